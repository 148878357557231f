"""Pretrains MCL: python main.py --config=configs/mcl_100ep.py --workdir=DIR.

Without --config it runs the CPU demo (configs/demo.py). Rerunning the same
command resumes from the newest checkpoint in the workdir. This file parses
flags and sets up the process; everything else, from checking the config to
the final evaluation, is `mcl_jax.training.loop.train_and_evaluate`.

Multi-process (README, "Multi-host launches"): run the same command on every
host (or once per GPU) with --distributed. On Cloud TPU VMs, SLURM, Open MPI
and Kubernetes JAX finds the coordinator and the process ids by itself;
elsewhere pass --coordinator_address, --num_processes and --process_id.

The console shows the run (start-up, one line per logged step and per
checkpoint, the final table); everything, library messages included, is also
written to WORKDIR/train.log. --verbose (or MCL_VERBOSE=1) shows library
messages and tracebacks on the console too.

Exit status: 0 when the run finished or stopped on SIGTERM / SIGINT after
saving a checkpoint; 2 with a one-line message for a wrong command line or an
impossible config (found before anything is compiled); 1 with a one-line
message for an unusable workdir, missing data or a non-finite loss; 130 after
a second Ctrl-C.
"""

import os

from absl import flags
from ml_collections import config_flags

from mcl_jax import cli

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(_HERE, 'configs', 'demo.py')
config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'Training config file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, logs and config.json go here '
                    '(default: runs/<config name>).')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host; '
                  'on TPU pods and SLURM the coordinator is found automatically).')
flags.DEFINE_string('coordinator_address', None, 'With --distributed: host:port of process '
                    "0's coordinator (default: found from the cluster environment, or "
                    '$JAX_COORDINATOR_ADDRESS).')
flags.DEFINE_integer('num_processes', None, 'With --distributed: number of processes '
                     '(default: from the cluster environment).')
flags.DEFINE_integer('process_id', None, 'With --distributed: this process, 0 .. '
                     'num_processes - 1 (default: from the cluster environment).')
flags.DEFINE_list('local_device_ids', None, 'With --distributed: the local accelerators '
                  'this process drives, e.g. 0,1,2,3,4,5,6,7 for one process per GPU node '
                  '(default: under SLURM one device per task, [$SLURM_LOCALID]; else all).')


def _config_description(argv) -> str:
  path = config_flags.get_config_filename(flags.FLAGS['config'])
  overrides = [a for a in argv[1:] if a.startswith('--config.')]
  return ' '.join([os.path.relpath(path) if path.startswith(_HERE) else path, *overrides])


def _check_paths(workdir: str, config):
  """The workdir's and the data paths' form, and gs:// credentials: one line, before any import.

  A malformed URL is a UsageError (exit 2), before anything exists; a gs://
  path on a machine without credentials fails here in a second rather than
  after TensorFlow and JAX have started (the workdir's full check, bucket and
  write access, is the training loop's).
  """
  from mcl_jax import paths, storage_checks  # pylint: disable=import-outside-toplevel
  paths.check_user_path(workdir, '--workdir')
  for field in ('folder', 'tfds_data_dir'):
    paths.check_user_path(config.data.get(field), f'--config.data.{field}')
  try:
    storage_checks.check_credentials(workdir)
  except paths.StorageError as e:
    raise paths.StorageError(f'workdir {e}') from e
  if config.data.source == 'folder':
    storage_checks.check_tool_path(config.data.get('folder'), '--config.data.folder')


def main(argv) -> int:
  """Starts JAX (and the other processes), then trains. Returns the exit status."""
  cli.parse_absl_flags(argv, __doc__)
  cli.use_project_verbosity()
  f = flags.FLAGS
  cli.check_distributed_flags(f)
  workdir = f.workdir or os.path.join('runs', os.path.splitext(os.path.basename(
      config_flags.get_config_filename(f['config'])))[0])
  _check_paths(workdir, f.config)
  # TensorFlow (tf.data only) is kept off the accelerators before JAX takes them.
  from mcl_jax.data import lazy_tf  # pylint: disable=import-outside-toplevel
  with cli.native_stderr_to_log('tensorflow'):
    lazy_tf.tf()
  import jax  # pylint: disable=import-outside-toplevel
  cli.initialize_distributed(f)
  from absl import logging  # pylint: disable=import-outside-toplevel
  from mcl_jax.training import loop  # pylint: disable=import-outside-toplevel
  logging.info('config: %s', _config_description(argv))
  devices = jax.devices()
  logging.info('devices: %d x %s (%s), process %d of %d', len(devices), devices[0].platform,
               devices[0].device_kind, jax.process_index(), jax.process_count())
  loop.train_and_evaluate(f.config, workdir)
  return 0


if __name__ == '__main__':
  cli.run(main, prog='main.py')
