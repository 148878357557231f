"""Can a run or a tool use this path? Credentials and access, checked before any work.

Locally a probe file is created and removed; on gs:// the credentials are
looked up before any request, then a probe object is uploaded and deleted
(a folder to write into) or the path is listed once (a path to read), and a
failure says which of a missing bucket (404), a refused write (403) and
refused credentials (401) it was, from the HTTP status.

`check_writable` is a run's workdir check (main.py, through
training.checkpointing.check_workdir); `check_tool_path` is the same check
for a path a tool reads or writes (evaluate, dense_eval, export, visualize,
the detection fine-tune), called before anything slow.
"""

import logging
import os
import uuid

from mcl_jax import paths
from mcl_jax.paths import CREDENTIALS_HELP, StorageError


def check_credentials(path):
  """On gs:// (without an emulator): Google credentials must be found.

  google-auth's default lookup (GOOGLE_APPLICATION_CREDENTIALS, gcloud's
  application-default file, then the metadata server of a Google VM) is what
  both gcsfs and tensorstore use; without credentials gcsfs would go on
  anonymously and fail later with a less helpful error.
  """
  if not paths.is_cloud(path) or paths.emulated():
    return
  import google.auth  # pylint: disable=import-outside-toplevel
  from google.auth import exceptions  # pylint: disable=import-outside-toplevel
  # google-auth logs a warning of its own for each place it looked in vain
  # (the metadata server above all); the error below says it all in one line.
  logger = logging.getLogger('google.auth._default')
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    google.auth.default()
  except exceptions.DefaultCredentialsError as e:
    raise StorageError(f'{path}: no Google Cloud credentials found: {CREDENTIALS_HELP}') from e
  finally:
    logger.setLevel(level)


def check_writable(path, what: str | None = None) -> bool:
  """Makes sure a run can write into folder `path`, or says why not (StorageError).

  Locally: creates the folder and a probe file (removed again). On gs://:
  credentials (before any request), then a probe object uploaded and
  deleted. That needs only the object permissions a run needs anyway (not
  the bucket's metadata), and tells a missing bucket (404 on the upload; it
  is never created here: a typo would make a new bucket) from a write
  refused (403) and refused credentials (401).

  Args:
    path: the folder.
    what: what the folder is for, in the messages (default 'workdir PATH').

  Returns:
    Whether the folder was new: locally, created here; on gs://, holding no
    object yet.
  """
  paths.check_user_path(path)
  if not paths.is_cloud(path):
    new = not os.path.exists(path)
    _check_local_writable(path)
    return new
  check_credentials(path)
  bucket, _ = paths.split(path)
  probe = paths.join(path, f'.write_test_{uuid.uuid4().hex[:12]}')
  try:
    paths.gcs().pipe_file(paths.gcs_key(probe), b'')
    paths.remove(probe)
  except FileNotFoundError as e:
    what = what or f'workdir {path}'
    raise StorageError(f'bucket gs://{bucket} does not exist ({what}): create it (gcloud '
                       f'storage buckets create gs://{bucket}) or fix the path') from e
  except paths.request_errors() as e:
    raise _access_error(path, 'is not writable', e) from e
  try:
    return not paths.exists(path)
  except paths.request_errors() as e:
    raise _access_error(path, 'cannot be listed', e) from e


def check_tool_path(path, flag: str, write: bool = False):
  """A tool is about to read (or, with `write`, write) `path`: one line now if it cannot.

  The same checks as a run's workdir, for any path a tool takes (a workdir
  to read, an output file, a data folder): first the path's form
  (`paths.check_user_path`: a malformed URL is a UsageError, exit 2), then on
  gs://, before any other request, the credentials (`check_credentials`),
  then one request: for `write`, a probe object uploaded into the file's
  folder and deleted (`check_writable`: a missing bucket, a refused write
  or refused credentials are told apart); to read, one listing of the path,
  whose refusal (401 credentials, 403 permission) is said as such. A path
  that is simply absent passes here: the tool then says what it expected
  to find there. Local paths are only checked for their form.

  Raises:
    paths.PathSyntaxError: a malformed or unsupported URL.
    StorageError: no credentials, a missing bucket, or access refused.
  """
  paths.check_user_path(path, flag)
  if not path or not paths.is_cloud(path):
    return
  try:
    check_credentials(path)
    if write:
      check_writable(paths.dirname(path), what=f'{flag}={path}')
      return
    fs = paths.gcs()
    try:
      fs.ls(paths.gcs_key(path), detail=False, refresh=True)
    except FileNotFoundError:
      return
    except paths.request_errors() as e:
      raise _access_error(path, 'cannot be read', e) from e
  except StorageError as e:
    if flag in str(e):
      raise
    raise StorageError(f'{flag} {e}' if str(e).startswith(path) else f'{flag}: {e}') from e


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
    return StorageError(f'{path} {what}: the credentials were refused ({paths.storage_reason(e)}): '
                        f'{CREDENTIALS_HELP}')
  if status == 403:
    return StorageError(f'{path} {what}: permission denied ({paths.storage_reason(e)}): give the '
                        'account the Storage Object User role on the bucket, or choose another '
                        'path')
  return StorageError(f'{path} {what} ({paths.storage_reason(e)})')


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
