"""CPU demo: real MCL pretraining on scikit-learn's digits (no download).

Run:  python main.py --config=configs/demo.py --workdir=runs/demo

Hardware: any CPU; about 5 minutes on 2 cores. A narrow ResNet-18-style FPN
sees 32 px canvases, so every montage level maps to one 1x1 region on its FPN
level (32 / 32) and the reference's reshape path works unchanged (level-3
tiles are 4 px: too small to identify a digit, so levels 2-3 stay near
chance). Expect the total loss to fall from about 3.47 to about 2.7 and the
level-0 positive cosine to rise from 0 to about 0.5; at the end a table of
held-out kNN / linear-probe top-1 of a random init beside the pretrained
backbone (see docs and the closing notes: on digits, 300 steps do not yet
beat the random-feature kNN baseline).

Departures from the 100-epoch recipe, all for a 32 px, 300-step CPU run:
tau 0.2 (a visible loss range), trust coefficient 0.02 (LARS at batch 64
would otherwise move weights by 0.025% a step), gentler crops and no blur or
flips (a sigma-2 blur and a 20% crop erase a 32 px digit).
"""

from configs import mcl_100ep


def get_config():
  """The 100-epoch config, shrunk to digits on a CPU."""
  c = mcl_100ep.get_config()
  c.data.source = 'digits'
  c.data.image_size = 32
  c.data.shuffle_buffer = 2048
  c.data.num_classes = 10
  c.data.num_train_examples = 1438  # digits minus the 20% held out
  c.data.crop_scale = (0.5, 1.0)
  c.augment.blur_p = (0.0, 0.0)
  c.augment.flip_p = (0.0, 0.0)
  c.model.depth = 18
  c.model.width = 16
  c.model.stage_sizes = (1, 1, 1, 1)
  c.model.fpn_channels = 64
  c.model.neck_hidden = 256
  c.model.embed_dim = 64
  c.model.predictor_hidden = 256
  c.model.dtype = 'float32'  # CPUs have no fast bf16
  c.montage.group_size = 32
  c.loss.tau = 0.2
  c.optim.global_batch = 64
  c.optim.base_lr = 2.0
  c.optim.trust_coefficient = 0.02
  c.optim.num_steps = 300
  c.optim.warmup_steps = 10
  c.log_every = 25
  c.checkpoint_every = 50
  c.eval_knn_at_end = True
  return c
