"""What every command line of the project shares: one error line, exit status, logs.

An entry point runs its main function through `run`:

    def main(argv) -> int: ...          # raise on failure, return 0
    if __name__ == '__main__':
      cli.run(main, prog='python -m mcl_jax.my_tool')

* A failure prints one line on stderr, `error: <what was wrong>; <what to
  do>`, and exits with status 2 for a wrong command line (`UsageError`, a bad
  flag, a config file that does not load, an impossible config value) or 1
  for a failure at run time (missing data, an unusable workdir or checkpoint,
  a non-finite loss, a missing optional package, anything unexpected); 130
  after Ctrl-C.
* No traceback unless asked for: `--verbose` on the command line or
  MCL_VERBOSE=1 in the environment. Where a log file is open (`log_to_file`),
  the traceback goes there as well.
* The console shows the run: INFO lines logged by this project's code, and
  WARNING or worse from anywhere. Library INFO (Orbax, JAX, TensorFlow, absl)
  goes only to the log file, once one is opened; until then it is held back
  and written into it when it opens. `--verbose` shows everything.

argparse tools build their parser with `ArgumentParser` (its errors become
`UsageError`s and it has --verbose); absl-flag tools parse with
`parse_absl_flags`, which turns flag and config-file errors into
`UsageError`s before anything heavy is imported.
"""

import argparse
import contextlib
import logging
import logging.handlers
import os
import re
import sys
import tempfile
import traceback
from typing import Callable, NoReturn, Sequence

# TensorFlow's C++ INFO messages say nothing about the run; set before any
# entry point can import TensorFlow (its import-time banners ignore it: see
# `native_stderr_to_log`).
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
VERBOSE_ENV = 'MCL_VERBOSE'

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_DIR = os.path.dirname(_PACKAGE_DIR)


class UsageError(Exception):
  """A wrong command line: exit status 2."""


class MissingDependencyError(RuntimeError):
  """An optional package is not installed; the message says what to install."""


# Exceptions are classified by class name (any class in the MRO), so that
# classifying needs none of the heavy modules that define them; tools run as
# `python -m` define theirs in __main__.
USAGE_ERRORS = frozenset({'UsageError', 'ConfigError', 'ArgumentError'})
RUNTIME_ERRORS = frozenset({'RunError', 'CheckpointError', 'DatasetNotFoundError', 'NonFiniteError',
                            'ExportError', 'MissingDependencyError', 'DenseEvalError',
                            'SegmentationDataError', 'StorageError'})


def require(module: str, what_for: str, install: str):
  """Imports `module`, or raises MissingDependencyError naming the install command."""
  import importlib  # pylint: disable=import-outside-toplevel
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise MissingDependencyError(
        f'{what_for} needs {module!r}, which is not installed ({e}): {install}') from e


# ------------------------------------------------------------------- errors --

def one_line(text: str) -> str:
  """`text` on one line: newlines and runs of blanks become single spaces."""
  return re.sub(r'\s+', ' ', str(text)).strip()


def _names(exc: BaseException) -> set[str]:
  return {cls.__name__ for cls in type(exc).__mro__}


def describe(exc: BaseException, verbose_hint: bool = True) -> tuple[str, int]:
  """(the one error line without 'error: ', exit status) of an exception."""
  names = _names(exc)
  if isinstance(exc, KeyboardInterrupt):
    return 'interrupted (nothing was saved after the last checkpoint)', EXIT_INTERRUPTED
  message = one_line(str(exc)) or type(exc).__name__
  if names & USAGE_ERRORS:
    return message, EXIT_USAGE
  if names & RUNTIME_ERRORS:
    return message, EXIT_FAILURE
  if isinstance(exc, OSError) and exc.strerror:
    where = f': {exc.filename}' if exc.filename else ''
    return f'{exc.strerror}{where}', EXIT_FAILURE
  hint = (f' (unexpected: rerun with --verbose or {VERBOSE_ENV}=1 for the traceback)'
          if verbose_hint else '')
  return f'{type(exc).__name__}: {message}{hint}', EXIT_FAILURE


def verbose_requested(argv: Sequence[str]) -> bool:
  """--verbose (or --verbose=true/1) in argv, or MCL_VERBOSE set to a true value."""
  if os.environ.get(VERBOSE_ENV, '').lower() in ('1', 'true', 'yes', 'on'):
    return True
  return any(a in ('--verbose', '--verbose=true', '--verbose=True', '--verbose=1')
             for a in argv)


def run(main: Callable[[list[str]], int | None], prog: str,
        argv: Sequence[str] | None = None) -> NoReturn:
  """Runs `main(argv)` (argv[0] is the program) and exits with its status.

  Sets up the console (see the module docstring); an exception becomes one
  `error:` line and exit status 2 or 1, a KeyboardInterrupt status 130.
  """
  argv = list(sys.argv if argv is None else argv)
  verbose = verbose_requested(argv[1:])
  setup_logging(verbose)
  try:
    status = main(argv)
  except SystemExit:
    raise
  except BaseException as e:  # pylint: disable=broad-except
    line, status = describe(e, verbose_hint=not verbose)
    logging.getLogger('mcl_jax.cli').debug('%s failed', prog, exc_info=True)
    if verbose:
      traceback.print_exc()
    _flush_logs()
    print(f'error: {line}', file=sys.stderr, flush=True)
    close_log_file()
    sys.exit(status)
  _flush_logs()
  close_log_file()
  sys.exit(int(status or 0))


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


# --------------------------------------------------------- argparse and absl --

class ArgumentParser(argparse.ArgumentParser):
  """argparse with --verbose, whose errors are `UsageError`s (one line, status 2)."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.add_argument('--verbose', action='store_true',
                      help=f'show library logs and tracebacks (or set {VERBOSE_ENV}=1)')

  def add_flag(self, name: str, **kwargs):
    """--name, spelt with underscores as every tool's flags are; --name-with-dashes works too."""
    dashed = name.replace('_', '-')
    names = [f'--{name}'] + ([f'--{dashed}'] if dashed != name else [])
    return self.add_argument(*names, dest=name, **kwargs)

  def error(self, message):
    raise UsageError(f'{one_line(message)} (see {self.prog} --help)')


_DID_YOU_MEAN = re.compile(r'Did you mean "([^"]+)" instead of "([^"]+)"')


def _config_error(exc: BaseException, argv: Sequence[str], flag: str) -> UsageError:
  """A readable UsageError of a config override or config file that failed to load."""
  text = str(exc)
  m = _DID_YOU_MEAN.search(text.replace('\\"', '"'))
  if m:
    right, wrong = m.groups()
    bad = next((a.split('=')[0] for a in argv if a.startswith(f'--{flag}.')
                and re.search(rf'(^|\.){re.escape(wrong)}(=|\.|$)', a.split('=')[0][2:])), None)
    bad = bad or f'--{flag}.{wrong}'
    parts = bad[len(flag) + 3:].split('.')
    parts[parts.index(wrong) if wrong in parts else -1] = right
    fixed = f'--{flag}.' + '.'.join(parts)
    return UsageError(f'{bad}: the config has no field {wrong!r}; did you mean {fixed}?')
  # A config file that does not load: the first line names the file, the
  # innermost cause says why (ml_collections nests them).
  causes = []
  e = exc
  while e is not None:
    causes.append(e)
    e = e.__cause__ or e.__context__
  reason = causes[-1]
  reason_text = one_line(str(reason)).replace("\\'", "'")
  return UsageError(f'--{flag}: {reason_text}')


def parse_absl_flags(argv: Sequence[str], doc: str, config_flag: str = 'config') -> list[str]:
  """Parses absl flags (and an ml_collections config flag) into flags.FLAGS.

  Handles -h / --help (prints `doc` and the flags, exits 0). Every problem of
  the command line, the config file or a --config.x override raises a
  UsageError with one readable line, before anything heavy is imported.

  Returns:
    The arguments left after the flags (argv[0] first).
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  if any(a in ('-h', '--help', '-help', '--helpshort', '--helpfull') for a in argv[1:]):
    print(doc.strip() + '\n\nFlags:\n' + f.main_module_help())
    sys.exit(0)
  if 'verbose' not in f:
    flags.DEFINE_bool('verbose', False,
                      f'Show library logs and tracebacks (or set {VERBOSE_ENV}=1).')
  given = [a.split('=', 1)[1] for a in argv[1:] if a.startswith(f'--{config_flag}=')]
  path = given[-1] if given else None  # the last one counts, as in absl
  if path is not None:
    file_part = path.split(':', 1)[0]  # config_flags allows path:argument
    if not os.path.isfile(file_part):
      raise UsageError(f'--{config_flag}={path}: no such file (the configs are in '
                       f'{os.path.relpath(os.path.join(_REPO_DIR, "configs"))}/, e.g. '
                       'configs/demo.py)')
  try:
    rest = f(list(argv))
  except flags.Error as e:
    raise UsageError(f'{one_line(e)} (see {os.path.basename(argv[0])} --help)') from e
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    raise _config_error(e, argv, config_flag) from e
  if config_flag in f:
    try:
      _ = f[config_flag].value.keys()  # config_flags reports load errors on access
    except Exception as e:  # pylint: disable=broad-except
      raise _config_error(e, argv, config_flag) from e
  if len(rest) > 1:
    raise UsageError(f'unexpected arguments {rest[1:]} (flags are --name=value; see '
                     f'{os.path.basename(argv[0])} --help)')
  return rest


# ------------------------------------------------------------------ logging --

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
  """The log file, local or gs:// (an mcl_jax.paths.AppendFile).

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
    from mcl_jax import paths  # pylint: disable=import-outside-toplevel
    self.baseFilename = path
    self._storage_error = paths.StorageError
    self._file = paths.AppendFile(path, background_s=interval_s, on_error=_warn_stderr)

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
  print(f'warning: log file: {one_line(e)}', file=sys.stderr, flush=True)


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


def _flush_logs():
  for h in logging.getLogger().handlers:
    try:
      h.flush()
    except Exception:  # pylint: disable=broad-except
      pass
  sys.stdout.flush()
