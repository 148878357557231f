"""Pictures of what the network sees: augmented crops and montage canvases.

Owns the two PNGs of the project: the crop grid (8 crops per image, after
the host crop and the device augmentation) and the montage canvases of one
group per level and view (written to WORKDIR/montage.png at the start of a
run). The command line is `python -m mcl_jax.visualize`
(mcl_jax/visualize.py).
"""

import io

from absl import logging
import jax
import numpy as np

from mcl_jax import paths
from mcl_jax.data import augment
from mcl_jax.pretext import montage, objective


def grid_image(crops_float01, gap: int = 2, view_gap: int = 8) -> np.ndarray:
  """Lays out [n, c, S, S, 3] crops in [0, 1] as one uint8 image.

  Args:
    crops_float01: n rows of c crops each, values in [0, 1].
    gap: white pixels between crops.
    view_gap: white pixels between the two views (after column c // 2).

  Returns:
    uint8 [H, W, 3] grid.
  """
  crops = np.clip(np.asarray(crops_float01, np.float32), 0.0, 1.0)
  n, c, h, w, _ = crops.shape
  half = c // 2
  x0 = [j * (w + gap) + (view_gap - gap if j >= half > 0 else 0)
        for j in range(c)]
  width = x0[-1] + w
  height = n * h + (n - 1) * gap
  canvas = np.full((height, width, 3), 255, np.uint8)
  for i in range(n):
    for j in range(c):
      y = i * (h + gap)
      canvas[y:y + h, x0[j]:x0[j] + w] = np.rint(crops[i, j] * 255)
  return canvas


def png_bytes(img_uint8: np.ndarray) -> bytes:
  """The PNG file of a uint8 [H, W, 3] image."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO()
  Image.fromarray(img_uint8).save(buf, 'PNG')
  return buf.getvalue()


def save_png(img_uint8: np.ndarray, path: str):
  """Writes a uint8 [H, W, 3] image to `path` (local or gs://) as a PNG, in one piece
  (local parents created)."""
  paths.makedirs(paths.dirname(paths.abspath(path)))
  paths.write_atomic(path, png_bytes(img_uint8))


def crops_grid_png(crops_float01, path: str, **kwargs) -> None:
  """Writes `grid_image(crops_float01)` to `path` as a PNG (parents created).

  Args:
    crops_float01: [n, num_crops, S, S, 3] floats in [0, 1].
    path: output file.
    **kwargs: passed to `grid_image` (gap, view_gap).
  """
  save_png(grid_image(crops_float01, **kwargs), path)


def augmented_crops(config, crops_u8, key) -> np.ndarray:
  """The device augmentation of host crops, de-normalised to [0, 1] floats."""
  out = augment.augment_crops(crops_u8, key, config.augment, config.data.num_crops)
  return np.asarray(augment.denormalize(out, config.augment))


def montage_canvases(config, crops_u8, key, max_canvases: int = 4):
  """Augmented montage canvases of both views of the first montage group.

  Returns {view: [level][canvas] float images in [0, 1]}.
  """
  layout = montage.layout_for(config)
  group = _first_local_rows(crops_u8, layout.group_size)
  crops = augment.augment_crops(group, key, config.augment, config.data.num_crops)
  out = {}
  for view in (0, 1):
    canvases, _ = objective.view_canvases(crops, view, layout, key, None,
                                          config.montage.downsample)
    canvases = np.asarray(augment.denormalize(canvases, config.augment))
    levels, start = [], 0
    for block in layout.blocks:
      levels.append(canvases[start:start + min(block.count, max_canvases)])
      start += block.count
    out['qk'[view]] = levels
  return out


def _first_local_rows(x, n: int) -> np.ndarray:
  """The first `n` rows of `x` that this process holds, as NumPy.

  In a multi-process run the batch is a global array that no one process
  holds whole: slicing it from process 0 alone runs an all-gather that the
  other processes never join, and their next collective (the train step's)
  then receives its data and fails. Process 0's own rows are as good a
  picture.
  """
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(jax.device_get(x[:n]))
  rows = {}
  for shard in x.addressable_shards:  # one entry per row block (replicas repeat it)
    rows.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([np.asarray(rows[k]) for k in sorted(rows)])[:n]


def montage_image(config, crops_u8, key) -> np.ndarray:
  """uint8 picture of a few canvases per level: view q's levels, then view k's."""
  views = montage_canvases(config, crops_u8, key)
  rows = [np.concatenate(list(level), axis=1) for view in ('q', 'k') for level in views[view]]
  width = max(r.shape[1] for r in rows)
  rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=1.0)
          for r in rows]
  return (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).astype(np.uint8)


def write_montage_png(config, crops_u8, path: str):
  """Writes `montage_image` of the first group of a batch to `path` (process 0)."""
  if jax.process_index() != 0:
    return
  save_png(montage_image(config, crops_u8, jax.random.key(config.seed)), path)
  logging.info('Wrote %s (rows: view q levels 0..%d, then view k)', path,
               len(config.loss.level_weights) - 1)
