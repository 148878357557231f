"""The one path layer: every file the project keeps in a workdir, local or `gs://`.

Everything a run writes besides the Orbax checkpoints goes through here:
config.json, metrics.jsonl, the TensorBoard events, montage.png, train.log,
the checkpoint listing and clean-up, the tools' outputs. Callers pass plain
strings; a path that starts with `gs://` is a Google Cloud Storage object
name, anything else a local (or mounted) path.

* Local paths use the plain os / open calls this project always used: the
  same files, the same bytes, the same atomic rename for `write_atomic`.
* `gs://` paths use gcsfs (through fsspec), the maintained Python client of
  the fsspec project for GCS, and only that. It is also what Orbax's own
  directory work (step folders, `_CHECKPOINT_METADATA`, `commit_success.txt`,
  deleting old steps) runs on: Orbax goes through etils `epath`, and epath
  hands gs:// to gcsfs when `EPATH_USE_TF=0`. This module forces that
  setting, and `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`, as soon as the
  package is imported (mcl_jax/__init__.py imports this module), in
  production and in tests alike. Otherwise epath would pick tf.io.gfile
  whenever TensorFlow is installed (it is: tfds needs it), and gcsfs would
  pick its experimental zonal-bucket file system, which asks the storage
  control API about every bucket: neither can be pointed at a test server,
  so the tests would cover another code path than a real bucket gets. With
  both settings the code that talks to a real bucket is the code the tests
  run against fake-gcs-server on 127.0.0.1 (mcl_jax/testing/gcs_server.py);
  only the endpoint (STORAGE_EMULATOR_HOST) and the credentials differ. The
  array data of checkpoints is written by tensorstore's own GCS driver
  (TENSORSTORE_GCS_HTTP_URL in tests), as Orbax does by itself. This module
  and Orbax share one gcsfs instance, with its listing cache off (`gcs`).

GCS has no directories, no appends and no renames:
* `makedirs` is a no-op on gs:// (it never creates a bucket;
  `mcl_jax.storage_checks.check_writable` says when the bucket is missing).
* `write_atomic` uploads one object: a GCS upload is atomic (readers see the
  old object or the new one, never a part).
* `mcl_jax.append_log.AppendFile` gives append-only logs on these paths: locally a file opened with 'a' and
  flushed on every write, as before; on gs:// the new bytes are kept in
  memory and each upload sends only them, as a temporary object that is
  then concatenated onto the log with one server-side compose request (GCS's
  own way of appending; the log object is replaced atomically). Bytes
  uploaded per flush are what was written since the last one: they do not
  grow with the log. Uploads run on a background thread every
  `background_s` seconds (30 s for the run's logs; GCS takes about one
  update per second per object), plus the explicit flushes a caller needs
  (metrics.jsonl before each checkpoint).
* `move_tree` (a corrupt checkpoint moved aside) is os.rename locally and a
  copy then delete on gs://, not atomic: the source's commit marker is
  deleted first, so the source stops counting as a checkpoint at once.
"""

import builtins
import logging
import os
import posixpath
import re
import shutil
import threading
import uuid

from mcl_jax import errors

# Before anything imports gcsfs or asks etils for a gs:// backend (see above).
os.environ['EPATH_USE_TF'] = '0'
os.environ['GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT'] = 'false'

# The log file keeps the run, not a line per HTTP request of the storage client.
logging.getLogger('gcsfs').setLevel(logging.INFO)
logging.getLogger('fsspec').setLevel(logging.WARNING)
if os.environ.get('STORAGE_EMULATOR_HOST'):
  # A storage emulator (tests) takes no credentials: gcsfs (ours and Orbax's)
  # still tries the default ones first, and google-auth warns each time.
  logging.getLogger('google.auth._default').setLevel(logging.ERROR)

GS = 'gs://'
# The marker Orbax writes last into a complete checkpoint on GCS.
COMMIT_FILE = 'commit_success.txt'
CREDENTIALS_HELP = ('run `gcloud auth application-default login` (or point '
                    'GOOGLE_APPLICATION_CREDENTIALS at a service-account key; on a Cloud TPU '
                    'or Compute Engine VM the VM\'s service account is used)')


class StorageError(errors.RunError, RuntimeError):
  """A path that cannot be used; the message is one line saying what to do."""


def is_cloud(path) -> bool:
  """Whether `path` is a gs:// object name."""
  return str(path).startswith(GS)


class PathSyntaxError(errors.UsageError, ValueError):
  """A path given by the user that is a malformed or unsupported URL (exit status 2)."""


# `scheme:` then one slash or more: a URL, not a local name (a local file may
# well be called `a:b`, but not `a:/b` by accident).
_URL = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*):/')
# GCS bucket names: 3-63 lowercase letters, digits, '-', '_' and '.', starting
# and ending with a letter or digit (dotted names may be longer; 222 at most).
_BUCKET = re.compile(r'^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$')
_EXPECTED = 'expected gs://BUCKET/path for a Cloud Storage bucket, or a local path'


def check_user_path(path, flag: str = 'path') -> str | None:
  """Refuses a path the user typed that is a malformed or unsupported URL; returns it.

  Called wherever a path enters from a command line or config (a run's
  workdir, a tool's --workdir / --out, data folders, the dense probe's VOC
  root), before anything is created: a local path is used as given, so a
  typo such as `gs:/bucket/run` would otherwise become a folder named `gs:`
  in the current directory. Refused (one line naming `flag` and the form
  expected):

  * anything starting `gs:` (any case) that is not `gs://BUCKET[/...]` with a
    valid bucket name: `gs:/b`, `gs:b`, `gs://`, `gs:///b`, `GS://b`, `gs://My_Bucket`;
  * other URL schemes (`s3://`, `gcs://`, `http://`, `file://`...): only local
    paths and gs:// are read and written by this project (`gcs://`, fsspec's
    alias of gs://, is named as such in the message).

  None and '' pass through (the caller decides whether a path is required).
  """
  if path is None or str(path) == '':
    return path
  p = str(path)
  m = _URL.match(p)
  looks_gs = p[:3].lower() == 'gs:'
  if not looks_gs and not m:
    return path
  if p.startswith(GS):
    bucket = split(p)[0]
    if _BUCKET.match(bucket):
      return path
    what = ('has no bucket name' if not bucket else
            f'{bucket!r} is not a valid bucket name (3-63 lowercase letters, digits, '
            "'-', '_' or '.')")
    raise PathSyntaxError(f'{flag}={p}: {what}: {_EXPECTED}')
  if looks_gs:
    raise PathSyntaxError(f'{flag}={p}: a malformed gs:// URL (the scheme is lowercase '
                          f'gs followed by two slashes): {_EXPECTED}')
  scheme = m.group(1)
  hint = (" (gcs:// is another name of gs://: write gs://)"
          if scheme.lower() == 'gcs' else '')
  raise PathSyntaxError(f'{flag}={p}: {scheme}:// paths are not supported{hint}: '
                        f'{_EXPECTED}')



def split(path: str) -> tuple[str, str]:
  """(bucket, object name) of a gs:// path."""
  rest = str(path)[len(GS):]
  bucket, _, name = rest.partition('/')
  return bucket, name.strip('/')


# ------------------------------------------------------------ gcsfs access --

_FS = None
_FS_LOCK = threading.Lock()


def emulated() -> bool:
  """Whether a storage emulator is configured (tests): no credentials needed."""
  return bool(os.environ.get('STORAGE_EMULATOR_HOST'))


def gcs():
  """The gcsfs file system of this process: the very instance Orbax's epath uses,
  with gcsfs's listing cache turned off.

  gcsfs caches folder listings and answers later listings and existence
  checks from them. The objects of a checkpoint change behind its back:
  tensorstore writes the arrays, Orbax's other hosts write theirs, and this
  module moves a corrupt checkpoint aside. A cached listing then shows steps
  that are gone (Orbax tried to delete one twice) or hides new ones. Without
  the cache every listing asks the server: a few requests per checkpoint.
  """
  global _FS
  with _FS_LOCK:
    if _FS is None:
      _check_backends()
      import fsspec  # pylint: disable=import-outside-toplevel
      from fsspec import dircache  # pylint: disable=import-outside-toplevel
      # etils.epath's gs:// backend asks for exactly this (fsspec keeps one
      # instance per class and arguments); tests/test_paths.py checks it.
      fs = fsspec.filesystem('gcs', finalize_on_close=True)
      fs.dircache = dircache.DirCache(use_listings_cache=False)
      _FS = fs
    return _FS


def _fresh(path: str):
  """gcsfs and the key of a gs:// path."""
  return gcs(), gcs_key(path)


def _check_backends():
  """Fails loudly if gcsfs or etils were set up before this module forced them."""
  import gcsfs  # pylint: disable=import-outside-toplevel
  from gcsfs import core  # pylint: disable=import-outside-toplevel
  if gcsfs.GCSFileSystem is not core.GCSFileSystem:
    raise StorageError('gcsfs was imported before mcl_jax, with its experimental file '
                       'system: import mcl_jax first (or set GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='
                       'false)')
  from etils.epath import gpath  # pylint: disable=import-outside-toplevel
  uses_tf = getattr(gpath, '_is_tf_installed', lambda: False)  # etils' own switch
  if uses_tf():
    raise StorageError('etils epath resolved gs:// to tf.io.gfile before mcl_jax was '
                       'imported: import mcl_jax first (or set EPATH_USE_TF=0)')


def gcs_key(path: str) -> str:
  """gcsfs's name for a gs:// path: bucket/object, no scheme, no trailing slash."""
  return str(path)[len(GS):].rstrip('/')


# ------------------------------------------------------------- path names --

def join(path, *parts) -> str:
  if is_cloud(path):
    return posixpath.join(str(path).rstrip('/'), *parts)
  return os.path.join(path, *parts)


def abspath(path) -> str:
  return str(path).rstrip('/') if is_cloud(path) else os.path.abspath(path)


def basename(path) -> str:
  return posixpath.basename(str(path).rstrip('/')) if is_cloud(path) else os.path.basename(path)


def dirname(path) -> str:
  if is_cloud(path):
    return posixpath.dirname(str(path).rstrip('/'))
  return os.path.dirname(path)


# ------------------------------------------------------------ file system --

def exists(path) -> bool:
  """A file, or a folder (on gs://: any object under the prefix)."""
  if not is_cloud(path):
    return os.path.exists(path)
  fs, key = _fresh(path)
  return fs.exists(key)


def isdir(path) -> bool:
  """A folder (on gs://: a prefix holding at least one object)."""
  if not is_cloud(path):
    return os.path.isdir(path)
  fs, key = _fresh(path)
  return fs.isdir(key)


def isfile(path) -> bool:
  if not is_cloud(path):
    return os.path.isfile(path)
  fs, key = _fresh(path)
  return fs.isfile(key)


def getsize(path) -> int:
  if not is_cloud(path):
    return os.path.getsize(path)
  fs, key = _fresh(path)
  return int(fs.size(key))


def makedirs(path):
  """Creates a folder and its parents (nothing to do on gs://)."""
  if not is_cloud(path):
    os.makedirs(path, exist_ok=True)


def listdir(path) -> list[str]:
  """Names in a folder, sorted; [] if there is none."""
  if not is_cloud(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []
  fs, key = _fresh(path)
  try:
    entries = fs.ls(key, detail=False, refresh=True)
  except FileNotFoundError:
    return []
  prefix = gcs_key(path) + '/'
  return sorted({e.rstrip('/')[len(prefix):].split('/')[0] for e in entries
                 if e.startswith(prefix) and len(e.rstrip('/')) > len(prefix)})


def find(path) -> list[str]:
  """Every file under a folder, recursively, as paths relative to it, sorted; [] if none.

  On gs:// one listing of the prefix (paged by the server, no request per
  folder): what a data folder in a bucket is scanned with.
  """
  if not is_cloud(path):
    found = []
    for folder, dirs, names in os.walk(path):
      dirs.sort()
      rel = os.path.relpath(folder, path)
      found += [name if rel == '.' else os.path.join(rel, name) for name in names]
    return sorted(found)
  fs, key = _fresh(path)
  try:
    keys = fs.find(key, withdirs=False)
  except FileNotFoundError:
    return []
  prefix = key + '/'
  return sorted(k[len(prefix):] for k in keys if k.startswith(prefix) and not k.endswith('/'))


def glob(pattern) -> list[str]:
  """Paths matching a glob pattern, sorted (gs:// results keep the scheme)."""
  if not is_cloud(pattern):
    import glob as glob_lib  # pylint: disable=import-outside-toplevel
    return sorted(glob_lib.glob(pattern))
  fs, key = _fresh(pattern.split('*')[0].rsplit('/', 1)[0])
  return sorted(GS + p for p in fs.glob(gcs_key(pattern)))


def remove(path, missing_ok: bool = False):
  """Deletes one file."""
  try:
    if is_cloud(path):
      gcs().rm_file(gcs_key(path))
    else:
      os.remove(path)
  except FileNotFoundError:
    if not missing_ok:
      raise


def rmtree(path, missing_ok: bool = True):
  """Deletes a folder and all it holds."""
  if not is_cloud(path):
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif not missing_ok:
      raise FileNotFoundError(path)
    return
  fs, key = _fresh(path)
  try:
    fs.rm(key, recursive=True)
  except FileNotFoundError:
    if not missing_ok:
      raise


def rename(src, dst):
  """os.rename of a local path (atomic). GCS has no rename: see `move_tree`."""
  if is_cloud(src) or is_cloud(dst):
    raise StorageError(f'rename {src} -> {dst}: objects cannot be renamed in GCS')
  os.rename(src, dst)


def move_tree(src, dst, marker: str | None = COMMIT_FILE):
  """Moves a folder: os.rename locally; copy, then delete, on gs://.

  On gs:// the source's `marker` object (Orbax's commit marker) is deleted
  right after the copy, before the rest, so that an interruption never leaves
  a source that still counts as complete next to its copy.
  """
  if not is_cloud(src):
    os.rename(src, dst)
    return
  fs, _ = _fresh(src)
  for key in sorted(fs.find(gcs_key(src))):
    fs.cp_file(key, gcs_key(dst) + key[len(gcs_key(src)):])
  if marker:
    remove(join(src, marker), missing_ok=True)
  rmtree(src)


def disk_usage(path) -> tuple[int, int]:
  """(files, bytes) under a folder, counted recursively."""
  if not is_cloud(path):
    files = total = 0
    for folder, _, names in os.walk(path):
      for name in names:
        files += 1
        total += os.path.getsize(os.path.join(folder, name))
    return files, total
  fs, key = _fresh(path)
  sizes = fs.du(key, total=False)
  return len(sizes), int(sum(sizes.values()))


def read_bytes(path) -> bytes:
  if not is_cloud(path):
    with builtins.open(path, 'rb') as f:
      return f.read()
  return gcs().cat_file(gcs_key(path))


def read_text(path) -> str:
  if not is_cloud(path):
    with builtins.open(path) as f:
      return f.read()
  return read_bytes(path).decode()


def open(path, mode: str = 'r'):  # pylint: disable=redefined-builtin
  """A file object: the built-in open locally, a gcsfs file on gs://.

  On gs:// a file opened for writing becomes the object when it is closed
  (one upload for small files), so readers never see half of it.
  """
  if not is_cloud(path):
    return builtins.open(path, mode)
  if any(c in mode for c in 'a+'):
    raise StorageError(f'{path}: mode {mode!r}: GCS objects cannot be appended to or '
                       'updated in place (use AppendFile)')
  return gcs().open(gcs_key(path), mode)


def write_atomic(path, data: str | bytes):
  """Writes a whole file so that a kill never leaves part of it.

  Locally: a temporary file in the same folder, fsync, os.replace. On gs://
  one upload, which GCS commits atomically.
  """
  raw = data.encode() if isinstance(data, str) else bytes(data)
  if is_cloud(path):
    try:
      gcs().pipe_file(gcs_key(path), raw)
    except FileNotFoundError as e:
      raise StorageError(f'{path}: cannot be written: bucket gs://{split(path)[0]} does not '
                         'exist') from e
    except request_errors() as e:
      raise StorageError(f'{path}: cannot be written ({storage_reason(e)})') from e
    return
  tmp = f'{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp'
  try:
    with builtins.open(tmp, 'xb') as f:
      f.write(raw)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


# ------------------------------------------------------------ errors --

def request_errors() -> tuple[type[BaseException], ...]:
  """What a failed gs:// request raises through gcsfs.

  OSError (gcsfs's 403 and 404, aiohttp's connection errors), ValueError
  (400), RuntimeError, and gcsfs's HttpError for every other status (401,
  or 429 and 5xx once its retries are spent), which is none of those.
  """
  from gcsfs import retry  # pylint: disable=import-outside-toplevel
  return (OSError, RuntimeError, ValueError, retry.HttpError)


def storage_reason(e: BaseException) -> str:
  """A short reason of a storage error (status and message, one line)."""
  code = getattr(e, 'code', None)
  text = ' '.join(str(e).split())
  if isinstance(e, FileNotFoundError):
    return f'not found: {text}'
  return f'{type(e).__name__}{f" {code}" if code else ""}: {text}'[:300]
