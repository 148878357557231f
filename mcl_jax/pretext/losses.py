"""The multi-level InfoNCE loss (docs/METHOD.md section 4) and its supervised twin."""

from typing import Sequence

import jax
import jax.numpy as jnp
import optax


def l2_normalize(x, eps: float = 1e-12):
  """x / max(||x||, eps), as torch `F.normalize`; computed in float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def infonce(pred, targets, labels, tau: float, weight: float):
  """One level and view: CE(cos(pred, targets) / tau, labels) * 2 tau w.

  Args:
    pred: [T, D] predictor outputs of the tiles (normalised here).
    targets: [M, D] L2-normalised target embeddings (the global batch).
    labels: [T] int, the row of `targets` each tile comes from.
    tau: temperature.
    weight: the level's loss weight.

  Returns:
    (loss, mean positive cosine, mean negative cosine).
  """
  logits = l2_normalize(pred) @ targets.astype(jnp.float32).T  # cosines, f32
  loss = optax.softmax_cross_entropy_with_integer_labels(logits / tau, labels).mean()
  pos = jnp.take_along_axis(logits, labels[:, None], axis=1).mean()
  # The reference's negative mean: all entries minus the positives.
  t, m = logits.shape
  neg = (logits.sum() - pos * t) / (t * m - t)
  return loss * 2.0 * tau * weight, pos, neg


def mcl_loss(preds_q: Sequence[jax.Array], preds_k: Sequence[jax.Array],
             labels_q: Sequence[jax.Array], labels_k: Sequence[jax.Array],
             targets_q, targets_k, tau: float, level_weights: Sequence[float]):
  """Symmetric multi-level InfoNCE.

  View-q tiles of level i are pulled towards the view-k targets of their
  source images (T_k) and view-k tiles towards T_q. Total = sum over levels
  and both views.

  Args:
    preds_q, preds_k: per level, [T_i, D] predictor outputs of each view.
    labels_q, labels_k: per level, [T_i] rows into the targets.
    targets_q, targets_k: [B_global, D] target level-0 embeddings of each
      view (normalised here).
    tau: temperature.
    level_weights: w_i per level.

  Returns:
    (total loss, metrics dict with per-level loss / pos_cos / neg_cos).
  """
  if len(level_weights) != len(preds_q):
    raise ValueError(f'loss.level_weights has {len(level_weights)} entries '
                     f'for {len(preds_q)} montage levels')
  tq, tk = l2_normalize(targets_q), l2_normalize(targets_k)
  total, metrics = 0.0, {}
  for i, w in enumerate(level_weights):
    lq, pq, nq = infonce(preds_q[i], tk, labels_q[i], tau, w)
    lk, pk, nk = infonce(preds_k[i], tq, labels_k[i], tau, w)
    total = total + lq + lk
    metrics[f'loss_level{i}'] = lq + lk
    metrics[f'pos_cos_level{i}'] = (pq + pk) / 2
    metrics[f'neg_cos_level{i}'] = (nq + nk) / 2
  metrics['loss'] = total
  return total, metrics


def supervised_loss(logits: Sequence[jax.Array], classes: Sequence[jax.Array],
                    level_weights: Sequence[float], label_smoothing: float = 0.0):
  """Supervised MCL for one view: per level, w_i x CE(tile logits, source class).

  Args:
    logits: per level, [T_i, num_classes] class logits of the tiles.
    classes: per level, [T_i] class of each tile's source image.
    level_weights: w_i per level.
    label_smoothing: optax label smoothing of the one-hot targets.

  Returns:
    (loss, metrics with per-level loss and top-1 accuracy).
  """
  total, metrics = 0.0, {}
  for i, (z, y, w) in enumerate(zip(logits, classes, level_weights)):
    z = z.astype(jnp.float32)
    target = optax.smooth_labels(jax.nn.one_hot(y, z.shape[-1]), label_smoothing)
    loss = optax.softmax_cross_entropy(z, target).mean() * w
    total = total + loss
    metrics[f'loss_level{i}'] = loss
    metrics[f'acc_level{i}'] = (z.argmax(-1) == y).mean()
  return total, metrics
