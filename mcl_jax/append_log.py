"""Append-only log files, local or `gs://`: metrics.jsonl, train.log, TensorBoard events.

GCS has no appends: on gs:// the new bytes are kept in memory and each
upload sends only them, as a temporary object that is then concatenated
onto the log with one server-side compose request (the log object is
replaced atomically), optionally from a background thread (see
`AppendFile`). Paths and the gcsfs instance are `mcl_jax.paths`'.
"""

import builtins
import threading
import uuid

from mcl_jax import paths
from mcl_jax.paths import StorageError

_TMP_PREFIX = '.append-'


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
    self.cloud = paths.is_cloud(path)
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
                                      name=f'upload {paths.basename(path)}', daemon=True)
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
    fs, key = paths.gcs(), paths.gcs_key(self.path)
    try:
      if self._exists is None:
        self._exists = paths.exists(self.path)
      if not self._exists:
        fs.pipe_file(key, data)
        self._exists = True
        return
      folder = paths.gcs_key(paths.dirname(self.path))
      part = f'{folder}/{_TMP_PREFIX}{uuid.uuid4().hex}.tmp'
      fs.pipe_file(part, data)
      try:
        fs.merge(key, [key, part])
      finally:
        try:
          fs.rm_file(part)
        except OSError:
          pass  # a leftover part is removed by remove_leftover_parts
    except paths.request_errors() as e:
      raise StorageError(f'{self.path}: appending {len(data)} bytes failed '
                         f'({paths.storage_reason(e)}); they are kept for the next flush') from e

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
  if not paths.is_cloud(folder):
    return
  for name in paths.listdir(folder):
    if name.startswith(_TMP_PREFIX):
      paths.remove(paths.join(folder, name), missing_ok=True)
