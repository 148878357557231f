"""CPU demo: real MCL pretraining on scikit-learn's digits (no download).

Run:  python main.py --config=configs/demo.py --workdir=runs/demo

Hardware: any CPU (2 cores are enough); finishes in a few minutes. A narrow
ResNet-18-style FPN sees 64 px canvases; every montage level still maps to
one 2x2 region on its FPN level (64 / 32), so the reference's reshape path
works unchanged. Expect the loss to fall clearly and, at the end, a table of
held-out kNN top-1 for the random init beside the pretrained backbone.
"""

from configs import mcl_100ep


def get_config():
  """The 100-epoch config, shrunk to digits on a CPU."""
  c = mcl_100ep.get_config()
  c.data.source = 'digits'
  c.data.image_size = 64
  c.data.shuffle_buffer = 2048
  c.data.num_classes = 10
  c.data.num_train_examples = 1438  # digits minus the 20% held out
  c.model.depth = 18
  c.model.width = 16
  c.model.stage_sizes = (1, 1, 1, 1)
  c.model.fpn_channels = 64
  c.model.neck_hidden = 256
  c.model.embed_dim = 64
  c.model.predictor_hidden = 256
  c.model.dtype = 'float32'  # CPUs have no fast bf16
  c.montage.group_size = 32
  c.optim.global_batch = 64
  c.optim.base_lr = 1.0
  c.optim.num_epochs = 4
  c.optim.warmup_steps = 10
  c.log_every = 10
  c.checkpoint_every = 25
  c.eval_knn_at_end = True
  return c
