"""The fine-tuning optimizer: SGD with momentum, warm-up and step decay.

The schedule and the update are detectron2's 1x recipe (docs/DETECTION.md):

* learning rate at step t (0-based): base_lr x w(t) x gamma ** (number of
  lr_steps <= t), where during the warm-up (t < warmup_iters) w(t) =
  warmup_factor (1 - t / warmup_iters) + t / warmup_iters, and 1 after it
  (detectron2's WarmupMultiStepLR, 'linear' warm-up);
* the update of PyTorch's `torch.optim.SGD` (dampening 0, not Nesterov):
  d = g + wd w, buf = momentum buf + d (buf = d at the first step),
  w -= lr buf. Weight decay is added to the gradient before the momentum, so
  it is scaled by the learning rate (not decoupled);
* weight decay `optim.weight_decay` on every kernel and every bias, norm
  biases included, and `optim.weight_decay_norm` on the norms' scales.

The learning rate is not scaled with the batch: base_lr is the rate of
`optim.global_batch` images, and a run with another batch sets both.
"""

import jax
import jax.numpy as jnp
import optax

# Name of a normalisation layer's multiplicative parameter in Flax (BatchNorm,
# GroupNorm, LayerNorm): the only leaves with optim.weight_decay_norm.
NORM_SCALE = 'scale'


def lr_schedule(config) -> optax.Schedule:
  """The learning rate of each step (0-based), as detectron2's WarmupMultiStepLR."""
  o = config.optim
  base, factor, warmup = float(o.base_lr), float(o.warmup_factor), int(o.warmup_iters)
  milestones = tuple(int(s) for s in o.lr_steps)
  gamma = float(o.gamma)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    if warmup > 0:
      alpha = t / warmup
      warm = jnp.where(t < warmup, factor * (1.0 - alpha) + alpha, 1.0)
    else:
      warm = jnp.ones_like(t)
    lr = base * warm
    # x gamma ** bisect_right(milestones, t): one product per milestone reached
    # (no pow: its exp/log would round more than the products).
    for m in milestones:
      lr = lr * jnp.where(t >= m, jnp.float32(gamma), jnp.float32(1.0))
    return lr

  return schedule


def _leaf_name(path) -> str:
  last = path[-1]
  return str(getattr(last, 'key', getattr(last, 'name', last)))


def is_norm_scale(path) -> bool:
  """Whether a parameter (its tree path) is a normalisation layer's scale."""
  return _leaf_name(path) == NORM_SCALE


def decay_mask(params):
  """True for the leaves that get optim.weight_decay (all but the norms' scales)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: not is_norm_scale(p), params)


def norm_scale_mask(params):
  """True for the norms' scales (they get optim.weight_decay_norm)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: is_norm_scale(p), params)


def sgd(learning_rate, momentum: float, weight_decay: float,
        weight_decay_norm: float = 0.0) -> optax.GradientTransformation:
  """torch.optim.SGD with per-parameter weight decay, as optax updates.

  Args:
    learning_rate: a float or an optax schedule of the step.
    momentum: the momentum of the buffer (0 disables it).
    weight_decay: added as weight_decay x w to the gradient of every leaf
      but the norms' scales.
    weight_decay_norm: the same for the norms' scales.
  """
  parts = []
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
  if weight_decay_norm:
    parts.append(optax.add_decayed_weights(weight_decay_norm, mask=norm_scale_mask))
  if momentum:
    parts.append(optax.trace(decay=momentum, nesterov=False))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


def create_optimizer(config) -> optax.GradientTransformation:
  """SGD + momentum + weight decay with the config's schedule."""
  o = config.optim
  return sgd(lr_schedule(config), momentum=float(o.momentum),
             weight_decay=float(o.weight_decay),
             weight_decay_norm=float(o.weight_decay_norm))
