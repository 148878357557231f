"""The console and the log file of every command: who sees which log record where.

* The console shows the run: INFO lines logged by this project's code, and
  WARNING or worse from anywhere. Library INFO (Orbax, JAX, TensorFlow, absl)
  goes only to the log file, once one is opened (`log_to_file`); until then
  it is held back and written into it when it opens. `--verbose` (or
  MCL_VERBOSE=1) shows everything.
* The log file is local or gs:// (an `mcl_jax.append_log.AppendFile`).

`mcl_jax.cli.run` sets this up for a command; library code only logs.
"""

import contextlib
import logging
import logging.handlers
import os
import sys
import tempfile
from typing import Sequence

from mcl_jax import errors

VERBOSE_ENV = 'MCL_VERBOSE'

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_DIR = os.path.dirname(_PACKAGE_DIR)


def verbose_requested(argv: Sequence[str]) -> bool:
  """--verbose (or --verbose=true/1) in argv, or MCL_VERBOSE set to a true value."""
  if os.environ.get(VERBOSE_ENV, '').lower() in ('1', 'true', 'yes', 'on'):
    return True
  return any(a in ('--verbose', '--verbose=true', '--verbose=True', '--verbose=1')
             for a in argv)


@contextlib.contextmanager
def native_stderr_to_log(what: str):
  """Sends what native code writes to stderr meanwhile to the log (INFO), not the console.

  For imports whose C++ libraries print start-up banners straight to file
  descriptor 2 (TensorFlow's oneDNN and CPU-feature lines, written before
  its logging is configured, whatever TF_CPP_MIN_LOG_LEVEL says). If the
  block raises, the captured text goes to the console after all.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  failed = False
  with tempfile.TemporaryFile() as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield
    except BaseException:
      failed = True
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      text = tmp.read().decode(errors='replace').rstrip()
      if text and failed:
        print(text, file=sys.stderr)
      elif text:
        logging.getLogger(f'native.{what}').info('%s', text, extra={'library': True})



def _from_project(record: logging.LogRecord) -> bool:
  if getattr(record, 'library', False):
    return False
  path = os.path.abspath(record.pathname or '')
  return path.startswith(_PACKAGE_DIR + os.sep) or path == os.path.join(_REPO_DIR, 'main.py')


class _ConsoleFilter(logging.Filter):
  """This project's INFO and everyone's WARNING+ (everything when verbose)."""

  def __init__(self, verbose: bool, below_warning: bool):
    super().__init__()
    self.verbose, self.below_warning = verbose, below_warning

  def filter(self, record):
    if (record.levelno < logging.WARNING) != self.below_warning:
      return False
    return record.levelno >= logging.WARNING or self.verbose or (
        record.levelno >= logging.INFO and _from_project(record))


class _ConsoleFormatter(logging.Formatter):
  """The message as it is; warnings and errors prefixed, library ones one line."""

  def __init__(self, verbose: bool):
    super().__init__()
    self.verbose = verbose

  def format(self, record):
    msg = record.getMessage()
    if record.name == 'py.warnings':  # "file:line: Category: text\n  source line"
      msg = msg.strip().splitlines()[0]
    if record.levelno >= logging.ERROR:
      msg = 'error: ' + msg
    elif record.levelno >= logging.WARNING:
      msg = 'warning: ' + msg
    if self.verbose and record.exc_info:
      msg += '\n' + self.formatException(record.exc_info)
    return msg


_FILE_FORMAT = '%(asctime)s %(levelname).1s %(name)s %(filename)s:%(lineno)d] %(message)s'


class _State:
  handlers: list = []
  buffer: logging.handlers.MemoryHandler | None = None
  file: '_AppendFileHandler | None' = None


def setup_logging(verbose: bool = False):
  """Console handlers on the root logger, and a buffer for the log file.

  INFO lines go to stdout, WARNING and worse to stderr. Python warnings are
  logged (one line each). Everything at INFO and above is kept in memory
  until `log_to_file` opens the log file.
  """
  root = logging.getLogger()
  for h in _State.handlers:
    root.removeHandler(h)
  out = logging.StreamHandler(sys.stdout)
  out.addFilter(_ConsoleFilter(verbose, below_warning=True))
  err = logging.StreamHandler(sys.stderr)
  err.addFilter(_ConsoleFilter(verbose, below_warning=False))
  for h in (out, err):
    h.setFormatter(_ConsoleFormatter(verbose))
  _State.buffer = logging.handlers.MemoryHandler(
      capacity=100_000, flushLevel=logging.CRITICAL + 1, flushOnClose=False)
  _State.handlers = [out, err, _State.buffer]
  for h in _State.handlers:
    root.addHandler(h)
  root.setLevel(logging.DEBUG)  # the file keeps the traceback of a failure
  for h in (out, err):
    h.setLevel(logging.INFO)
  _State.buffer.setLevel(logging.INFO)
  use_project_verbosity()
  logging.captureWarnings(True)


def reset_logging():
  """Undoes `setup_logging` (for a process that runs several commands in turn, as tests do)."""
  close_log_file()
  root = logging.getLogger()
  for h in _State.handlers:
    root.removeHandler(h)
  _State.handlers, _State.buffer = [], None
  logging.captureWarnings(False)


def use_project_verbosity():
  """Lets absl's INFO through to the handlers (absl flag parsing resets it)."""
  try:
    from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  absl_logging.set_verbosity(absl_logging.INFO)
  # absl's own handler (installed by absl.app.run) would print a second copy.
  root = logging.getLogger()
  handler = absl_logging.get_absl_handler()
  if handler in root.handlers:
    root.removeHandler(handler)


class _AppendFileHandler(logging.Handler):
  """The log file, local or gs:// (an mcl_jax.append_log.AppendFile).

  Locally each record is written and flushed at once, as logging's
  FileHandler does. On gs:// (GCS has no appends) `emit` only keeps the
  lines; the AppendFile's own thread uploads them every `interval_s`
  seconds, and `close` uploads the rest. Never from `emit` or `flush`:
  logging calls those with the handler's lock held, and the storage client
  logs from its event-loop thread during an upload. A failed upload keeps
  the lines for the next one and says so once on stderr (logging it would
  come back here).
  """

  def __init__(self, path: str, interval_s: float):
    super().__init__()
    from mcl_jax import append_log, paths  # pylint: disable=import-outside-toplevel
    self.baseFilename = path
    self._storage_error = paths.StorageError
    self._file = append_log.AppendFile(path, background_s=interval_s, on_error=_warn_stderr)

  def emit(self, record):
    try:
      self._file.write(self.format(record) + '\n')
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)

  def flush(self):
    """Nothing more to do: see the class."""

  def close(self):
    try:
      self._file.close()
    except self._storage_error as e:
      _warn_stderr(e)
    super().close()


def _warn_stderr(e: BaseException):
  print(f'warning: log file: {errors.one_line(e)}', file=sys.stderr, flush=True)


# gs:// log file: uploaded this often.
CLOUD_LOG_FLUSH_S = 30.0


def log_to_file(path: str) -> str | None:
  """Starts writing the full log (library INFO included) to `path` (local or gs://).

  What was logged since `setup_logging` is written first. Does nothing
  unless `setup_logging` ran (library code and tests log as they please).
  Returns the path, or None.
  """
  if _State.buffer is None:
    return None
  close_log_file()
  handler = _AppendFileHandler(path, CLOUD_LOG_FLUSH_S)
  handler.setFormatter(logging.Formatter(_FILE_FORMAT))
  handler.setLevel(logging.DEBUG)
  for record in _State.buffer.buffer:
    handler.handle(record)
  _State.buffer.buffer.clear()
  root = logging.getLogger()
  root.removeHandler(_State.buffer)
  root.addHandler(handler)
  _State.file = handler
  return path


def log_file() -> str | None:
  """The open log file's path, or None."""
  return _State.file.baseFilename if _State.file is not None else None


def close_log_file():
  """Closes the log file (before its directory is removed, and at exit)."""
  if _State.file is not None:
    logging.getLogger().removeHandler(_State.file)
    _State.file.close()
    _State.file = None


def flush_logs():
  """Flushes every handler and stdout (before the error line and at exit)."""
  for h in logging.getLogger().handlers:
    try:
      h.flush()
    except Exception:  # pylint: disable=broad-except
      pass
  sys.stdout.flush()
