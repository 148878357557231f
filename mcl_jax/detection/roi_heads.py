"""RoI heads of Mask R-CNN: sampling, the multi-level pooler, box and mask heads, losses.

detectron2's StandardROIHeads with a "4conv1fc" box head and the
MaskRCNNConvUpsampleHead, in static shapes:

* Sampling keeps a fixed S = batch_size_per_image RoIs per image (sampled
  ones first, positives before negatives; a `valid` mask marks the rest
  when fewer candidates exist).
* The mask head runs on a fixed M = int(S * positive_fraction) RoIs per
  image: the sampler never takes more positives than that, and positives
  come first, so the first M sampled RoIs hold every foreground RoI
  (the rest are masked out).
* The heads' BatchNorms (`MaskedBatchNorm`) take their batch statistics over
  the valid rows only (sampled RoIs for the box head, foreground RoIs for
  the mask head), the rows detectron2's heads see.

The pooler is ROIAlignV2 (aligned) with a static sampling ratio
(`roi.sampling_ratio`, 2): detectron2's adaptive ratio (ceil of the bin
size) makes the number of samples data-dependent. A box's level is data too;
`multilevel_roi_align` pools every box on its own level with one gather
from the levels' maps concatenated (no box is pooled four times).
"""

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcl_jax.detection import boxes as box_ops
from mcl_jax.detection import matching
from mcl_jax.detection import nms as nms_lib
from mcl_jax.nn import roi_align as roi_align_lib
from mcl_jax.nn.batch_norm import BN_EPS, BN_MOMENTUM
from mcl_jax.nn.resnet import conv_init

# detectron2 inits of the fresh layers.
cls_score_init = nn.initializers.normal(0.01)
bbox_pred_init = nn.initializers.normal(0.001)
fc_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')  # Caffe2 Xavier fill
msra_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')  # c2_msra_fill
mask_predictor_init = nn.initializers.normal(0.001)

# The pooled levels P2..P5.
POOL_LEVELS = (2, 3, 4, 5)


@dataclasses.dataclass(frozen=True)
class ROISettings:
  """config.model.roi, hashable (a field of the flax module)."""
  batch_size_per_image: int = 512
  positive_fraction: float = 0.25
  iou_threshold: float = 0.5
  num_convs: int = 4
  fc_dim: int = 1024
  mask_conv_dim: int = 256
  box_pool: int = 7
  mask_pool: int = 14
  sampling_ratio: int = 2
  bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
  score_thresh: float = 0.05
  nms_thresh: float = 0.5
  detections_per_image: int = 100

  @classmethod
  def from_config(cls, roi) -> 'ROISettings':
    return cls(**{f.name: (tuple(roi[f.name]) if f.name == 'bbox_reg_weights' else roi[f.name])
                  for f in dataclasses.fields(cls) if f.name in roi})

  @property
  def mask_rois(self) -> int:
    """Mask RoIs per image: the most foreground RoIs the sampler can take."""
    return int(self.batch_size_per_image * self.positive_fraction)


class MaskedBatchNorm(nn.Module):
  """BatchNorm over the rows of x whose mask is set (names as `nn.BatchNorm`).

  Plain autodiff (the heads' activations are small next to the backbone's);
  momentum, eps and the biased running variance as `mcl_jax.nn.batch_norm`.
  A batch without any valid row normalises with mean 0 and variance 1 and
  leaves the running averages unchanged.

  Attributes:
    use_running_average: eval mode.
    dtype: output dtype; statistics and normalisation run in float32.
  """
  use_running_average: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, relu: bool = False):
    """Normalises x [R, ..., C]; mask [R] bool selects the rows of the statistics."""
    c = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    xf = x.astype(jnp.float32)
    if self.use_running_average:
      y = (xf - ra_mean.value) * (jax.lax.rsqrt(ra_var.value + BN_EPS) * scale) + bias
    else:
      axes = tuple(range(x.ndim - 1))
      m = jnp.ones(x.shape[0], jnp.float32) if mask is None else mask.astype(jnp.float32)
      w = m.reshape((-1,) + (1,) * (x.ndim - 1))
      rows = jnp.sum(m)
      count = jnp.maximum(rows * (x[0].size // c), 1.0)
      mean = jnp.sum(xf * w, axes) / count
      var = jnp.sum(w * jnp.square(xf - mean), axes) / count
      # No valid row anywhere (a background-only batch's mask head): unit
      # variance keeps the ignored rows' activations at their scale.
      var = jnp.where(rows > 0, var, 1.0)
      y = (xf - mean) * (jax.lax.rsqrt(var + BN_EPS) * scale) + bias
      if not self.is_initializing():
        # No valid row in the whole batch: the running averages stay.
        seen = rows > 0
        ra_mean.value = jnp.where(seen, BN_MOMENTUM * ra_mean.value + (1 - BN_MOMENTUM) * mean,
                                  ra_mean.value)
        ra_var.value = jnp.where(seen, BN_MOMENTUM * ra_var.value + (1 - BN_MOMENTUM) * var,
                                 ra_var.value)
    y = y.astype(self.dtype)
    return nn.relu(y) if relu else y


def _conv(features: int, dtype, name: str, kernel_init=conv_init):
  return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=kernel_init, name=name)


class BoxHead(nn.Module):
  """"4conv1fc": convK (3x3, no bias) + BN + ReLU, flatten (h, w, c order), fc1 + ReLU.

  convK / bnK carry the pretraining neck's names, so its region convs load
  into them by name.
  """
  channels: int = 256
  num_convs: int = 4
  fc_dim: int = 1024
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, valid, train: bool):
    """x [R, k, k, C], valid [R] -> [R, fc_dim] (compute dtype)."""
    for k in range(1, self.num_convs + 1):
      x = _conv(self.channels, self.dtype, f'conv{k}')(x)
      x = MaskedBatchNorm(not train, self.dtype, name=f'bn{k}')(x, valid, relu=True)
    x = x.reshape(x.shape[0], -1)
    return nn.relu(nn.Dense(self.fc_dim, dtype=self.dtype, param_dtype=jnp.float32,
                            kernel_init=fc_init, name='fc1')(x))


class BoxPredictor(nn.Module):
  """cls_score (K + 1, background last) and class-specific bbox_pred (4K)."""
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x [R, D] -> (logits [R, K + 1], deltas [R, K, 4]), float32."""
    dense = lambda n, init, name: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32,
                                           kernel_init=init, name=name)
    logits = dense(self.num_classes + 1, cls_score_init, 'cls_score')(x).astype(jnp.float32)
    deltas = dense(4 * self.num_classes, bbox_pred_init, 'bbox_pred')(x).astype(jnp.float32)
    return logits, deltas.reshape(x.shape[0], self.num_classes, 4)


class MaskHead(nn.Module):
  """Four 3x3 conv + BN + ReLU, 2x2 stride-2 transposed conv + ReLU, 1x1 conv to K masks."""
  num_classes: int
  conv_dim: int = 256
  num_convs: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, valid, train: bool):
    """x [R, 14, 14, C], valid [R] -> mask logits [R, 28, 28, K] (float32)."""
    for k in range(1, self.num_convs + 1):
      x = _conv(self.conv_dim, self.dtype, f'conv{k}', msra_init)(x)
      x = MaskedBatchNorm(not train, self.dtype, name=f'bn{k}')(x, valid, relu=True)
    # Flax's ConvTranspose is torch's ConvTranspose2d with the kernel flipped
    # spatially (export.py converts).
    x = nn.relu(nn.ConvTranspose(self.conv_dim, (2, 2), strides=(2, 2), padding='VALID',
                                 dtype=self.dtype, param_dtype=jnp.float32,
                                 kernel_init=msra_init, name='deconv')(x))
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=mask_predictor_init, name='predictor')(x).astype(jnp.float32)


def multilevel_roi_align(feats: Sequence[jax.Array], boxes, box_indices, levels,
                         output_size: int, sampling_ratio: int):
  """ROIAlignV2 of each box on its own FPN level, with one gather for all levels.

  Equal to `roi_align(feats[levels[r]], ..., spatial_scale=1 / stride)` per
  box: the sample positions are roi_align's (`sample_positions`) on the box
  scaled by its level's 2^-l, which is exact in float32 (a power of two), so
  they are those of the per-level call bit for bit; the bilinear weights,
  edge clamping and out-of-map zeros follow roi_align with each box's own
  map size. The levels are concatenated into one flat array and every
  sample reads its level's part. This costs one RoIAlign, where pooling every
  box on every level and selecting costs four (and their backward passes
  four scatters over the maps).

  Args:
    feats: P2..P5, [N, H_l, W_l, C] (same N and C).
    boxes: [R, 4] canvas pixels.
    box_indices: [R] int image of each box.
    levels: [R] int32 index into feats (`boxes.assign_levels`).
    output_size: k (k x k bins).
    sampling_ratio: static samples per bin and axis.

  Returns:
    [R, k, k, C] in the features' dtype.
  """
  n, c = feats[0].shape[0], feats[0].shape[-1]
  strides = jnp.asarray([2.0**-lvl for lvl in POOL_LEVELS[:len(feats)]], jnp.float32)
  heights = jnp.asarray([f.shape[1] for f in feats], jnp.int32)[levels]
  widths = jnp.asarray([f.shape[2] for f in feats], jnp.int32)[levels]
  sizes = [n * f.shape[1] * f.shape[2] for f in feats]
  offsets = jnp.asarray([sum(sizes[:i]) for i in range(len(feats))], jnp.int32)[levels]
  scaled = boxes.astype(jnp.float32) * strides[levels][:, None]
  ys, xs = roi_align_lib.sample_positions(scaled, output_size, 1.0, sampling_ratio, True)

  def interp(coord, length):  # roi_align's _interp_weights with a per-box length
    length = length[:, None]
    cc = jnp.maximum(coord, 0.0)
    low = jnp.floor(cc).astype(jnp.int32)
    at_edge = low >= length - 1
    low = jnp.where(at_edge, length - 1, low)
    high = jnp.where(at_edge, length - 1, low + 1)
    cc = jnp.where(at_edge, low.astype(cc.dtype), cc)
    frac = cc - low
    return low, high, 1.0 - frac, frac

  y_ok = (ys >= -1.0) & (ys <= heights[:, None].astype(jnp.float32))
  x_ok = (xs >= -1.0) & (xs <= widths[:, None].astype(jnp.float32))
  y_lo, y_hi, wy_lo, wy_hi = interp(ys, heights)
  x_lo, x_hi, wx_lo, wx_hi = interp(xs, widths)
  flat = jnp.concatenate([f.reshape(-1, c) for f in feats])
  base = (offsets + box_indices.astype(jnp.int32) * heights * widths)[:, None, None]
  w_ = widths[:, None, None]

  def gather(yi, xi):
    return flat[base + yi[:, :, None] * w_ + xi[:, None, :]]  # [R, P, Q, C]

  wy_lo, wy_hi = wy_lo[:, :, None, None], wy_hi[:, :, None, None]
  wx_lo, wx_hi = wx_lo[:, None, :, None], wx_hi[:, None, :, None]
  out = (gather(y_lo, x_lo) * (wy_lo * wx_lo) + gather(y_lo, x_hi) * (wy_lo * wx_hi)
         + gather(y_hi, x_lo) * (wy_hi * wx_lo) + gather(y_hi, x_hi) * (wy_hi * wx_hi))
  ok = (y_ok[:, :, None] & x_ok[:, None, :])[..., None]
  out = jnp.where(ok, out, 0.0)
  r = boxes.shape[0]
  out = out.reshape(r, output_size, sampling_ratio, output_size, sampling_ratio, c)
  return out.mean(axis=(2, 4)).astype(feats[0].dtype)


def pool(feats: Sequence[jax.Array], boxes, output_size: int, sampling_ratio: int):
  """Pools boxes [B, R, 4] (canvas pixels) at their levels: [B * R, k, k, C].

  Mapped over images, so each image's boxes gather from its own maps only
  (a batched gather, which a batch-sharded program keeps on its shard).
  """
  def one_image(image_feats, image_boxes):
    return multilevel_roi_align([f[None] for f in image_feats], image_boxes,
                                jnp.zeros(image_boxes.shape[0], jnp.int32),
                                box_ops.assign_levels(image_boxes), output_size, sampling_ratio)

  out = jax.vmap(one_image)(list(feats), boxes)
  return out.reshape(-1, *out.shape[2:])


def sample_rois(proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, key,
                settings: ROISettings, num_classes: int):
  """detectron2's label_and_sample_proposals for one image, static.

  The gt boxes are appended to the proposals; IoU >= iou_threshold is
  foreground; S = batch_size_per_image RoIs are sampled, positive_fraction
  positive at most. The S output rows hold the sampled RoIs first
  (positives, then negatives), then unsampled padding (valid False).

  Returns:
    dict of rois [S, 4], valid [S] (sampled), fg [S], classes [S] (gt class
    for fg, num_classes for background), gt_index [S] (matched gt).
  """
  cand = jnp.concatenate([proposals, gt_boxes]).astype(jnp.float32)
  cand_valid = jnp.concatenate([proposal_valid, gt_valid])
  iou = box_ops.pairwise_iou(gt_boxes, cand)
  matched, label = matching.match(iou, gt_valid, (settings.iou_threshold,), (0, 1), False)
  label = jnp.where(cand_valid, label, -1)
  s = min(settings.batch_size_per_image, cand.shape[0])
  pos, neg = matching.subsample(label, settings.batch_size_per_image,
                                settings.positive_fraction, key)
  # Positives (2) before negatives (1) before the rest; top_k keeps index
  # order among equals.
  _, idx = jax.lax.top_k(pos.astype(jnp.int32) * 2 + neg.astype(jnp.int32), s)
  fg = pos[idx]
  gt_index = matched[idx]
  return {'rois': cand[idx], 'valid': fg | neg[idx], 'fg': fg,
          'classes': jnp.where(fg, gt_classes[gt_index], num_classes).astype(jnp.int32),
          'gt_index': gt_index}


def box_losses(logits, deltas, classes, valid, target_deltas):
  """Fast R-CNN losses over the sampled RoIs.

  Args:
    logits: [N, K + 1]; deltas: [N, K, 4].
    classes: [N] int in 0..K (K = background).
    valid: [N] bool, the sampled RoIs.
    target_deltas: [N, 4] (read at foreground RoIs only).

  Returns:
    loss_cls: softmax cross-entropy, mean over sampled RoIs.
    loss_box_reg: L1 of the gt class's deltas on foreground RoIs, summed and
      divided by the number of sampled RoIs.
  """
  k = deltas.shape[1]
  count = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  ce = -jnp.take_along_axis(logp, classes[:, None], axis=-1)[:, 0]
  loss_cls = jnp.sum(jnp.where(valid, ce, 0.0)) / count
  fg = valid & (classes < k)
  chosen = jnp.take_along_axis(deltas, jnp.minimum(classes, k - 1)[:, None, None], axis=1)[:, 0]
  l1 = jnp.abs(chosen.astype(jnp.float32) - target_deltas)
  return loss_cls, jnp.sum(jnp.where(fg[:, None], l1, 0.0)) / count


def mask_loss(mask_logits, classes, fg, targets):
  """BCE of the gt class's mask logits, mean over foreground RoIs x pixels.

  Args:
    mask_logits: [N, s, s, K]; classes: [N] (read at foreground rows);
    fg: [N] bool; targets: [N, s, s] in {0, 1}.
  """
  k = mask_logits.shape[-1]
  cls = jnp.clip(classes, 0, k - 1)[:, None, None, None]
  x = jnp.take_along_axis(mask_logits.astype(jnp.float32), cls, axis=-1)[..., 0]
  bce = jnp.maximum(x, 0.0) - x * targets + jnp.log1p(jnp.exp(-jnp.abs(x)))
  count = jnp.maximum(jnp.sum(fg) * x[0].size, 1).astype(jnp.float32)
  return jnp.sum(jnp.where(fg[:, None, None], bce, 0.0)) / count


def detect(logits, deltas, proposals, proposal_valid, image_hw, settings: ROISettings):
  """detectron2's fast_rcnn_inference for one image, static.

  Softmax scores, class-specific boxes decoded and clipped, candidates with
  score > score_thresh, NMS per class, the top detections_per_image.

  Args:
    logits: [R, K + 1]; deltas: [R, K, 4]; proposals: [R, 4];
    proposal_valid: [R]; image_hw: [2].

  Returns:
    boxes [D, 4], scores [D], classes [D] int32, valid [D].
  """
  r, k = deltas.shape[:2]
  scores = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[:, :k]
  boxes = box_ops.decode(deltas, proposals[:, None, :], settings.bbox_reg_weights)
  boxes = box_ops.clip(boxes, image_hw).reshape(r * k, 4)
  scores = scores.reshape(r * k)
  classes = jnp.tile(jnp.arange(k, dtype=jnp.int32), r)
  cand = ((scores > settings.score_thresh) & jnp.repeat(proposal_valid, k)
          & jnp.all(jnp.isfinite(boxes), axis=-1))
  keep, keep_valid = nms_lib.batched_nms(
      boxes, scores, classes, cand, settings.nms_thresh, settings.detections_per_image)
  return boxes[keep], jnp.where(keep_valid, scores[keep], 0.0), classes[keep], keep_valid
