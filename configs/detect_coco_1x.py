r"""Mask R-CNN R50-FPN, COCO 1x: the detection fine-tuning protocol.

Run (one host, all its accelerators; multi-host: the same command on every
host with --distributed):

    python -m mcl_jax.finetune --config=configs/detect_coco_1x.py \
        --pretrained=runs/mcl_100ep --workdir=runs/coco_1x \
        --config.data.coco_root=/data/coco

The protocol: 90k SGD steps of 16 images (2 per device on 8 devices), base
LR 0.02 with a linear warm-up over 1,000 steps from 0.001 x and x 0.1 at 60k
and 80k, weight decay 1e-4 (weights and biases; norm scales 0), COCO
train2017 at short sides 640-800 (long side <= 1333) with flips, scored on
val2017 at short side 800 with COCO's box and mask AP (docs/DETECTION.md).
The learning rate is for 16 images: with another global batch, scale
optim.base_lr linearly (and the step counts inversely) yourself.
"""

import ml_collections


def get_config():
  """The reference fine-tuning configuration (docs/DETECTION.md)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # A pretraining workdir (main.py --workdir), 'none' (random init),
  # 'torchvision:PATH.pth' or 'detectron2:PATH.pkl'. --pretrained sets it.
  c.pretrained = 'none'

  # ---- data ----------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.source = 'coco'  # 'coco' | 'digit_scenes'
  c.data.coco_root = ml_collections.config_dict.placeholder(str)  # train2017/ val2017/ annotations/
  c.data.train_split = 'train2017'
  c.data.val_split = 'val2017'
  c.data.num_classes = 80
  c.data.train_short_sides = (640, 672, 704, 736, 768, 800)
  c.data.test_short_side = 800
  c.data.max_long_side = 1333
  # The static canvases (H, W), multiples of 32: each batch is padded to the
  # smallest that holds all its images, and each canvas compiles once (14
  # compiles). inputs.propose_canvases((704, 800)): landscape and portrait
  # canvases for COCO's aspect ratios at short sides 704 and 800; on a
  # COCO-like size list benchmarks/detection_input.py measured 1.12 canvas
  # pixels per image pixel in training and 1.03 at test (one 1344 x 1344
  # canvas: 2.55 and 2.06).
  c.data.canvas_sizes = ((704, 704), (704, 960), (704, 1056), (704, 1280), (800, 800),
                         (800, 1088), (800, 1216), (800, 1344), (960, 704), (1056, 704),
                         (1088, 800), (1216, 800), (1280, 704), (1344, 800))
  c.data.flip_p = 0.5
  c.data.max_gt = 100
  c.data.mask_size = 112  # box-local ground-truth masks, M x M
  c.data.scenes_root = ml_collections.config_dict.placeholder(str)  # digit_scenes: None = beside the workdir
  c.data.scenes = ml_collections.ConfigDict()  # digit_scenes only (configs/detect_demo.py)

  # ---- model -----------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.depth = 50
  c.model.width = 64
  c.model.stage_sizes = ml_collections.config_dict.placeholder(tuple)  # None: from depth
  c.model.block = ml_collections.config_dict.placeholder(str)  # None: from depth
  c.model.dtype = 'bfloat16'  # compute dtype; parameters and losses stay float32
  c.model.remat = 'none'
  c.model.fpn_channels = 256
  c.model.anchor_sizes = (32, 64, 128, 256, 512)
  c.model.aspect_ratios = (0.5, 1.0, 2.0)
  c.model.rpn = ml_collections.ConfigDict()
  c.model.rpn.pre_nms_topk_train = 2000
  c.model.rpn.pre_nms_topk_test = 1000
  c.model.rpn.post_nms_topk_train = 1000
  c.model.rpn.post_nms_topk_test = 1000
  c.model.rpn.nms_thresh = 0.7
  c.model.rpn.batch_size_per_image = 256
  c.model.rpn.positive_fraction = 0.5
  c.model.rpn.iou_thresholds = (0.3, 0.7)
  c.model.roi = ml_collections.ConfigDict()
  c.model.roi.batch_size_per_image = 512
  c.model.roi.positive_fraction = 0.25
  c.model.roi.iou_threshold = 0.5
  c.model.roi.num_convs = 4
  c.model.roi.fc_dim = 1024
  c.model.roi.mask_conv_dim = 256
  c.model.roi.box_pool = 7
  c.model.roi.mask_pool = 14
  c.model.roi.sampling_ratio = 2
  c.model.roi.bbox_reg_weights = (10.0, 10.0, 5.0, 5.0)
  c.model.roi.score_thresh = 0.05
  c.model.roi.nms_thresh = 0.5
  c.model.roi.detections_per_image = 100

  # ---- optimisation (detectron2's 1x) ----------------------------------------
  c.optim = ml_collections.ConfigDict()
  c.optim.global_batch = 16
  c.optim.base_lr = 0.02  # for global_batch 16; not rescaled automatically
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4  # every kernel and bias (norm biases included)
  c.optim.weight_decay_norm = 0.0  # norm scales
  c.optim.warmup_iters = 1000
  c.optim.warmup_factor = 0.001
  c.optim.lr_steps = (60_000, 80_000)
  c.optim.gamma = 0.1
  c.optim.num_steps = 90_000

  # ---- evaluation and bookkeeping --------------------------------------------
  c.eval_every = 10_000  # steps; the last step is always evaluated (0: only then)
  c.eval_per_device_batch = 2
  c.precise_bn_iters = 0  # not implemented: must be 0 (docs/DETECTION.md)
  c.compare_random_init = False  # also fine-tune a random init in WORKDIR/random_init
  c.log_every = 20
  c.checkpoint_every = 5000
  c.keep_checkpoints = 3
  return c
