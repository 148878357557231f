"""The run's metrics: console lines, TensorBoard scalars and WORKDIR/metrics.jsonl.

Owns metrics.jsonl: `MetricWriter` appends one line per step, and
`truncate_metrics` cuts it back to a restored step when a run resumes.
"""

import json
import os
import time

from absl import logging
import jax
import numpy as np

from mcl_jax import paths

METRICS_FILE = 'metrics.jsonl'


class MetricWriter:
  """Writes metrics on process 0: a log line when console=True; every call to the files."""

  def __init__(self, workdir: str, num_steps: int, global_batch: int):
    self.num_steps, self.global_batch = num_steps, global_batch
    self.active = jax.process_index() == 0
    self._t0, self._step0 = None, None
    self._tb = self._jsonl = None
    if self.active:
      self._jsonl = open(os.path.join(workdir, METRICS_FILE), 'a')
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(workdir)
      except ImportError:
        logging.warning('tensorboardX is not installed: no TensorBoard scalars.')

  def write(self, step: int, metrics: dict, console: bool = True):
    """Logs `metrics` of the step that ends at `step` (1-based count of steps done)."""
    now = time.perf_counter()
    if self._t0 is None:  # the first step includes compilation: rate from the next one
      self._t0, self._step0 = now, step
    rate = (step - self._step0) * self.global_batch / max(now - self._t0, 1e-9)
    metrics = dict(metrics, images_per_sec=rate)
    if not self.active:
      return
    self._jsonl.write(json.dumps({'step': step, **metrics}) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, v, step)
    if console:
      levels = ' '.join(f'{metrics[k]:.3f}' for k in sorted(metrics)
                        if k.startswith('loss_level'))
      eta = (self.num_steps - step) * self.global_batch / rate if rate > 0 else float('nan')
      line = (f'step {step}/{self.num_steps}  loss {metrics["loss"]:.4f} [{levels}]  '
              f'lr {metrics["lr"]:.4g}  m {metrics.get("target_momentum", 0.0):.5f}  '
              f'{rate:.1f} img/s  ETA {_hms(eta)}')
      # One line: the console shows this project's INFO (mcl_jax.cli), and
      # the log file keeps it with the rest.
      logging.info('%s', line)

  def close(self):
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _hms(seconds: float) -> str:
  if not np.isfinite(seconds):
    return '--:--:--'
  s = int(seconds)
  return f'{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}'


def truncate_metrics(workdir: str, step: int) -> int:
  """Drops the lines of steps after `step` (and unparsable ones) from metrics.jsonl.

  Called when a run (re)starts from the checkpoint of `step`: the steps after
  it are trained again and logged again, so each step keeps exactly one line,
  the one of the run that is continued. A line cut short by a kill is dropped
  too. Process 0 only; returns the number of lines dropped.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if jax.process_index() != 0 or not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.read().splitlines()
  keep = []
  for line in lines:
    try:
      if int(json.loads(line)['step']) <= step:
        keep.append(line)
    except (ValueError, KeyError, TypeError):
      pass
  dropped = len(lines) - len(keep)
  if dropped:
    paths.write_atomic(path, ''.join(l + '\n' for l in keep))
    logging.info('%s: dropped %d line(s) after step %d (they are logged again).',
                 path, dropped, step)
  return dropped
