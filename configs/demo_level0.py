"""CPU demo reduced to montage level 0: the image-level (BYOL-like) baseline.

Run:  python main.py --config=configs/demo_level0.py --workdir=runs/demo_level0

Same as configs/demo.py except one field: `loss.level_weights = (1/2,)`, the
first of the demo's four weights. The number of levels is the length of that
tuple, so the montage keeps only its level-0 block (each canvas is one whole
crop), the online network has one predictor, and the loss is the demo's
level-0 term alone: whole crop of view q against the target's whole crop of
view k and vice versa. Data, crops (crops 0 and 4 of the same 8 per image,
so the same stream for the same seed), augmentation, network, optimiser and
schedule are the demo's. The equivalent override of the demo is
`--config.loss.level_weights='(0.5,)'`.

Used by docs/DENSE.md to compare multi-level against image-level pretraining
with the dense probe (python -m mcl_jax.dense_eval).
"""

from configs import demo


def get_config():
  c = demo.get_config()
  c.loss.level_weights = (1 / 2,)
  return c
