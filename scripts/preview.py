"""Writes a PNG grid of the augmented crops of a few training images.

One row per image, one column per crop: crops 0-3 (view A) left of a wider
gap, crops 4-7 (view B) right of it, after the host crop and the device
augmentation, de-normalised. Quick visual check of the input pipeline:

  python scripts/preview.py --config=configs/mcl_100ep.py \
      --config.data.source=digits --out=/tmp/crops.png
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
from PIL import Image

from mcl_jax import augment
from mcl_jax import input_pipeline
from mcl_jax import logs

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/mcl_100ep.py', 'Training config file.')
_OUT = flags.DEFINE_string('out', 'crops_preview.png', 'PNG to write.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 4, 'Rows (images) to show.')
_SEED = flags.DEFINE_integer('seed', 0, 'Data and augmentation seed.')


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


def crops_grid_png(crops_float01, path: str, **kwargs) -> None:
  """Writes `grid_image(crops_float01)` to `path` as a PNG.

  Args:
    crops_float01: [n, num_crops, S, S, 3] floats in [0, 1].
    path: output file; parent folders are created.
    **kwargs: passed to `grid_image` (gap, view_gap).
  """
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  Image.fromarray(grid_image(crops_float01, **kwargs)).save(path, 'PNG')


def augmented_crops(config, num_images: int, seed: int) -> np.ndarray:
  """First batch of the configured source, augmented and de-normalised.

  Returns:
    float32 [num_images, num_crops, S, S, 3] in [0, 1].
  """
  it = input_pipeline.create_train_iterator(
      config.data, global_batch=num_images, seed=seed, process_index=0,
      process_count=1)
  batch = next(it)
  out = augment.augment_crops(batch['crops'], jax.random.key(seed),
                              config.augment, num_crops=config.data.num_crops)
  return np.asarray(augment.denormalize(out, config.augment))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  crops = augmented_crops(_CONFIG.value, _NUM_IMAGES.value, _SEED.value)
  crops_grid_png(crops, _OUT.value)
  print(f'wrote {_OUT.value}: {crops.shape[0]} images x {crops.shape[1]} '
        'crops (view A | view B)')
  # The montages of one group, built from the same source (both views, levels 0..3).
  config = _CONFIG.value
  it = input_pipeline.create_train_iterator(
      config.data, global_batch=config.montage.group_size, seed=_SEED.value,
      process_index=0, process_count=1)
  root, ext = os.path.splitext(_OUT.value)
  logs.write_montage_png(config, next(it)['crops'], os.path.dirname(os.path.abspath(_OUT.value)),
                         name=os.path.basename(root) + '_montage' + (ext or '.png'))
  print(f'wrote {root}_montage{ext or ".png"}: canvases per level, view q then view k')


if __name__ == '__main__':
  app.run(main)
