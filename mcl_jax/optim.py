"""The optimizer: learning-rate schedule, LARS and the weight-decay mask."""

import jax
import optax


def peak_lr(config) -> float:
  return config.optim.base_lr * config.optim.global_batch / 256


def lr_schedule(config, num_steps: int) -> optax.Schedule:
  """Linear warm-up from warmup_ratio x lr, then cosine decay to min_lr."""
  o, lr = config.optim, peak_lr(config)
  warmup = min(o.warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=lr * o.warmup_ratio, peak_value=lr, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=min(o.min_lr, lr))


def decay_mask(params):
  """True for weights that get weight decay and LARS adaptation.

  Kernels only: BatchNorm scales/biases and all biases are excluded, as in
  the reference's paramwise options.
  """
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(config, num_steps: int) -> optax.GradientTransformation:
  o = config.optim
  return optax.chain(
      optax.clip_by_global_norm(o.clip_norm),
      optax.lars(lr_schedule(config, num_steps), weight_decay=o.weight_decay,
                 weight_decay_mask=decay_mask, trust_coefficient=o.trust_coefficient,
                 trust_ratio_mask=decay_mask, momentum=o.momentum))
