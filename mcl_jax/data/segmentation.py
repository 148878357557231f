"""Segmentation data for the dense probe: digit scenes and a VOC-layout folder.

Both sources give a `SegmentationSet`: uint8 images [N, S, S, 3], uint8 class
labels [N, S, S] (255 = ignore) and a per-pixel object-size bin [N, S, S]
(0 small, 1 medium, 2 large, NO_OBJECT for background and ignored pixels),
which `dense_eval` uses for mIoU by object size.

* `digit_scenes` (no download): textured, noisy canvases with 2-6
  scikit-learn digits pasted at random positions and sides from 8 to 32 px
  (log-uniform, the sizes of the 32 px demo's montage tiles of levels 0-2).
  A digit is its whole 8x8 image (dark paper and bright ink, as the
  pretraining sees it) upsampled bilinearly to a square of its side, pasted
  gray over the background and labelled digit + 1 over the square; later
  digits occlude earlier ones; background = 0. (Labelling the ink alone was
  tried first: its 1-3 px strokes are below the stride-4 P2 resolution, so
  every model's probe predicted background almost everywhere.)
  Probe-train scenes draw digits from the pretraining split of
  `input_pipeline.digits_arrays(data.digits_heldout_fraction)`, probe-test
  scenes only from its held-out digits, which pretraining never saw. Size
  bins by the pasted side: small < 13 px <= medium < 21 px <= large (thirds
  of the log-uniform range 8..32).
* `voc`: Pascal VOC 2012 as kept on disk (README, "Dense probe"): images
  resized to a fixed short side (bilinear; masks nearest) and centre-cropped
  to a square. Objects are the instances of SegmentationObject/<id>.png when
  that file exists, else the connected components of each class; size bins
  by visible area as a fraction of the image: small < 1/300 <= medium < 3%
  <= large (COCO's 32^2 and 96^2 px on a 640 x 480 image).
"""

import dataclasses
import functools
import io
import os

import numpy as np

from mcl_jax import errors, paths

IGNORE = 255
NO_OBJECT = 255
SIZE_NAMES = ('small', 'medium', 'large')

# digit_scenes
SCENE_SIZE = 64
DIGIT_SIDES = (8, 32)
DIGITS_PER_SCENE = (2, 6)
NOISE = 12  # uniform pixel noise in [-NOISE, NOISE] over the whole scene
NUM_TRAIN_SCENES = 1000
NUM_TEST_SCENES = 500
DIGIT_CLASS_NAMES = ('background',) + tuple(str(d) for d in range(10))

# voc
VOC_SHORT_SIDE = 224
VOC_AREA_EDGES = (1 / 300, 0.03)
VOC_CLASS_NAMES = ('background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus',
                   'car', 'cat', 'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike',
                   'person', 'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor')


class SegmentationDataError(errors.RunError, ValueError):
  """Segmentation data that cannot be read (one line: which file, what is wrong)."""


@dataclasses.dataclass
class SegmentationSet:
  """One split of a segmentation dataset at probe resolution.

  Attributes:
    images: uint8 [N, S, S, 3] RGB.
    labels: uint8 [N, S, S] class indices, IGNORE (255) = not scored.
    size_bins: uint8 [N, S, S] object-size bin of each pixel (0 small,
      1 medium, 2 large), NO_OBJECT (255) for background / ignored pixels.
    ids: an id per image (file id or 'scene<i>').
    objects: digit scenes only: per scene, the pasted digits in paint order
      as (digit id, class, y0, x0, side); None for other sources.
  """
  images: np.ndarray
  labels: np.ndarray
  size_bins: np.ndarray
  ids: list
  objects: list | None = None

  def __len__(self):
    return len(self.images)


@dataclasses.dataclass
class ProbeData:
  """Train and test splits plus what the probe needs to know about them."""
  name: str
  train: SegmentationSet
  test: SegmentationSet
  num_classes: int
  class_names: tuple
  size_rule: str  # how objects are binned by size, for the report

  @property
  def image_size(self) -> int:
    return int(self.train.images.shape[1])


# ---------------------------------------------------------------- resizing --


@functools.lru_cache(maxsize=256)
def linear_weights(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] bilinear interpolation matrix (half-pixel centres, edges clamped).

  For upsampling, the same map as jax.image.resize(..., 'linear') and
  tf.image.resize(..., 'bilinear'). Cached: do not modify the result.
  """
  x = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
  x = np.clip(x, 0, n_in - 1)
  lo = np.floor(x).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  w = np.zeros((n_out, n_in))
  np.add.at(w, (np.arange(n_out), lo), 1 - (x - lo))
  np.add.at(w, (np.arange(n_out), hi), x - lo)
  return w


def resize_digit(image8: np.ndarray, side: int) -> np.ndarray:
  """An [h, w] image upsampled bilinearly (half-pixel centres) to float [side, side].

  The same interpolation as the pretraining pipeline's tf.image.resize
  (bilinear, no antialiasing when upsampling), without rounding.
  """
  h, w = image8.shape
  return linear_weights(h, side) @ image8.astype(np.float64) @ linear_weights(w, side).T


# ------------------------------------------------------------ digit scenes --


def _background(rng, size: int) -> np.ndarray:
  """A textured, colour background, float [size, size, 3] roughly in 5..90.

  Smooth colour blobs (4x4 random field per channel, upsampled) plus one
  oriented sinusoidal grating of random period (6-16 px) and phase.
  """
  w = linear_weights(4, size)
  blobs = np.stack([w @ f @ w.T for f in rng.normal(size=(3, 4, 4))], -1)
  yy, xx = np.arange(size)[:, None], np.arange(size)[None, :]
  angle, period, phase = rng.uniform(0, np.pi), rng.uniform(6, 16), rng.uniform(0, 2 * np.pi)
  grating = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)
  return 45.0 + 22.0 * np.clip(blobs, -1.5, 1.5) + 12.0 * grating[..., None]


def size_edges(sides=DIGIT_SIDES) -> tuple[int, int]:
  """The small / medium and medium / large edges: thirds of the log-side range.

  A side below the first edge is small, below the second medium. For the
  default 8..32 px these are 13 and 21; for 8..64 px, 16 and 32, so each bin
  holds one octave of tile sizes.
  """
  lo, hi = float(sides[0]), float(sides[1])
  # round() first: 8 * 8 ** (1/3) is 16.000000000000004 in floats, and a
  # bin edge must not move by an ulp.
  return tuple(int(np.ceil(round(lo * (hi / lo) ** (k / 3), 6))) for k in (1, 2))


def size_bin_of_side(side: int, edges) -> int:
  """0 small, 1 medium, 2 large (`edges` from `size_edges`)."""
  return int(np.searchsorted(edges, side, side='right'))


def size_rule(sides=DIGIT_SIDES) -> str:
  """The size bins of digit scenes with these digit sides, in words."""
  e = size_edges(sides)
  return (f'by digit side: small {sides[0]}-{e[0] - 1} px, medium {e[0]}-{e[1] - 1} px, '
          f'large {e[1]}-{sides[1]} px')


def make_digit_scenes(digit_images: np.ndarray, digit_labels: np.ndarray, num_scenes: int,
                      seed: int, size: int = SCENE_SIZE, sides=DIGIT_SIDES,
                      digits_per_scene=DIGITS_PER_SCENE, digit_ids=None) -> SegmentationSet:
  """Scenes of digits pasted on textured backgrounds (deterministic in `seed`).

  Args:
    digit_images: uint8 [M, h, w] digit images (0 = paper, 255 = ink).
    digit_labels: int [M] digit classes 0..9.
    num_scenes: N.
    seed: the scenes depend on it alone (and on the arguments).
    size: canvas side S.
    sides: (min, max) digit side in pixels, drawn log-uniformly.
    digits_per_scene: (min, max) digits per scene, inclusive.
    digit_ids: an id per digit image, reported in `objects` (default: the
      row in digit_images).

  Returns:
    A SegmentationSet (labels: digit + 1 over each pasted square, the last one
    on top; 0 elsewhere) whose `objects` list the pasted digits.
  """
  if len(digit_images) == 0:
    raise SegmentationDataError('digit_scenes: no digits to paste')
  if not sides[0] <= sides[1] <= size:
    raise SegmentationDataError(f'digit_scenes: digit sides {tuple(sides)} must be '
                                f'ordered and fit the {size} px canvas')
  digit_ids = np.arange(len(digit_images)) if digit_ids is None else np.asarray(digit_ids)
  rng = np.random.default_rng(seed)
  images = np.zeros((num_scenes, size, size, 3), np.uint8)
  labels = np.zeros((num_scenes, size, size), np.uint8)
  bins = np.full((num_scenes, size, size), NO_OBJECT, np.uint8)
  objects = []
  lo, hi = np.log(sides[0]), np.log(sides[1])
  edges = size_edges(sides)
  for n in range(num_scenes):
    canvas = _background(rng, size)
    scene_objects = []
    for _ in range(rng.integers(digits_per_scene[0], digits_per_scene[1] + 1)):
      row = int(rng.integers(len(digit_images)))
      side = int(np.clip(np.rint(np.exp(rng.uniform(lo, hi))), sides[0], sides[1]))
      y0, x0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
      window = np.s_[y0:y0 + side, x0:x0 + side]
      canvas[window] = resize_digit(digit_images[row], side)[..., None]
      labels[n][window] = int(digit_labels[row]) + 1
      bins[n][window] = size_bin_of_side(side, edges)
      scene_objects.append((int(digit_ids[row]), int(digit_labels[row]), y0, x0, side))
    canvas += rng.uniform(-NOISE, NOISE, canvas.shape)
    images[n] = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    objects.append(scene_objects)
  return SegmentationSet(images, labels, bins, [f'scene{i}' for i in range(num_scenes)],
                         objects)


def digit_scenes(heldout_fraction: float, num_train: int = NUM_TRAIN_SCENES,
                 num_test: int = NUM_TEST_SCENES, seed: int = 0,
                 size: int = SCENE_SIZE, sides=DIGIT_SIDES) -> ProbeData:
  """Probe-train scenes of pretraining-split digits, probe-test scenes of held-out ones.

  `size` is the scene side and `sides` the (min, max) digit side; the size
  bins are the thirds of the log-side range (`size_rule`).
  """
  from mcl_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
  images, labels, splits = input_pipeline.digits_arrays(float(heldout_fraction))
  tr, te = splits['train'], splits['heldout']
  return ProbeData(
      name=f'digit_scenes ({size} px, digits {sides[0]}-{sides[1]} px)',
      train=make_digit_scenes(images[tr], labels[tr], num_train, seed=2 * seed, size=size,
                              sides=sides, digit_ids=tr),
      test=make_digit_scenes(images[te], labels[te], num_test, seed=2 * seed + 1, size=size,
                             sides=sides, digit_ids=te),
      num_classes=11, class_names=DIGIT_CLASS_NAMES,
      size_rule=size_rule(sides))


# --------------------------------------------------------------------- VOC --


class _VocFiles:
  """The files of a VOC-layout root, local or gs://, through `mcl_jax.paths`.

  On gs:// the root is listed once (one paged request, not one per file),
  and the bytes of the images and masks `_check_files` opened are kept
  until the split is loaded, so that each object is downloaded once.
  """

  def __init__(self, root: str):
    self.root = root
    self.cloud = paths.is_cloud(root)
    self._listing = set(paths.find(root)) if self.cloud else None
    self._kept = {}

  def path(self, *parts: str) -> str:
    return paths.join(self.root, *parts)

  def isfile(self, path: str) -> bool:
    if not self.cloud:
      return os.path.isfile(path)
    return path[len(self.root.rstrip('/')) + 1:] in self._listing

  def image(self, path: str, keep: bool = False):
    """A PIL image of `path` (its bytes kept for the next call with `keep`)."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    if not self.cloud:
      return Image.open(path)
    data = self._kept.pop(path, None) or paths.read_bytes(path)
    if keep:
      self._kept[path] = data
    return Image.open(io.BytesIO(data))


def _read_ids(files: _VocFiles, split: str) -> list:
  path = files.path('ImageSets', 'Segmentation', f'{split}.txt')
  if not files.isfile(path):
    raise SegmentationDataError(f'{path}: split file not found (expected the VOC layout '
                                'ImageSets/Segmentation/{train,val}.txt)')
  ids = [line.split()[0] for line in paths.read_text(path).splitlines() if line.strip()]
  if not ids:
    raise SegmentationDataError(f'{path}: empty split (no image ids listed)')
  return ids


def _check_files(voc_files: _VocFiles, split: str, ids: list) -> list:
  """(image path, mask path, object path or None) per id; raises on the first problem."""
  problems, files = [], []
  for i in ids:
    img = voc_files.path('JPEGImages', f'{i}.jpg')
    mask = voc_files.path('SegmentationClass', f'{i}.png')
    obj = voc_files.path('SegmentationObject', f'{i}.png')
    if not voc_files.isfile(img):
      problems.append(f'id {i!r} is listed in ImageSets/Segmentation/{split}.txt but '
                      f'{img} does not exist')
      continue
    if not voc_files.isfile(mask):
      problems.append(f'{mask}: mask missing for image {img}')
      continue
    try:
      with voc_files.image(img, keep=True) as im_i, voc_files.image(mask, keep=True) as im_m:
        if im_i.size != im_m.size:
          problems.append(f'{mask}: mask is {im_m.size[0]}x{im_m.size[1]} but its image '
                          f'{img} is {im_i.size[0]}x{im_i.size[1]}')
          continue
        if im_m.mode not in ('P', 'L'):
          problems.append(f'{mask}: mode {im_m.mode}, expected a palette (P) or grayscale '
                          '(L) PNG of class indices')
          continue
    except OSError as e:
      problems.append(f'{img} or {mask} cannot be read ({e})')
      continue
    files.append((img, mask, obj if voc_files.isfile(obj) else None))
  if problems:
    more = f' (and {len(problems) - 1} more problem(s) in split {split!r})' \
        if len(problems) > 1 else ''
    raise SegmentationDataError(problems[0] + more)
  return files


def _object_sizes(labels: np.ndarray, objects: np.ndarray | None) -> np.ndarray:
  """Per-pixel size bin from instance ids (or connected components of each class)."""
  from scipy import ndimage  # pylint: disable=import-outside-toplevel
  area = labels.size
  bins = np.full(labels.shape, NO_OBJECT, np.uint8)
  fg = (labels != 0) & (labels != IGNORE)
  if objects is not None:
    regions = [objects == k for k in np.unique(objects[fg]) if k not in (0, IGNORE)]
    regions = [r & fg for r in regions]
  else:
    regions = []
    for c in np.unique(labels[fg]):
      comp, n = ndimage.label(labels == c)
      regions += [comp == k for k in range(1, n + 1)]
  for r in regions:
    frac = r.sum() / area
    bins[r] = int(np.searchsorted(VOC_AREA_EDGES, frac, side='right'))
  return bins


def _resize_crop(arr: np.ndarray, short_side: int, resample) -> np.ndarray:
  """Resizes so the short side is `short_side`, then centre-crops a square."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  h, w = arr.shape[:2]
  s = short_side / min(h, w)
  nh, nw = max(short_side, round(h * s)), max(short_side, round(w * s))
  out = np.asarray(Image.fromarray(arr).resize((nw, nh), resample))
  top, left = (nh - short_side) // 2, (nw - short_side) // 2
  return out[top:top + short_side, left:left + short_side]


def load_voc_split(root: str, split: str, short_side: int = VOC_SHORT_SIDE,
                   max_images: int | None = None) -> SegmentationSet:
  """One split of a VOC-layout folder at probe resolution.

  Every listed id is checked first (image present, mask present, same size,
  class-index PNG); the first problem is raised as one SegmentationDataError
  line that also counts the others.
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel
  paths.check_user_path(root, 'voc_root')
  if not paths.isdir(root):
    raise SegmentationDataError(f'VOC root {root!r} is not a directory')
  voc_files = _VocFiles(root)
  ids = _read_ids(voc_files, split)[:max_images]
  files = _check_files(voc_files, split, ids)
  images, labels, bins = [], [], []
  for img, mask, obj in files:
    with voc_files.image(img) as im:
      rgb = np.asarray(im.convert('RGB'))
    with voc_files.image(mask) as im:
      lab = np.asarray(im).astype(np.uint8)
    inst = None
    if obj is not None:
      with voc_files.image(obj) as im:
        inst = np.asarray(im).astype(np.uint8) if im.size == (lab.shape[1], lab.shape[0]) \
            else None
    size_bins = _object_sizes(lab, inst)
    images.append(_resize_crop(rgb, short_side, Image.BILINEAR))
    labels.append(_resize_crop(lab, short_side, Image.NEAREST))
    bins.append(_resize_crop(size_bins, short_side, Image.NEAREST))
  return SegmentationSet(np.stack(images), np.stack(labels), np.stack(bins), list(ids))


def voc(root: str, short_side: int = VOC_SHORT_SIDE, train_split: str = 'train',
        test_split: str = 'val', max_train: int | None = None,
        max_test: int | None = None) -> ProbeData:
  """Probe data from a VOC-layout folder (train on `train_split`, score `test_split`)."""
  train = load_voc_split(root, train_split, short_side, max_train)
  test = load_voc_split(root, test_split, short_side, max_test)
  labelled = [x[x != IGNORE] for x in (train.labels, test.labels)]
  top = max(int(x.max()) if x.size else 0 for x in labelled)
  # VOC's 21 classes, or more if the folder's masks use higher indices.
  num_classes = max(top + 1, len(VOC_CLASS_NAMES))
  names = VOC_CLASS_NAMES + tuple(str(i) for i in range(len(VOC_CLASS_NAMES), num_classes))
  rule = (f'by object area / image area: small < {VOC_AREA_EDGES[0]:.2%}, medium < '
          f'{VOC_AREA_EDGES[1]:.0%}, large >= {VOC_AREA_EDGES[1]:.0%} (objects: '
          'SegmentationObject instances, else connected components per class)')
  return ProbeData(name=f'voc {paths.basename(paths.abspath(root))} ({short_side} px)',
                   train=train, test=test, num_classes=num_classes, class_names=names,
                   size_rule=rule)
