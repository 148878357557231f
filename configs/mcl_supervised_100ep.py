"""Supervised MCL: the montage pretext trained with ImageNet-1k labels (docs/METHOD.md section 7).

Run:  python main.py --config=configs/mcl_supervised_100ep.py --workdir=runs/mcl_sup

Hardware and schedule as configs/mcl_100ep.py. Same montages, ResNet-50,
FPN and region neck; each tile embedding of each level is classified into
the 1000 classes (its label: the class of its source image), cross-entropy
weighted by the level weights and summed over levels and both views. No
target network. The paper reports transfer similar to the self-supervised
model. Expect the per-level tile accuracy (acc_level*) to rise fastest at
level 0 (whole crops) and slowest at level 3 (28 px tiles).

Classifier choice: one linear classifier per level (`loss.classifier =
'per_level'`), mirroring the one predictor per level of the self-supervised
objective, so that each scale gets its own decision boundary while the neck
stays shared; 'shared' uses one classifier for all levels. Label smoothing
0.1, the usual ImageNet setting for supervised ResNets; the paper does not
state one.
"""

from configs import mcl_100ep


def get_config():
  c = mcl_100ep.get_config()
  c.objective = 'supervised'
  c.loss.classifier = 'per_level'
  c.loss.label_smoothing = 0.1
  return c
