"""The optimizer maths: peak learning rate, schedule, decay mask and LARS.

Defaults follow the reference (docs/METHOD.md section 5, GuoQiushan/MCL's
openselfsup LARS and mmcv's cosine schedule with linear warm-up). The optax
forms the project used before are kept as switches:

* `optim.lars_trust_ratio`: 'reference' scales a tensor's update by
  eta ||w|| / (||g|| + wd ||w||) (norms added); 'optax' (`optax.lars`) by
  eta ||w|| / ||g + wd w||.
* `optim.lr_warmup`: 'reference' (mmcv) multiplies a cosine that runs from
  step 0 over the whole run by a linear ramp; 'optax'
  (`optax.warmup_cosine_decay_schedule`) ramps linearly, then starts the
  cosine after the warm-up.

Both 'optax' options give exactly the optimizer `optax` builds from the same
numbers (tests/test_optim.py checks it).
"""

import jax
import jax.numpy as jnp
import optax


def peak_lr(config) -> float:
  """base_lr per 256 images, scaled linearly to the global batch."""
  return config.optim.base_lr * config.optim.global_batch / 256


def _reference_schedule(peak: float, min_lr: float, warmup_steps: int, warmup_ratio: float,
                        num_steps: int) -> optax.Schedule:
  """mmcv's CosineAnnealing with linear warm-up, by iteration."""
  total = max(num_steps, 1)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    # (1 + cos(pi t / T)) / 2 = sin^2(pi (T - t) / 2T), in float32 to a few
    # 1e-7 relative at every step: near the end the direct form cancels
    # (1 + cos ~ 0) to an absolute error of about 1e-7 x peak, i.e. 1.6% of
    # min_lr 1e-4 at peak 16, and cos near pi/2 loses relative precision.
    half = jnp.sin(jnp.pi * (total - t) / (2.0 * total))
    cos_lr = min_lr + (peak - min_lr) * half * half
    if warmup_steps <= 0:
      return cos_lr
    ramp = warmup_ratio + (1.0 - warmup_ratio) * t / warmup_steps
    return jnp.where(t < warmup_steps, cos_lr * ramp, cos_lr)

  return schedule


def _optax_schedule(peak: float, min_lr: float, warmup_steps: int, warmup_ratio: float,
                    num_steps: int) -> optax.Schedule:
  """Linear warm-up from warmup_ratio x peak, then a cosine over the remaining steps."""
  warmup = min(warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=peak * warmup_ratio, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=min(min_lr, peak))


_SCHEDULES = {'reference': _reference_schedule, 'optax': _optax_schedule}


def lr_schedule(config, num_steps: int) -> optax.Schedule:
  """The learning rate at each step (0-based) of a `num_steps` run.

  'reference' (mmcv, `optim.lr_warmup`): cos_lr(t) = min_lr + (peak - min_lr)
  (1 + cos(pi t / T)) / 2 from step 0 over all T steps; for t < warmup_steps
  it is multiplied by r + (1 - r) t / warmup_steps (r = warmup_ratio).
  'optax': `optax.warmup_cosine_decay_schedule`, the cosine starting after
  the warm-up.
  """
  o = config.optim
  return _SCHEDULES[o.lr_warmup](peak_lr(config), o.min_lr, o.warmup_steps, o.warmup_ratio,
                                num_steps)


def decay_mask(params):
  """True for weights that get weight decay and LARS adaptation.

  Kernels only: BatchNorm scales/biases and all biases (every tensor of rank
  <= 1) are excluded, as in the reference's paramwise options.
  """
  return jax.tree.map(lambda p: p.ndim > 1, params)


def scale_by_lars_trust_ratio(weight_decay: float, trust_coefficient: float,
                              mask) -> optax.GradientTransformation:
  """The reference LARS direction: (g + wd w) x eta ||w|| / (||g|| + wd ||w||).

  Applies to the tensors where `mask` (a tree of bools or a callable on the
  params) is True; the others pass through unchanged (local lr 1, no weight
  decay). Where ||g|| + wd ||w|| = 0 the reference divides by zero (Python
  floats: ZeroDivisionError); there g + wd w is 0 as well, so the direction is
  0 here. Where only ||w|| = 0 the local lr is 0, as in the reference (optax
  uses 1), so a zero tensor stays zero.
  """

  def update_fn(updates, state, params):
    if params is None:
      raise ValueError('LARS needs the params')
    flags = mask(params) if callable(mask) else mask

    def scale(g, w, adapt):
      if not adapt:
        return g
      w_norm = jnp.linalg.norm(w.astype(jnp.float32))
      g_norm = jnp.linalg.norm(g.astype(jnp.float32))
      denom = g_norm + weight_decay * w_norm
      local_lr = trust_coefficient * w_norm / jnp.where(denom > 0, denom, 1.0)
      return ((g + weight_decay * w) * local_lr).astype(g.dtype)

    return jax.tree.map(scale, updates, params, flags), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def lars(learning_rate, weight_decay: float, trust_coefficient: float, momentum: float,
         mask=decay_mask) -> optax.GradientTransformation:
  """The reference LARS (openselfsup/utils/optimizers.py) as updates for optax.

  Per tensor: d = (g + wd w) lr local_lr, buf = momentum buf + d (buf = d at
  the first step, since it starts at 0), w -= buf. Masked-out tensors: d = g lr.

  Args:
    learning_rate: a float or an optax schedule of the step.
    weight_decay: wd.
    trust_coefficient: eta.
    momentum: the momentum of buf.
    mask: tree of bools, or a callable on the params, True where LARS and
      weight decay apply.
  """
  return optax.chain(
      scale_by_lars_trust_ratio(weight_decay, trust_coefficient, mask),
      optax.scale_by_learning_rate(learning_rate),
      optax.trace(decay=momentum))


def create_optimizer(config, num_steps: int) -> optax.GradientTransformation:
  """Global-norm gradient clipping, then LARS with the run's schedule."""
  o = config.optim
  schedule = lr_schedule(config, num_steps)
  if o.lars_trust_ratio == 'reference':
    inner = lars(schedule, weight_decay=o.weight_decay, trust_coefficient=o.trust_coefficient,
                 momentum=o.momentum, mask=decay_mask)
  else:
    inner = optax.lars(schedule, weight_decay=o.weight_decay, weight_decay_mask=decay_mask,
                       trust_coefficient=o.trust_coefficient, trust_ratio_mask=decay_mask,
                       momentum=o.momentum)
  return optax.chain(optax.clip_by_global_norm(o.clip_norm), inner)
