"""Greedy non-maximum suppression with static shapes.

Exactly the greedy algorithm of torchvision / detectron2: visit the boxes by
decreasing score (ties: lower index first, as a stable sort leaves them) and
keep a box unless a kept box overlaps it with IoU > threshold. Written as a
`lax.while_loop` whose every step keeps the best box still alive and removes
what it suppresses: the first alive box in score order is always one the
greedy pass keeps, so the loop runs once per kept box (at most max_output
times) and needs one IoU row per step, never the [N, N] matrix: N of tens of
thousands fits.
"""

import jax.numpy as jnp
from jax import lax

from mcl_jax.detection import boxes as box_ops


def nms(boxes, scores, valid, iou_threshold: float, max_output: int):
  """Greedy NMS of one set of boxes.

  Args:
    boxes: [N, 4] float (x1, y1, x2, y2).
    scores: [N] float.
    valid: [N] bool; invalid entries are never kept and suppress nothing.
    iou_threshold: a box is suppressed by a kept box when their IoU > this.
    max_output: static number of output slots.

  Returns:
    indices: [max_output] int32 into the inputs, kept boxes by decreasing
      score, then 0 in the unused slots.
    keep_valid: [max_output] bool, True for the slots holding a kept box.
  """
  return batched_nms(boxes, scores, jnp.zeros(scores.shape, jnp.int32), valid, iou_threshold,
                     max_output)


def batched_nms(boxes, scores, idxs, valid, iou_threshold: float, max_output: int):
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
  sboxes = boxes.astype(jnp.float32)[order]
  sidxs = idxs[order]

  def cond(state):
    alive, _, count = state
    return (count < max_output) & jnp.any(alive)

  def body(state):
    alive, out, count = state
    i = jnp.argmax(alive)  # the best box still alive: greedy keeps it
    iou = box_ops.pairwise_iou(lax.dynamic_slice_in_dim(sboxes, i, 1), sboxes)[0]
    suppressed = (iou > iou_threshold) & (sidxs == sidxs[i])
    alive = alive & ~suppressed & (jnp.arange(n) != i)
    return alive, out.at[count].set(order[i]), count + 1

  init = (valid[order], jnp.zeros((max_output,), jnp.int32), jnp.zeros((), jnp.int32))
  _, out, count = lax.while_loop(cond, body, init)
  return out, jnp.arange(max_output) < count
