r"""A tiny fine-tuning config for tests (seconds per step on a CPU); not a model to evaluate.

Run:  python -m mcl_jax.finetune --config=configs/detect_test_tiny.py --pretrained=none \
          --workdir=/tmp/detect_tiny

Standalone (it imports no other config, so that changing the demo or the COCO
config never changes the tests): 64 px scenes of two or three large digits
(22-32 px), a narrow one-block-per-stage trunk, a 32-channel FPN, small
proposal and RoI counts, a few steps.

The learning test (tests/test_finetune.py) runs 500 steps of it from a random
init and needs box AP50 >= 0.5 on held-out scenes. What makes that reachable
on a CPU: localisation is learnt in ~100 steps (class-agnostic AP50 0.89),
the ten-way digit classification is what takes the steps, so the settings
favour it: no horizontal flip (a mirrored digit is no digit), 512 training
scenes of 2-3 digits (more distinct digits per step), 16 RoIs per image half
of them foreground at most (the foreground's share of loss_cls, which
detectron2 averages over every sampled RoI), a width-16 trunk and the lr
dropped for the last fifth of the steps.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.pretrained = 'none'

  c.data = ml_collections.ConfigDict()
  c.data.source = 'digit_scenes'
  c.data.coco_root = ml_collections.config_dict.placeholder(str)
  c.data.scenes_root = ml_collections.config_dict.placeholder(str)  # None: beside the workdir
  c.data.train_split = 'train2017'
  c.data.val_split = 'val2017'
  c.data.num_classes = 10
  c.data.train_short_sides = (64,)
  c.data.test_short_side = 64
  c.data.max_long_side = 64
  c.data.canvas_sizes = ((64, 64),)
  c.data.flip_p = 0.0  # mirrored digits are not digits
  c.data.max_gt = 4
  c.data.mask_size = 16
  c.data.scenes = ml_collections.ConfigDict()
  c.data.scenes.num_train = 512
  c.data.scenes.num_val = 16
  c.data.scenes.image_size = 64
  c.data.scenes.digits_per_scene = (2, 3)
  c.data.scenes.sides = (22, 32)
  c.data.scenes.seed = 0
  c.data.scenes.heldout_fraction = 0.2

  c.model = ml_collections.ConfigDict()
  c.model.depth = 18
  c.model.width = 16
  c.model.stage_sizes = (1, 1, 1, 1)
  c.model.block = ml_collections.config_dict.placeholder(str)
  c.model.dtype = 'float32'
  c.model.remat = 'none'
  c.model.fpn_channels = 32
  c.model.anchor_sizes = (8, 16, 32, 64, 128)
  c.model.aspect_ratios = (0.5, 1.0, 2.0)
  c.model.rpn = ml_collections.ConfigDict(dict(
      pre_nms_topk_train=200, pre_nms_topk_test=200, post_nms_topk_train=64,
      post_nms_topk_test=32, nms_thresh=0.7, batch_size_per_image=64, positive_fraction=0.5,
      iou_thresholds=(0.3, 0.7)))
  c.model.roi = ml_collections.ConfigDict(dict(
      batch_size_per_image=16, positive_fraction=0.5, iou_threshold=0.5, num_convs=4,
      fc_dim=128, mask_conv_dim=16, box_pool=7, mask_pool=7, sampling_ratio=2,
      bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), score_thresh=0.05, nms_thresh=0.5,
      detections_per_image=8))

  c.optim = ml_collections.ConfigDict()
  c.optim.global_batch = 8
  c.optim.base_lr = 0.1  # a random init of a narrow net learns visibly in tens of steps
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.weight_decay_norm = 0.0
  c.optim.warmup_iters = 10
  c.optim.warmup_factor = 0.001
  c.optim.lr_steps = (400,)  # x0.1 for the last fifth of the learning test's 500 steps
  c.optim.gamma = 0.1
  c.optim.num_steps = 6

  c.eval_every = 0
  c.eval_per_device_batch = 2
  c.precise_bn_iters = 0
  c.compare_random_init = False
  c.log_every = 1
  c.checkpoint_every = 2
  c.keep_checkpoints = 2
  return c
