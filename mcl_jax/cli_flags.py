"""Command-line parsing for every command: argparse and absl flags, errors as `UsageError`s.

argparse tools build their parser with `ArgumentParser` (its errors become
`UsageError`s and it has --verbose); absl-flag tools parse with
`parse_absl_flags`, which turns flag and config-file errors into
`UsageError`s before anything heavy is imported.
"""

import argparse
import os
import re
import sys
from typing import Sequence

from mcl_jax.console import VERBOSE_ENV
from mcl_jax.errors import UsageError, one_line

_REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# ml_collections (1.1.0) puts its suggestion for a mistyped field only into the
# message text (ConfigDict._generate_did_you_mean_message): no attribute or
# exception type carries it, so it is read from there. tests/test_cli.py
# provokes the installed version's real messages.
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




def check_path_flags(args: argparse.Namespace, *names: str) -> argparse.Namespace:
  """Refuses a malformed URL in path flags `names` (`paths.check_user_path`): exit 2.

  Called by each tool's parse_args, so that a typo like --workdir=gs:/bucket
  fails before anything is imported, read or created.
  """
  from mcl_jax import paths  # pylint: disable=import-outside-toplevel
  for name in names:
    paths.check_user_path(getattr(args, name), f'--{name}')
  return args


def add_checkpoint_flags(parser: ArgumentParser):
  """--workdir, --step and --which: the checkpoint a tool reads (evaluation, export)."""
  parser.add_argument('--workdir', required=True,
                      help='pretraining workdir (config.json + checkpoints/)')
  parser.add_argument('--step', type=int, default=None,
                      help='checkpoint step (default: newest)')
  parser.add_argument('--which', choices=('online', 'target'), default='online',
                      help='online network or EMA target encoder')


def check_distributed_flags(f) -> None:
  """Refuses the rendezvous flags without --distributed (main.py's and finetune's absl flags)."""
  if not f.distributed and (f.coordinator_address or f.num_processes or
                            f.process_id is not None or f.local_device_ids):
    raise UsageError('--coordinator_address / --num_processes / --process_id / '
                     '--local_device_ids need --distributed')


def initialize_distributed(f) -> None:
  """`jax.distributed.initialize()` from the --distributed flags; nothing without them."""
  if not f.distributed:
    return
  import jax  # pylint: disable=import-outside-toplevel
  jax.distributed.initialize(
      coordinator_address=f.coordinator_address, num_processes=f.num_processes,
      process_id=f.process_id,
      local_device_ids=[int(i) for i in f.local_device_ids] if f.local_device_ids else None)
  if jax.process_count() > 1 and jax.default_backend() == 'cpu':
    _no_cached_cpu_collectives(jax)


# jaxlib 0.12.1 (0.12.0.1 and earlier are fine): a CPU program with several
# cross-process (Gloo) collectives hangs in its first all-gather when it is
# loaded from the persistent compilation cache; compiled afresh it runs. No
# release has fixed it yet, so every later one is treated the same (a fixed one
# only compiles a multi-process CPU run afresh: slower, never wrong).
_CPU_CACHE_HANG_FROM = (0, 12, 1)


def _no_cached_cpu_collectives(jax) -> None:
  """Turns the persistent compilation cache off for a multi-process CPU run where it hangs."""
  from absl import logging  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  if not (jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir):
    return
  if cpu_cache_hangs(jaxlib.__version__):
    jax.config.update('jax_enable_compilation_cache', False)
    logging.warning('Persistent compilation cache off for this run: multi-process CPU '
                    'programs loaded from it hang on jaxlib %s (they compile afresh).',
                    jaxlib.__version__)


def cpu_cache_hangs(jaxlib_version: str) -> bool:
  """Whether multi-process CPU programs hang when loaded from the compilation cache."""
  release = tuple(int(p) for p in re.findall(r'\d+', jaxlib_version)[:3])
  return release >= _CPU_CACHE_HANG_FROM
