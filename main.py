"""Pretrains MCL: python main.py --config=configs/mcl_100ep.py --workdir=DIR.

Without --config it runs the CPU demo (configs/demo.py). Rerunning the same
command resumes from the newest checkpoint in the workdir. All logic lives in
mcl_jax.train; this file only parses flags and sets up the process.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file('config', os.path.join(_HERE, 'configs', 'demo.py'),
                                'Training config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, logs and config.json go here '
                    '(default: runs/<config name>).')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host; '
                  'on TPU pods and SLURM the coordinator is found automatically).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Keep TensorFlow (tf.data only) off the accelerators before anything imports it.
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU') if tf.config.list_physical_devices('TPU') else None
  import jax
  if flags.FLAGS.distributed:
    jax.distributed.initialize()
  from mcl_jax import train
  workdir = flags.FLAGS.workdir or os.path.join(
      'runs', os.path.splitext(os.path.basename(config_flags.get_config_filename(
          flags.FLAGS['config'])))[0])
  logging.info('JAX process %d of %d; devices: %s', jax.process_index(),
               jax.process_count(), jax.devices())
  train.train_and_evaluate(flags.FLAGS.config, workdir)


if __name__ == '__main__':
  app.run(main)
