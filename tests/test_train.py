"""Training system: sharded step equality, schedules, masks, EMA."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mcl_jax.nn import model as model_lib
from mcl_jax.training import state as state_lib
from mcl_jax.training import optim
from mcl_jax.training import step as step_lib
from mcl_jax.pretext import montage
from tests import tolerance
from tests.tiny_config import tiny_config

F32 = np.float32


def _one_step(config, num_devices, crops, labels, num_steps=10, before=None):
  """One step on `num_devices`, from `before` (host arrays) or a fresh state."""
  mesh = state_lib.make_mesh(num_devices)
  rep = NamedSharding(mesh, P())
  tx = optim.create_optimizer(config, num_steps)
  if before is None:
    # rbg keys: the same Kaiming init, much cheaper to compile than threefry.
    state = jax.jit(lambda k: state_lib.create_train_state(config, k, tx),
                    out_shardings=rep)(jax.random.key(0, impl='rbg'))
    before = jax.device_get(state)
  else:  # the same values, replicated over this mesh (no second init compile)
    state = jax.device_put(before, rep)
  step = step_lib.make_train_step(config, mesh, tx, num_steps)
  shard = NamedSharding(mesh, P('data'))
  state, metrics = step(state, jax.device_put(crops, shard), jax.device_put(labels, shard))
  return before, jax.device_get(state), jax.device_get(metrics)


def test_one_step_on_one_and_eight_devices_agree():
  """Same global batch on 1 and 8 devices: same loss and updated params (f32)."""
  if jax.device_count() < 8:  # tests/conftest.py simulates 8 unless XLA_FLAGS is set outside
    pytest.skip(f'needs 8 devices, has {jax.device_count()}')
  config = tiny_config(**{'optim.global_batch': 64})
  # Two levels (4 crops) and one neck conv: the same sharded step, half the
  # program to compile twice.
  config.loss.level_weights = (0.5, 0.5)
  config.data.num_crops = 4
  config.model.neck_convs = 1
  rng = np.random.RandomState(0)
  crops = rng.randint(0, 256, (64, 4, 32, 32, 3)).astype(np.uint8)
  labels = rng.randint(0, 10, (64,)).astype(np.int32)
  before, s1, m1 = _one_step(config, 1, crops, labels)
  _, s8, m8 = _one_step(config, 8, crops, labels, before=before)
  assert np.isfinite(m1['loss'])
  # The same step, its sums split over 8 devices and joined by all-reduces:
  # reordered reductions. The network's stages (BN rows at most the stem's:
  # every canvas of a view, (S / 2)^2 each), the loss (cosines over D twice,
  # logsumexp over the batch, mean over a level's tiles), then for the update
  # the backward's stages again and LARS (the global norm, a tensor's norms).
  layout = montage.layout_for(config)
  canvases = config.optim.global_batch // config.montage.group_size * layout.num_canvases
  chain = tolerance.network_chain(before.params, canvases * (32 // 2)**2)
  loss_chain = [config.model.embed_dim] * 2 + [64, 64 * 8]
  n_all = sum(x.size for x in jax.tree.leaves(before.params))
  rtol = tolerance.tol(F32, chain + loss_chain, 1.0, sides=2, walk=True)
  update_rtol = tolerance.tol(F32, 2 * chain + loss_chain + [n_all, n_all, n_all, 8], 1.0,
                              sides=2, walk=True)
  for k in m1:  # relative to max(1, |value|): cosines can sit near 0
    tolerance.check(abs(float(m1[k]) - float(m8[k])), rtol * max(1.0, abs(float(m1[k]))),
                    f'1 vs 8 devices: {k}')
  # Parameters: the update's error, relative to the largest update (a
  # gradient that is zero up to rounding, as a bias ahead of a BN, is float
  # noise of the size of its neighbours' terms), and the rounding of
  # w - update on each side.
  moved = max(float(np.max(np.abs(np.asarray(a, np.float64) - w0)))
              for a, w0 in zip(jax.tree.leaves(s1.params), jax.tree.leaves(before.params)))
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(s1.params),
                        jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    bound = (update_rtol * moved
             + tolerance.tol(F32, 1, float(np.max(np.abs(a))), sides=2, worst_case=True))
    tolerance.check(np.max(np.abs(a - b)), bound,
                    f'1 vs 8 devices: params {jax.tree_util.keystr(path[0])}')
  # The step moved the online params, and the target followed by EMA with m_0.
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.max(np.abs(a - b)),
                                       before.params, s1.params))
  assert max(moved) > 0
  m0 = float(state_lib.ema_momentum(0, 10, config.optim.ema_base_momentum))
  assert m0 == pytest.approx(config.optim.ema_base_momentum,
                             rel=tolerance.tol(F32, 3 + tolerance.TRANSCENDENTAL + 4,
                                               worst_case=True))  # as in test_target_momentum_schedule
  expect = optax.incremental_update(model_lib.encoder_subtree(s1.params),
                                    before.target_params, 1.0 - m0)
  # m t + (1 - m) w on both sides: three roundings each, relative to the terms.
  for a, b, t, w in zip(jax.tree.leaves(expect), jax.tree.leaves(s1.target_params),
                        jax.tree.leaves(before.target_params),
                        jax.tree.leaves(model_lib.encoder_subtree(s1.params))):
    scale = max(float(np.max(np.abs(t))), float(np.max(np.abs(w))))
    tolerance.assert_close(a, b, atol=tolerance.tol(F32, 3, scale, sides=2, worst_case=True),
                           what='EMA target update')
  assert int(s1.step) == 1


def test_target_momentum_schedule():
  """The EMA target's momentum: 0.99 -> 1 along a half cosine."""
  rel = lambda n: tolerance.tol(F32, n, worst_case=True)
  # Target momentum: 0.99 -> 1 along a half cosine: 1 - (1 - m) (cos + 1) / 2,
  # the argument (3 roundings, times |sin| <= 1), the cos and 4 more.
  m_rel = rel(3 + tolerance.TRANSCENDENTAL + 4)
  assert float(state_lib.ema_momentum(0, 100, 0.99)) == pytest.approx(0.99, rel=m_rel)
  assert float(state_lib.ema_momentum(50, 100, 0.99)) == pytest.approx(0.995, rel=m_rel)
  assert float(state_lib.ema_momentum(100, 100, 0.99)) == pytest.approx(1.0, rel=m_rel)
