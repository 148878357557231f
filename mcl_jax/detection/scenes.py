"""Digit instance scenes: a small detection dataset in COCO's folder layout.

No download: scikit-learn's 8x8 digits are pasted as instances onto textured
colour canvases and written as a real COCO-layout folder, which the rest of
the detection layer reads exactly as it reads COCO::

  ROOT/train2017/000000000001.png ...
  ROOT/val2017/...
  ROOT/annotations/instances_train2017.json, instances_val2017.json

Each digit is one instance of category 1..10 (named '0'..'9'): a digit of
side s is its 8x8 image upsampled bilinearly to s x s; its mask is its ink
(upsampled intensity >= half of full ink), its bbox the mask's tight box
[x, y, w, h], its area the mask's pixel count, its segmentation the mask's
RLE (pycocotools), iscrowd 0. The ink is alpha-blended in a random bright
colour over a background of smooth colour blobs and a sinusoidal grating
(the dense probe's scene style), then uniform noise covers the canvas.
Digits of one scene do not overlap (their squares are disjoint; a digit that
finds no free place after a few tries is left out).

Training scenes use the pretraining's training digits and validation scenes
only its held-out digits (`mcl_jax.data.digits.digits_arrays`), so the
fine-tuned detector is scored on digits pretraining never saw.

Object sizes: COCO's small / medium / large edges (32^2 and 96^2 px of area)
are meant for images of about 640 px. A scene of S px scales them by
(S / 640)^2: for S = 128 the edges are 6.4^2 and 19.2^2 px of mask area.
A digit's ink covers about 30% of its square, so at 128 px a side below
about 12 px is small and one above about 35 px large; the default sides
(8..48 px, log-uniform) put roughly 20 / 60 / 20% of the digits in the three
bins. The edges are written into the annotation file (`info.area_ranges`),
and `coco.load_split` hands them to `coco_eval.evaluate`, which passes them
to COCOeval in place of COCO's.

Settings (`config.data.scenes`): num_train, num_val, image_size,
digits_per_scene (min, max), sides (min, max), seed, heldout_fraction.
`ensure_scenes` writes a folder once per settings (the folder name carries a
hash of them) and reuses it afterwards.
"""

import hashlib
import io
import json
import os
import shutil
import uuid

import ml_collections
import numpy as np

from mcl_jax import paths
from mcl_jax.data import segmentation
from mcl_jax.data.digits import digits_arrays
from mcl_jax.errors import UsageError

SPLITS = ('train2017', 'val2017')
MARKER = 'SCENES_COMPLETE.json'
CATEGORY_NAMES = tuple(str(d) for d in range(10))
# COCO's small / medium area edges, for images of COCO_SIDE px.
COCO_AREA_EDGES = (32 ** 2, 96 ** 2)
COCO_SIDE = 640
INK_THRESHOLD = 0.5  # fraction of full ink that counts as the digit's mask
NOISE = 12
PLACEMENT_TRIES = 30
_FIELDS = ('num_train', 'num_val', 'image_size', 'digits_per_scene', 'sides', 'seed',
           'heldout_fraction')


def scene_config(**overrides) -> ml_collections.ConfigDict:
  """The default settings (the 128 px demo's), with `overrides` applied."""
  c = ml_collections.ConfigDict()
  c.num_train = 2000
  c.num_val = 500
  c.image_size = 128
  c.digits_per_scene = (2, 6)
  c.sides = (8, 48)
  c.seed = 0
  c.heldout_fraction = 0.2  # the pretraining's digits split (configs: digits_heldout_fraction)
  for k, v in overrides.items():
    if k not in _FIELDS:
      raise UsageError(f'config.data.scenes has no field {k!r} (fields: {", ".join(_FIELDS)})')
    c[k] = v
  return c


def easy_scene_config(num_train: int = 64, num_val: int = 16,
                      seed: int = 0) -> ml_collections.ConfigDict:
  """A few large, well separated digits (1-2 of 22-32 px on a 64 px canvas): tests."""
  return scene_config(num_train=num_train, num_val=num_val, image_size=64,
                      digits_per_scene=(1, 2), sides=(22, 32), seed=seed)


def _settings(scene_cfg) -> dict:
  """The settings as plain JSON values (accepts config.data or config.data.scenes)."""
  if 'scenes' in scene_cfg:
    scene_cfg = scene_cfg.scenes
  s = {k: scene_cfg[k] for k in _FIELDS}
  s = {k: [int(x) for x in v] if isinstance(v, (tuple, list)) else v for k, v in s.items()}
  s['heldout_fraction'] = float(s['heldout_fraction'])
  for k in ('num_train', 'num_val', 'image_size', 'seed'):
    s[k] = int(s[k])
  lo, hi = s['sides']
  if not 4 <= lo <= hi <= s['image_size']:
    raise UsageError(f'config.data.scenes.sides {tuple(s["sides"])} must be ordered, at least '
                     f'4 px and at most image_size {s["image_size"]}')
  if not 0 <= s['digits_per_scene'][0] <= s['digits_per_scene'][1]:
    raise UsageError(f'config.data.scenes.digits_per_scene {tuple(s["digits_per_scene"])} must '
                     'be an ordered (min, max) pair')
  return s


def area_ranges(image_size: int) -> list:
  """COCOeval's areaRng (all, small, medium, large) scaled to an S px scene."""
  f = (image_size / COCO_SIDE) ** 2
  s, m = COCO_AREA_EDGES[0] * f, COCO_AREA_EDGES[1] * f
  return [[0.0, 1e10], [0.0, s], [s, m], [m, 1e10]]


def size_bin(area: float, ranges) -> int:
  """0 small, 1 medium, 2 large for a mask area under `area_ranges(...)`."""
  return int(np.searchsorted([ranges[1][1], ranges[2][1]], area, side='left'))


# ------------------------------------------------------------------ drawing --


def _background(rng, size: int) -> np.ndarray:
  """Smooth colour blobs plus an oriented grating, float [size, size, 3] in ~5..90."""
  w = segmentation.linear_weights(4, size)
  blobs = np.stack([w @ f @ w.T for f in rng.normal(size=(3, 4, 4))], -1)
  yy, xx = np.arange(size)[:, None], np.arange(size)[None, :]
  angle, period = rng.uniform(0, np.pi), rng.uniform(6, 16) * size / 64
  phase = rng.uniform(0, 2 * np.pi)
  grating = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)
  return 45.0 + 22.0 * np.clip(blobs, -1.5, 1.5) + 12.0 * grating[..., None]


def _place(rng, size: int, side: int, taken: list) -> tuple[int, int] | None:
  """A top-left corner whose side x side square overlaps no square in `taken`."""
  for _ in range(PLACEMENT_TRIES):
    y0, x0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
    if all(y0 >= ty + ts or ty >= y0 + side or x0 >= tx + ts or tx >= x0 + side
           for ty, tx, ts in taken):
      return y0, x0
  return None


def render_scene(rng, digit_images, digit_labels, settings: dict):
  """One scene: (uint8 [S, S, 3] image, [(class 0..9, bool mask [S, S])...])."""
  size = settings['image_size']
  lo, hi = np.log(settings['sides'][0]), np.log(settings['sides'][1])
  canvas = _background(rng, size)
  taken, instances = [], []
  n_lo, n_hi = settings['digits_per_scene']
  for _ in range(int(rng.integers(n_lo, n_hi + 1))):
    row = int(rng.integers(len(digit_images)))
    side = int(np.clip(np.rint(np.exp(rng.uniform(lo, hi))), *settings['sides']))
    colour = rng.uniform(150, 255, 3)
    corner = _place(rng, size, side, taken)
    if corner is None:
      continue
    y0, x0 = corner
    taken.append((y0, x0, side))
    alpha = np.clip(segmentation.resize_digit(digit_images[row], side) / 255.0, 0, 1)
    window = np.s_[y0:y0 + side, x0:x0 + side]
    canvas[window] = canvas[window] * (1 - alpha[..., None]) + colour * alpha[..., None]
    mask = np.zeros((size, size), bool)
    mask[window] = alpha >= INK_THRESHOLD
    if mask.any():
      instances.append((int(digit_labels[row]), mask))
  canvas += rng.uniform(-NOISE, NOISE, canvas.shape)
  return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), instances


def _annotation(mask: np.ndarray, category_id: int, image_id: int, ann_id: int) -> dict:
  from pycocotools import mask as mask_util  # pylint: disable=import-outside-toplevel
  ys, xs = np.nonzero(mask)
  x0, y0 = int(xs.min()), int(ys.min())
  rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {'id': ann_id, 'image_id': image_id, 'category_id': category_id,
          'bbox': [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
          'area': int(mask.sum()), 'iscrowd': 0,
          'segmentation': {'size': [int(v) for v in rle['size']],
                           'counts': rle['counts'].decode('ascii')}}


def _png(image: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG')
  return buf.getvalue()


def generate_split(settings: dict, split: str, write):
  """Renders one split; `write(relative path, bytes)` stores each file."""
  images8, labels, digit_splits = digits_arrays(settings['heldout_fraction'])
  rows = digit_splits['train' if split == SPLITS[0] else 'heldout']
  num = settings['num_train' if split == SPLITS[0] else 'num_val']
  # Train and val scenes draw from separate streams of the one seed.
  rng = np.random.default_rng([settings['seed'], SPLITS.index(split)])
  size = settings['image_size']
  images, annotations = [], []
  for i in range(num):
    image_id = i + 1
    image, instances = render_scene(rng, images8[rows], labels[rows], settings)
    name = f'{image_id:012d}.png'
    write(f'{split}/{name}', _png(image))
    images.append({'id': image_id, 'file_name': name, 'height': size, 'width': size})
    for cls, mask in instances:
      annotations.append(_annotation(mask, cls + 1, image_id, len(annotations) + 1))
  info = {'description': f'digit scenes {split}', 'settings': settings,
          'area_ranges': area_ranges(size)}
  coco = {'info': info, 'images': images, 'annotations': annotations,
          'categories': [{'id': k + 1, 'name': n, 'supercategory': 'digit'}
                         for k, n in enumerate(CATEGORY_NAMES)]}
  write(f'annotations/instances_{split}.json', json.dumps(coco).encode())


def settings_hash(settings: dict) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def scenes_folder(scene_cfg, root: str) -> str:
  """Where `ensure_scenes` keeps the scenes of these settings under `root`."""
  return paths.join(root, f'digit_scenes_{settings_hash(_settings(scene_cfg))}')


def _complete(folder: str, digest: str) -> bool:
  marker = paths.join(folder, MARKER)
  if not paths.isfile(marker):
    return False
  try:
    return json.loads(paths.read_text(marker)).get('hash') == digest
  except ValueError:
    return False


def ensure_scenes(scene_cfg, root: str) -> str:
  """Writes the scenes of these settings under `root` once; returns their folder.

  Args:
    scene_cfg: `config.data.scenes` (or `config.data`, whose `scenes` is used).
    root: the parent folder (local or gs://).

  Returns:
    ROOT/digit_scenes_<hash of the settings>, a COCO-layout folder. A folder
    with a matching marker is reused as it is. Locally the scenes are written
    to a temporary folder and renamed into place (a kill leaves no half
    folder; of concurrent writers one rename wins). On gs:// every file is
    one upload and the marker is written last.
  """
  settings = _settings(scene_cfg)
  digest = settings_hash(settings)
  folder = paths.join(root, f'digit_scenes_{digest}')
  if _complete(folder, digest):
    return folder
  paths.makedirs(root)
  cloud = paths.is_cloud(root)
  target = folder if cloud else paths.join(root, f'.tmp-{uuid.uuid4().hex}')

  def write(rel, data):
    path = paths.join(target, *rel.split('/'))
    paths.makedirs(paths.dirname(path))
    if cloud:
      paths.write_atomic(path, data)
    else:
      with open(path, 'wb') as f:
        f.write(data)

  try:
    for split in SPLITS:
      generate_split(settings, split, write)
    write(MARKER, json.dumps({'hash': digest, 'settings': settings}).encode())
    if not cloud and not _complete(folder, digest):  # another writer may have finished
      if os.path.isdir(folder):
        shutil.rmtree(folder)  # an incomplete folder of the same name
      try:
        os.rename(target, folder)
      except OSError:
        if not _complete(folder, digest):  # not another writer's complete folder
          raise
  finally:
    if not cloud and os.path.isdir(target):
      shutil.rmtree(target)
  return folder
