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
  and Orbax share one gcsfs instance, with its listing cache off (`_fs`).

GCS has no directories, no appends and no renames:
* `makedirs` is a no-op on gs:// (it never creates a bucket; `check_workdir`
  says when the bucket is missing).
* `write_atomic` uploads one object: a GCS upload is atomic (readers see the
  old object or the new one, never a part).
* `AppendFile` gives append-only logs: locally a file opened with 'a' and
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
import shutil
import threading
import uuid

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
_TMP_PREFIX = '.append-'
CREDENTIALS_HELP = ('run `gcloud auth application-default login` (or point '
                    'GOOGLE_APPLICATION_CREDENTIALS at a service-account key; on a Cloud TPU '
                    'or Compute Engine VM the VM\'s service account is used)')


class StorageError(RuntimeError):
  """A path that cannot be used; the message is one line saying what to do."""


def is_cloud(path) -> bool:
  """Whether `path` is a gs:// object name."""
  return str(path).startswith(GS)


def check_supported(path):
  """Refuses URLs of other schemes (s3://, http://...): only local and gs:// work."""
  p = str(path)
  if '://' in p and not is_cloud(p):
    raise StorageError(f'{p!r}: only local paths and gs:// buckets are supported')


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


def _fs():
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
  return _fs(), _key(path)


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


def _key(path: str) -> str:
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
  prefix = _key(path) + '/'
  return sorted({e.rstrip('/')[len(prefix):].split('/')[0] for e in entries
                 if e.startswith(prefix) and len(e.rstrip('/')) > len(prefix)})


def glob(pattern) -> list[str]:
  """Paths matching a glob pattern, sorted (gs:// results keep the scheme)."""
  if not is_cloud(pattern):
    import glob as glob_lib  # pylint: disable=import-outside-toplevel
    return sorted(glob_lib.glob(pattern))
  fs, key = _fresh(pattern.split('*')[0].rsplit('/', 1)[0])
  return sorted(GS + p for p in fs.glob(_key(pattern)))


def remove(path, missing_ok: bool = False):
  """Deletes one file."""
  try:
    if is_cloud(path):
      _fs().rm_file(_key(path))
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
  for key in sorted(fs.find(_key(src))):
    fs.cp_file(key, _key(dst) + key[len(_key(src)):])
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
  return _fs().cat_file(_key(path))


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
  return _fs().open(_key(path), mode)


def write_atomic(path, data: str | bytes):
  """Writes a whole file so that a kill never leaves part of it.

  Locally: a temporary file in the same folder, fsync, os.replace. On gs://
  one upload, which GCS commits atomically.
  """
  raw = data.encode() if isinstance(data, str) else bytes(data)
  if is_cloud(path):
    try:
      _fs().pipe_file(_key(path), raw)
    except FileNotFoundError as e:
      raise StorageError(f'{path}: cannot be written: bucket gs://{split(path)[0]} does not '
                         'exist') from e
    except _request_errors() as e:
      raise StorageError(f'{path}: cannot be written ({describe(e)})') from e
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


# ------------------------------------------------------------ append logs --

class AppendFile:
  """An append-only log file (metrics.jsonl, train.log, TensorBoard events).

  Locally: the file opened with 'a' (binary or text as `binary` says) and
  flushed after every write, exactly as a plain file. On gs:// writes are
  kept in memory; `flush()` uploads what was written since the last upload
  and appends it with a compose request. With `background_s`, a daemon
  thread also does that every `background_s` seconds, so that the writer
  never waits for the network; an upload that fails there keeps the bytes
  for the next one and is reported once through `on_error`. An explicit
  `flush()` that fails raises StorageError (the bytes are kept as well).
  Process-local; one writer per file.

  Attributes:
    uploads, bytes_uploaded: gs:// uploads done and the bytes they sent.
  """

  def __init__(self, path: str, binary: bool = False, background_s: float | None = None,
               on_error=None):
    self.path, self.binary = str(path), binary
    self.cloud = is_cloud(path)
    self.uploads = self.bytes_uploaded = 0
    # Writes take _lock only, briefly, so a write never waits for an upload:
    # the storage client logs from its own thread during an upload, and a
    # log record written here must not wait for that upload to end.
    self._lock = threading.Lock()
    self._upload_lock = threading.Lock()
    self._pending = bytearray()
    self._file = None
    self._exists = None
    self._on_error = on_error
    self._failing = False
    self._stop = self._thread = None
    if not self.cloud:
      self._file = builtins.open(self.path, 'ab' if binary else 'a')
    elif background_s:
      self._stop = threading.Event()
      self._thread = threading.Thread(target=self._uploader, args=(background_s,),
                                      name=f'upload {basename(path)}', daemon=True)
      self._thread.start()

  def write(self, data: str | bytes):
    if self._file is not None:
      self._file.write(data)
      self._file.flush()
      return
    with self._lock:
      self._pending += data.encode() if isinstance(data, str) else data

  def flush(self):
    """Makes what was written durable: on gs://, uploads it (StorageError if that fails)."""
    if self._file is not None:
      self._file.flush()
      return
    with self._upload_lock:
      with self._lock:
        data = bytes(self._pending)
      if not data:
        return
      self._append(data)
      with self._lock:
        del self._pending[:len(data)]
      self.uploads += 1
      self.bytes_uploaded += len(data)

  def _uploader(self, every_s: float):
    while not self._stop.wait(every_s):
      try:
        self.flush()
        self._failing = False
      except StorageError as e:
        if not self._failing and self._on_error is not None:
          self._on_error(e)
        self._failing = True

  def _append(self, data: bytes):
    fs, key = _fs(), _key(self.path)
    try:
      if self._exists is None:
        self._exists = exists(self.path)
      if not self._exists:
        fs.pipe_file(key, data)
        self._exists = True
        return
      part = f'{_key(dirname(self.path))}/{_TMP_PREFIX}{uuid.uuid4().hex}.tmp'
      fs.pipe_file(part, data)
      try:
        fs.merge(key, [key, part])
      finally:
        try:
          fs.rm_file(part)
        except OSError:
          pass  # a leftover part is removed by remove_leftover_parts
    except _request_errors() as e:
      raise StorageError(f'{self.path}: appending {len(data)} bytes failed '
                         f'({describe(e)}); they are kept for the next flush') from e

  @property
  def pending(self) -> int:
    """Bytes written but not uploaded yet (gs://)."""
    return len(self._pending)

  def close(self):
    """Stops the uploader, uploads what is left (StorageError if that fails), closes."""
    if self._file is not None:
      self._file.close()
      self._file = None
      return
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
    self.flush()


def remove_leftover_parts(folder):
  """Deletes temporary append parts that a kill left in a gs:// folder."""
  if not is_cloud(folder):
    return
  for name in listdir(folder):
    if name.startswith(_TMP_PREFIX):
      remove(join(folder, name), missing_ok=True)


# ---------------------------------------------------------------- checks --

def describe(e: BaseException) -> str:
  """A short reason of a storage error (status and message, one line)."""
  code = getattr(e, 'code', None)
  text = ' '.join(str(e).split())
  if isinstance(e, FileNotFoundError):
    return f'not found: {text}'
  return f'{type(e).__name__}{f" {code}" if code else ""}: {text}'[:300]


def check_credentials(path):
  """On gs:// (without an emulator): Google credentials must be found.

  google-auth's default lookup (GOOGLE_APPLICATION_CREDENTIALS, gcloud's
  application-default file, then the metadata server of a Google VM) is what
  both gcsfs and tensorstore use; without credentials gcsfs would go on
  anonymously and fail later with a less helpful error.
  """
  if not is_cloud(path) or emulated():
    return
  import google.auth  # pylint: disable=import-outside-toplevel
  from google.auth import exceptions  # pylint: disable=import-outside-toplevel
  try:
    google.auth.default()
  except exceptions.DefaultCredentialsError as e:
    raise StorageError(f'{path}: no Google Cloud credentials found: {CREDENTIALS_HELP}') from e


def check_writable(path) -> bool:
  """Makes sure a run can write into folder `path`, or says why not (StorageError).

  Locally: creates the folder and a probe file (removed again). On gs://:
  credentials (before any request), then a probe object uploaded and
  deleted. That needs only the object permissions a run needs anyway (not
  the bucket's metadata), and tells a missing bucket (404 on the upload; it
  is never created here: a typo would make a new bucket) from a write
  refused (403) and refused credentials (401).

  Returns:
    Whether the folder was new: locally, created here; on gs://, holding no
    object yet.
  """
  check_supported(path)
  if not is_cloud(path):
    new = not os.path.exists(path)
    _check_local_writable(path)
    return new
  check_credentials(path)
  bucket, _ = split(path)
  if not bucket:
    raise StorageError(f'{path!r}: no bucket name (gs://BUCKET/path)')
  probe = join(path, f'.write_test_{uuid.uuid4().hex[:12]}')
  try:
    _fs().pipe_file(_key(probe), b'')
    remove(probe)
  except FileNotFoundError as e:
    raise StorageError(f'bucket gs://{bucket} does not exist (workdir {path}): create it '
                       f'(gcloud storage buckets create gs://{bucket}) or fix the path') from e
  except _request_errors() as e:
    raise _access_error(path, 'is not writable', e) from e
  try:
    return not exists(path)
  except _request_errors() as e:
    raise _access_error(path, 'cannot be listed', e) from e


def _request_errors() -> tuple[type[BaseException], ...]:
  """What a failed gs:// request raises through gcsfs.

  OSError (gcsfs's 403 and 404, aiohttp's connection errors), ValueError
  (400), RuntimeError, and gcsfs's HttpError for every other status (401,
  or 429 and 5xx once its retries are spent), which is none of those.
  """
  from gcsfs import retry  # pylint: disable=import-outside-toplevel
  return (OSError, RuntimeError, ValueError, retry.HttpError)


def _status(e: BaseException) -> int | None:
  """The HTTP status behind a gcsfs error, or None.

  gcsfs raises HttpError (with .code) for most statuses, a failed refresh
  of the credentials included (as 401), but a plain OSError('Forbidden:
  URL ...') for 403. The status is never searched for in the message: that
  holds the request's URL, whose port or object name may contain any digits
  or words (a proxy on port 40195 once made a 403 read as a 401).
  """
  code = getattr(e, 'code', None)
  if isinstance(code, int):
    return code
  if isinstance(e, OSError) and str(e).startswith('Forbidden: '):
    return 403
  return None


def _access_error(path, what: str, e: BaseException) -> StorageError:
  status = _status(e)
  if status == 401:
    return StorageError(f'{path} {what}: the credentials were refused ({describe(e)}): '
                        f'{CREDENTIALS_HELP}')
  if status == 403:
    return StorageError(f'{path} {what}: permission denied ({describe(e)}): give the '
                        'account the Storage Object User role on the bucket, or choose another '
                        'path')
  return StorageError(f'{path} {what} ({describe(e)})')


def _check_local_writable(path):
  import tempfile  # pylint: disable=import-outside-toplevel
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise StorageError(f'{path!r} cannot be created ({type(e).__name__}: {e.strerror or e})'
                       ) from e
  try:
    fd, probe = tempfile.mkstemp(prefix='.write_test_', dir=path)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise StorageError(f'{path!r} is not writable ({type(e).__name__}: {e.strerror or e})'
                       ) from e
