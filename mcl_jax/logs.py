"""Console, TensorBoard and JSON-lines metrics, and the montage preview PNG."""

import json
import os
import time

from absl import logging
import jax
import numpy as np


class MetricWriter:
  """Writes metrics on process 0: console every call with console=True, all to files."""

  def __init__(self, workdir: str, num_steps: int, global_batch: int):
    self.num_steps, self.global_batch = num_steps, global_batch
    self.active = jax.process_index() == 0
    self._t0, self._step0 = None, None
    self._tb = self._jsonl = None
    if self.active:
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
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
      logging.info(line)
      print(line, flush=True)

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


def montage_canvases(config, crops_u8, key, max_canvases: int = 4):
  """Augmented montage canvases of both views of the first montage group.

  Returns {view: [level][canvas] float images in [0, 1]}.
  """
  from mcl_jax import augment, model as model_lib, train
  layout = train.layout_for(config)
  group = np.asarray(jax.device_get(crops_u8[:layout.group_size]))
  crops = augment.augment_crops(group, key, config.augment, config.data.num_crops)
  out = {}
  for view in (0, 1):
    canvases, _ = model_lib.view_canvases(crops, view, layout, key, None,
                                          config.montage.downsample)
    canvases = np.asarray(augment.denormalize(canvases, config.augment))
    levels, start = [], 0
    for block in layout.blocks:
      levels.append(canvases[start:start + min(block.count, max_canvases)])
      start += block.count
    out['qk'[view]] = levels
  return out


def write_montage_png(config, crops_u8, workdir: str, name: str = 'montage.png'):
  """Writes a PNG of a few canvases per level of both views (process 0)."""
  if jax.process_index() != 0:
    return
  from PIL import Image
  views = montage_canvases(config, crops_u8, jax.random.key(config.seed))
  rows = []
  for view in ('q', 'k'):
    for level in views[view]:
      rows.append(np.concatenate(list(level), axis=1))
  width = max(r.shape[1] for r in rows)
  rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=1.0)
          for r in rows]
  img = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).astype(np.uint8)
  path = os.path.join(workdir, name)
  Image.fromarray(img).save(path)
  logging.info('Wrote %s (rows: view q levels 0..%d, then view k)', path, len(views['q']) - 1)
