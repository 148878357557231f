"""`python -m mcl_jax.dense_eval`: the dense (segmentation) probe of a run.

Trains a linear per-pixel classifier on frozen backbone + FPN features of the
checkpoint and of a random init, prints mIoU, pixel accuracy and mIoU by
object size side by side, and writes WORKDIR/dense_probe.png. The probe
itself is `mcl_jax.eval.dense_probe`, its data `mcl_jax.data.segmentation`.

    python -m mcl_jax.dense_eval --workdir runs/demo [--dataset digit_scenes|voc]
        [--voc_root PATH] [--features fpn|C2..C5|P2..P5] [--png PATH]

Flags are spelt with underscores (--voc_root, --image_size, ...), as every
other tool's; the dashed spellings (--voc-root) are accepted too.
"""

import argparse
from typing import Any

from mcl_jax import cli, paths
from mcl_jax.data import segmentation as seg_data
from mcl_jax.eval import dense_probe


def parse_args(argv=None) -> argparse.Namespace:
  """Command-line flags (usage errors: one line, exit status 2)."""
  p = cli.ArgumentParser(
      prog='python -m mcl_jax.dense_eval',
      description='Linear dense (segmentation) probe of a pretrained mcl_jax run')
  cli.add_checkpoint_flags(p)
  p.add_argument('--dataset', choices=('digit_scenes', 'voc'), default='digit_scenes')
  p.add_flag('voc_root', default=None,
             help='VOC-layout folder (JPEGImages, SegmentationClass, ImageSets)')
  p.add_flag('train_split', default='train')
  p.add_flag('test_split', default='val')
  p.add_argument('--features', choices=dense_probe.FEATURE_CHOICES, default='fpn')
  p.add_flag('image_size', type=int, default=None,
             help='scene side (digit_scenes, default 64) or short side (voc, default 224); '
             'a multiple of 32')
  p.add_flag('num_train', type=int, default=None,
             help='probe-train scenes (default 1000) / cap on VOC ids')
  p.add_flag('num_test', type=int, default=None,
             help='probe-test scenes (default 500) / cap on VOC ids')
  p.add_flag('data_seed', type=int, default=0)
  p.add_flag('digit_sides', type=int, nargs=2, default=None, metavar=('MIN', 'MAX'),
             help='digit_scenes: smallest and largest digit side in px (default '
             f'{seg_data.DIGIT_SIDES[0]} {seg_data.DIGIT_SIDES[1]}); size bins are the '
             'thirds of the log range')
  p.add_argument('--seed', type=int, default=None, help='random-init seed (default: config)')
  p.add_argument('--png', default=None,
                 help="test scenes picture (default WORKDIR/dense_probe.png; 'none': skip)")
  args = cli.check_path_flags(p.parse_args(argv), 'workdir', 'voc_root', 'png')
  if args.dataset == 'voc' and not args.voc_root:
    p.error('--dataset voc needs --voc_root PATH')
  if args.image_size is not None and (args.image_size < 32 or args.image_size % 32):
    p.error(f'--image_size {args.image_size}: must be a positive multiple of 32 (P5 has '
            'stride 32)')
  for name in ('num_train', 'num_test'):
    v = getattr(args, name)
    if v is not None and v < 1:
      p.error(f'--{name} {v}: must be >= 1')
  if args.digit_sides is not None:
    if args.dataset != 'digit_scenes':
      p.error('--digit_sides applies to --dataset digit_scenes only')
    lo, hi = args.digit_sides
    size = args.image_size or seg_data.SCENE_SIZE
    if not 1 <= lo <= hi <= size:
      p.error(f'--digit_sides {lo} {hi}: need 1 <= MIN <= MAX <= the scene side ({size})')
  return args


def main(argv=None) -> dict[str, Any]:
  """Loads the checkpoint, probes it beside a random init, prints the table."""
  from mcl_jax.training import checkpointing  # pylint: disable=import-outside-toplevel
  args = parse_args(argv)
  config, variables = checkpointing.load_variables(args.workdir, step=args.step,
                                                   which=args.which)
  png = args.png or paths.join(args.workdir, 'dense_probe.png')
  result = dense_probe.evaluate_variables(
      config, variables, compare_random_init=True, features=args.features,
      dataset=args.dataset, seed=args.seed, png=None if png.lower() == 'none' else png,
      voc_root=args.voc_root, image_size=args.image_size, num_train=args.num_train,
      num_test=args.num_test, data_seed=args.data_seed, train_split=args.train_split,
      test_split=args.test_split, digit_sides=args.digit_sides)
  label = checkpointing.checkpoint_label(args.workdir, args.step, args.which)
  print(dense_probe.format_table(result, trained_label=label))
  if 'png' in result:
    print(f"test scenes (image | labels | {label} | random init): {result['png']}")
  print(f"{result['seconds']:.0f} s")
  return result


def _cli_main(argv) -> int:
  from mcl_jax import storage_checks  # pylint: disable=import-outside-toplevel
  from mcl_jax.training import checkpointing  # pylint: disable=import-outside-toplevel
  args = parse_args(argv[1:])
  storage_checks.check_tool_path(args.workdir, '--workdir')
  storage_checks.check_tool_path(args.voc_root, '--voc_root')
  if (args.png or '').lower() != 'none':
    storage_checks.check_tool_path(args.png or paths.join(args.workdir, 'dense_probe.png'),
                                   '--png', write=True)
  checkpointing.check_readable(args.workdir, args.step)  # a wrong workdir: now, not later
  main(argv[1:])
  return 0


if __name__ == '__main__':
  cli.run(_cli_main, prog='python -m mcl_jax.dense_eval')
