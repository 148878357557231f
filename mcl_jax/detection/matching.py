"""Anchor / proposal matching and balanced sampling (detectron2 Matcher, subsample_labels).

Static shapes throughout: ground truth comes padded to G rows with a validity
mask, and the sampler marks its choice with boolean masks instead of
returning index lists of data-dependent length.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

IGNORE = -1


def match(iou, gt_valid, thresholds: Sequence[float], labels: Sequence[int],
          allow_low_quality_matches: bool):
  """Matches each prediction (anchor or proposal) to a ground-truth box.

  detectron2's Matcher: each prediction takes the gt of highest IoU (the
  first on ties); its label is labels[i] for thresholds[i-1] <= IoU <
  thresholds[i] (with -inf and +inf at the ends). With low-quality matches,
  for each gt every prediction whose IoU equals that gt's highest IoU is
  labelled 1 (its matched gt stays the argmax, as in detectron2).

  Padding gt (gt_valid False) never matches; an image without valid gt has
  every prediction labelled labels[0] (background). One deliberate
  difference: a valid gt that overlaps no prediction at all (highest IoU 0)
  creates no low-quality matches, where detectron2 would label every
  prediction with IoU 0 to it foreground.

  Args:
    iou: [G, N] IoU of every gt with every prediction.
    gt_valid: [G] bool.
    thresholds: increasing IoU thresholds, e.g. (0.3, 0.7) for the RPN, (0.5,) for RoIs.
    labels: len(thresholds) + 1 labels in {-1, 0, 1}, e.g. (0, -1, 1) or (0, 1).
    allow_low_quality_matches: as above (True for the RPN).

  Returns:
    matched_gt: [N] int32 index into the gt (0 when the image has none).
    label: [N] int32 in {-1 (ignore), 0 (background), 1 (foreground)}.
  """
  if len(labels) != len(thresholds) + 1:
    raise ValueError(f'{len(labels)} labels for {len(thresholds)} thresholds: give one more label')
  if list(thresholds) != sorted(thresholds):
    raise ValueError(f'thresholds {tuple(thresholds)} must increase')
  g, n = iou.shape
  if g == 0:
    return jnp.zeros((n,), jnp.int32), jnp.full((n,), labels[0], jnp.int32)
  iou = iou.astype(jnp.float32)
  # A negative IoU never wins the argmax against a real gt (IoU >= 0) and
  # falls below every threshold: background when no gt is valid.
  masked = jnp.where(gt_valid[:, None], iou, -1.0)
  matched_gt = jnp.argmax(masked, axis=0).astype(jnp.int32)
  best = jnp.max(masked, axis=0)
  bucket = sum((best >= t).astype(jnp.int32) for t in thresholds)
  label = jnp.asarray(labels, jnp.int32)[bucket]
  if allow_low_quality_matches:
    best_per_gt = jnp.max(masked, axis=1, keepdims=True)
    usable = gt_valid[:, None] & (best_per_gt > 0)
    low_quality = jnp.any(usable & (masked == best_per_gt), axis=0)
    label = jnp.where(low_quality, 1, label)
  return matched_gt, label


def subsample(labels, num_samples: int, positive_fraction: float, key):
  """Balanced random choice of foreground and background (detectron2 subsample_labels).

  Positives are label 1, negatives label 0 (-1 is never chosen). It takes
  num_pos = min(#positives, int(num_samples * positive_fraction)) positives
  and num_neg = min(#negatives, num_samples - num_pos) negatives, each set
  uniformly at random: the top-k of random scores among the candidates.

  Args:
    labels: [N] int labels in {-1, 0, 1}.
    num_samples: total per image (static).
    positive_fraction: the largest share of positives.
    key: a PRNG key (one per image and step).

  Returns:
    pos, neg: [N] bool masks of the chosen positives and negatives (disjoint).
  """
  n = labels.shape[0]
  is_pos, is_neg = labels == 1, labels == 0
  num_pos = jnp.minimum(jnp.sum(is_pos), int(num_samples * positive_fraction))
  num_neg = jnp.minimum(jnp.sum(is_neg), num_samples - num_pos)
  key_pos, key_neg = jax.random.split(key)
  return (_choose(is_pos, num_pos, min(num_samples, n), key_pos),
          _choose(is_neg, num_neg, min(num_samples, n), key_neg))


def _choose(candidates, count, k: int, key):
  """A uniformly random `count` of the `candidates` (count <= k, static k), as a mask."""
  n = candidates.shape[0]
  if k == 0:
    return jnp.zeros((n,), bool)
  # Non-candidates score -1, below every uniform draw in [0, 1).
  scores = jnp.where(candidates, jax.random.uniform(key, (n,)), -1.0)
  _, top = lax.top_k(scores, k)
  chosen = (jnp.arange(k) < count) & candidates[top]
  return jnp.zeros((n,), bool).at[top].set(chosen)
