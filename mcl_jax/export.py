"""`python -m mcl_jax.export`: a run's checkpoint as detectron2 or torchvision weights.

From a pretraining workdir (model shape from its config.json, weights from
its newest complete checkpoint unless --step is given):

    python -m mcl_jax.export --workdir runs/mcl_100ep --format detectron2 --out mcl.pkl
    python -m mcl_jax.export --workdir runs/mcl_100ep --format torchvision --out mcl.pth \
        [--step 31280] [--which target]

From a detection fine-tune's workdir (`python -m mcl_jax.finetune`), the whole
Mask R-CNN under detectron2's full names (detectron2 format only):

    python -m mcl_jax.export --workdir runs/coco_1x --format detectron2 --out mask_rcnn.pkl

The conversions are `mcl_jax.eval.exporters` and `mcl_jax.detection.export`. The torchvision format
writes with PyTorch, an optional extra (`pip install -e ".[torch]"`); the
detectron2 format needs no PyTorch.
"""

import argparse

from mcl_jax import cli, paths
from mcl_jax.eval import exporters


def parse_args(argv=None) -> argparse.Namespace:
  """Command-line flags of `python -m mcl_jax.export`."""
  p = cli.ArgumentParser(
      prog='python -m mcl_jax.export',
      description='Converts a pretraining checkpoint for detectron2 or torchvision.')
  cli.add_checkpoint_flags(p)
  p.add_argument('--format', choices=('detectron2', 'torchvision'), required=True)
  p.add_argument('--out', required=True,
                 help='output file: *.pkl for detectron2, *.pth for torchvision')
  return cli.check_path_flags(p.parse_args(argv), 'workdir', 'out')


def main(argv=None) -> int:
  """Loads the checkpoint, converts it and writes --out. Returns the exit code.

  Raises (one error line under `cli.run`): cli.UsageError for a wrong --out,
  MissingDependencyError without PyTorch for the torchvision format,
  CheckpointError for a workdir without usable checkpoints.
  """
  args = parse_args(argv)
  if args.format == 'detectron2' and not args.out.endswith('.pkl'):
    raise cli.UsageError(f'--out={args.out}: detectron2 reads pickled weights only from '
                         'a *.pkl file; name it e.g. mcl.pkl')
  if args.format == 'torchvision':
    exporters.torch_module()  # before minutes of loading: say now what to install
  # pylint: disable=import-outside-toplevel
  from mcl_jax import storage_checks
  from mcl_jax.detection import state as detection_state
  from mcl_jax.training import checkpointing
  storage_checks.check_tool_path(args.workdir, '--workdir')
  storage_checks.check_tool_path(args.out, '--out', write=True)
  saved_config = paths.join(args.workdir, checkpointing.CONFIG_FILE)
  # A workdir without config.json gets load_variables' own error below.
  if paths.exists(saved_config) and detection_state.is_detector_config(
      checkpointing.load_config(args.workdir)):
    return _export_detector(args)
  _, variables = checkpointing.load_variables(args.workdir, step=args.step, which=args.which)
  paths.makedirs(paths.dirname(paths.abspath(args.out)))
  names = exporters.export(variables, args.format, args.out)
  print(f'wrote {len(names)} tensors ({args.which} network, {args.format}) to {args.out}')
  return 0


def _export_detector(args) -> int:
  """A fine-tuned Mask R-CNN's checkpoint as a detectron2 .pkl of the whole model."""
  # pylint: disable=import-outside-toplevel
  from mcl_jax.detection import export as detection_export
  from mcl_jax.detection import state as detection_state
  if args.format != 'detectron2':
    raise cli.UsageError(f'--format={args.format}: {args.workdir} is a detection fine-tune; '
                         'its whole Mask R-CNN exports with --format=detectron2 only')
  if args.which != 'online':
    raise cli.UsageError(f'--which={args.which}: a detection fine-tune has no target '
                         'network; leave --which out')
  _, variables = detection_state.load_variables(args.workdir, step=args.step)
  paths.makedirs(paths.dirname(paths.abspath(args.out)))
  names = detection_export.save_detectron2_maskrcnn(variables, args.out)
  print(f'wrote {len(names)} tensors (Mask R-CNN, detectron2 names) to {args.out}')
  return 0


if __name__ == '__main__':
  cli.run(lambda argv: main(argv[1:]), prog='python -m mcl_jax.export')
