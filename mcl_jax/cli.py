"""What every command line of the project shares: one error line and its exit status.

An entry point runs its main function through `run`:

    def main(argv) -> int: ...          # raise on failure, return 0
    if __name__ == '__main__':
      cli.run(main, prog='python -m mcl_jax.my_tool')

* A failure prints one line on stderr, `error: <what was wrong>; <what to
  do>`, and exits with the status its type gives: 2 for a wrong command line
  (an `errors.UsageError`: a bad flag, a config file that does not load, an
  impossible config value; or argparse's ArgumentError), 1 for a failure at
  run time (an `errors.RunError`: missing data, an unusable workdir or
  checkpoint, a non-finite loss, a missing optional package; or anything
  unexpected); 130 after Ctrl-C. A new error class gets its status by
  subclassing one of the two bases.
* No traceback unless asked for: `--verbose` on the command line or
  MCL_VERBOSE=1 in the environment. Where a log file is open
  (`console.log_to_file`), the traceback goes there as well.

The console and log file are `mcl_jax.console`'s, the parsers
`mcl_jax.cli_flags`'; their names are importable from here too, as the
commands use them.
"""

import argparse
import faulthandler
import importlib
import logging
import os
import signal
import sys
import traceback
from typing import Callable, NoReturn, Sequence

# TensorFlow's C++ INFO messages say nothing about the run; set before any
# entry point can import TensorFlow (its import-time banners ignore it: see
# `console.native_stderr_to_log`).
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

# pylint: disable=unused-import,g-multiple-import
from mcl_jax import console, errors
from mcl_jax.cli_flags import (ArgumentParser, add_checkpoint_flags, check_path_flags,  # noqa: F401
                               check_distributed_flags, initialize_distributed,
                               parse_absl_flags)
from mcl_jax.console import (VERBOSE_ENV, close_log_file, log_file, log_to_file,  # noqa: F401
                             native_stderr_to_log, reset_logging, setup_logging,
                             use_project_verbosity, verbose_requested)
from mcl_jax.errors import EXIT_FAILURE, EXIT_USAGE, UsageError, one_line  # noqa: F401
# pylint: enable=unused-import,g-multiple-import

EXIT_INTERRUPTED = 130


class MissingDependencyError(errors.RunError, RuntimeError):
  """An optional package is not installed; the message says what to install."""


def require(module: str, what_for: str, install: str):
  """Imports `module`, or raises MissingDependencyError naming the install command."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise MissingDependencyError(
        f'{what_for} needs {module!r}, which is not installed ({e}): {install}') from e


def error_report(exc: BaseException, verbose_hint: bool = True) -> tuple[str, int]:
  """(the one error line without 'error: ', exit status) of an exception, by its type."""
  if isinstance(exc, KeyboardInterrupt):
    return 'interrupted (nothing was saved after the last checkpoint)', EXIT_INTERRUPTED
  message = one_line(str(exc)) or type(exc).__name__
  if isinstance(exc, argparse.ArgumentError):
    return message, EXIT_USAGE
  if isinstance(exc, (errors.UsageError, errors.RunError)):
    return message, exc.exit_status
  if isinstance(exc, OSError) and exc.strerror:
    where = f': {exc.filename}' if exc.filename else ''
    return f'{exc.strerror}{where}', EXIT_FAILURE
  hint = (f' (unexpected: rerun with --verbose or {VERBOSE_ENV}=1 for the traceback)'
          if verbose_hint else '')
  return f'{type(exc).__name__}: {message}{hint}', EXIT_FAILURE


def run(main: Callable[[list[str]], int | None], prog: str,
        argv: Sequence[str] | None = None) -> NoReturn:
  """Runs `main(argv)` (argv[0] is the program) and exits with its status.

  Sets up the console (`console.setup_logging`); an exception becomes one
  `error:` line and exit status 2 or 1, a KeyboardInterrupt status 130.
  SIGUSR1 prints every thread's Python stack on stderr (the process goes on).
  """
  argv = list(sys.argv if argv is None else argv)
  if hasattr(signal, 'SIGUSR1') and sys.__stderr__ is not None:
    # `kill -USR1 PID` prints every thread's Python stack on stderr: where a
    # hung run waits (e.g. in a collective that another process never joined).
    faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
  verbose = verbose_requested(argv[1:])
  setup_logging(verbose)
  try:
    status = main(argv)
  except SystemExit:
    raise
  except BaseException as e:  # pylint: disable=broad-except
    line, status = error_report(e, verbose_hint=not verbose)
    logging.getLogger('mcl_jax.cli').debug('%s failed', prog, exc_info=True)
    if verbose:
      traceback.print_exc()
    console.flush_logs()
    print(f'error: {line}', file=sys.stderr, flush=True)
    close_log_file()
    sys.exit(status)
  console.flush_logs()
  close_log_file()
  sys.exit(int(status or 0))
