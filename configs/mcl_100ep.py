"""MCL, 100 epochs of ImageNet-1k: the paper-reproduction config.

Run (one host, all its accelerators; multi-host: same command on every host):

    python main.py --config=configs/mcl_100ep.py --workdir=runs/mcl_100ep \
        --config.data.tfds_data_dir=/path/to/tensorflow_datasets

Hardware: the reference used 32 GPUs x 128 images (global batch 4096). Any
device count whose product with `montage.group_size` divides 4096 works; each
montage group (128 images) is assembled on one device.

Expect: 31,280 steps; the loss starts near 4 x sum(w) x log(4096) ~ 33.3
(two views, each level's CE times 2 tau w, at tau = 1) and the exported backbone + FPN + neck reach 42.5 box AP / 38.3 mask AP with
Mask R-CNN R50-FPN 1x on COCO (paper, Table 1). Every number below is the
reference recipe's (the MCL paper and its released code) unless its comment
says otherwise.
"""

import ml_collections


def get_config():
  """Returns the reference configuration (docs/METHOD.md)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = 'self_supervised'  # or 'supervised' (docs/METHOD.md section 7)

  # ---- data (host side: decode + random-resized crop, uint8) --------------
  c.data = ml_collections.ConfigDict()
  c.data.source = 'tfds'  # 'tfds' | 'folder' | 'digits'
  c.data.tfds_name = 'imagenet2012'
  c.data.tfds_data_dir = ml_collections.config_dict.placeholder(str)
  c.data.tfds_manual_dir = ml_collections.config_dict.placeholder(str)
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.folder = ml_collections.config_dict.placeholder(str)
  c.data.image_size = 224
  c.data.num_crops = 8
  c.data.crop_scale = (0.2, 1.0)
  c.data.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.data.shuffle_buffer = 16_384
  c.data.prefetch = 2
  c.data.num_train_examples = 1_281_167  # tfds: epochs -> steps before the dataset is prepared
  c.data.num_classes = 1000
  c.data.digits_heldout_fraction = 0.2
  c.data.num_threads = ml_collections.config_dict.placeholder(int)  # tf.data threads; None: all cores
  c.data.tfds_download_and_prepare = False  # True: build a missing TFDS dataset on first use
  c.data.eval_crop_fraction = 0.875  # eval: shorter side -> image_size / 0.875, centre crop
  # Where the random-resized crops are cut and resized. 'host': the host sends
  # num_crops uint8 crops per image. 'device': the host only decodes (the
  # union of the crop windows, downscaled to max_side if longer) and sends
  # one padded max_side^2 buffer + the windows; mcl_jax/data/device_crops.py cuts
  # and resizes them inside the train step.
  # 'device' because it feeds an accelerator about 4x more images per host
  # core at the same crops (docs/PERFORMANCE.md section 8, issue 14): on
  # 500x375 JPEGs one core's host side ran 550 images/s against the host
  # path's 106 (decode alone: 756, so 1.37x of the decode floor); on larger
  # photos 169 against 101. Its step cost is +0.6% FLOPs at 64 px, +1.3%
  # ('all') to +2.7% ('used') at 224 px with 512 px buffers, no measurable
  # time on the r50-small step, and no compiled memory at 224 px.
  # The crops equal the host's to 1 grey level (below max_side).
  c.data.crop_on = 'device'  # 'host' | 'device'
  c.data.max_side = 512  # crop_on='device': buffer side; at scale 0.2 crops keep >= ~200 px

  # ---- device augmentation: view A (crops 0-3) and view B (crops 4-7) -----
  c.augment = ml_collections.ConfigDict()
  c.augment.flip_p = (0.5, 0.5)
  c.augment.jitter_p = (0.8, 0.8)
  c.augment.brightness = 0.4
  c.augment.contrast = 0.4
  c.augment.saturation = 0.2
  c.augment.hue = 0.1
  c.augment.grayscale_p = (0.2, 0.2)
  c.augment.blur_p = (1.0, 0.1)
  c.augment.blur_sigma = (0.1, 2.0)
  c.augment.solarize_p = (0.0, 0.2)
  c.augment.mean = (0.485, 0.456, 0.406)
  c.augment.std = (0.229, 0.224, 0.225)
  c.augment.blur_kernel_fraction = 0.1  # odd blur kernel ~10% of the side (23 px at 224)

  # ---- model ---------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.depth = 50
  c.model.width = 64  # stem / first-stage width; 64 = torchvision
  c.model.stage_sizes = ml_collections.config_dict.placeholder(tuple)  # None: from depth
  c.model.block = ml_collections.config_dict.placeholder(str)  # 'basic' | 'bottleneck'; None: from depth
  c.model.fpn_channels = 256
  c.model.neck_convs = 4
  c.model.neck_hidden = 2048
  c.model.embed_dim = 256
  c.model.predictor_hidden = 2048
  c.model.dtype = 'bfloat16'  # compute dtype; params stay float32
  c.model.region_path = 'reshape'  # 'reshape' (reference) | 'roi_align'
  c.model.neck_regions = 'all'  # 'all' (reference) | 'used' (beyond)
  c.model.region_size = ml_collections.config_dict.placeholder(int)  # None: image_size // 32
  c.model.target_whole_crops_only = False  # beyond: target sees level-0 canvases only
  # What the backward pass recomputes instead of keeping (model.REMAT): 'none' |
  # 'blocks' | 'blocks+neck' | 'stages+neck'. Same loss and gradients; less memory.
  c.model.remat = 'none'

  # ---- montage -------------------------------------------------------------
  c.montage = ml_collections.ConfigDict()
  c.montage.layout = 'grid'  # 'grid' (reference) | 'mixed' (beyond)
  c.montage.grids = (1, 2, 4, 8)
  c.montage.canvas_divisors = (1, 4, 16, 32)  # n_i = group_size / divisor
  c.montage.group_size = 128  # images mixed into one set of canvases (reference: per GPU)
  c.montage.downsample = 'nearest'  # 'nearest' (reference) | 'antialias'
  c.montage.mixed_canvases_divisor = 8  # mixed layout: group_size / 8 canvases

  # ---- loss ----------------------------------------------------------------
  c.loss = ml_collections.ConfigDict()
  c.loss.tau = 1.0
  c.loss.level_weights = (1 / 2, 1 / 4, 1 / 8, 1 / 8)
  c.loss.label_smoothing = 0.0  # supervised objective only
  c.loss.classifier = 'per_level'  # supervised objective: 'per_level' | 'shared'

  # ---- optimisation ----------------------------------------------------------
  c.optim = ml_collections.ConfigDict()
  c.optim.global_batch = 4096
  c.optim.base_lr = 1.0  # per 256 images: lr = base_lr * global_batch / 256
  c.optim.warmup_steps = 3127
  c.optim.warmup_ratio = 1e-4
  # 'reference' (mmcv): the cosine runs from step 0 over the whole run and the
  # warm-up multiplies it by warmup_ratio + (1 - warmup_ratio) t / warmup_steps;
  # 'optax': linear warm-up, then the cosine over the remaining steps.
  c.optim.lr_warmup = 'reference'
  c.optim.min_lr = 1e-4
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-5
  c.optim.trust_coefficient = 1e-3
  # LARS local lr of a kernel w with gradient g: 'reference' (openselfsup)
  # trust_coefficient ||w|| / (||g|| + weight_decay ||w||); 'optax' (optax.lars)
  # trust_coefficient ||w|| / ||g + weight_decay w||.
  c.optim.lars_trust_ratio = 'reference'
  c.optim.clip_norm = 500.0
  c.optim.num_epochs = 100
  c.optim.num_steps = ml_collections.config_dict.placeholder(int)  # overrides epochs
  c.optim.ema_base_momentum = 0.99
  # 'views': each view's online forward + backward in turn, summing the gradients
  # (same loss and gradient, one view's activations in memory); 'none': both at once.
  c.optim.accumulate = 'none'

  # ---- bookkeeping ----------------------------------------------------------
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.montage_png = True
  c.eval_knn_at_end = False
  c.eval_dense_at_end = False  # with eval_knn_at_end: also the dense probe (digits only)
  return c
