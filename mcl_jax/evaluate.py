"""`python -m mcl_jax.evaluate`: kNN and linear probe of a run's backbone.

Prints a random init beside the checkpoint (held-out top-1 of DINO's weighted
kNN and of a logistic-regression probe on pooled C5). The evaluation itself
is `mcl_jax.eval.probes`.

    python -m mcl_jax.evaluate --workdir runs/demo [--dataset digits] [--step N]
"""

import argparse
from typing import Any

from mcl_jax import cli
from mcl_jax.eval import probes


def parse_args(argv=None) -> argparse.Namespace:
  """Command-line flags."""
  p = cli.ArgumentParser(prog='python -m mcl_jax.evaluate',
                         description='kNN / linear probe of a pretrained mcl_jax run')
  cli.add_checkpoint_flags(p)
  p.add_argument('--dataset', choices=('digits', 'tfds', 'folder'), default=None,
                 help='overrides config.data.source')
  p.add_argument('--folder', default=None, help='image folder (--dataset folder)')
  p.add_flag('tfds_name', default=None)
  p.add_flag('tfds_data_dir', default=None)
  p.add_flag('train_split', default=None, help='memory / probe-training split')
  p.add_flag('test_split', default=None, help='query / probe-test split')
  p.add_flag('max_train', type=int, default=None)
  p.add_flag('max_test', type=int, default=None)
  p.add_flag('batch_size', type=int, default=256)
  p.add_argument('--k', type=int, default=probes.KNN_K)
  p.add_argument('--t', type=float, default=probes.KNN_T)
  return cli.check_path_flags(p.parse_args(argv), 'workdir', 'folder', 'tfds_data_dir')


def apply_data_flags(config, args):
  """Writes the command line's data overrides into config.data (in place)."""
  d = config.data
  overrides = {'source': args.dataset, 'folder': args.folder, 'tfds_name': args.tfds_name,
               'tfds_data_dir': args.tfds_data_dir, 'train_split': args.train_split,
               'eval_split': args.test_split}
  with d.unlocked():
    for key, value in overrides.items():
      if value is not None:
        d[key] = value


def main(argv=None) -> dict[str, Any]:
  """Loads a checkpoint, evaluates it beside a random init, prints the table."""
  from mcl_jax.training import checkpointing  # pylint: disable=import-outside-toplevel
  args = parse_args(argv)
  config, variables = checkpointing.load_variables(args.workdir, step=args.step,
                                                   which=args.which)
  apply_data_flags(config, args)
  result = probes.evaluate_variables(config, variables, compare_random_init=True,
                                     batch_size=args.batch_size, k=args.k, t=args.t,
                                     max_train=args.max_train, max_test=args.max_test)
  label = checkpointing.checkpoint_label(args.workdir, args.step, args.which)
  print(probes.format_table(result, trained_label=label))
  return result


def _cli_main(argv) -> int:
  from mcl_jax import storage_checks  # pylint: disable=import-outside-toplevel
  from mcl_jax.training import checkpointing  # pylint: disable=import-outside-toplevel
  from mcl_jax.data import lazy_tf  # pylint: disable=import-outside-toplevel
  args = parse_args(argv[1:])
  storage_checks.check_tool_path(args.workdir, '--workdir')
  storage_checks.check_tool_path(args.folder, '--folder')
  checkpointing.check_readable(args.workdir, args.step)  # a wrong workdir: now, not later
  with cli.native_stderr_to_log('tensorflow'):  # its start-up banners: not the console
    lazy_tf.tf()
  main(argv[1:])
  return 0


if __name__ == '__main__':
  cli.run(_cli_main, prog='python -m mcl_jax.evaluate')
