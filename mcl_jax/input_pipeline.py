"""Host input pipeline: decode + RandomResizedCrop, uint8 crops per image.

MCL_SPEC.md section 1, step 1: every image yields `num_crops` independent
random-resized crops (uint8, `image_size` square); the rest of the
augmentation runs on the device (`mcl_jax.augment`).

Sources (`config.data.source`):
  'tfds'    any TFDS image dataset, read undecoded and decoded here, fused
            with the crop (`tf.image.decode_and_crop_jpeg` for JPEG).
  'folder'  root/[split/]class/*.jpg|png|...; files directly in the root are
            unlabelled (label -1). Files that PIL cannot identify are skipped
            and counted; odd formats (CMYK, 16-bit, RGBA, palette, ...) are
            decoded with PIL and converted to RGB uint8.
  'digits'  scikit-learn's 8x8 digits, upsampled; ships with scikit-learn, so
            tests and smoke runs need no download.

Determinism. Every random choice is a stateless op seeded from
(seed, epoch, global element position), so a batch depends only on
(seed, step) and never on thread scheduling. For the indexable sources
(folder, digits) epoch e visits a seeded permutation of the examples; batch b
of that epoch is permutation[b * G : (b + 1) * G] (G = global batch) and
process p reads the p-th 1/process_count slice of it, so processes read
disjoint parts that together cover the epoch (less the final partial batch)
and the union of a step's local batches does not depend on process_count.
`start_step` resumes at epoch = step // steps_per_epoch and skips the
consumed indices of that epoch before anything is read or decoded. TFDS
record files are read as a stream instead: each process reads its own even
split, shuffled per epoch with seeds derived from (seed, epoch, process), and
skips consumed records (undecoded) when resuming. A file that passes the
folder scan but then fails to decode is dropped from the stream (and counted),
which shifts the later batches of that run; resuming stays exact on data
without such files.

TensorFlow is imported lazily (and hidden from any GPU) so that importing
`mcl_jax.augment` or the rest of the project never needs it.
"""

import concurrent.futures
import dataclasses
import functools
import io
import itertools
import math
import os
import threading
import time
from typing import Any, Callable, Iterator, Optional

from absl import logging
import jax
import numpy as np

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif',
                    '.tiff', '.ppm', '.pgm', '.jfif')

# The digits train/held-out split never changes with the config seed, so the
# held-out images stay unseen by every pretraining run.
DIGITS_SPLIT_SEED = 2304_02010

_JPEG_MAGIC = b'\xff\xd8\xff'
_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
# Folder files by decoder: clean JPEG goes to TensorFlow (fused crop), the
# rest to PIL, which copes with CMYK, 16-bit, palette and damaged files.
_KIND_TF, _KIND_PIL = 0, 1


class DatasetNotFoundError(ValueError):
  """The configured data is missing; the message says what to provide."""


# ---------------------------------------------------------------------------
# TensorFlow, lazily.
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _tf():
  """Imports TensorFlow, keeping it off every GPU (JAX owns the devices)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    # Devices were already initialised by someone else; nothing to hide then.
    pass
  return tf


def _options(data_cfg):
  tf = _tf()
  opts = tf.data.Options()
  opts.deterministic = True
  num_threads = data_cfg.get('num_threads', None)
  if num_threads:
    opts.threading.private_threadpool_size = int(num_threads)
  # One thread per op: parallelism comes from elements, not within a decode.
  opts.threading.max_intra_op_parallelism = 1
  return opts


# ---------------------------------------------------------------------------
# Skip accounting.
# ---------------------------------------------------------------------------


class DecodeStats:
  """Thread-safe counts of files skipped because they could not be decoded.

  Attributes:
    skipped_at_scan: files that PIL could not identify when the folder was
      listed (never enter the stream).
    failed_decodes: decode failures while streaming (counted per occurrence,
      i.e. again each epoch); those elements are dropped.
  """

  def __init__(self, skipped_at_scan: int = 0):
    self.skipped_at_scan = skipped_at_scan
    self.failed_decodes = 0
    self._lock = threading.Lock()

  def add_failure(self):
    with self._lock:
      self.failed_decodes += 1
      n = self.failed_decodes
    # Power-of-two logging: visible, but never floods the log.
    if n & (n - 1) == 0:
      logging.warning('input pipeline: %d undecodable image(s) skipped', n)

  @property
  def total(self) -> int:
    return self.skipped_at_scan + self.failed_decodes


# ---------------------------------------------------------------------------
# PIL decoding (odd formats).
# ---------------------------------------------------------------------------


def pil_to_rgb_uint8(im) -> np.ndarray:
  """Converts any PIL image to RGB uint8 [H, W, 3].

  16-bit (and 32-bit integer) grayscale is rescaled from 0..65535, not
  clipped at 255 as `convert('RGB')` would do; alpha is dropped (like
  torchvision's `pil_loader`); CMYK, palette and the rest go through PIL's
  own conversion.
  """
  if im.mode.startswith('I;16') or im.mode == 'I':
    x = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
    x = ((x * 255 + 32767) // 65535).astype(np.uint8)
    return np.repeat(x[..., None], 3, axis=-1)
  if im.mode == 'F':
    x = np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8)
    return np.repeat(x[..., None], 3, axis=-1)
  return np.asarray(im.convert('RGB'), dtype=np.uint8)


def _pil_decode_bytes(data: bytes) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as im:
    im.load()
    return pil_to_rgb_uint8(im)


def _make_pil_decoder(stats: DecodeStats) -> Callable[[bytes], Any]:
  """A numpy_function body: bytes -> (image, ok), counting failures."""
  def decode(data):
    try:
      img = _pil_decode_bytes(bytes(data))
      if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError('empty image')
      return img, np.bool_(True)
    except Exception:  # pylint: disable=broad-except
      # Any failure means an unusable file: count it and drop the element.
      stats.add_failure()
      return np.zeros((1, 1, 3), np.uint8), np.bool_(False)
  return decode


# ---------------------------------------------------------------------------
# RandomResizedCrop (TensorFlow graph code, stateless).
# ---------------------------------------------------------------------------


def sample_crop_windows(seed, height, width, num_crops: int, scale, ratio,
                        tries: int = 10):
  """torchvision `RandomResizedCrop.get_params`, for num_crops crops at once.

  Each crop draws `tries` (area, log-aspect) candidates; the first that fits
  is used with a uniform offset; if none fits the crop falls back to the
  largest centred crop with the aspect ratio clamped into `ratio`. Sizes are
  rounded half-to-even like Python's round().

  Args:
    seed: int [2] stateless seed.
    height: image height (scalar tensor).
    width: image width (scalar tensor).
    num_crops: number of crops.
    scale: (min, max) fraction of the image area.
    ratio: (min, max) aspect ratio w / h.
    tries: candidates per crop (torchvision: 10).

  Returns:
    int32 [num_crops, 4] windows (y, x, h, w).
  """
  tf = _tf()
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  seeds = tf.random.experimental.stateless_split(seed, 4)
  shape = [num_crops, tries]
  area = h * w * tf.random.stateless_uniform(
      shape, seeds[0], scale[0], scale[1])
  aspect = tf.exp(tf.random.stateless_uniform(
      shape, seeds[1], math.log(ratio[0]), math.log(ratio[1])))
  cw = tf.round(tf.sqrt(area * aspect))
  ch = tf.round(tf.sqrt(area / aspect))
  valid = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
  first = tf.argmax(tf.cast(valid, tf.int32), axis=1, output_type=tf.int32)
  found = tf.reduce_any(valid, axis=1)
  cw = tf.gather(cw, first, axis=1, batch_dims=1)
  ch = tf.gather(ch, first, axis=1, batch_dims=1)
  in_ratio = w / h
  fb_w = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
  fb_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
  cw = tf.where(found, cw, fb_w)
  ch = tf.where(found, ch, fb_h)
  # torch.randint(0, H - h + 1); min() guards against float rounding at 1.0.
  uy = tf.random.stateless_uniform([num_crops], seeds[2])
  ux = tf.random.stateless_uniform([num_crops], seeds[3])
  y = tf.where(found, tf.minimum(tf.floor(uy * (h - ch + 1)), h - ch),
               tf.floor((h - ch) / 2))
  x = tf.where(found, tf.minimum(tf.floor(ux * (w - cw + 1)), w - cw),
               tf.floor((w - cw) / 2))
  return tf.cast(tf.stack([y, x, ch, cw], axis=1), tf.int32)


def _resize_windows(image, origin, windows, size: int):
  """Cuts each window out of `image` and resizes it to size x size uint8.

  Bilinear with antialiasing, i.e. PIL's resize as torchvision uses it.

  Args:
    image: uint8 [H, W, 3] holding (at least) the union of the windows.
    origin: (y, x) of image's top-left corner in full-image coordinates.
    windows: int32 [n, 4] (y, x, h, w) in full-image coordinates.
    size: output side.

  Returns:
    uint8 [n, size, size, 3].
  """
  tf = _tf()
  out = []
  for k in range(windows.shape[0]):
    y, x, h, w = tf.unstack(windows[k])
    crop = image[y - origin[0]:y - origin[0] + h,
                 x - origin[1]:x - origin[1] + w]
    out.append(tf.image.resize(crop, [size, size], method='bilinear',
                               antialias=True))
  crops = tf.stack(out)
  return tf.cast(tf.clip_by_value(tf.round(crops), 0.0, 255.0), tf.uint8)


@dataclasses.dataclass(frozen=True)
class _CropSpec:
  size: int
  num_crops: int
  scale: tuple[float, float]
  ratio: tuple[float, float]


def _crop_spec(data_cfg) -> _CropSpec:
  return _CropSpec(size=int(data_cfg.image_size),
                   num_crops=int(data_cfg.num_crops),
                   scale=tuple(float(s) for s in data_cfg.crop_scale),
                   ratio=tuple(float(r) for r in data_cfg.crop_ratio))


def _image_crops(image, seed, spec: _CropSpec):
  """Random-resized crops of a decoded uint8 [H, W, 3] image."""
  tf = _tf()
  shape = tf.shape(image)
  windows = sample_crop_windows(seed, shape[0], shape[1], spec.num_crops,
                                spec.scale, spec.ratio)
  return _resize_windows(image, (0, 0), windows, spec.size)


def _jpeg_crops(data, seed, spec: _CropSpec):
  """Crops of a JPEG, decoding only the union of the crop windows."""
  tf = _tf()
  shape = tf.image.extract_jpeg_shape(data)
  windows = sample_crop_windows(seed, shape[0], shape[1], spec.num_crops,
                                spec.scale, spec.ratio)
  y0 = tf.reduce_min(windows[:, 0])
  x0 = tf.reduce_min(windows[:, 1])
  y1 = tf.reduce_max(windows[:, 0] + windows[:, 2])
  x1 = tf.reduce_max(windows[:, 1] + windows[:, 3])
  image = tf.image.decode_and_crop_jpeg(
      data, tf.stack([y0, x0, y1 - y0, x1 - x0]), channels=3)
  return _resize_windows(image, (y0, x0), windows, spec.size)


def _png_to_uint8(data):
  # Decoding as uint16 handles 8- and 16-bit PNGs alike: 8-bit values come
  # back as x * 257, which the rescale maps back to x exactly.
  tf = _tf()
  x = tf.cast(tf.io.decode_png(data, channels=3, dtype=tf.uint16), tf.int32)
  return tf.cast((x * 255 + 32767) // 65535, tf.uint8)


def _decode_crops(data, force_pil, seed, spec: _CropSpec, pil_decoder):
  """Encoded image bytes -> (uint8 [n, S, S, 3] crops, ok).

  JPEG: fused decode + crop in TensorFlow. PNG: TensorFlow. Anything else, or
  when `force_pil`: PIL in a numpy_function, which reports failures as ok =
  False instead of raising.
  """
  tf = _tf()
  magic = tf.strings.substr(data, 0, 8)
  is_jpeg = tf.strings.substr(magic, 0, 3) == _JPEG_MAGIC
  is_png = magic == _PNG_MAGIC

  def tf_jpeg():
    return _jpeg_crops(data, seed, spec), tf.constant(True)

  def tf_png():
    return _image_crops(_png_to_uint8(data), seed, spec), tf.constant(True)

  def pil():
    image, ok = tf.numpy_function(pil_decoder, [data], [tf.uint8, tf.bool],
                                  stateful=False)
    image.set_shape([None, None, 3])
    ok.set_shape([])
    return _image_crops(image, seed, spec), ok

  return tf.cond(
      is_jpeg & ~force_pil, tf_jpeg,
      lambda: tf.cond(is_png & ~force_pil, tf_png, pil))


def _element_seed(seed: int, epoch, gid):
  """Stateless seed of one element from (seed, epoch, global position)."""
  tf = _tf()
  base = tf.stack([tf.constant(seed, tf.int64),
                   2 * tf.cast(epoch, tf.int64) + 1])
  return tf.random.experimental.stateless_fold_in(base, tf.cast(gid, tf.int64))


# ---------------------------------------------------------------------------
# Folder source.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FolderIndex:
  """The usable files of a folder, sorted by (class, path).

  Attributes:
    root: the directory listed.
    paths: file paths [N].
    labels: int32 [N]; class-folder index, -1 for files directly in root.
    kinds: int32 [N]; 0 = TensorFlow JPEG decode, 1 = PIL decode.
    class_names: sorted class-folder names.
    skipped: paths of files PIL could not identify.
  """
  root: str
  paths: tuple[str, ...]
  labels: np.ndarray
  kinds: np.ndarray
  class_names: tuple[str, ...]
  skipped: tuple[str, ...]


def _is_image_file(name: str) -> bool:
  return not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)


def _list_images(root: str) -> tuple[list[str], list[int], list[str]]:
  """Lists root/*.ext (label -1) and root/class/**/*.ext (class index)."""
  with os.scandir(root) as it:
    entries = sorted(it, key=lambda e: e.name)
  classes = [e.name for e in entries
             if e.is_dir() and not e.name.startswith('.')]
  paths = [e.path for e in entries if e.is_file() and _is_image_file(e.name)]
  labels = [-1] * len(paths)
  for idx, name in enumerate(classes):
    found = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
      found += [os.path.join(dirpath, f) for f in filenames
                if _is_image_file(f)]
    paths += sorted(found)
    labels += [idx] * len(found)
  return paths, labels, classes


def _jpeg_has_eoi(path: str) -> bool:
  # A JPEG cut short lacks its end-of-image marker; TensorFlow would raise
  # on it mid-stream, while PIL reports it as a countable failure. The marker
  # is looked for near the end, not at it, because some cameras append data
  # after it (harmless to both decoders); inside entropy-coded data 0xFF is
  # always stuffed, so FFD9 there can only be a marker.
  with open(path, 'rb') as f:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 1024))
    return b'\xff\xd9' in f.read()


def _probe(path: str) -> Optional[int]:
  """Decoder kind of a file from its header, or None if unreadable."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      fmt, mode = im.format, im.mode
    clean_jpeg = (fmt == 'JPEG' and mode in ('RGB', 'L') and
                  _jpeg_has_eoi(path))
  except Exception:  # pylint: disable=broad-except
    return None
  return _KIND_TF if clean_jpeg else _KIND_PIL


def _missing_folder_error(path, what: str) -> DatasetNotFoundError:
  return DatasetNotFoundError(
      f'data.source="folder": {what}. Set --config.data.folder=/path/to/root '
      f'where root holds images as root/[split/]<class>/<image> (class '
      f'folders give labels in sorted order; images directly in root are '
      f'unlabelled), with extensions {", ".join(IMAGE_EXTENSIONS)}. '
      f'(got {path!r})')


@functools.lru_cache(maxsize=8)
def _scan_folder_cached(root: str, mtime_ns: int) -> FolderIndex:
  del mtime_ns  # Only part of the cache key: a changed root is rescanned.
  start = time.time()
  paths, labels, classes = _list_images(root)
  if not paths:
    raise _missing_folder_error(root, 'no image files found in ' + root)
  workers = min(32, 4 * (os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    kinds = list(pool.map(_probe, paths, chunksize=64))
  keep = [i for i, k in enumerate(kinds) if k is not None]
  skipped = tuple(paths[i] for i, k in enumerate(kinds) if k is None)
  if skipped:
    logging.warning('folder %s: %d unreadable file(s) skipped, e.g. %s',
                    root, len(skipped), skipped[0])
  if not keep:
    raise _missing_folder_error(root, f'none of the {len(paths)} image files '
                                f'in {root} could be read')
  logging.info('folder %s: %d images, %d classes, scanned in %.1fs', root,
               len(keep), len(classes), time.time() - start)
  return FolderIndex(
      root=root,
      paths=tuple(paths[i] for i in keep),
      labels=np.asarray([labels[i] for i in keep], np.int32),
      kinds=np.asarray([kinds[i] for i in keep], np.int32),
      class_names=tuple(classes),
      skipped=skipped)


def _folder_split_dir(data_cfg, split: Optional[str]) -> str:
  root = data_cfg.get('folder', None)
  if not root:
    raise _missing_folder_error(root, 'data.folder is not set')
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise _missing_folder_error(root, f'{root} is not a directory')
  if split and os.path.isdir(os.path.join(root, split)):
    return os.path.join(root, split)
  if split:
    logging.info('folder %s has no %r subfolder: using all of it', root, split)
  return root


def scan_folder(data_cfg, split: Optional[str] = None) -> FolderIndex:
  """Lists and header-checks the images of `data.folder` (or its split).

  Args:
    data_cfg: the `data` config section.
    split: subfolder to use when root/split exists; otherwise root itself.

  Returns:
    The `FolderIndex` (cached until the directory's mtime changes).

  Raises:
    DatasetNotFoundError: path unset/missing or no readable images.
  """
  path = _folder_split_dir(data_cfg, split)
  return _scan_folder_cached(path, os.stat(path).st_mtime_ns)


# ---------------------------------------------------------------------------
# Digits source.
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def digits_arrays(heldout_fraction: float):
  """scikit-learn digits as uint8 with a fixed train / held-out split.

  Args:
    heldout_fraction: fraction of the 1,797 images held out.

  Returns:
    (images uint8 [1797, 8, 8] in 0..255, labels int32 [1797],
     {'train': sorted indices, 'heldout': sorted indices}).
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
  labels = digits.target.astype(np.int32)
  perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels))
  n_held = int(round(heldout_fraction * len(labels)))
  splits = {'heldout': np.sort(perm[:n_held]), 'train': np.sort(perm[n_held:])}
  return images, labels, splits


def _digits_split(split: str) -> str:
  if split in ('train',):
    return 'train'
  if split in ('heldout', 'validation', 'val', 'test', 'eval'):
    return 'heldout'
  raise ValueError(f'digits has splits "train" and "heldout", got {split!r}')


def _upsample_digits(images8, size: int):
  """uint8 [..., 8, 8] -> uint8 [..., size, size, 3], bilinear."""
  tf = _tf()
  x = tf.image.resize(tf.cast(images8, tf.float32)[..., None], [size, size],
                      method='bilinear')
  x = tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)
  return tf.repeat(x, 3, axis=-1)


# ---------------------------------------------------------------------------
# TFDS source.
# ---------------------------------------------------------------------------


def _tfds_missing_message(builder, data_cfg) -> str:
  name = data_cfg.tfds_name
  data_dir = data_cfg.get('tfds_data_dir', None) or '~/tensorflow_datasets'
  manual_dir = (data_cfg.get('tfds_manual_dir', None) or
                os.path.join(data_dir, 'downloads', 'manual'))
  head = (f'TFDS dataset {name!r} is not prepared: no files under '
          f'{builder.data_dir}. ')
  if name.split('/')[0].split(':')[0] == 'imagenet2012':
    return head + (
        'ImageNet cannot be downloaded automatically. Register at '
        'https://image-net.org/download-images, download '
        'ILSVRC2012_img_train.tar (~138 GB) and ILSVRC2012_img_val.tar '
        f'(~6.3 GB) and put both files in the manual_dir {manual_dir} '
        '(--config.data.tfds_manual_dir). Then either run '
        f'`tfds build imagenet2012 --data_dir={data_dir} '
        f'--manual_dir={manual_dir}` once, or set '
        '--config.data.tfds_download_and_prepare=True to let the loader '
        'prepare it (several hours, ~150 GB of output in data_dir). '
        'Alternatively point --config.data.source=folder at an extracted '
        'copy (root/train/<wnid>/*.JPEG).')
  if getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):
    return head + (
        f'It needs a manual download into {manual_dir}: '
        f'{builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()} Then run `tfds build '
        f'{name} --data_dir={data_dir} --manual_dir={manual_dir}` or set '
        '--config.data.tfds_download_and_prepare=True.')
  return head + (
      f'Run `tfds build {name} --data_dir={data_dir}` on a machine with '
      'network access (then copy data_dir here), or set '
      '--config.data.tfds_download_and_prepare=True to download it on first '
      'use.')


def tfds_builder(data_cfg):
  """The prepared TFDS builder of `data.tfds_name`.

  Raises:
    DatasetNotFoundError: unknown name, or files missing and
      `data.tfds_download_and_prepare` is off; the message says what to
      download and where to put it.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _tf()
  data_dir = data_cfg.get('tfds_data_dir', None)
  try:
    builder = tfds.builder(data_cfg.tfds_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotFoundError(
        f'unknown TFDS dataset {data_cfg.tfds_name!r}: check '
        '--config.data.tfds_name (see `tfds.list_builders()`).') from e
  if builder.is_prepared():
    return builder
  if data_cfg.get('tfds_download_and_prepare', False):
    manual_dir = data_cfg.get('tfds_manual_dir', None)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder
  raise DatasetNotFoundError(_tfds_missing_message(builder, data_cfg))


def _tfds_keys(builder) -> tuple[str, Optional[str]]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features = builder.info.features
  image_keys = [k for k, f in features.items()
                if isinstance(f, tfds.features.Image)]
  if not image_keys:
    raise ValueError(f'{builder.name} has no Image feature')
  return image_keys[0], ('label' if 'label' in features else None)


def require_labels(data_cfg) -> int:
  """Checks that the training source is labelled; returns its class count.

  Raises:
    ValueError: the source has unlabelled images (a folder without class
      subfolders, a tfds dataset without a 'label' feature), or more classes
      than `data.num_classes`.
  """
  source = data_cfg.source
  if source == 'digits':
    num = 10
  elif source == 'folder':
    index = scan_folder(data_cfg, data_cfg.get('train_split'))
    if (index.labels < 0).any():
      raise ValueError(
          f"objective='supervised' needs labels, but data.folder={data_cfg.folder!r} "
          f'has {int((index.labels < 0).sum())} images outside class subfolders: '
          'arrange it as root/class/*.jpg, or use the self-supervised objective.')
    num = len(index.class_names)
  elif source == 'tfds':
    builder = tfds_builder(data_cfg)
    _, label_key = _tfds_keys(builder)
    if label_key is None:
      raise ValueError(f"objective='supervised' needs labels, but tfds dataset "
                       f"{data_cfg.tfds_name!r} has no 'label' feature.")
    num = builder.info.features[label_key].num_classes
  else:
    raise ValueError(f"data.source={source!r}: must be 'tfds', 'folder' or 'digits'")
  if num > data_cfg.num_classes:
    raise ValueError(f'data.num_classes={data_cfg.num_classes}: the {source} source has '
                     f'{num} classes; set --config.data.num_classes={num}.')
  return num


# ---------------------------------------------------------------------------
# Sizes.
# ---------------------------------------------------------------------------


def num_train_examples(data_cfg) -> int:
  """Training examples of the configured source.

  digits: the fixed train split; folder: the readable files; tfds: the
  prepared dataset's split size, else `data.num_train_examples`.
  """
  source = data_cfg.source
  if source == 'digits':
    _, _, splits = digits_arrays(float(data_cfg.digits_heldout_fraction))
    return len(splits['train'])
  if source == 'folder':
    return len(scan_folder(data_cfg, data_cfg.train_split).paths)
  if source == 'tfds':
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    _tf()
    try:
      builder = tfds.builder(data_cfg.tfds_name,
                             data_dir=data_cfg.get('tfds_data_dir', None))
      if builder.is_prepared():
        return int(builder.info.splits[data_cfg.train_split].num_examples)
    except (tfds.core.registered.DatasetNotFoundError, KeyError):
      pass
    return int(data_cfg.num_train_examples)
  raise ValueError(f'unknown data.source {source!r}')


def steps_per_epoch(data_cfg, global_batch: int) -> int:
  """Full global batches per epoch (the last partial batch is dropped)."""
  return num_train_examples(data_cfg) // int(global_batch)


# ---------------------------------------------------------------------------
# Train iterator.
# ---------------------------------------------------------------------------


class TrainIterator:
  """Infinite iterator of local batches.

  Yields dicts with 'crops' uint8 [local_batch, num_crops, S, S, 3] and
  'label' int32 [local_batch] (plus 'index' int64 when requested).

  Attributes:
    local_batch: examples per yielded batch.
    steps_per_epoch: global steps per epoch.
    num_examples: training examples of the source.
    stats: `DecodeStats` of skipped files.
  """

  def __init__(self, batches: Iterator[dict[str, np.ndarray]], *,
               local_batch: int, steps_per_epoch: int, num_examples: int,
               stats: DecodeStats):
    self._batches = batches
    self.local_batch = local_batch
    self.steps_per_epoch = steps_per_epoch
    self.num_examples = num_examples
    self.stats = stats

  @property
  def num_skipped(self) -> int:
    """Files skipped so far (unreadable at scan + failed decodes)."""
    return self.stats.total

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._batches)


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How global positions map to processes (see module docstring)."""
  global_batch: int
  local_batch: int
  process_index: int
  process_count: int
  steps_per_epoch: int
  start_epoch: int
  start_offset: int  # elements of start_epoch this process has consumed


def _layout(num_examples, global_batch, start_step, process_index,
            process_count) -> _Layout:
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if global_batch % process_count:
    raise ValueError(f'global_batch {global_batch} is not divisible by '
                     f'process_count {process_count}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in '
                     f'[0, {process_count})')
  spe = num_examples // global_batch
  if spe == 0:
    raise ValueError(f'{num_examples} training examples are fewer than one '
                     f'global batch of {global_batch}')
  local = global_batch // process_count
  epoch, step_in_epoch = divmod(int(start_step), spe)
  return _Layout(global_batch, local, process_index, process_count, spe,
                 epoch, step_in_epoch * local)


def _gid(pos, lay: _Layout):
  """Global position in the epoch of this process's pos-th element."""
  return ((pos // lay.local_batch) * lay.global_batch +
          lay.process_index * lay.local_batch + pos % lay.local_batch)


def _finish(ds, data_cfg, local_batch: int):
  """Drops failed elements, batches, prefetches."""
  tf = _tf()
  # Last line of defence: an element whose TensorFlow decode raises (a JPEG
  # damaged past its header and end marker) is dropped with a logged warning
  # instead of ending training.
  ds = ds.ignore_errors(log_warning=True)
  ds = ds.filter(lambda ex: ex['ok'])
  ds = ds.map(lambda ex: {k: v for k, v in ex.items() if k != 'ok'})
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.prefetch(int(data_cfg.get('prefetch', 2)) or tf.data.AUTOTUNE)
  return ds.with_options(_options(data_cfg))


def _indexed_stream(num_examples: int, lay: _Layout, seed: int,
                    element_fn, include_index: bool, data_cfg,
                    source_ids=None):
  """Epoch permutations of range(N), this process's slice, mapped.

  Args:
    num_examples: N.
    lay: batch layout.
    seed: config seed.
    element_fn: (i, element_seed) -> (crops, label, ok), i in [0, N).
    include_index: also emit 'index': source_ids[i], or i when None.
    data_cfg: the `data` config section.
    source_ids: optional int64 [N] tensor mapping i to the source's own id.

  Returns:
    The batched tf.data.Dataset (infinite).
  """
  tf = _tf()
  n_used = lay.steps_per_epoch * lay.global_batch
  lo = lay.process_index * lay.local_batch

  def epoch_indices(epoch):
    perm = tf.random.experimental.stateless_shuffle(
        tf.range(num_examples, dtype=tf.int64),
        seed=tf.stack([tf.constant(seed, tf.int64), 2 * epoch]))
    # Batch b of the epoch is perm[b*G:(b+1)*G]; this process reads its slice.
    mine = tf.reshape(perm[:n_used], [lay.steps_per_epoch, lay.global_batch])
    mine = tf.reshape(mine[:, lo:lo + lay.local_batch], [-1])
    pos = tf.range(tf.size(mine, out_type=tf.int64), dtype=tf.int64)
    ds = tf.data.Dataset.from_tensor_slices(
        (mine, _gid(pos, lay), tf.fill(tf.shape(mine), epoch)))
    # Resuming: drop consumed indices before anything is read or decoded.
    return ds.skip(tf.where(epoch == lay.start_epoch,
                            tf.constant(lay.start_offset, tf.int64),
                            tf.constant(0, tf.int64)))

  ds = tf.data.Dataset.range(lay.start_epoch, 2**62).flat_map(epoch_indices)

  def load(i, gid, epoch):
    crops, label, ok = element_fn(i, _element_seed(seed, epoch, gid))
    ex = {'crops': crops, 'label': tf.cast(label, tf.int32), 'ok': ok}
    if include_index:
      ex['index'] = i if source_ids is None else tf.gather(source_ids, i)
    return ex

  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _finish(ds, data_cfg, lay.local_batch)


def _digits_train(data_cfg, lay_fn, seed, include_index):
  tf = _tf()
  spec = _crop_spec(data_cfg)
  images, labels, splits = digits_arrays(
      float(data_cfg.digits_heldout_fraction))
  train = splits['train']
  lay = lay_fn(len(train))
  t_images = tf.constant(images[train])
  t_labels = tf.constant(labels[train])
  t_ids = tf.constant(train.astype(np.int64))

  def element_fn(i, elem_seed):
    image = _upsample_digits(tf.gather(t_images, i), spec.size)
    return (_image_crops(image, elem_seed, spec), tf.gather(t_labels, i),
            tf.constant(True))

  # 'index' reports the row in load_digits(), not the train-list position.
  ds = _indexed_stream(len(train), lay, seed, element_fn, include_index,
                       data_cfg, source_ids=t_ids)
  return ds, lay, len(train), DecodeStats()


def _folder_train(data_cfg, lay_fn, seed, include_index):
  tf = _tf()
  spec = _crop_spec(data_cfg)
  index = scan_folder(data_cfg, data_cfg.train_split)
  lay = lay_fn(len(index.paths))
  stats = DecodeStats(skipped_at_scan=len(index.skipped))
  pil_decoder = _make_pil_decoder(stats)
  t_paths = tf.constant(np.asarray(index.paths, dtype=object))
  t_labels = tf.constant(index.labels)
  t_force_pil = tf.constant(index.kinds == _KIND_PIL)

  def element_fn(i, elem_seed):
    data = tf.io.read_file(tf.gather(t_paths, i))
    crops, ok = _decode_crops(data, tf.gather(t_force_pil, i), elem_seed,
                              spec, pil_decoder)
    return crops, tf.gather(t_labels, i), ok

  ds = _indexed_stream(len(index.paths), lay, seed, element_fn,
                       include_index, data_cfg)
  return ds, lay, len(index.paths), stats


def _tfds_epoch(builder, data_cfg, lay: _Layout, seed: int, epoch: int,
                skip: int, stats: DecodeStats, include_index: bool):
  """One epoch of this process's TFDS split, shuffled, skipped, mapped."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tf = _tf()
  spec = _crop_spec(data_cfg)
  image_key, label_key = _tfds_keys(builder)
  split = tfds.even_splits(data_cfg.train_split, n=lay.process_count,
                           drop_remainder=True)[lay.process_index]
  # One seed per (seed, epoch, process) for file order and the buffer.
  epoch_seed = int(np.random.SeedSequence(
      [seed, epoch, lay.process_index]).generate_state(1)[0] & 0x7FFFFFFF)
  read_config = tfds.ReadConfig(
      shuffle_seed=epoch_seed, interleave_cycle_length=16,
      interleave_block_length=1, options=_options(data_cfg))
  ds = builder.as_dataset(
      split=split, shuffle_files=True, read_config=read_config,
      decoders={image_key: tfds.decode.SkipDecoding()})
  ds = ds.shuffle(int(data_cfg.shuffle_buffer), seed=epoch_seed,
                  reshuffle_each_iteration=False)
  # Every process contributes exactly steps_per_epoch local batches.
  ds = ds.take(lay.steps_per_epoch * lay.local_batch).enumerate().skip(skip)
  pil_decoder = _make_pil_decoder(stats)

  def load(pos, ex):
    elem_seed = _element_seed(seed, epoch, _gid(pos, lay))
    crops, ok = _decode_crops(ex[image_key], tf.constant(False), elem_seed,
                              spec, pil_decoder)
    label = (tf.cast(ex[label_key], tf.int32) if label_key
             else tf.constant(-1, tf.int32))
    out = {'crops': crops, 'label': label, 'ok': ok}
    if include_index:
      out['index'] = tf.constant(-1, tf.int64)
    return out

  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _finish(ds, data_cfg, lay.local_batch)


def _tfds_train(data_cfg, lay_fn, seed, include_index):
  builder = tfds_builder(data_cfg)
  n = int(builder.info.splits[data_cfg.train_split].num_examples)
  lay = lay_fn(n)
  stats = DecodeStats()

  def epochs():
    # Record files can only be streamed, so each epoch is its own pipeline,
    # seeded by its epoch number; batches never straddle epochs. The price is
    # one shuffle-buffer fill at each epoch boundary.
    for epoch in itertools.count(lay.start_epoch):
      skip = lay.start_offset if epoch == lay.start_epoch else 0
      yield _tfds_epoch(builder, data_cfg, lay, seed, epoch, skip, stats,
                        include_index)

  return epochs(), lay, n, stats


def create_train_iterator(data_cfg, *, global_batch: int, seed: int,
                          start_step: int = 0,
                          process_index: Optional[int] = None,
                          process_count: Optional[int] = None,
                          include_index: bool = False) -> TrainIterator:
  """Infinite, deterministic iterator of this process's training batches.

  Args:
    data_cfg: the `data` config section.
    global_batch: images per step over all processes.
    seed: base seed; batches depend only on (seed, step).
    start_step: first step to produce (resuming continues the stream
      exactly).
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).
    include_index: add 'index' int64 [local_batch]: the example's position in
      the source (digits: row of `load_digits()`, folder: position in
      `scan_folder(...).paths`, tfds: -1). For tests and debugging.

  Returns:
    A `TrainIterator` of dicts {'crops': uint8 [local_batch, num_crops, S, S,
    3], 'label': int32 [local_batch]}, local_batch = global_batch //
    process_count.

  Raises:
    DatasetNotFoundError: the configured data is missing (the message says
      what to provide).
  """
  global_batch = int(global_batch)
  lay_fn = functools.partial(
      _layout, global_batch=global_batch, start_step=start_step,
      process_index=process_index, process_count=process_count)
  source = data_cfg.source
  if source == 'digits':
    ds, lay, n, stats = _digits_train(data_cfg, lay_fn, seed, include_index)
    datasets = iter([ds])
  elif source == 'folder':
    ds, lay, n, stats = _folder_train(data_cfg, lay_fn, seed, include_index)
    datasets = iter([ds])
  elif source == 'tfds':
    datasets, lay, n, stats = _tfds_train(data_cfg, lay_fn, seed,
                                          include_index)
  else:
    raise ValueError(f'unknown data.source {source!r} '
                     '(expected "tfds", "folder" or "digits")')
  batches = itertools.chain.from_iterable(
      ds.as_numpy_iterator() for ds in datasets)
  return TrainIterator(batches, local_batch=lay.local_batch,
                       steps_per_epoch=lay.steps_per_epoch, num_examples=n,
                       stats=stats)


# ---------------------------------------------------------------------------
# Evaluation arrays.
# ---------------------------------------------------------------------------


def _eval_resize_size(data_cfg) -> int:
  # Shorter side before the centre crop: 256 for 224 at the usual 0.875.
  return int(round(int(data_cfg.image_size) /
                   float(data_cfg.get('eval_crop_fraction', 0.875))))


def _pil_center_resize(img: np.ndarray, size: int, resize: int) -> np.ndarray:
  """Shorter side -> resize (bilinear, antialiased), then centre crop."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  im = Image.fromarray(img)
  w, h = im.size
  scale = resize / min(w, h)
  nw, nh = max(size, int(round(w * scale))), max(size, int(round(h * scale)))
  im = im.resize((nw, nh), Image.BILINEAR)
  # torchvision CenterCrop offsets.
  top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
  return np.asarray(im.crop((left, top, left + size, top + size)))


def _folder_eval(data_cfg, split, max_examples):
  index = scan_folder(data_cfg, split)
  size, resize = int(data_cfg.image_size), _eval_resize_size(data_cfg)
  paths = index.paths[:max_examples] if max_examples else index.paths

  def load(path):
    try:
      with open(path, 'rb') as f:
        return _pil_center_resize(_pil_decode_bytes(f.read()), size, resize)
    except Exception:  # pylint: disable=broad-except
      return None

  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    images = list(pool.map(load, paths))
  keep = [i for i, im in enumerate(images) if im is not None]
  if len(keep) < len(images):
    logging.warning('eval folder: %d undecodable file(s) skipped',
                    len(images) - len(keep))
  labels = index.labels[:len(paths)][keep]
  stacked = (np.stack([images[i] for i in keep]) if keep
             else np.zeros((0, size, size, 3), np.uint8))
  return stacked, labels.astype(np.int32)


def _tfds_eval(data_cfg, split, max_examples):
  tf = _tf()
  builder = tfds_builder(data_cfg)
  image_key, label_key = _tfds_keys(builder)
  size, resize = int(data_cfg.image_size), _eval_resize_size(data_cfg)
  ds = builder.as_dataset(split=split, shuffle_files=False)
  if max_examples:
    ds = ds.take(max_examples)

  def prep(ex):
    img = ex[image_key]
    if img.shape.rank == 3 and img.shape[-1] == 1:
      img = tf.image.grayscale_to_rgb(img)
    shape = tf.cast(tf.shape(img)[:2], tf.float32)
    new = tf.cast(tf.round(shape * resize / tf.reduce_min(shape)), tf.int32)
    img = tf.image.resize(img, tf.maximum(new, size), method='bilinear',
                          antialias=True)
    img = tf.image.resize_with_crop_or_pad(img, size, size)
    img = tf.cast(tf.clip_by_value(tf.round(img), 0.0, 255.0), tf.uint8)
    label = (tf.cast(ex[label_key], tf.int32) if label_key
             else tf.constant(-1, tf.int32))
    return img, label

  ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE).batch(256)
  images, labels = [], []
  for x, y in ds.as_numpy_iterator():
    images.append(x)
    labels.append(y)
  if not images:
    return np.zeros((0, size, size, 3), np.uint8), np.zeros((0,), np.int32)
  return np.concatenate(images), np.concatenate(labels)


def load_eval_arrays(data_cfg, split: str,
                     max_examples: Optional[int] = None
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Whole evaluation split in memory, for kNN / linear-probe evaluation.

  digits: 'train' or 'heldout' (also 'validation'/'test'), upsampled;
  folder: root/split if it exists, else the whole folder; tfds: any split
  name. folder and tfds images are resized (shorter side to image_size /
  eval_crop_fraction) and centre-cropped.

  Args:
    data_cfg: the `data` config section.
    split: split name.
    max_examples: keep only the first max_examples (None: all).

  Returns:
    (uint8 [N, S, S, 3] images, int32 [N] labels; -1 where unlabelled).
  """
  source = data_cfg.source
  if source == 'digits':
    images, labels, splits = digits_arrays(
        float(data_cfg.digits_heldout_fraction))
    idx = splits[_digits_split(split)][:max_examples]
    up = _upsample_digits(images[idx], int(data_cfg.image_size)).numpy()
    return up, labels[idx]
  if source == 'folder':
    return _folder_eval(data_cfg, split, max_examples)
  if source == 'tfds':
    return _tfds_eval(data_cfg, split, max_examples)
  raise ValueError(f'unknown data.source {source!r}')


# ---------------------------------------------------------------------------
# Host -> device.
# ---------------------------------------------------------------------------


def to_global_batch(local_batch: dict[str, np.ndarray],
                    sharding) -> dict[str, jax.Array]:
  """Assembles each process's local batch into global jax.Arrays.

  Args:
    local_batch: this process's batch (leading axis = local examples).
    sharding: a `jax.sharding.Sharding` of the global arrays, typically
      NamedSharding(mesh, P('data')); its leading axis is split over
      processes in process order.

  Returns:
    Dict of global jax.Arrays, leading axis local_batch * process_count.
  """
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      local_batch)
