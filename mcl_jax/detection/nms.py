"""Greedy non-maximum suppression with static shapes.

Exactly the greedy algorithm of torchvision / detectron2: visit the boxes by
decreasing score (ties: lower index first, as a stable sort leaves them) and
keep a box unless a kept box of its group overlaps it with IoU > threshold.

Visiting one box per loop step would take N sequential steps (thousands for
the RPN), each a few tiny kernels on an accelerator. Instead the sorted boxes
go in tiles of `tile`: a tile first drops what the boxes kept so far
suppress (one [tile, kept] IoU), then settles its own boxes by iterating
keep = alive & ~(kept earlier in the tile and overlapping) to its fixed
point. That equation fixes each box's decision from the decisions before it
in the tile, so its fixed point is unique and is the greedy result, and
iterating from keep = alive reaches it (after k steps the first k boxes are
final), usually in a few steps. The loop stops once max_output boxes are
kept or no alive box is left; the kept boxes live in a buffer of
max_output + tile rows, so memory never grows as [N, N].
"""

import jax.numpy as jnp
from jax import lax

from mcl_jax.detection import boxes as box_ops

DEFAULT_TILE = 256


def nms(boxes, scores, valid, iou_threshold: float, max_output: int, tile: int = DEFAULT_TILE):
  """Greedy NMS of one set of boxes.

  Args:
    boxes: [N, 4] float (x1, y1, x2, y2).
    scores: [N] float.
    valid: [N] bool; invalid entries are never kept and suppress nothing.
    iou_threshold: a box is suppressed by a kept box when their IoU > this.
    max_output: static number of output slots.
    tile: boxes settled per loop step (static; any value gives the same result).

  Returns:
    indices: [max_output] int32 into the inputs, kept boxes by decreasing
      score, then 0 in the unused slots.
    keep_valid: [max_output] bool, True for the slots holding a kept box.
  """
  return batched_nms(boxes, scores, jnp.zeros(scores.shape, jnp.int32), valid, iou_threshold,
                     max_output, tile)


def batched_nms(boxes, scores, idxs, valid, iou_threshold: float, max_output: int,
                tile: int = DEFAULT_TILE):
  """Greedy NMS within each group of equal `idxs` (a class, a level).

  A box only suppresses boxes of its own group (compared directly, not by
  detectron2's coordinate-offset trick, so no rounding of shifted
  coordinates can change an IoU); the groups share the output slots, by
  decreasing score.

  Args:
    boxes: [N, 4].
    scores: [N].
    idxs: [N] int group of each box.
    valid: [N] bool.
    iou_threshold: as in `nms`.
    max_output: as in `nms`.
    tile: as in `nms`.

  Returns:
    (indices [max_output] int32, keep_valid [max_output] bool), as in `nms`.
  """
  n = scores.shape[0]
  if n == 0 or max_output == 0:
    return jnp.zeros((max_output,), jnp.int32), jnp.zeros((max_output,), bool)
  valid = valid & ~jnp.isnan(scores)
  key = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
  key = jnp.where(key == 0, 0.0, key)  # -0.0 and 0.0 tie, as they compare equal
  order = jnp.argsort(-key, stable=True).astype(jnp.int32)
  t = min(tile, n)
  pad = -n % t
  sboxes = jnp.pad(boxes.astype(jnp.float32)[order], ((0, pad), (0, 0)))
  sidxs = jnp.pad(idxs.astype(jnp.int32)[order], (0, pad))
  alive = jnp.pad(valid[order], (0, pad))
  kept_pos = _greedy_positions(sboxes, sidxs, alive, iou_threshold, max_output, t)
  count = jnp.minimum(jnp.sum(kept_pos >= 0), max_output)
  ok = jnp.arange(max_output) < count
  return jnp.where(ok, order[jnp.maximum(kept_pos[:max_output], 0)], 0), ok


def _greedy_positions(sboxes, sidxs, alive, iou_threshold: float, max_output: int, t: int):
  """Positions (in score order) of the first kept boxes: at least max_output of them, if there are.

  Args:
    sboxes, sidxs, alive: [n] boxes, groups, validity in score order; n a multiple of t.
    iou_threshold, max_output: as in `batched_nms`.
    t: the tile.

  Returns:
    [max_output + t] int32: kept positions in increasing order, then -1.
  """
  n = sboxes.shape[0]
  cap = max_output + t  # the loop stops once max_output are kept: one tile more fits
  # Stop at the last alive box: sorted invalid entries (and padding) need no visit.
  end = jnp.max(jnp.where(alive, jnp.arange(n) + 1, 0))
  earlier = jnp.arange(t)[:, None] < jnp.arange(t)[None, :]  # [j, i]: j before i

  def settle(state):
    start, buf_boxes, buf_idxs, buf_pos, count = state
    tb = lax.dynamic_slice_in_dim(sboxes, start, t)
    tg = lax.dynamic_slice_in_dim(sidxs, start, t)
    ta = lax.dynamic_slice_in_dim(alive, start, t)
    # Suppressed by a box kept in an earlier tile (buffer rows past count hold
    # position -1 and take no part).
    hit = ((box_ops.pairwise_iou(tb, buf_boxes) > iou_threshold)
           & (tg[:, None] == buf_idxs[None, :]) & (buf_pos >= 0)[None, :])
    ta = ta & ~jnp.any(hit, axis=1)
    within = ((box_ops.pairwise_iou(tb, tb) > iou_threshold) & (tg[:, None] == tg[None, :])
              & earlier)

    def step(s):
      keep, _ = s
      new = ta & ~jnp.any(within & keep[:, None], axis=0)
      return new, jnp.any(new != keep)

    keep, _ = lax.while_loop(lambda s: s[1], step, (ta, jnp.array(True)))
    # Append this tile's kept boxes to the buffer, in order.
    dest = jnp.where(keep, count + jnp.cumsum(keep) - 1, cap)
    buf_boxes = buf_boxes.at[dest].set(tb, mode='drop')
    buf_idxs = buf_idxs.at[dest].set(tg, mode='drop')
    buf_pos = buf_pos.at[dest].set(start + jnp.arange(t, dtype=jnp.int32), mode='drop')
    return start + t, buf_boxes, buf_idxs, buf_pos, count + jnp.sum(keep, dtype=jnp.int32)

  def more(state):
    start, _, _, _, count = state
    return (start < end) & (count < max_output)

  init = (jnp.zeros((), jnp.int32), jnp.zeros((cap, 4), jnp.float32), jnp.zeros((cap,), jnp.int32),
          jnp.full((cap,), -1, jnp.int32), jnp.zeros((), jnp.int32))
  return lax.while_loop(more, settle, init)[3]
