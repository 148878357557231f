r"""Fine-tunes a Mask R-CNN on top of a pretrained backbone: python -m mcl_jax.finetune.

    python -m mcl_jax.finetune --config=configs/detect_demo.py --pretrained=runs/demo \
        --workdir=runs/detect_demo
    python -m mcl_jax.finetune --config=configs/detect_coco_1x.py --pretrained=runs/mcl_100ep \
        --workdir=runs/coco_1x --config.data.coco_root=/data/coco

--pretrained is a pretraining workdir (main.py --workdir), 'none' (random
init), 'torchvision:PATH.pth' or 'detectron2:PATH.pkl'; without it the
config's `pretrained` field is used. Rerunning the same command resumes from
the newest checkpoint in the workdir (the pretrained source is read only by
a new run). SIGTERM / Ctrl-C: finish the step, save, exit 0. At the end (and
every config.eval_every steps) the detector is scored on the validation split
with COCO's box and mask AP; the table is printed and written to
WORKDIR/coco_eval.json. docs/DETECTION.md has the protocol and the commands.

Multi-process: the same command on every host with --distributed, as
main.py. --preflight compiles the config's train step for its largest canvas
at the per-device batch of a --preflight_devices run, without data or a
workdir, prints its memory and exits (1 if it does not fit
--preflight_budget_gib).

The console shows the run; everything, library messages included, also goes
to WORKDIR/train.log; TensorBoard scalars and metrics.jsonl are in the
workdir. Exit status: 0 when the run finished or stopped after saving; 2
with one line for a wrong command line or an impossible config; 1 with one
line for missing data, an unusable workdir or pretrained source, or a
non-finite loss.
"""

import os

from absl import flags
from ml_collections import config_flags

from mcl_jax import cli, errors

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT_CONFIG = os.path.join(_REPO, 'configs', 'detect_demo.py')
config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'Fine-tuning config file.',
                                lock_config=True)
flags.DEFINE_string('pretrained', None, "Pretraining workdir, 'none', 'torchvision:PATH' or "
                    "'detectron2:PATH' (default: the config's `pretrained`).")
flags.DEFINE_string('workdir', None, 'Checkpoints, logs, config.json and coco_eval.json go '
                    'here (default: runs/<config name>).')
flags.DEFINE_bool('preflight', False, 'Only compile the train step for the largest canvas '
                  '(no data, no workdir) and print its memory per device.')
flags.DEFINE_integer('preflight_devices', 8, 'With --preflight: the device count of the run '
                     '(per-device batch = optim.global_batch / this).')
flags.DEFINE_float('preflight_budget_gib', 16.0, 'With --preflight: the device memory to '
                   'check against, GiB.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host).')
flags.DEFINE_string('coordinator_address', None, "With --distributed: host:port of process 0's "
                    'coordinator (default: from the cluster environment).')
flags.DEFINE_integer('num_processes', None, 'With --distributed: number of processes.')
flags.DEFINE_integer('process_id', None, 'With --distributed: this process, 0 .. '
                     'num_processes - 1.')
flags.DEFINE_list('local_device_ids', None, 'With --distributed: the local accelerators '
                  'this process drives.')


class PreflightError(errors.RunError):
  """The compiled step does not fit the given memory (exit status 1)."""


def _config_description(argv) -> str:
  path = config_flags.get_config_filename(flags.FLAGS['config'])
  overrides = [a for a in argv[1:] if a.startswith(('--config.', '--pretrained'))]
  return ' '.join([os.path.relpath(path) if path.startswith(_REPO) else path, *overrides])


def _pretrained_path(source: str | None) -> str | None:
  """The path inside a --pretrained source ('none' has none)."""
  if not source or source == 'none':
    return None
  for prefix in ('torchvision:', 'detectron2:'):
    if source.startswith(prefix):
      return source[len(prefix):]
  return source


def _check_paths(workdir: str, config):
  """Every path's form and gs:// access: one line, before JAX starts (as main.py's)."""
  from mcl_jax import paths, storage_checks  # pylint: disable=import-outside-toplevel
  pretrained = _pretrained_path(config.get('pretrained'))
  data_paths = {'--workdir': workdir, '--pretrained': pretrained,
                '--config.data.coco_root': config.data.get('coco_root'),
                '--config.data.scenes_root': config.data.get('scenes_root')}
  for flag, path in data_paths.items():
    paths.check_user_path(path, flag)
  try:
    storage_checks.check_credentials(workdir)
  except paths.StorageError as e:
    raise paths.StorageError(f'workdir {e}') from e
  storage_checks.check_tool_path(pretrained, '--pretrained')
  if config.data.source == 'coco':
    storage_checks.check_tool_path(config.data.get('coco_root'), '--config.data.coco_root')


def main(argv) -> int:
  """Starts JAX (and the other processes), then fine-tunes. Returns the exit status."""
  cli.parse_absl_flags(argv, __doc__)
  cli.use_project_verbosity()
  f = flags.FLAGS
  cli.check_distributed_flags(f)
  config = f.config
  if f.pretrained is not None:
    with config.unlocked():
      config.pretrained = f.pretrained
  workdir = f.workdir or os.path.join('runs', os.path.splitext(os.path.basename(
      config_flags.get_config_filename(f['config'])))[0])
  if not f.preflight:
    _check_paths(workdir, config)
  import jax  # pylint: disable=import-outside-toplevel
  cli.initialize_distributed(f)
  from absl import logging  # pylint: disable=import-outside-toplevel
  from mcl_jax.detection import train  # pylint: disable=import-outside-toplevel
  logging.info('config: %s', _config_description(argv))
  devices = jax.devices()
  logging.info('devices: %d x %s (%s), process %d of %d', len(devices), devices[0].platform,
               devices[0].device_kind, jax.process_index(), jax.process_count())
  if f.preflight:
    need = train.preflight(config, f.preflight_devices, f.preflight_budget_gib)
    if not need['fits']:
      raise PreflightError(f'the train step needs {need["total"] / 2**30:.2f} GiB per device, '
                           f'more than {f.preflight_budget_gib:g} GiB: see docs/DETECTION.md, '
                           '"Memory"')
    return 0
  train.finetune(config, workdir)
  return 0


if __name__ == '__main__':
  cli.run(main, prog='python -m mcl_jax.finetune')
