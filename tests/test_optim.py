"""mcl_jax.training.optim against NumPy transcriptions of the reference formulas (float64).

Reference: docs/METHOD.md section 5, i.e. openselfsup's LARS and mmcv's cosine
schedule with linear warm-up. The 'optax' options must equal the optax calls
the project made before, exactly.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import mcl_100ep
from mcl_jax import config_validation
from mcl_jax.training import optim
from mcl_jax.training import state as state_lib
from tests import tolerance
from tests.tiny_config import tiny_config

F32 = np.float32
# The float32 schedules against the float64 formulas (tests/tolerance.py,
# worst-case roundings, each relative to the value it produces):
# 'reference': pi (a float32 constant), times (T - t), over 2T: 3 roundings
# in the argument, which sin passes on relatively on [0, pi/2], plus the sin
# itself; squared (twice that, plus the product); times (peak - min) (the
# constant and the product) and plus min (positive terms): 2 (3 + 4) + 1 + 2
# + 1 = 18; the warm-up ramp t / w, times (1 - r), plus r, times the cosine
# value: 4 more. Relative at every step: the sin^2 form never cancels.
LR_RTOL = tolerance.tol(F32, 2 * (3 + tolerance.TRANSCENDENTAL) + 4 + 4, worst_case=True)
# optax's direct form (1 + cos(pi frac)) / 2 cancels near the end: absolute
# errors relative to the peak. frac and pi frac: 3 roundings of an argument
# up to pi, which cos passes on with |sin| <= 1 (3 pi < 10 roundings), the
# cos itself, 1 + cos, the product with (peak - end): 10 + 4 + 3 = 17.
OPTAX_ATOL_PER_PEAK = tolerance.tol(F32, 10 + tolerance.TRANSCENDENTAL + 3, worst_case=True)


def move_tol(w, moved, n_all, steps, clipped=True):
  """Five LARS steps in float32 against float64, one tensor's displacement.

  Per step: the global gradient norm for clipping (all n_all entries), the
  tensor's norms of w and g (a reduction each), the trust ratio, the update
  and the momentum buffer (a few elementwise roundings), all relative to the
  displacement; and w itself, rounded to float32 after each step: u |w| per
  step, which can dwarf a small displacement.
  """
  n = w.size
  per_step = ([n_all] if clipped else []) + [n, n, 8]
  return (tolerance.tol(F32, per_step * steps, moved)
          + tolerance.tol(F32, steps, np.abs(w).max(), worst_case=True))


# ------------------------------------------------------ NumPy transcriptions --

def mmcv_lr(t, peak, min_lr, total, warmup, ratio):
  """mmcv CosineAnnealing (by iteration) with linear warm-up, as docs/METHOD.md section 5."""
  t = np.asarray(t, np.float64)
  cos_lr = min_lr + (peak - min_lr) * (1 + np.cos(np.pi * t / total)) / 2
  return np.where(t < warmup, cos_lr * (ratio + (1 - ratio) * t / max(warmup, 1)), cos_lr)


def optax_lr(t, peak, min_lr, total, warmup, ratio):
  """Linear warm-up from ratio x peak, then a cosine over the remaining steps."""
  t = np.asarray(t, np.float64)
  warmup = min(warmup, max(total - 1, 0))
  end, decay = min(min_lr, peak), max(total, warmup + 1) - warmup
  ramp = ratio * peak + (peak - ratio * peak) * t / max(warmup, 1)
  frac = np.clip(t - warmup, 0, decay) / decay
  return np.where(t < warmup, ramp, end + (peak - end) * (1 + np.cos(np.pi * frac)) / 2)


def clip_global(grads, max_norm):
  norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
  return {k: g * (max_norm / norm) if norm > max_norm else g for k, g in grads.items()}


def reference_lars_step(params, grads, bufs, lr, wd, eta, momentum, excluded):
  """openselfsup LARS.step for one parameter dict (names -> float64 arrays)."""
  new_params, new_bufs = {}, {}
  for k, w in params.items():
    g = grads[k]
    if k in excluded:
      local_lr, decay = 1.0, 0.0
    else:
      w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
      local_lr, decay = eta * w_norm / (g_norm + wd * w_norm), wd
    d = (g + decay * w) * (lr * local_lr)
    buf = d if bufs is None else momentum * bufs[k] + d
    new_params[k], new_bufs[k] = w - buf, buf
  return new_params, new_bufs


# ------------------------------------------------------------------ helpers --

def _config(**optim_fields):
  c = mcl_100ep.get_config()
  for k, v in optim_fields.items():
    c.optim[k] = v
  return c


def _random_tree(rng):
  """Kernels (decayed, adapted) and rank-1 BN scales / biases (excluded)."""
  shapes = {'conv': {'kernel': (3, 3, 4, 8), 'bias': (8,)},
            'bn': {'scale': (8,), 'bias': (8,)},
            'dense': {'kernel': (16, 5), 'bias': (5,)},
            'head': {'kernel': (5, 7)}}
  return jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v, np.float64)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _run(tx, params, grads_seq):
  state = tx.init(params)
  for g in grads_seq:
    updates, state = jax.jit(tx.update)(g, state, params)
    params = optax.apply_updates(params, updates)
  return params


# ---------------------------------------------------------------- schedules --

def test_reference_schedule_over_the_100_epoch_run():
  """Every step of T = 31,280 (warm-up 3,127) against the mmcv formula."""
  c = _config(num_steps=31_280)
  total, o = 31_280, c.optim
  assert o.lr_warmup == 'reference' and optim.peak_lr(c) == 16.0
  steps = np.arange(total)
  got = np.asarray(jax.jit(optim.lr_schedule(c, total))(jnp.asarray(steps)), np.float64)
  want = mmcv_lr(steps, 16.0, o.min_lr, total, o.warmup_steps, o.warmup_ratio)
  tolerance.assert_close(got, want, atol=0, rtol=LR_RTOL, what='reference schedule, 31,280 steps')
  # Spot checks of the formula itself: ratio x cos_lr(0) at 0, the cosine's
  # own value at the end of the warm-up and mid-run, min_lr at T.
  at = lambda t: float(optim.lr_schedule(c, total)(t))
  assert at(0) == pytest.approx(16.0 * 1e-4, rel=LR_RTOL)
  half = 1e-4 + (16.0 - 1e-4) * (1 + math.cos(math.pi * 3127 / total)) / 2
  assert at(3127) == pytest.approx(half, rel=LR_RTOL)
  assert at(3126) == pytest.approx(
      (1e-4 + (16.0 - 1e-4) * (1 + math.cos(math.pi * 3126 / total)) / 2)
      * (1e-4 + (1 - 1e-4) * 3126 / 3127), rel=LR_RTOL)
  assert at(15_640) == pytest.approx(1e-4 + (16.0 - 1e-4) / 2, rel=LR_RTOL)
  assert at(total) == pytest.approx(1e-4, rel=LR_RTOL)
  # The optax form starts the cosine after the warm-up: mid-run rates differ
  # by well over 5% (the issue measured 10-20%), so the switch matters.
  optax_sched = optim.lr_schedule(_config(lr_warmup='optax'), total)
  for t in (8_000, 15_640, 25_000):
    assert abs(float(optax_sched(t)) / at(t) - 1) > 0.05, t


@pytest.mark.parametrize('total,warmup', [(10, 3), (6, 2), (5, 10), (7, 0), (1, 0)])
def test_short_schedules(total, warmup):
  """Short runs, a warm-up longer than the run, and none, in both forms."""
  for form, formula in (('reference', mmcv_lr), ('optax', optax_lr)):
    c = _config(lr_warmup=form, warmup_steps=warmup, base_lr=0.5, global_batch=64)
    steps = np.arange(total + 1)
    got = np.asarray(optim.lr_schedule(c, total)(jnp.asarray(steps)), np.float64)
    want = formula(steps, 0.125, c.optim.min_lr, total, warmup, c.optim.warmup_ratio)
    atol = OPTAX_ATOL_PER_PEAK * 0.125 if form == 'optax' else 0
    tolerance.assert_close(got, want, atol=atol, rtol=LR_RTOL,
                           what=f'{form} schedule, {total} steps, warm-up {warmup}')


def test_optax_schedule_is_the_former_optax_call():
  c = _config(lr_warmup='optax', num_steps=31_280)
  o, total = c.optim, 31_280
  former = optax.warmup_cosine_decay_schedule(
      init_value=16.0 * o.warmup_ratio, peak_value=16.0, warmup_steps=o.warmup_steps,
      decay_steps=total, end_value=o.min_lr)
  steps = jnp.arange(total + 1)
  np.testing.assert_array_equal(optim.lr_schedule(c, total)(steps), former(steps))
  steps = np.arange(total + 1)
  tolerance.assert_close(former(steps),
                         optax_lr(steps, 16.0, o.min_lr, total, o.warmup_steps, o.warmup_ratio),
                         atol=OPTAX_ATOL_PER_PEAK * 16.0, rtol=LR_RTOL,
                         what='optax schedule vs its formula')


# --------------------------------------------------------------------- LARS --

def test_decay_mask_is_rank_above_one():
  mask = _flat(optim.decay_mask(_random_tree(np.random.default_rng(0))))
  assert {k for k, v in mask.items() if v} == {"['conv']['kernel']", "['dense']['kernel']",
                                                 "['head']['kernel']"}


@pytest.mark.parametrize('seed', [0, 1])
def test_reference_lars_matches_openselfsup(seed):
  """Clipping + LARS with momentum over five steps of a short schedule."""
  rng = np.random.default_rng(seed)
  # Large weight decay and eta so that both terms of the trust ratio matter;
  # clip_norm between the gradients' norms, so some steps are clipped.
  fields = dict(weight_decay=0.05, trust_coefficient=0.02, momentum=0.9, clip_norm=9.0,
                warmup_steps=2, global_batch=256, base_lr=0.5, min_lr=1e-3)
  c = _config(**fields)
  total = 5
  params = _random_tree(rng)
  scales = [0.5, 3.0, 1.0, 2.0, 0.2]  # global norms from about 4 to 60
  grads_seq = [jax.tree.map(lambda p, s=s: (s * rng.standard_normal(p.shape)).astype(np.float32),
                            params) for s in scales]
  got = _flat(_run(optim.create_optimizer(c, total), params, grads_seq))

  excluded = {k for k, v in _flat(optim.decay_mask(params)).items() if not v}
  o = c.optim
  p, bufs = _flat(params), None
  clipped = 0
  for t, g in enumerate(grads_seq):
    g = _flat(g)
    clipped += math.sqrt(sum(np.sum(v * v) for v in g.values())) > o.clip_norm
    lr = float(mmcv_lr(t, 0.5, o.min_lr, total, o.warmup_steps, o.warmup_ratio))
    p, bufs = reference_lars_step(p, clip_global(g, o.clip_norm), bufs, lr, o.weight_decay,
                                  o.trust_coefficient, o.momentum, excluded)
  assert 0 < clipped < total
  start = _flat(params)
  n_all = sum(v.size for v in start.values())
  for k in p:
    moved = np.max(np.abs(p[k] - start[k]))
    tolerance.assert_close(got[k] - start[k], p[k] - start[k],
                           atol=move_tol(p[k], moved, n_all, total), what=f'LARS {k} displacement')
  # The optax trust ratio moves the kernels about 10% differently here.
  other = _flat(_run(optim.create_optimizer(_config(**fields, lars_trust_ratio='optax'), total),
                     params, grads_seq))
  gap = max(np.max(np.abs(other[k] - p[k])) / np.max(np.abs(p[k] - start[k]))
            for k in p if k not in excluded)
  assert gap > 0.03, gap


def test_reference_lars_zero_norms():
  """||w|| = 0: local lr 0 (the tensor stays 0); ||w|| = ||g|| = 0: no NaN, no update."""
  tx = optim.lars(0.1, weight_decay=1e-5, trust_coefficient=1e-3, momentum=0.9)
  params = {'zero_w': jnp.zeros((3, 4)), 'zero_both': jnp.zeros((2, 2)),
            'zero_g': jnp.ones((4, 2)), 'bias': jnp.zeros((4,))}
  grads = {'zero_w': jnp.ones((3, 4)), 'zero_both': jnp.zeros((2, 2)),
           'zero_g': jnp.zeros((4, 2)), 'bias': jnp.ones((4,))}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates['zero_w'], 0)
  np.testing.assert_array_equal(updates['zero_both'], 0)
  # ||g|| = 0, ||w|| = 1 x sqrt(8): local lr = eta / wd, d = lr eta w. The
  # norm (8 squares and a sqrt) and about 6 products and quotients.
  rtol = tolerance.tol(F32, 8 + tolerance.TRANSCENDENTAL + 6, worst_case=True)
  tolerance.assert_close(updates['zero_g'], -0.1 * 1e-3 * np.ones((4, 2)), atol=0, rtol=rtol,
                         what='LARS update, zero gradient')
  tolerance.assert_close(updates['bias'], -0.1 * np.ones(4), atol=0,  # excluded: -lr g
                         rtol=tolerance.tol(F32, 2, worst_case=True), what='LARS update, bias')


def test_optax_options_are_the_former_optimizer():
  """lars_trust_ratio='optax', lr_warmup='optax': bit for bit the former chain."""
  c = _config(lars_trust_ratio='optax', lr_warmup='optax', weight_decay=0.05,
              trust_coefficient=0.02, clip_norm=9.0, warmup_steps=2, global_batch=256,
              base_lr=0.5, min_lr=1e-3)
  o, total = c.optim, 6
  former = optax.chain(
      optax.clip_by_global_norm(o.clip_norm),
      optax.lars(optax.warmup_cosine_decay_schedule(
          init_value=0.5 * o.warmup_ratio, peak_value=0.5, warmup_steps=2, decay_steps=6,
          end_value=o.min_lr),
          weight_decay=o.weight_decay, weight_decay_mask=optim.decay_mask,
          trust_coefficient=o.trust_coefficient, trust_ratio_mask=optim.decay_mask,
          momentum=o.momentum))
  rng = np.random.default_rng(3)
  params = _random_tree(rng)
  grads_seq = [jax.tree.map(lambda p, s=s: (s * rng.standard_normal(p.shape)).astype(np.float32),
                            params) for s in (0.5, 3.0, 1.0)]
  tx = optim.create_optimizer(c, total)
  assert (jax.tree.structure(tx.init(params)) == jax.tree.structure(former.init(params)))
  got, want = _run(tx, params, grads_seq), _run(former, params, grads_seq)
  jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize('field', ['lr_warmup', 'lars_trust_ratio'])
def test_switches_are_validated(field):
  c = _config(**{field: 'torch'})
  with pytest.raises(config_validation.ConfigError, match=f'optim.{field}'):
    config_validation.validate(c, 32, 4)


# ------------------------------------------- the optax form, values, masks --

def test_schedules():
  """The optax form of the schedule (optim.lr_warmup='optax'; the tests above check both)."""
  config = tiny_config(**{'optim.global_batch': 64})
  config.optim.lr_warmup = 'optax'
  config.optim.global_batch = 512
  config.optim.base_lr = 1.0
  config.optim.min_lr = 1e-4
  config.optim.warmup_steps = 10
  sched = optim.lr_schedule(config, 100)
  lr = 1.0 * 512 / 256
  # float32: optax's warm-up is (init - peak) (1 - t / w) + peak, which
  # cancels near init: four roundings relative to the peak, absolute. At t =
  # 10 and 100 the cosine's argument is 0 or pi, whose float32 cosine rounds
  # to exactly 1 or -1: the peak or the end value, each after two roundings.
  rel = lambda n: tolerance.tol(F32, n, worst_case=True)
  assert float(sched(0)) == pytest.approx(lr * 1e-4, rel=0, abs=rel(4) * lr)
  assert float(sched(10)) == pytest.approx(lr, rel=rel(2))
  assert float(sched(5)) == pytest.approx(lr * 1e-4 + (lr - lr * 1e-4) / 2, rel=0,
                                          abs=rel(4) * lr)
  assert float(sched(100)) == pytest.approx(1e-4, rel=rel(2))


def test_reference_config_values():
  c = mcl_100ep.get_config()
  assert optim.peak_lr(c) == 16.0
  assert c.optim.warmup_steps == 3127 and c.optim.clip_norm == 500
  assert c.optim.num_epochs * (c.data.num_train_examples // c.optim.global_batch) == 31_200
  assert tuple(c.loss.level_weights) == (0.5, 0.25, 0.125, 0.125) and c.loss.tau == 1.0
  assert c.model.depth == 50 and c.model.dtype == 'bfloat16'


def test_decay_mask_excludes_norms_and_biases():
  config = tiny_config(**{'optim.global_batch': 64})
  params = jax.eval_shape(lambda k: state_lib.create_train_state(
      config, k, optim.create_optimizer(config, 1)), jax.random.key(0)).params
  flat = jax.tree_util.tree_flatten_with_path(optim.decay_mask(params))[0]
  names = {'/'.join(str(getattr(p, 'key', p)) for p in path): v for path, v in flat}
  assert names['backbone/conv1/kernel'] and names['neck/fc1/kernel']
  assert not names['backbone/bn1/scale'] and not names['backbone/bn1/bias']
  assert not names['neck/fc1/bias'] and not names['neck/bn1/scale']
  assert not names['predictors_0/fc1_bn/bias']
