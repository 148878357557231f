"""The run's metrics: console lines, TensorBoard scalars and WORKDIR/metrics.jsonl.

Owns metrics.jsonl: `MetricWriter` appends one line per step, and
`truncate_metrics` cuts it back to a restored step when a run resumes.

Locally every line is written and flushed at once, as to any file. On a
gs:// workdir (GCS has no appends: mcl_jax.append_log.AppendFile) the lines are
uploaded in batches by a background thread every CLOUD_FLUSH_S seconds, and
by the training loop before each checkpoint is saved (`MetricWriter.flush`),
so that a checkpoint never covers a step whose line is not in the bucket.
The TensorBoard events are uploaded by tensorboardX's own writer thread,
every CLOUD_FLUSH_S seconds on gs:// (locally it writes every 120 s, as
before), and when the writer closes.
"""

import json
import time

from absl import logging
import jax
import numpy as np

from mcl_jax import append_log, paths

METRICS_FILE = 'metrics.jsonl'
# gs:// logs: one upload per file this often in the background (GCS takes
# about one update per second per object; each upload sends only the new
# bytes).
CLOUD_FLUSH_S = 30.0


class MetricWriter:
  """Writes metrics on process 0: a log line when console=True; every call to the files."""

  def __init__(self, workdir: str, num_steps: int, global_batch: int):
    self.num_steps, self.global_batch = num_steps, global_batch
    self.active = jax.process_index() == 0
    self._t0, self._step0 = None, None
    self._tb = self._jsonl = None
    if self.active:
      self._jsonl = append_log.AppendFile(paths.join(workdir, METRICS_FILE),
                                     background_s=CLOUD_FLUSH_S,
                                     on_error=lambda e: logging.warning('%s', e))
      try:
        from tensorboardX import SummaryWriter
        if paths.is_cloud(workdir):
          _tensorboard_to_gcs()
        self._tb = SummaryWriter(workdir, flush_secs=int(CLOUD_FLUSH_S) if
                                 paths.is_cloud(workdir) else 120)
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
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, v, step)
    if console:
      levels = ' '.join(f'{metrics[k]:.3f}' for k in sorted(metrics)
                        if k.startswith('loss_level'))
      eta = (self.num_steps - step) * self.global_batch / rate if rate > 0 else float('nan')
      line = (f'step {step}/{self.num_steps}  loss {metrics["loss"]:.4f} [{levels}]  '
              f'lr {metrics["lr"]:.4g}  m {metrics.get("target_momentum", 0.0):.5f}  '
              f'{rate:.1f} img/s  ETA {hms(eta)}')
      # One line: the console shows this project's INFO (mcl_jax.cli), and
      # the log file keeps it with the rest.
      logging.info('%s', line)

  def flush(self):
    """Makes every metrics line written so far durable (gs://: uploads them).

    Called before each checkpoint is saved. Raises paths.StorageError if the
    upload fails: the checkpoint must not be saved then.
    """
    if self._jsonl:
      self._jsonl.flush()

  def close(self):
    if self._jsonl:
      try:
        self._jsonl.close()
      except paths.StorageError as e:  # not covered by a checkpoint: those steps rerun
        logging.warning('%s', e)
    if self._tb is not None:
      self._tb.close()


def hms(seconds: float) -> str:
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
  path = paths.join(workdir, METRICS_FILE)
  if jax.process_index() != 0 or not paths.exists(path):
    return 0
  lines = paths.read_text(path).splitlines()
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


class _TensorBoardFile:
  """tensorboardX's event-file target on gs://: a append_log.AppendFile.

  tensorboardX writes the records and calls flush() from its own thread
  every flush_secs and on SummaryWriter.flush/close; each flush appends only
  the records since the last one. A failed upload is logged and retried at
  the next flush (raising would stop tensorboardX's writer thread, and its
  full queue would then block training).

  Attributes:
    file: the AppendFile (its `uploads` and `bytes_uploaded`).
  """

  def __init__(self, path: str):
    self.file = append_log.AppendFile(path, binary=True)
    self._failing = False
    _TENSORBOARD_FILES.append(self)

  def write(self, data: bytes):
    self.file.write(data)

  def flush(self):
    try:
      self.file.flush()
      self._failing = False
    except paths.StorageError as e:
      if not self._failing:
        logging.warning('TensorBoard events: %s', e)
      self._failing = True

  def close(self):
    self.flush()


# The gs:// event files opened in this process (benchmarks/cloud_io.py reads
# their upload counts).
_TENSORBOARD_FILES = []


class _TensorBoardFactory:
  """tensorboardX's writer factory for the 'gs' prefix (record_writer registry)."""

  def open(self, path):
    return _TensorBoardFile(path)

  def directory_check(self, path):
    del path  # GCS has no folders to make


def _tensorboard_to_gcs():
  """Routes tensorboardX's gs:// event files through mcl_jax.paths.

  tensorboardX's own gs:// writer (google-cloud-storage) uploads the whole
  event file again at every flush, so its uploads grow with the run; this
  one sends only the new records.
  """
  from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel
  record_writer.register_writer_factory('gs', _TensorBoardFactory())
