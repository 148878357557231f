"""The 'folder' source: images under root/[split/]class/*.jpg|png|...

Files directly in the root are unlabelled (label -1); class folders give
labels in sorted order. Files that PIL cannot identify are skipped at the scan
and counted; odd formats (CMYK, 16-bit, RGBA, palette, ...) are decoded with
PIL and converted to RGB uint8. Owns the scan (`scan_folder`, `FolderIndex`)
and the source's answers: `num_examples`, `num_classes`, `train_stream`,
`eval_arrays`, `eval_splits`, `has_heldout_split`.

`data.folder` may be a gs:// folder: it is read through `mcl_jax.paths`
(the project's one gcsfs client), listed once per process (one recursive
listing, cached; split folders are found in it), and each host reads only
the files of its own slice of every batch (`stream.indexed_stream`). A file
in a bucket is not opened at the scan (that would be a request per image
on every host): its header is checked when it is read, and a file PIL
cannot identify then counts as a decode failure instead of a scan skip.
"""

import concurrent.futures
import dataclasses
import functools
import io
import os
import time
from typing import Optional

from absl import logging
import numpy as np

from mcl_jax import paths as paths_lib
from mcl_jax.data import decode, stream
from mcl_jax.data.lazy_tf import tf as _tf
from mcl_jax.data.spec import DataSpec, DatasetNotFoundError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif',
                    '.tiff', '.ppm', '.pgm', '.jfif')

# Files by decoder: clean JPEG goes to TensorFlow (fused crop), the rest to
# PIL, which copes with CMYK, 16-bit, palette and damaged files.
KIND_TF, KIND_PIL = 0, 1


@dataclasses.dataclass(frozen=True)
class FolderIndex:
  """The usable files of a folder, sorted by (class, path).

  Attributes:
    root: the directory listed.
    paths: file paths [N].
    labels: int32 [N]; class-folder index, -1 for files directly in root.
    kinds: int32 [N]; KIND_TF = TensorFlow JPEG decode, KIND_PIL = PIL.
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


def _list_cloud_images(root: str, split: Optional[str]
                       ) -> tuple[list[str], list[int], list[str]]:
  """`_list_images` of a gs:// root (or its split), from the one cached listing."""
  base = _cloud_listing(root)
  if split:
    base = tuple(k[len(split) + 1:] for k in base if k.startswith(split + '/'))
  top, by_class = [], {}
  for rel in base:
    parts = rel.split('/')
    if any(p.startswith('.') for p in parts) or not _is_image_file(parts[-1]):
      continue
    if len(parts) == 1:
      top.append(rel)
    else:
      by_class.setdefault(parts[0], []).append(rel)
  folder = paths_lib.join(root, split) if split else root
  classes = sorted(by_class)
  paths = [paths_lib.join(folder, r) for r in sorted(top)]
  labels = [-1] * len(paths)
  for idx, name in enumerate(classes):
    found = sorted(paths_lib.join(folder, r) for r in by_class[name])
    paths += found
    labels += [idx] * len(found)
  return paths, labels, classes


@functools.lru_cache(maxsize=8)
def _cloud_listing(root: str) -> tuple[str, ...]:
  """Every object under a gs:// root, relative to it: one listing per process and root."""
  return tuple(paths_lib.find(root))


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
  return KIND_TF if clean_jpeg else KIND_PIL


def _probe_bytes(data: bytes) -> Optional[int]:
  """`_probe` of a file's bytes (a gs:// file, checked when it is read)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as im:
      fmt, mode = im.format, im.mode
  except Exception:  # pylint: disable=broad-except
    return None
  clean_jpeg = (fmt == 'JPEG' and mode in ('RGB', 'L') and b'\xff\xd9' in data[-1024:])
  return KIND_TF if clean_jpeg else KIND_PIL


def _missing_folder_error(path, what: str) -> DatasetNotFoundError:
  return DatasetNotFoundError(
      f'data.source="folder": {what}. Set --config.data.folder=/path/to/root '
      f'where root holds images as root/[split/]<class>/<image> (class '
      f'folders give labels in sorted order; images directly in root are '
      f'unlabelled), with extensions {", ".join(IMAGE_EXTENSIONS)}. '
      f'(got {path!r})')


@functools.lru_cache(maxsize=8)
def _scan_folder_cached(root: str, mtime_ns: int, cloud_split: Optional[str] = None
                        ) -> FolderIndex:
  """The index of local folder `root`, or of gs:// `root` (its `cloud_split` if given)."""
  del mtime_ns  # Only part of the cache key: a changed root is rescanned.
  start = time.time()
  cloud = paths_lib.is_cloud(root)
  paths, labels, classes = (_list_cloud_images(root, cloud_split) if cloud
                            else _list_images(root))
  if cloud and cloud_split:
    root = paths_lib.join(root, cloud_split)
  if not paths:
    raise _missing_folder_error(root, 'no image files found in ' + root)
  if cloud:  # headers are checked as the files are read (see the module doc)
    kinds = [KIND_TF] * len(paths)
  else:
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


def _root(spec: DataSpec) -> str:
  """The absolute `data.folder`, checked to be a directory."""
  root = spec.folder
  if not root:
    raise _missing_folder_error(root, 'data.folder is not set')
  paths_lib.check_user_path(root, 'data.folder')
  if paths_lib.is_cloud(root):
    root = root.rstrip('/')
    if not _cloud_listing(root):
      raise _missing_folder_error(root, f'{root} holds no objects (no such folder)')
    return root
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise _missing_folder_error(root, f'{root} is not a directory')
  return root


def _has_split(root: str, split: str) -> bool:
  if paths_lib.is_cloud(root):
    return any(k.startswith(split + '/') for k in _cloud_listing(root))
  return os.path.isdir(os.path.join(root, split))


def _split_dir(spec: DataSpec, split: Optional[str]) -> tuple[str, Optional[str]]:
  """(root, split to use or None): root/split when it exists, else root."""
  root = _root(spec)
  if split and _has_split(root, split):
    return root, split
  if split:
    logging.info('folder %s has no %r subfolder: using all of it', root, split)
  return root, None


def scan_folder(spec: DataSpec, split: Optional[str] = None) -> FolderIndex:
  """Lists and header-checks the images of `data.folder` (or its split).

  Args:
    spec: the data settings.
    split: subfolder to use when root/split exists; otherwise root itself.

  Returns:
    The `FolderIndex` (cached until the directory's mtime changes).

  Raises:
    DatasetNotFoundError: path unset/missing or no readable images.
  """
  root, use = _split_dir(spec, split)
  if paths_lib.is_cloud(root):
    return _scan_folder_cached(root, 0, use)
  path = os.path.join(root, use) if use else root
  return _scan_folder_cached(path, os.stat(path).st_mtime_ns)


def num_examples(spec: DataSpec) -> int:
  """Readable image files of the train split."""
  return len(scan_folder(spec, spec.train_split).paths)


def num_classes(spec: DataSpec) -> int:
  """Class folders of the train split; every image must be in one."""
  index = scan_folder(spec, spec.train_split)
  if (index.labels < 0).any():
    raise ValueError(
        f"objective='supervised' needs labels, but data.folder={spec.folder!r} "
        f'has {int((index.labels < 0).sum())} images outside class subfolders: '
        'arrange it as root/class/*.jpg, or use the self-supervised objective.')
  return len(index.class_names)


def eval_splits(spec: DataSpec) -> tuple[str, str]:
  """(memory / training split, query / test split) for evaluation."""
  return spec.train_split, spec.eval_split


def has_heldout_split(spec: DataSpec) -> bool:
  """Whether root holds a train or eval split subfolder.

  Without either, both evaluation splits would read the whole folder, so
  evaluation holds out a part of it instead.
  """
  root = _root(spec)
  return any(s and _has_split(root, s) for s in eval_splits(spec))


def train_stream(spec: DataSpec, plan_for, seed: int,
                 include_index: bool) -> stream.TrainStream:
  """Epoch permutations of the train split's files; 'index' is the position.

  The `input_pipeline.Source.train_stream` of this source.
  """
  tf = _tf()
  index = scan_folder(spec, spec.train_split)
  plan = plan_for(len(index.paths))
  stats = decode.DecodeStats(skipped_at_scan=len(index.skipped))
  pil_decoder = decode.make_pil_decoder(stats)
  t_paths = tf.constant(np.asarray(index.paths, dtype=object))
  t_labels = tf.constant(index.labels)
  t_force_pil = tf.constant(index.kinds == KIND_PIL)

  read = (_cloud_reader(tf) if paths_lib.is_cloud(index.root) else
          lambda path: (tf.io.read_file(path), tf.constant(False)))

  def element_fn(i, elem_seed):
    data, unclean = read(tf.gather(t_paths, i))
    features, ok = decode.decode_features(data, tf.gather(t_force_pil, i) | unclean,
                                          elem_seed, spec, pil_decoder)
    return features, tf.gather(t_labels, i), ok

  ds = stream.indexed_stream(len(index.paths), plan, seed, element_fn,
                             include_index, spec)
  return stream.TrainStream([ds], plan, len(index.paths), stats)


def _cloud_reader(tf):
  """path -> (bytes, whether PIL must decode them), read through `mcl_jax.paths`.

  Not tf.io.read_file: that would reach the bucket through TensorFlow's own
  GCS client, a second client with its own credentials and retries. The
  header check `_probe` does at a local scan happens here, on the bytes.
  """
  def fetch(path):
    data = paths_lib.read_bytes(path.decode())
    # An object array: a numpy bytes scalar would drop trailing NUL bytes.
    return np.asarray(data, dtype=object), np.bool_(_probe_bytes(data) != KIND_TF)

  def read(path):
    data, unclean = tf.numpy_function(fetch, [path], [tf.string, tf.bool], stateful=False)
    data.set_shape([])
    unclean.set_shape([])
    return data, unclean
  return read


def eval_arrays(spec: DataSpec, split: str, max_examples=None):
  """root/split if it exists, else the whole folder; resized, centre-cropped.

  Files that fail to decode are skipped (with a warning).
  """
  index = scan_folder(spec, split)
  size, resize = spec.image_size, decode.eval_resize_size(spec)
  paths = index.paths[:max_examples] if max_examples else index.paths

  def load(path):
    try:
      return decode.pil_center_resize(decode.pil_decode_bytes(paths_lib.read_bytes(path)),
                                      size, resize)
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
