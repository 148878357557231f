"""Pretrains MCL: python main.py --config=configs/mcl_100ep.py --workdir=DIR.

Without --config it runs the CPU demo (configs/demo.py). Rerunning the same
command resumes from the newest checkpoint in the workdir. All logic lives in
mcl_jax.train; this file only parses flags and sets up the process.

Multi-process (README, "Multi-host launches"): run the same command on every
host (or once per GPU) with --distributed. On Cloud TPU VMs, SLURM, Open MPI
and Kubernetes JAX finds the coordinator and the process ids by itself;
elsewhere pass --coordinator_address, --num_processes and --process_id.

Exit status: 0 when the run finished or stopped on SIGTERM / SIGINT after
saving a checkpoint; 1 with a one-line message for an impossible config, an
unusable workdir, missing data or a non-finite loss.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file('config', os.path.join(_HERE, 'configs', 'demo.py'),
                                'Training config file.', lock_config=True)
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Keep TensorFlow (tf.data only) off the accelerators before anything imports it.
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')
  if tf.config.list_physical_devices('TPU'):
    tf.config.set_visible_devices([], 'TPU')
  import jax
  f = flags.FLAGS
  if f.distributed:
    jax.distributed.initialize(
        coordinator_address=f.coordinator_address, num_processes=f.num_processes,
        process_id=f.process_id,
        local_device_ids=[int(i) for i in f.local_device_ids] if f.local_device_ids else None)
  elif (f.coordinator_address or f.num_processes or f.process_id is not None
        or f.local_device_ids):
    raise app.UsageError('--coordinator_address / --num_processes / --process_id / '
                         '--local_device_ids need --distributed')
  from mcl_jax import checkpointing, config_validation, input_pipeline, train
  workdir = flags.FLAGS.workdir or os.path.join(
      'runs', os.path.splitext(os.path.basename(config_flags.get_config_filename(
          flags.FLAGS['config'])))[0])
  logging.info('JAX process %d of %d; devices: %s', jax.process_index(),
               jax.process_count(), jax.devices())
  try:
    train.train_and_evaluate(flags.FLAGS.config, workdir)
  except (config_validation.ConfigError, checkpointing.CheckpointError,
          input_pipeline.DatasetNotFoundError, train.NonFiniteError) as e:
    logging.error('%s: %s', type(e).__name__, e)
    sys.exit(f'error: {type(e).__name__}: {e}')


if __name__ == '__main__':
  app.run(main)
