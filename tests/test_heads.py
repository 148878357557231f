"""GroupedBatchNorm against NumPy, and the neck's per-level (per-group) independence.

Tolerances: normalised outputs and running statistics, max abs error 1e-5
(inputs of unit scale, float32).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax.nn.batch_norm import GroupedBatchNorm
from mcl_jax.nn.heads import Predictor, RegionNeck

TOL = 1e-5
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
  errs = (np.abs(np.asarray(y) - want).max(),
          np.abs(np.asarray(state['batch_stats']['mean']) - mean).max(),
          np.abs(np.asarray(state['batch_stats']['var']) - var).max())
  print(f'GroupedBatchNorm {shape}: out / running mean / running var max abs err '
        f'{errs[0]:.2e} / {errs[1]:.2e} / {errs[2]:.2e} (tol {TOL})')
  assert max(errs) <= TOL
  # Eval mode: the (given) running statistics, groups irrelevant.
  y_eval = mod.apply(v, jnp.asarray(x), GROUPS, False)
  want_eval = ((x - np.asarray(v['batch_stats']['mean']))
               / np.sqrt(np.asarray(v['batch_stats']['var']) + EPS)
               * np.asarray(v['params']['scale']) + np.asarray(v['params']['bias']))
  err = np.abs(np.asarray(y_eval) - want_eval).max()
  print(f'GroupedBatchNorm eval {shape}: max abs err {err:.2e} (tol {TOL})')
  assert err <= TOL


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
  np.testing.assert_allclose(np.asarray(s1['batch_stats']['mean']), m1, atol=TOL)
  assert np.abs(np.asarray(s1['batch_stats']['mean'])
                - np.asarray(s2['batch_stats']['mean'])).min() > 0.01


def test_grouped_bn_without_scale_bias_and_bad_groups():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((6, 3)).astype(np.float32))
  mod = GroupedBatchNorm(use_scale=False, use_bias=False)
  v = mod.init(jax.random.key(0), x, (2, 4), True)
  assert 'params' not in v
  y, _ = mod.apply(v, x, (2, 4), True, mutable=['batch_stats'])
  want, _, _ = _np_grouped_bn(np.asarray(x), (2, 4), 1.0, 0.0, np.zeros(3), np.ones(3))
  assert np.abs(np.asarray(y) - want).max() <= TOL
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
  print(f'neck: other groups moved by at most {worst:.2e} (tol {TOL})')
  assert worst <= TOL


def test_neck_group_equals_neck_alone(tiny_neck):
  """Each group's output equals running the neck on that group's regions only."""
  _, _, regions, fn, alone = tiny_neck
  out = np.asarray(fn(regions))
  bounds = np.cumsum((0,) + GROUPS)
  err = 0.0
  for k, n in enumerate(GROUPS):
    solo = np.asarray(alone[n](regions[bounds[k]:bounds[k + 1]]))
    err = max(err, np.abs(out[bounds[k]:bounds[k + 1]] - solo).max())
  print(f'neck grouped vs per-group call: max abs err {err:.2e} (tol {TOL})')
  assert err <= TOL


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
