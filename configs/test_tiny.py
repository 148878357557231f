"""A tiny config for tests and quick checks (seconds per step on a CPU).

Run:  python main.py --config=configs/test_tiny.py --workdir=/tmp/mcl_tiny

Not a model to evaluate: 32 px canvases (1x1 regions per tile), a narrow
ResNet-18-style trunk, 8-image montage groups, a few steps.
"""

from configs import demo


def get_config():
  c = demo.get_config()
  c.data.image_size = 32
  c.model.width = 8
  c.model.fpn_channels = 16
  c.model.neck_hidden = 32
  c.model.embed_dim = 16
  c.model.predictor_hidden = 32
  c.montage.group_size = 8
  c.montage.canvas_divisors = (1, 4, 8, 8)  # at least one canvas per level
  c.optim.global_batch = 16
  c.optim.base_lr = 2.0  # tests were sized with the demo's former rate
  c.optim.num_steps = 6
  c.optim.warmup_steps = 2
  c.log_every = 1
  c.checkpoint_every = 2
  c.keep_checkpoints = 2
  c.montage_png = False
  c.eval_knn_at_end = False
  c.eval_dense_at_end = False
  return c
