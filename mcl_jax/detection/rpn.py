"""Region proposal network: head, anchor labels, losses and proposals (detectron2 RPN).

Everything works on static shapes: every anchor of every level is scored,
labelled and sampled with masks, proposals are a fixed count per image with a
validity mask. Level order is P2..P6; within a level anchors are
position-major, then aspect ratio (`anchors.level_anchors`), which is the
order of the head's outputs reshaped from [N, H, W, A].
"""

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mcl_jax.detection import anchors as anchor_lib
from mcl_jax.detection import boxes as box_ops
from mcl_jax.detection import matching
from mcl_jax.detection import nms as nms_lib

# P2..P6.
STRIDES = (4, 8, 16, 32, 64)
# detectron2 StandardRPNHead: every conv normal(std 0.01), bias 0.
head_init = nn.initializers.normal(0.01)


@dataclasses.dataclass(frozen=True)
class RPNSettings:
  """config.model.rpn, hashable (a field of the flax module)."""
  pre_nms_topk_train: int = 2000
  pre_nms_topk_test: int = 1000
  post_nms_topk_train: int = 1000
  post_nms_topk_test: int = 1000
  nms_thresh: float = 0.7
  batch_size_per_image: int = 256
  positive_fraction: float = 0.5
  iou_thresholds: tuple[float, float] = (0.3, 0.7)

  @classmethod
  def from_config(cls, rpn) -> 'RPNSettings':
    return cls(**{f.name: (tuple(rpn[f.name]) if f.name == 'iou_thresholds' else rpn[f.name])
                  for f in dataclasses.fields(cls) if f.name in rpn})


class RPNHead(nn.Module):
  """3x3 conv + ReLU shared over levels, then 1x1 objectness (A) and deltas (4A).

  Attributes:
    channels: the FPN width (the conv keeps it).
    num_anchors: A, anchors per position (aspect ratios).
    dtype: compute dtype; outputs are float32.
  """
  channels: int
  num_anchors: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array]):
    """Per level: logits [N, H*W*A] and deltas [N, H*W*A, 4], float32."""
    conv = lambda f, k, name: nn.Conv(f, (k, k), padding=((k // 2, k // 2),) * 2,
                                      dtype=self.dtype, param_dtype=jnp.float32,
                                      kernel_init=head_init, name=name)
    shared = conv(self.channels, 3, 'conv')
    objectness = conv(self.num_anchors, 1, 'objectness_logits')
    deltas = conv(4 * self.num_anchors, 1, 'anchor_deltas')
    logits, regs = [], []
    for f in feats:
      t = nn.relu(shared(f))
      n = f.shape[0]
      logits.append(objectness(t).astype(jnp.float32).reshape(n, -1))
      # Channel a * 4 + j is delta j of anchor a (detectron2's view(N, A, 4, H, W)).
      regs.append(deltas(t).astype(jnp.float32).reshape(n, -1, 4))
    return logits, regs


def level_anchors(canvas_hw: Sequence[int], sizes: Sequence[float],
                  ratios: Sequence[float]) -> list[jax.Array]:
  """The anchors of P2..P6 for one canvas, one [n_l, 4] array per level."""
  return anchor_lib.all_anchors(tuple(canvas_hw), STRIDES[:len(sizes)], tuple(sizes),
                                tuple(ratios))


def label_anchors(anchors, gt_boxes, gt_valid, key, settings: RPNSettings):
  """Sampled anchor labels of one image and each anchor's matched gt box.

  IoU >= 0.7 foreground, < 0.3 background, between ignored, plus each gt's
  best anchors; then 256 sampled, half positive at most.

  Args:
    anchors: [NA, 4], every level's anchors concatenated.
    gt_boxes: [G, 4]; gt_valid: [G] bool.
    key: the sampling key of this image.
    settings: RPNSettings.

  Returns:
    labels [NA] int32: 1 sampled positive, 0 sampled negative, -1 not sampled;
    matched boxes [NA, 4].
  """
  lo, hi = settings.iou_thresholds
  iou = box_ops.pairwise_iou(gt_boxes, anchors)
  matched, label = matching.match(iou, gt_valid, (lo, hi), (0, -1, 1), True)
  pos, neg = matching.subsample(label, settings.batch_size_per_image,
                                settings.positive_fraction, key)
  labels = jnp.where(pos, 1, jnp.where(neg, 0, -1)).astype(jnp.int32)
  return labels, gt_boxes[matched]


def bce_with_logits(x, y):
  """Binary cross-entropy of logits x against targets y in [0, 1], stable, float32."""
  x = x.astype(jnp.float32)
  return jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))


def rpn_losses(logits, deltas, anchors, labels, matched_boxes, batch_size_per_image: int):
  """detectron2's RPN losses, summed and divided by batch_size_per_image x images.

  Args:
    logits: [B, NA] objectness logits.
    deltas: [B, NA, 4] predicted deltas.
    anchors: [NA, 4].
    labels: [B, NA] from `label_anchors` (1, 0, -1).
    matched_boxes: [B, NA, 4] matched gt boxes (read at positives only).
    batch_size_per_image: the sampler's per-image count (the normaliser).

  Returns:
    (loss_rpn_cls, loss_rpn_loc) float32 scalars.
  """
  pos = labels == 1
  sampled = labels >= 0
  cls = jnp.sum(jnp.where(sampled, bce_with_logits(logits, pos.astype(jnp.float32)), 0.0))
  # Non-positives encode their anchor against itself (zero deltas, never NaN).
  targets = box_ops.encode(jnp.where(pos[..., None], matched_boxes, anchors[None]),
                           jnp.broadcast_to(anchors[None], matched_boxes.shape))
  loc = jnp.sum(jnp.where(pos[..., None], jnp.abs(deltas.astype(jnp.float32) - targets), 0.0))
  norm = float(batch_size_per_image * logits.shape[0])
  return cls / norm, loc / norm


def find_proposals(logits: Sequence[jax.Array], deltas: Sequence[jax.Array],
                   anchors: Sequence[jax.Array], image_hw, pre_nms_topk: int,
                   post_nms_topk: int, nms_thresh: float):
  """detectron2's find_top_rpn_proposals with static counts (no gradient).

  Per level the top pre_nms_topk anchors by objectness (at most the level's
  count), decoded, clipped to the image; empty or non-finite boxes are
  invalid; NMS within each level; the top post_nms_topk per image.

  Args:
    logits, deltas, anchors: per level, [B, n_l], [B, n_l, 4], [n_l, 4].
    image_hw: [B, 2] int (h, w) of each image.
    pre_nms_topk, post_nms_topk, nms_thresh: as in RPNSettings.

  Returns:
    boxes [B, P, 4], scores (logits) [B, P], valid [B, P] with
    P = post_nms_topk, by decreasing score, invalid entries last.
  """
  logits = [lax.stop_gradient(x) for x in logits]
  deltas = [lax.stop_gradient(x) for x in deltas]

  def one_image(logit_list, delta_list, hw):
    cand_boxes, cand_scores, cand_levels = [], [], []
    for lvl, (lg, dl, an) in enumerate(zip(logit_list, delta_list, anchors)):
      k = min(pre_nms_topk, lg.shape[0])
      score, idx = lax.top_k(lg, k)
      cand_boxes.append(box_ops.decode(dl[idx], an[idx]))
      cand_scores.append(score)
      cand_levels.append(jnp.full((k,), lvl, jnp.int32))
    b = box_ops.clip(jnp.concatenate(cand_boxes), hw)
    s = jnp.concatenate(cand_scores)
    valid = (box_ops.nonempty(b) & jnp.all(jnp.isfinite(b), axis=-1) & jnp.isfinite(s))
    keep, keep_valid = nms_lib.batched_nms(b, s, jnp.concatenate(cand_levels), valid,
                                           nms_thresh, post_nms_topk)
    return b[keep], s[keep], keep_valid

  return jax.vmap(one_image)(logits, deltas, image_hw)
