"""Converts an mcl_jax pretraining checkpoint for detectron2 or torchvision.

Usage (from the repository root):

    python scripts/convert_checkpoint.py --workdir runs/mcl_100ep \
        --format detectron2 --out mcl_r50_fpn.pkl
    python scripts/convert_checkpoint.py --workdir runs/mcl_100ep \
        --format torchvision --out mcl_r50.pth [--step 31280] [--which target]

The model shape comes from the config.json saved in the workdir; the weights
from its Orbax checkpoint (newest complete one unless --step is given).
detectron2 gets the backbone, the FPN and the neck's four convs as the box
head's convs (benchmarks/detection/README.md); torchvision gets the backbone.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mcl_jax import checkpointing, export  # pylint: disable=wrong-import-position


def parse_args(argv=None) -> argparse.Namespace:
  """Command-line flags."""
  p = argparse.ArgumentParser(description=__doc__.split('\n\n', 1)[0])
  p.add_argument('--workdir', required=True, help='pretraining workdir (config.json + checkpoints/)')
  p.add_argument('--step', type=int, default=None, help='checkpoint step (default: newest)')
  p.add_argument('--which', choices=('online', 'target'), default='online',
                 help='online network or EMA target encoder')
  p.add_argument('--format', choices=('detectron2', 'torchvision'), required=True)
  p.add_argument('--out', required=True,
                 help='output file: *.pkl for detectron2, *.pth for torchvision')
  return p.parse_args(argv)


def main(argv=None) -> int:
  """Loads the checkpoint, converts it and writes --out. Returns the exit code."""
  args = parse_args(argv)
  if args.format == 'detectron2' and not args.out.endswith('.pkl'):
    print(f'error: --out {args.out}: detectron2 needs a .pkl file', file=sys.stderr)
    return 2
  _, variables = checkpointing.load_variables(args.workdir, step=args.step, which=args.which)
  out_dir = os.path.dirname(os.path.abspath(args.out))
  os.makedirs(out_dir, exist_ok=True)
  names = export.export(variables, args.format, args.out)
  print(f'wrote {len(names)} tensors ({args.which} network, {args.format}) to {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
