"""CPU demo: real MCL pretraining on scikit-learn's digits (no download).

Run:  python main.py --config=configs/demo.py --workdir=runs/demo

The 100-epoch config shrunk to a CPU: 600 steps of batch 64 (about 27 epochs
of the 1,438 training digits) on 64 px canvases, a narrow ResNet-18-style
FPN, tau 0.2, LARS trust coefficient 0.02 with base_lr 0.5, gentle crops
and no blur or flips. At the end it prints the held-out kNN / linear-probe
top-1 of a random init beside the pretrained backbone, then the dense
probe's mIoU on digit scenes. What it prints and how long it takes:
README.md; why these settings (64 px rather than 32, the learning rate, the
augmentations), with the measurements behind them: docs/PERFORMANCE.md,
section 11.
"""

from configs import mcl_100ep


def get_config():
  """The 100-epoch config, shrunk to digits on a CPU."""
  c = mcl_100ep.get_config()
  c.data.source = 'digits'
  # 64 px: every montage level's tiles (64, 32, 16, 8 px) carry a learnable
  # digit; at 32 px levels 2-3 (8, 4 px) hardly learn and the image-level
  # gain was within seed noise (docs/PERFORMANCE.md, section 11).
  c.data.image_size = 64
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
  c.eval_dense_at_end = True  # mcl_jax.eval.dense_probe on digit scenes (docs/DENSE.md)
  return c
