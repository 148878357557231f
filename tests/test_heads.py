"""GroupedBatchNorm against NumPy, and the neck's per-level (per-group) independence.

Tolerances (tests/tolerance.py): BatchNorm against float64 NumPy is a chain
of two reductions over a group's values (mean, then variance) and a few
elementwise operations, relative to the output's scale and to how much the
mean dominates the spread (rms / std, which magnifies the mean's error in
x - mean). The neck's comparisons are two float32 orders of the same sums:
per layer, a conv or dense reduction (3*3*C or the fan-in) and the
BatchNorm statistics over the group's rows, on normalised (unit-scale)
activations.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax.nn.batch_norm import GroupedBatchNorm
from mcl_jax.nn.heads import Predictor, RegionNeck
from tests import tolerance

F32 = np.float32
EPS, MOM = 1e-5, 0.9
GROUPS = (5, 9, 3)


def _np_grouped_bn(x, groups, scale, bias, mean0, var0):
  """Per-group batch norm (biased variance) and the sequential running-stat update."""
  x = x.astype(np.float64)
  axes = tuple(range(x.ndim - 1))
  out, start = [], 0
  mean, var = mean0.astype(np.float64), var0.astype(np.float64)
  for n in groups:
    xg = x[start:start + n]
    start += n
    mu, v = xg.mean(axes), xg.var(axes)  # np.var is the biased variance
    out.append((xg - mu) / np.sqrt(v + EPS) * scale + bias)
    mean = MOM * mean + (1 - MOM) * mu
    var = MOM * var + (1 - MOM) * v
  return np.concatenate(out), mean, var


def _bn_train_tol(x, groups, scale, want):
  """Train-mode grouped BN in float32 against float64 (tests/tolerance.py).

  Per group, two reductions over its n = rows x pixels values: the mean,
  whose error (relative to the values' RMS) enters x - mean and is divided
  by the group's std, so it is magnified by rms / std; and the variance
  (terms of one sign: relative to itself), whose relative error moves the
  output by |scale x_hat| / 2. Then four elementwise roundings (x - mean,
  times 1 / std, times scale, plus bias) relative to the output itself.
  """
  x = np.asarray(x, np.float64)
  axes = tuple(range(x.ndim - 1))
  per_row = x[0].size // x.shape[-1]
  bounds = np.cumsum((0,) + tuple(groups))
  cond, x_hat = 0.0, 0.0
  for a, b in zip(bounds[:-1], bounds[1:]):
    xg = x[a:b]
    std = np.sqrt(xg.var(axes) + EPS)
    cond = max(cond, float((np.sqrt(np.square(xg).mean(axes)) / std).max()))
    x_hat = max(x_hat, float((np.abs(xg - xg.mean(axes)) / std).max()))
  g = float(np.abs(scale).max())
  n = max(groups) * per_row
  return (tolerance.tol(F32, [n, n], g * (cond + x_hat / 2))
          + tolerance.tol(F32, 4, np.abs(want).max(), worst_case=True))


def _stats_tol(groups, per_row, *stats):
  """Running statistics: the group's mean or variance (a reduction over its
  values, terms relative to the statistic's own magnitude; the variance's
  terms are of one sign) and two roundings per momentum update, per group."""
  scale = max(float(np.abs(s).max()) for s in stats)
  return (tolerance.tol(F32, max(groups) * per_row, scale)
          + tolerance.tol(F32, 3 * len(groups), scale, worst_case=True))


# The region neck: per conv layer a 3*3*C reduction and BatchNorm statistics
# over a group's rows x 4 pixels; then the 2 x 2 mean, fc1 (fan-in C) and fc2
# (fan-in hidden), each with BatchNorm over the group's rows. Activations are
# normalised (unit scale) after every layer. Two float32 orders of the same sums.
def _neck_tol(channels=16, hidden=32, num_convs=4):
  rows = max(GROUPS)
  chain = [9 * channels, 4 * rows] * num_convs + [4, channels, rows, hidden, rows]
  return tolerance.tol(F32, chain, 1.0, sides=2)


def _random_vars(rng, c):
  """Random scale / bias / running statistics (never the 1 / 0 defaults)."""
  return {
      'params': {'scale': jnp.asarray(rng.uniform(0.5, 2.0, c).astype(np.float32)),
                 'bias': jnp.asarray(rng.standard_normal(c).astype(np.float32))},
      'batch_stats': {'mean': jnp.asarray(rng.standard_normal(c).astype(np.float32)),
                      'var': jnp.asarray(rng.uniform(0.5, 2.0, c).astype(np.float32))},
  }


@pytest.mark.parametrize('shape', [(17, 3, 3, 6), (17, 6)])
def test_grouped_bn_train_matches_numpy(shape):
  rng = np.random.default_rng(len(shape))
  c = shape[-1]
  # Groups with clearly different statistics, so a shared normalisation fails.
  x = rng.standard_normal(shape).astype(np.float32)
  x[:5] = x[:5] * 3 + 2
  x[14:] = x[14:] * 0.5 - 1
  mod = GroupedBatchNorm()
  init = mod.init(jax.random.key(0), jnp.asarray(x), GROUPS, True)
  assert set(init['params']) == {'scale', 'bias'}
  assert set(init['batch_stats']) == {'mean', 'var'}
  v = _random_vars(rng, c)
  y, state = mod.apply(v, jnp.asarray(x), GROUPS, True, mutable=['batch_stats'])
  want, mean, var = _np_grouped_bn(x, GROUPS, np.asarray(v['params']['scale']),
                                   np.asarray(v['params']['bias']),
                                   np.asarray(v['batch_stats']['mean']),
                                   np.asarray(v['batch_stats']['var']))
  assert y.dtype == jnp.float32 and y.shape == x.shape
  scale = np.asarray(v['params']['scale'])
  per_row = x[0].size // c
  tolerance.check(np.abs(np.asarray(y) - want).max(), _bn_train_tol(x, GROUPS, scale, want),
                  f'GroupedBatchNorm {shape} output')
  tolerance.check(np.abs(np.asarray(state['batch_stats']['mean']) - mean).max(),
                  _stats_tol(GROUPS, per_row, mean, x.mean(0)),
                  f'GroupedBatchNorm {shape} running mean')
  tolerance.check(np.abs(np.asarray(state['batch_stats']['var']) - var).max(),
                  _stats_tol(GROUPS, per_row, var, x.var(0)),
                  f'GroupedBatchNorm {shape} running var')
  # Eval mode: the (given) running statistics, groups irrelevant.
  y_eval = mod.apply(v, jnp.asarray(x), GROUPS, False)
  mean0, var0 = np.asarray(v['batch_stats']['mean']), np.asarray(v['batch_stats']['var'])
  rstd = 1 / np.sqrt(var0 + EPS)
  want_eval = (x - mean0) * rstd * scale + np.asarray(v['params']['bias'])
  # Elementwise: x - mean (relative to |x| + |mean|, then scaled by rstd * scale),
  # rsqrt (a few ulp), two products and the bias, relative to the output.
  eval_tol = (tolerance.tol(F32, 1, np.max((np.abs(x) + np.abs(mean0)) * rstd * scale),
                            worst_case=True)
              + tolerance.tol(F32, 5, np.abs(want_eval).max(), worst_case=True))
  tolerance.check(np.abs(np.asarray(y_eval) - want_eval).max(), eval_tol,
                  f'GroupedBatchNorm eval {shape}')


def test_grouped_bn_group_order_matters_for_running_stats():
  """Reversing the groups changes the running stats (sequential, not pooled)."""
  rng = np.random.default_rng(9)
  x = rng.standard_normal((12, 4)).astype(np.float32)
  x[:4] += 5.0
  mod = GroupedBatchNorm()
  v = mod.init(jax.random.key(0), jnp.asarray(x), (4, 8), True)
  _, s1 = mod.apply(v, jnp.asarray(x), (4, 8), True, mutable=['batch_stats'])
  _, s2 = mod.apply(v, jnp.asarray(np.concatenate([x[4:], x[:4]])), (8, 4), True,
                    mutable=['batch_stats'])
  _, m1, _ = _np_grouped_bn(x, (4, 8), 1.0, 0.0, np.zeros(4), np.ones(4))
  tolerance.assert_close(s1['batch_stats']['mean'], m1, _stats_tol((4, 8), 1, m1, x.mean(0)),
                         what='GroupedBatchNorm running mean, groups in order')
  assert np.abs(np.asarray(s1['batch_stats']['mean'])
                - np.asarray(s2['batch_stats']['mean'])).min() > 0.01


def test_grouped_bn_without_scale_bias_and_bad_groups():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((6, 3)).astype(np.float32))
  mod = GroupedBatchNorm(use_scale=False, use_bias=False)
  v = mod.init(jax.random.key(0), x, (2, 4), True)
  assert 'params' not in v
  y, _ = mod.apply(v, x, (2, 4), True, mutable=['batch_stats'])
  want, _, _ = _np_grouped_bn(np.asarray(x), (2, 4), 1.0, 0.0, np.zeros(3), np.ones(3))
  tolerance.check(np.abs(np.asarray(y) - want).max(),
                  _bn_train_tol(x, (2, 4), np.ones(3), want),
                  'GroupedBatchNorm without scale / bias')
  with pytest.raises(ValueError):
    mod.apply(v, x, (2, 3), True, mutable=['batch_stats'])


@pytest.fixture(scope='module')
def tiny_neck():
  neck = RegionNeck(channels=16, num_convs=4, hidden=32, out_dim=16)
  rng = np.random.default_rng(0)
  regions = jnp.asarray(rng.standard_normal((sum(GROUPS), 2, 2, 16)).astype(np.float32))
  variables = jax.jit(lambda k, r: neck.init(k, r, GROUPS, True))(
      jax.random.key(1, impl='rbg'), regions)
  fn = jax.jit(lambda r: neck.apply(variables, r, GROUPS, True, mutable=['batch_stats'])[0])
  alone = {n: jax.jit(lambda r, n=n: neck.apply(variables, r, (n,), True,
                                                mutable=['batch_stats'])[0])
           for n in set(GROUPS)}
  return neck, variables, regions, fn, alone


def test_neck_groups_are_independent(tiny_neck):
  """Changing one group's regions leaves the other groups' embeddings unchanged."""
  _, _, regions, fn, alone = tiny_neck
  rng = np.random.default_rng(3)
  base = np.asarray(fn(regions))
  assert base.shape == (sum(GROUPS), 16) and np.isfinite(base).all()
  bounds = np.cumsum((0,) + GROUPS)
  worst = 0.0
  for k in range(len(GROUPS)):
    r = np.asarray(regions).copy()
    r[bounds[k]:bounds[k + 1]] = rng.standard_normal(r[bounds[k]:bounds[k + 1]].shape) * 2 + 1
    out = np.asarray(fn(jnp.asarray(r)))
    for j in range(len(GROUPS)):
      d = np.abs(out[bounds[j]:bounds[j + 1]] - base[bounds[j]:bounds[j + 1]]).max()
      if j == k:
        assert d > 1e-2  # the changed group does change
      else:
        worst = max(worst, d)
  tolerance.check(worst, _neck_tol(), 'neck: other groups moved')


def test_neck_group_equals_neck_alone(tiny_neck):
  """Each group's output equals running the neck on that group's regions only."""
  _, _, regions, fn, alone = tiny_neck
  out = np.asarray(fn(regions))
  bounds = np.cumsum((0,) + GROUPS)
  err = 0.0
  for k, n in enumerate(GROUPS):
    solo = np.asarray(alone[n](regions[bounds[k]:bounds[k + 1]]))
    err = max(err, np.abs(out[bounds[k]:bounds[k + 1]] - solo).max())
  tolerance.check(err, _neck_tol(), 'neck grouped vs per-group call')


def test_neck_and_predictor_structure(tiny_neck):
  neck, variables, regions, _, _ = tiny_neck
  p = variables['params']
  assert set(p) == {'conv1', 'conv2', 'conv3', 'conv4', 'bn1', 'bn2', 'bn3', 'bn4',
                    'fc1', 'fc1_bn', 'fc2'}
  assert 'bias' not in p['conv1'] and p['conv1']['kernel'].shape == (3, 3, 16, 16)
  assert p['fc1']['kernel'].shape == (16, 32) and p['fc2']['kernel'].shape == (32, 16)
  assert 'fc2_bn' in variables['batch_stats']  # BN without scale / bias
  pred = Predictor(hidden=32, out_dim=16)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((10, 16)).astype(np.float32))
  pv = pred.init(jax.random.key(0), x, (10,), True)
  assert set(pv['params']) == {'fc1', 'fc1_bn', 'fc2'}
  y, _ = pred.apply(pv, x, (10,), True, mutable=['batch_stats'])
  assert y.shape == (10, 16) and y.dtype == jnp.float32
