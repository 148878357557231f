"""Box arithmetic: delta coding, IoU, clipping, FPN level assignment.

Boxes are float32 (x1, y1, x2, y2) in pixels, with detectron2's conventions:
the width is x2 - x1 (no +1), the centre x1 + w / 2. Every function works on
any leading shape [..., 4] unless it says otherwise, so it vmaps over images.
"""

import math
from typing import Sequence

import jax.numpy as jnp

# detectron2's clamp on the decoded log-scale (dw, dh): a box grows at most
# 1000 / 16 times its anchor, so exp never overflows early in training.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _centre_size(boxes):
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode(boxes, anchors, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)):
  """The deltas that take `anchors` to `boxes` (detectron2 Box2BoxTransform.get_deltas).

  Args:
    boxes: [..., 4] target boxes.
    anchors: [..., 4] source boxes (positive widths and heights).
    weights: (wx, wy, ww, wh) scaling the four deltas.

  Returns:
    [..., 4] deltas (wx dx / aw, wy dy / ah, ww log(gw / aw), wh log(gh / ah)).
  """
  wx, wy, ww, wh = weights
  ax, ay, aw, ah = _centre_size(anchors)
  gx, gy, gw, gh = _centre_size(boxes)
  return jnp.stack([wx * (gx - ax) / aw, wy * (gy - ay) / ah,
                    ww * jnp.log(gw / aw), wh * jnp.log(gh / ah)], axis=-1)


def decode(deltas, anchors, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
           clamp: float = DEFAULT_SCALE_CLAMP):
  """Applies `deltas` to `anchors` (detectron2 Box2BoxTransform.apply_deltas).

  Args:
    deltas: [..., 4] as `encode` returns them.
    anchors: [..., 4] (broadcast against deltas).
    weights: (wx, wy, ww, wh), as in `encode`.
    clamp: upper bound on the unweighted log-scale deltas before exp.

  Returns:
    [..., 4] boxes, float32.
  """
  deltas = deltas.astype(jnp.float32)
  anchors = anchors.astype(jnp.float32)
  wx, wy, ww, wh = weights
  ax, ay, aw, ah = _centre_size(anchors)
  dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
  dw = jnp.minimum(deltas[..., 2] / ww, clamp)
  dh = jnp.minimum(deltas[..., 3] / wh, clamp)
  cx, cy = dx * aw + ax, dy * ah + ay
  w, h = jnp.exp(dw) * aw, jnp.exp(dh) * ah
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def area(boxes):
  """(x2 - x1) * (y2 - y1), [...]."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def nonempty(boxes, threshold: float = 0.0):
  """Whether both sides are longer than `threshold` (detectron2 Boxes.nonempty), bool [...]."""
  return ((boxes[..., 2] - boxes[..., 0]) > threshold) & ((boxes[..., 3] - boxes[..., 1])
                                                          > threshold)


def clip(boxes, hw):
  """Clamps x into [0, w] and y into [0, h].

  Args:
    boxes: [..., 4].
    hw: (h, w): Python numbers or a [2] array (traced is fine, e.g. `image_hw[i]`).
  """
  h = jnp.asarray(hw[0], boxes.dtype)
  w = jnp.asarray(hw[1], boxes.dtype)
  x1 = jnp.clip(boxes[..., 0], 0, w)
  y1 = jnp.clip(boxes[..., 1], 0, h)
  x2 = jnp.clip(boxes[..., 2], 0, w)
  y2 = jnp.clip(boxes[..., 3], 0, h)
  return jnp.stack([x1, y1, x2, y2], axis=-1)


def pairwise_iou(a, b):
  """Intersection over union of every box of `a` with every box of `b`.

  Args:
    a: [N, 4].
    b: [M, 4].

  Returns:
    [N, M] float32; 0 where the union is empty (detectron2's pairwise_iou).
  """
  lt = jnp.maximum(a[:, None, :2], b[None, :, :2])
  rb = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = area(a)[:, None] + area(b)[None, :] - inter
  # Empty boxes have zero intersection: 0 wherever the union would divide by zero.
  return jnp.where(inter > 0, inter / jnp.where(inter > 0, union, 1.0), 0.0)


def assign_levels(boxes, min_level: int = 2, max_level: int = 5, canonical_size: float = 224,
                  canonical_level: int = 4):
  """The FPN level each RoI pools from (detectron2 assign_boxes_to_levels).

  floor(canonical_level + log2(sqrt(area) / canonical_size + 1e-8)), clamped
  to [min_level, max_level].

  Args:
    boxes: [..., 4].
    min_level, max_level: the pooled levels (P2..P5).
    canonical_size, canonical_level: a box of canonical_size^2 pixels maps to
      canonical_level.

  Returns:
    int32 [...]: the level minus `min_level`, i.e. the index into the list of
    pooled feature maps (as detectron2 returns it).
  """
  size = jnp.sqrt(jnp.maximum(area(boxes), 0.0))  # an inverted box goes to the lowest level
  level = jnp.floor(canonical_level + jnp.log2(size / canonical_size + 1e-8))
  return (jnp.clip(level, min_level, max_level) - min_level).astype(jnp.int32)
