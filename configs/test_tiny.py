"""A tiny config for tests and quick checks (seconds per step on a CPU).

Run:  python main.py --config=configs/test_tiny.py --workdir=/tmp/mcl_tiny

Not a model to evaluate: 32 px canvases (1x1 regions per tile), a narrow
ResNet-18-style trunk, 8-image montage groups, 6 steps on scikit-learn's
digits. Every field is written out here, so that editing another config
(the demo, the paper's) never changes what the tests run; the fields mean
what they mean in configs/mcl_100ep.py, which documents them.
"""

import ml_collections


def get_config():
  """The test config: every field explicit."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = 'self_supervised'

  c.data = ml_collections.ConfigDict()
  c.data.source = 'digits'
  c.data.tfds_name = 'imagenet2012'
  c.data.tfds_data_dir = ml_collections.config_dict.placeholder(str)
  c.data.tfds_manual_dir = ml_collections.config_dict.placeholder(str)
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.folder = ml_collections.config_dict.placeholder(str)
  c.data.image_size = 32
  c.data.num_crops = 8
  c.data.crop_scale = (0.5, 1.0)
  c.data.crop_ratio = (3 / 4, 4 / 3)
  c.data.shuffle_buffer = 2048
  c.data.prefetch = 2
  c.data.num_train_examples = 1281167
  c.data.num_classes = 10
  c.data.digits_heldout_fraction = 0.2
  c.data.num_threads = ml_collections.config_dict.placeholder(int)
  c.data.tfds_download_and_prepare = False
  c.data.eval_crop_fraction = 0.875
  c.data.crop_on = 'host'
  c.data.max_side = 64

  c.augment = ml_collections.ConfigDict()
  c.augment.flip_p = (0.0, 0.0)
  c.augment.jitter_p = (0.8, 0.8)
  c.augment.brightness = 0.4
  c.augment.contrast = 0.4
  c.augment.saturation = 0.2
  c.augment.hue = 0.1
  c.augment.grayscale_p = (0.2, 0.2)
  c.augment.blur_p = (0.0, 0.0)
  c.augment.blur_sigma = (0.1, 2.0)
  c.augment.solarize_p = (0.0, 0.2)
  c.augment.mean = (0.485, 0.456, 0.406)
  c.augment.std = (0.229, 0.224, 0.225)
  c.augment.blur_kernel_fraction = 0.1

  c.model = ml_collections.ConfigDict()
  c.model.depth = 18
  c.model.width = 8
  c.model.stage_sizes = ml_collections.FieldReference((1, 1, 1, 1), field_type=tuple)
  c.model.block = ml_collections.config_dict.placeholder(str)
  c.model.fpn_channels = 16
  c.model.neck_convs = 4
  c.model.neck_hidden = 32
  c.model.embed_dim = 16
  c.model.predictor_hidden = 32
  c.model.dtype = 'float32'
  c.model.region_path = 'reshape'
  c.model.neck_regions = 'all'
  c.model.region_size = ml_collections.config_dict.placeholder(int)
  c.model.target_whole_crops_only = False
  c.model.remat = 'none'

  c.montage = ml_collections.ConfigDict()
  c.montage.layout = 'grid'
  c.montage.grids = (1, 2, 4, 8)
  c.montage.canvas_divisors = (1, 4, 8, 8)
  c.montage.group_size = 8
  c.montage.downsample = 'nearest'
  c.montage.mixed_canvases_divisor = 8

  c.loss = ml_collections.ConfigDict()
  c.loss.tau = 0.2
  c.loss.level_weights = (0.5, 0.25, 0.125, 0.125)
  c.loss.label_smoothing = 0.0
  c.loss.classifier = 'per_level'

  c.optim = ml_collections.ConfigDict()
  c.optim.global_batch = 16
  c.optim.base_lr = 2.0
  c.optim.warmup_steps = 2
  c.optim.warmup_ratio = 0.0001
  c.optim.lr_warmup = 'reference'
  c.optim.min_lr = 0.0001
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-05
  c.optim.trust_coefficient = 0.02
  c.optim.lars_trust_ratio = 'reference'
  c.optim.clip_norm = 500.0
  c.optim.num_epochs = 100
  c.optim.num_steps = ml_collections.FieldReference(6, field_type=int)
  c.optim.ema_base_momentum = 0.99
  c.optim.accumulate = 'none'
  c.log_every = 1
  c.checkpoint_every = 2
  c.keep_checkpoints = 2
  c.montage_png = False
  c.eval_knn_at_end = False
  c.eval_dense_at_end = False
  return c
