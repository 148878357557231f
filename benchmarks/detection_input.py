"""Detection input: padding waste of canvas sets, and the host pipeline's rate.

Two parts:

* `--padding [--annotations instances_*.json]`: pixels the model computes
  per real image pixel (sum of canvas areas / sum of resized image areas)
  when every image is padded into the smallest canvas of a set that holds it,
  at train scales (the mean over the six short sides 640..800, long side at
  most 1333) and at the test scale (800). Image sizes come from an
  instances file (COCO's or the digit scenes') or, without one, from a
  SYNTHETIC size list standing in for COCO's (stated below: typical COCO
  sizes and assumed shares, not measured from COCO's file, which this
  machine does not have). Candidate sets: one 1344 x 1344 square, the
  canvases of `inputs.propose_canvases` for the short sides (800,),
  (704, 800), (672, 736, 800) and all six, with the number of canvases
  (compilations) each needs.
* `--rate`: images per second on one core (one thread) for decode only and
  for the whole training example (decode, resize, flip, pad, ground truth,
  box-local masks), on the digit scenes (128 px, M = 32) and on a synthetic
  COCO-sized set (640 x 480 and 480 x 640 JPEGs, 7 random polygon instances
  each, M = 112) written to a temporary COCO-layout folder.

Usage:
  python -m benchmarks.detection_input --padding [--annotations FILE] [--canvases "((H, W), ...)"]
  python -m benchmarks.detection_input --rate [--seconds 3]
"""

import argparse
import ast
import json
import os
import tempfile
import time

import ml_collections
import numpy as np
from PIL import Image

from mcl_jax.detection import coco as coco_lib
from mcl_jax.detection import inputs, scenes

TRAIN_SHORT = (640, 672, 704, 736, 768, 800)
TEST_SHORT, MAX_LONG = 800, 1333
# SYNTHETIC stand-in for COCO's (w, h) distribution: typical sizes and assumed shares.
SYNTHETIC_COCO_SIZES = (
    ((640, 480), 0.40), ((480, 640), 0.12), ((640, 427), 0.16), ((427, 640), 0.06),
    ((640, 425), 0.03), ((640, 640), 0.03), ((640, 360), 0.04), ((360, 640), 0.01),
    ((500, 375), 0.03), ((375, 500), 0.01), ((640, 512), 0.03), ((612, 612), 0.02),
    ((640, 400), 0.02), ((640, 338), 0.02), ((512, 640), 0.01),
    ((640, 240), 0.01))


def waste(sizes, weights, canvases, short_sides) -> float:
  """Sum of canvas areas / sum of resized areas, averaged over the short sides."""
  ratios = []
  for s in short_sides:
    real = padded = 0.0
    for (w, h), p in zip(sizes, weights):
      nh, nw = inputs.resize_shape(h, w, s, MAX_LONG)
      ch, cw = inputs.choose_canvas((nh, nw), canvases)
      real += p * nh * nw
      padded += p * ch * cw
    ratios.append(padded / real)
  return float(np.mean(ratios))


def sizes_from(path):
  with open(path) as f:
    images = json.load(f)['images']
  counts = {}
  for im in images:
    counts[(im['width'], im['height'])] = counts.get((im['width'], im['height']), 0) + 1
  sizes = sorted(counts)
  return sizes, np.array([counts[s] for s in sizes], np.float64) / len(images)


def padding_report(annotations=None, extra=None):
  if annotations:
    sizes, weights = sizes_from(annotations)
    source = f'{annotations}: {len(sizes)} distinct sizes'
  else:
    sizes = [s for s, _ in SYNTHETIC_COCO_SIZES]
    weights = np.array([p for _, p in SYNTHETIC_COCO_SIZES])
    weights = weights / weights.sum()
    source = 'SYNTHETIC COCO-like size list (typical sizes, assumed shares)'
  print(f'image sizes: {source}')
  sets = {'square 1344': ((1344, 1344),)}
  for shorts in ((800,), (704, 800), (672, 736, 800), TRAIN_SHORT):
    sets[f'propose_canvases{shorts}'] = inputs.propose_canvases(shorts)
  if extra:
    sets['--canvases'] = inputs.check_canvas_sizes(extra)
  print(f'{"canvas set":<45} {"canvases":>8} {"train":>7} {"test":>7}')
  for name, canvases in sets.items():
    tr = waste(sizes, weights, canvases, TRAIN_SHORT)
    te = waste(sizes, weights, canvases, (TEST_SHORT,))
    print(f'{name:<45} {len(canvases):>8} {tr:7.3f} {te:7.3f}')
  print('chosen for COCO: propose_canvases((704, 800)) =', inputs.propose_canvases((704, 800)))


# --------------------------------------------------------------------- rate --


def _polygon(rng, w, h):
  """A random star-shaped polygon inside the image: [x0, y0, x1, y1, ...]."""
  r = np.exp(rng.uniform(np.log(8), np.log(min(w, h) / 2.5)))
  cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
  angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(8, 17))))
  radii = r * rng.uniform(0.5, 1.0, len(angles))
  return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).ravel()


def make_coco_like(root: str, num: int, seed: int = 0, instances: int = 7) -> str:
  """Writes ROOT/train2017/*.jpg + annotations/instances_train2017.json (synthetic)."""
  from pycocotools import mask as mask_util  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, 'train2017'), exist_ok=True)
  os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
  images, anns = [], []
  for i in range(num):
    w, h = (640, 480) if i % 4 else (480, 640)
    coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float64)
    pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
    name = f'{i + 1:012d}.jpg'
    Image.fromarray(pixels).save(os.path.join(root, 'train2017', name), quality=90)
    images.append({'id': i + 1, 'file_name': name, 'height': h, 'width': w})
    for _ in range(instances):
      poly = _polygon(rng, w, h)
      rle = mask_util.merge(mask_util.frPyObjects([poly.tolist()], h, w))
      x, y, bw, bh = mask_util.toBbox(rle).tolist()
      anns.append({'id': len(anns) + 1, 'image_id': i + 1, 'category_id': int(rng.integers(1, 81)),
                   'bbox': [x, y, bw, bh], 'area': float(mask_util.area(rle)), 'iscrowd': 0,
                   'segmentation': [poly.tolist()]})
  cats = [{'id': k, 'name': f'class{k}'} for k in range(1, 81)]
  with open(os.path.join(root, 'annotations', 'instances_train2017.json'), 'w') as f:
    json.dump({'images': images, 'annotations': anns, 'categories': cats}, f)
  return root


def _rate(fn, ids, seconds):
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    fn(ids[n % len(ids)])
    n += 1
  return n / (time.perf_counter() - t0)


def rate_report(seconds: float):
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    digit_root = scenes.ensure_scenes(scenes.scene_config(num_train=64, num_val=8), tmp)
    coco_root = make_coco_like(os.path.join(tmp, 'coco'), 32)
    cases = (
        ('digit scenes 128 px, M=32', digit_root,
         dict(train_short_sides=(96, 112, 128), max_long_side=213, canvas_sizes=((128, 128),),
              mask_size=32, max_gt=16)),
        ('synthetic COCO 640x480, 7 polygons, M=112', coco_root,
         dict(train_short_sides=TRAIN_SHORT, max_long_side=MAX_LONG,
              canvas_sizes=inputs.propose_canvases((704, 800)), mask_size=112, max_gt=100)))
    for name, root, data in cases:
      data_cfg = ml_collections.ConfigDict({**data, 'flip_p': 0.5, 'test_short_side': 800})
      split = coco_lib.load_split(root, 'train2017')
      ids = list(split.train_ids)
      rng = np.random.default_rng(0)

      def full(i, split=split, data_cfg=data_cfg, rng=rng):
        info = split.image_info(i)
        short = int(rng.choice(data_cfg.train_short_sides))
        nh, nw = inputs.resize_shape(info['height'], info['width'], short,
                                     data_cfg.max_long_side)
        canvas = inputs.choose_canvas((nh, nw), data_cfg.canvas_sizes)
        return inputs.prepare_example(split, i, short, bool(rng.random() < 0.5), canvas,
                                      data_cfg)

      decode = _rate(split.load_image, ids, seconds)
      whole = _rate(full, ids, seconds)
      rows.append((name, decode, whole))
  print(f'{"set (one thread)":<45} {"decode img/s":>12} {"full img/s":>11} {"full/decode":>11}')
  for name, d, f in rows:
    print(f'{name:<45} {d:12.1f} {f:11.1f} {f / d:11.2f}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--padding', action='store_true')
  parser.add_argument('--annotations', default=None, help='an instances_*.json for --padding')
  parser.add_argument('--canvases', default=None,
                      help='one more canvas set for --padding, e.g. "((800, 1344), (1344, 800))"')
  parser.add_argument('--rate', action='store_true')
  parser.add_argument('--seconds', type=float, default=3.0)
  args = parser.parse_args()
  if not (args.padding or args.rate):
    parser.error('give --padding and/or --rate')
  if args.padding:
    extra = ast.literal_eval(args.canvases) if args.canvases else None
    padding_report(args.annotations, extra)
  if args.rate:
    rate_report(args.seconds)


if __name__ == '__main__':
  main()
