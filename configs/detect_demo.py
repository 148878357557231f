r"""CPU demo: fine-tune the demo pretraining (runs/demo) as a Mask R-CNN on digit scenes.

Run (after `python main.py --config=configs/demo.py --workdir=runs/demo`):

    python -m mcl_jax.finetune --config=configs/detect_demo.py --pretrained=runs/demo \
        --workdir=runs/detect_demo

The scenes are written once beside the workdir (runs/detection_scenes/):
128 px canvases with 2-6 digits of 8-48 px each, as a COCO-layout folder,
training scenes from the pretraining's training digits and validation
scenes from its held-out digits. The detector is the demo pretraining's
network (a narrow ResNet-18-style trunk with one block per stage, a 64-channel
FPN, float32) with the Mask R-CNN heads on top, anchors scaled to the scenes
(8-128 px) and small proposal / RoI counts. The same fine-tune then runs
from a random init in WORKDIR/random_init, and the COCO table of both,
scored on the held-out scenes, is printed side by side.
"""

from configs import detect_coco_1x


def get_config():
  """The COCO 1x config, shrunk to digit scenes on a CPU."""
  c = detect_coco_1x.get_config()
  c.pretrained = 'runs/demo'
  c.data.source = 'digit_scenes'
  c.data.coco_root = None
  c.data.scenes_root = None  # None: beside the workdir (WORKDIR/../detection_scenes)
  c.data.scenes.num_train = 2000
  c.data.scenes.num_val = 500
  c.data.scenes.image_size = 128
  c.data.scenes.digits_per_scene = (2, 6)
  c.data.scenes.sides = (8, 48)
  c.data.scenes.seed = 0
  c.data.scenes.heldout_fraction = 0.2  # the pretraining demo's digits split
  c.data.num_classes = 10
  c.data.train_short_sides = (128,)
  c.data.test_short_side = 128
  c.data.max_long_side = 128
  c.data.canvas_sizes = ((128, 128),)
  c.data.max_gt = 8
  c.data.mask_size = 32
  # The demo pretraining's network (configs/demo.py): its variables load by name.
  c.model.depth = 18
  c.model.width = 16
  c.model.stage_sizes = (1, 1, 1, 1)
  c.model.fpn_channels = 64
  c.model.dtype = 'float32'  # CPUs have no fast bf16
  c.model.anchor_sizes = (8, 16, 32, 64, 128)
  c.model.rpn.pre_nms_topk_train = 500
  c.model.rpn.pre_nms_topk_test = 500
  c.model.rpn.post_nms_topk_train = 128
  c.model.rpn.post_nms_topk_test = 100
  c.model.roi.batch_size_per_image = 64
  c.model.roi.fc_dim = 256
  c.model.roi.mask_conv_dim = 64
  c.model.roi.detections_per_image = 20
  c.optim.global_batch = 8
  c.optim.base_lr = 0.02
  c.optim.warmup_iters = 50
  c.optim.lr_steps = (240, 280)
  c.optim.num_steps = 300
  c.eval_every = 0
  c.eval_per_device_batch = 8
  c.compare_random_init = True
  c.log_every = 25
  c.checkpoint_every = 100
  return c
