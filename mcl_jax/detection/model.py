"""Mask R-CNN with a ResNet-FPN backbone (detectron2's R50-FPN), in Flax with static shapes.

The backbone and FPN are the pretraining's modules under the pretraining's
names (`backbone`, `fpn`, as in `MCLNet`), so pretrained variables load by
name; SyncBN is BatchNorm over the whole jitted batch. P6 (max-pool kernel 1,
stride 2 of P5) feeds the RPN only. The RPN is `rpn.py`, the RoI heads
`roi_heads.py`.

Training (`__call__`) returns detectron2's five losses; `predict` returns a
fixed number of detections per image with a validity mask. Computation runs
in `dtype` (bfloat16 on accelerators), parameters, losses, softmax and box
arithmetic in float32.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcl_jax.detection import boxes as box_ops
from mcl_jax.detection import mask_targets as mask_targets_lib
from mcl_jax.detection import roi_heads
from mcl_jax.detection import rpn as rpn_lib
from mcl_jax.nn import model as model_lib
from mcl_jax.nn import remat as remat_lib
from mcl_jax.nn.fpn import FPN
from mcl_jax.nn.resnet import ResNet

# detectron2's PIXEL_MEAN / PIXEL_STD (RGB, 0-255 units).
PIXEL_MEAN = (123.675, 116.280, 103.530)
PIXEL_STD = (58.395, 57.120, 57.375)
LOSS_NAMES = ('loss_rpn_cls', 'loss_rpn_loc', 'loss_cls', 'loss_box_reg', 'loss_mask')


def normalize_images(images, image_hw):
  """uint8 [B, H, W, 3] -> float32 (x - mean) / std, 0 outside each image's (h, w)."""
  x = (images.astype(jnp.float32) - jnp.asarray(PIXEL_MEAN)) / jnp.asarray(PIXEL_STD)
  h, w = images.shape[1:3]
  inside = ((jnp.arange(h)[None, :, None] < image_hw[:, 0, None, None])
            & (jnp.arange(w)[None, None, :] < image_hw[:, 1, None, None]))
  return jnp.where(inside[..., None], x, 0.0)


class MaskRCNN(nn.Module):
  """Mask R-CNN: ResNet + FPN, RPN, 4conv1fc box head, mask head.

  Attributes:
    num_classes: K (background is class K).
    depth, width, stage_sizes, block, fpn_channels, remat: the backbone, as
      the pretraining's config.model.
    anchor_sizes: one per level P2..P6; aspect_ratios: shared.
    rpn: rpn.RPNSettings; roi: roi_heads.ROISettings.
    dtype: compute dtype.
  """
  num_classes: int
  depth: int = 50
  width: int = 64
  stage_sizes: Sequence[int] | None = None
  block: str | None = None
  fpn_channels: int = 256
  anchor_sizes: Sequence[float] = (32, 64, 128, 256, 512)
  aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
  rpn: rpn_lib.RPNSettings = rpn_lib.RPNSettings()
  roi: roi_heads.ROISettings = roi_heads.ROISettings()
  dtype: Any = jnp.float32
  remat: str = 'none'

  def setup(self):
    if self.remat not in model_lib.REMAT:
      raise ValueError(f'model.remat={self.remat!r}: must be one of {tuple(model_lib.REMAT)}')
    backbone_remat, fpn_remat, _ = model_lib.REMAT[self.remat]
    self.backbone = ResNet(self.depth, self.width, self.stage_sizes, self.block, self.dtype,
                           remat=backbone_remat)
    fpn_cls = remat_lib.remat(FPN, static_argnums=(2,), policy=(
        remat_lib.RECOMPUTE if fpn_remat else remat_lib.KEEP))
    self.fpn = fpn_cls(self.fpn_channels, self.dtype)
    self.rpn_head = rpn_lib.RPNHead(self.fpn_channels, len(self.aspect_ratios), self.dtype)
    self.box_head = roi_heads.BoxHead(self.fpn_channels, self.roi.num_convs, self.roi.fc_dim,
                                      self.dtype)
    self.box_predictor = roi_heads.BoxPredictor(self.num_classes, self.dtype)
    self.mask_head = roi_heads.MaskHead(self.num_classes, self.roi.mask_conv_dim,
                                        dtype=self.dtype)

  def features(self, images, image_hw, train: bool):
    """Normalised images -> ([P2..P5], P6)."""
    c = self.backbone(normalize_images(images, image_hw), train)
    p = self.fpn(c, train)
    pooled = [p[f'P{lvl}'] for lvl in roi_heads.POOL_LEVELS]
    return pooled, pooled[-1][:, ::2, ::2]  # max-pool kernel 1, stride 2 (ceil size)

  def _rpn(self, images, image_hw, train: bool):
    feats, p6 = self.features(images, image_hw, train)
    logits, deltas = self.rpn_head(feats + [p6])
    anchors = rpn_lib.level_anchors(images.shape[1:3], self.anchor_sizes, self.aspect_ratios)
    return feats, logits, deltas, anchors

  def __call__(self, batch, train: bool = True):
    """The five training losses of a batch.

    Args:
      batch: the batch dict (images, image_hw, gt_boxes, gt_classes,
        gt_valid, gt_masks); needs the 'sampling' rng.
      train: batch statistics in every BatchNorm (False: running averages).

    Returns:
      {loss_rpn_cls, loss_rpn_loc, loss_cls, loss_box_reg, loss_mask}, float32 scalars.
    """
    images, image_hw = batch['images'], batch['image_hw']
    gt_boxes = batch['gt_boxes'].astype(jnp.float32)
    gt_classes, gt_valid = batch['gt_classes'], batch['gt_valid']
    b = images.shape[0]
    keys = jax.random.split(self.make_rng('sampling'), 2 * b)
    feats, logits, deltas, anchors = self._rpn(images, image_hw, train)

    every_anchor = jnp.concatenate(anchors)
    labels, matched = jax.vmap(rpn_lib.label_anchors, (None, 0, 0, 0, None))(
        every_anchor, gt_boxes, gt_valid, keys[:b], self.rpn)
    loss_rpn_cls, loss_rpn_loc = rpn_lib.rpn_losses(
        jnp.concatenate(logits, 1), jnp.concatenate(deltas, 1), every_anchor, labels, matched,
        self.rpn.batch_size_per_image)

    proposals, _, proposal_valid = rpn_lib.find_proposals(
        logits, deltas, anchors, image_hw, self.rpn.pre_nms_topk_train,
        self.rpn.post_nms_topk_train, self.rpn.nms_thresh)
    s = jax.vmap(roi_heads.sample_rois, (0, 0, 0, 0, 0, 0, None, None))(
        proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, keys[b:], self.roi,
        self.num_classes)
    losses = self._box_losses(feats, s, gt_boxes, train)
    losses['loss_mask'] = self._mask_loss(feats, s, gt_boxes, batch['gt_masks'], train)
    losses.update(loss_rpn_cls=loss_rpn_cls, loss_rpn_loc=loss_rpn_loc)
    return {k: losses[k] for k in LOSS_NAMES}

  def _box_losses(self, feats, s, gt_boxes, train: bool):
    rois, fg = s['rois'], s['fg']
    matched = jnp.take_along_axis(gt_boxes, s['gt_index'][..., None], axis=1)
    targets = box_ops.encode(jnp.where(fg[..., None], matched, rois), rois,
                             self.roi.bbox_reg_weights)
    # Padding rows may hold empty boxes (0 / 0); they are never read.
    targets = jnp.where(fg[..., None], targets, 0.0)
    pooled = roi_heads.pool(feats, rois, self.roi.box_pool, self.roi.sampling_ratio)
    valid = s['valid'].reshape(-1)
    logits, deltas = self.box_predictor(self.box_head(pooled, valid, train))
    loss_cls, loss_box_reg = roi_heads.box_losses(logits, deltas, s['classes'].reshape(-1),
                                                  valid, targets.reshape(-1, 4))
    return {'loss_cls': loss_cls, 'loss_box_reg': loss_box_reg}

  def _mask_loss(self, feats, s, gt_boxes, gt_masks, train: bool):
    m = self.roi.mask_rois  # every foreground RoI is among the first m (roi_heads.py)
    rois, fg = s['rois'][:, :m], s['fg'][:, :m]
    size = 2 * self.roi.mask_pool
    targets = jax.vmap(lambda gm, gb, r, gi: mask_targets_lib.mask_targets(gm, gb, r, gi, size))(
        gt_masks, gt_boxes, rois, s['gt_index'][:, :m])
    pooled = roi_heads.pool(feats, rois, self.roi.mask_pool, self.roi.sampling_ratio)
    logits = self.mask_head(pooled, fg.reshape(-1), train)
    return roi_heads.mask_loss(logits, s['classes'][:, :m].reshape(-1), fg.reshape(-1),
                               targets.reshape(-1, size, size))

  def predict(self, images, image_hw):
    """Detections of images [B, H, W, 3] uint8 (eval mode).

    Returns:
      dict: boxes [B, D, 4] (canvas pixels), scores [B, D], classes int32
      [B, D], valid bool [B, D], masks [B, D, 28, 28] (sigmoid of the
      predicted class's mask), D = detections_per_image; invalid slots
      have score 0.
    """
    b = images.shape[0]
    feats, logits, deltas, anchors = self._rpn(images, image_hw, False)
    proposals, _, proposal_valid = rpn_lib.find_proposals(
        logits, deltas, anchors, image_hw, self.rpn.pre_nms_topk_test,
        self.rpn.post_nms_topk_test, self.rpn.nms_thresh)
    r = proposals.shape[1]
    pooled = roi_heads.pool(feats, proposals, self.roi.box_pool, self.roi.sampling_ratio)
    cls_logits, box_deltas = self.box_predictor(
        self.box_head(pooled, proposal_valid.reshape(-1), False))
    boxes, scores, classes, valid = jax.vmap(roi_heads.detect, (0, 0, 0, 0, 0, None))(
        cls_logits.reshape(b, r, -1), box_deltas.reshape(b, r, self.num_classes, 4),
        proposals, proposal_valid, image_hw, self.roi)
    d = boxes.shape[1]
    pooled = roi_heads.pool(feats, boxes, self.roi.mask_pool, self.roi.sampling_ratio)
    mask_logits = self.mask_head(pooled, valid.reshape(-1), False)
    chosen = jnp.take_along_axis(mask_logits, classes.reshape(-1)[:, None, None, None], -1)
    masks = jax.nn.sigmoid(chosen[..., 0]).reshape(b, d, *mask_logits.shape[1:3])
    return {'boxes': boxes, 'scores': scores, 'classes': classes, 'valid': valid,
            'masks': jnp.where(valid[..., None, None], masks, 0.0)}

  def init_modules(self, images, image_hw):
    """Creates every module's variables at the cost of one forward pass of the backbone."""
    feats, _, _, _ = self._rpn(images, image_hw, False)
    c, one = self.fpn_channels, jnp.ones((1,), bool)
    box = jnp.zeros((1, self.roi.box_pool, self.roi.box_pool, c), self.dtype)
    self.box_predictor(self.box_head(box, one, False))
    mask = jnp.zeros((1, self.roi.mask_pool, self.roi.mask_pool, c), self.dtype)
    return self.mask_head(mask, one, False)


def create_detector(config) -> MaskRCNN:
  """MaskRCNN from config.model (and config.data.num_classes)."""
  m = config.model
  return MaskRCNN(
      num_classes=int(config.data.num_classes), depth=m.depth, width=m.width,
      stage_sizes=tuple(m.stage_sizes) if m.get('stage_sizes') else None,
      block=m.get('block'), fpn_channels=m.fpn_channels,
      anchor_sizes=tuple(m.anchor_sizes), aspect_ratios=tuple(m.aspect_ratios),
      rpn=rpn_lib.RPNSettings.from_config(m.rpn), roi=roi_heads.ROISettings.from_config(m.roi),
      dtype=model_lib.DTYPES[m.dtype], remat=m.get('remat', 'none'))


def init_variables(model: MaskRCNN, key, canvas_hw: Sequence[int]) -> dict:
  """Initial {'params', 'batch_stats'} (parameters do not depend on the canvas).

  detectron2's initialisation for the RPN, fc1, the predictors and the mask
  head; the pretraining's (Kaiming normal, fan_out) for the backbone, FPN and
  box-head convs, which a pretrained source overwrites.
  """
  images = jnp.zeros((1, *canvas_hw, 3), jnp.uint8)
  hw = jnp.asarray([canvas_hw], jnp.int32)
  variables = jax.jit(lambda k: model.init(k, images, hw, method=MaskRCNN.init_modules))(key)
  return {'params': variables['params'], 'batch_stats': variables['batch_stats']}


def abstract_variables(model: MaskRCNN, canvas_hw: Sequence[int] = (64, 64)):
  """ShapeDtypeStructs of the variables (no compute; for export checks)."""
  return jax.eval_shape(lambda k: init_variables(model, k, canvas_hw), jax.random.key(0))
