"""CPU demo: real MCL pretraining on scikit-learn's digits (no download).

Run:  python main.py --config=configs/demo.py --workdir=runs/demo

Hardware: any CPU; 600 steps of batch 64 (about 27 epochs of the 1,438
training digits); 4.9 min after the install on 2 free CPU cores (16.5 min
when other jobs kept them at a load average of 7-9). A narrow ResNet-18-style FPN sees
32 px canvases, so every montage level maps to one 1x1 region on its FPN
level (32 / 32) and the reference's reshape path works unchanged (level-3
tiles are 4 px, so levels 2-3 learn least). Expect the total loss to fall
from 3.47 to about 2.00 and the level-0 positive cosine to rise from 0 to
about 0.82 (negatives stay near 0). At the end it prints held-out kNN / linear-probe top-1 of a random
init beside the pretrained backbone, measured 0.866 -> 0.891 kNN and
0.939 -> 0.972 linear (seed 0, reference LARS and warm-up), then the dense
probe (docs/DENSE.md): mIoU 0.135 -> 0.184 on digit scenes.

Departures from the 100-epoch recipe, all for a 32 px, 600-step CPU run:
tau 0.2 (a visible loss range), trust coefficient 0.02 (LARS at batch 64
would otherwise move weights by 0.025% a step) with base_lr 0.5, gentler
crops and no blur or flips (a sigma-2 blur and a 20% crop erase a 32 px
digit). The learning rate matters most here: at base_lr 2 the same run
collapses the pooled C5 features to an effective rank of about 4 (17.7 at
init, 8.3 at base_lr 0.5) and ends below the random-init kNN (0.78-0.87).
"""

from configs import mcl_100ep


def get_config():
  """The 100-epoch config, shrunk to digits on a CPU."""
  c = mcl_100ep.get_config()
  c.data.source = 'digits'
  c.data.image_size = 32
  c.data.shuffle_buffer = 2048
  c.data.num_classes = 10
  c.data.crop_scale = (0.5, 1.0)
  # Host crops: on a CPU the device path's crop matmuls run on the same two
  # cores as the step, and the demo's figures (README) were measured this way.
  c.data.crop_on = 'host'
  c.data.max_side = 64  # crop_on='device': digits are image_size px, no cap needed
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
  c.optim.base_lr = 0.5
  c.optim.trust_coefficient = 0.02
  c.optim.num_steps = 600
  c.optim.warmup_steps = 10
  c.log_every = 25
  c.checkpoint_every = 100
  c.eval_knn_at_end = True
  c.eval_dense_at_end = True  # mcl_jax.eval.dense_eval on digit scenes (docs/DENSE.md)
  return c
