"""Training system: sharded step equality, schedules, masks, EMA."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import test_tiny
from mcl_jax.nn import model as model_lib
from mcl_jax.training import state as state_lib
from mcl_jax.training import optim
from mcl_jax.training import step as step_lib
from mcl_jax.pretext import montage
from tests import tolerance

F32 = np.float32


def _tiny(global_batch=64):
  c = test_tiny.get_config()
  c.optim.global_batch = global_batch
  return c


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
  config = _tiny()
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
                                               worst_case=True))  # as in test_schedules
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


def test_schedules():
  """The optax form of the schedule (optim.lr_warmup='optax'; test_optim tests both)."""
  config = _tiny()
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
  # Target momentum: 0.99 -> 1 along a half cosine: 1 - (1 - m) (cos + 1) / 2,
  # the argument (3 roundings, times |sin| <= 1), the cos and 4 more.
  m_rel = rel(3 + tolerance.TRANSCENDENTAL + 4)
  assert float(state_lib.ema_momentum(0, 100, 0.99)) == pytest.approx(0.99, rel=m_rel)
  assert float(state_lib.ema_momentum(50, 100, 0.99)) == pytest.approx(0.995, rel=m_rel)
  assert float(state_lib.ema_momentum(100, 100, 0.99)) == pytest.approx(1.0, rel=m_rel)


def test_reference_config_values():
  from configs import mcl_100ep
  c = mcl_100ep.get_config()
  assert optim.peak_lr(c) == 16.0
  assert c.optim.warmup_steps == 3127 and c.optim.clip_norm == 500
  assert c.optim.num_epochs * (c.data.num_train_examples // c.optim.global_batch) == 31_200
  assert tuple(c.loss.level_weights) == (0.5, 0.25, 0.125, 0.125) and c.loss.tau == 1.0
  assert c.model.depth == 50 and c.model.dtype == 'bfloat16'


def test_decay_mask_excludes_norms_and_biases():
  config = _tiny()
  params = jax.eval_shape(lambda k: state_lib.create_train_state(
      config, k, optim.create_optimizer(config, 1)), jax.random.key(0)).params
  flat = jax.tree_util.tree_flatten_with_path(optim.decay_mask(params))[0]
  names = {'/'.join(str(getattr(p, 'key', p)) for p in path): v for path, v in flat}
  assert names['backbone/conv1/kernel'] and names['neck/fc1/kernel']
  assert not names['backbone/bn1/scale'] and not names['backbone/bn1/bias']
  assert not names['neck/fc1/bias'] and not names['neck/bn1/scale']
  assert not names['predictors_0/fc1_bn/bias']
