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


def _tiny(global_batch=64):
  c = test_tiny.get_config()
  c.optim.global_batch = global_batch
  return c


def _one_step(config, num_devices, crops, labels, num_steps=10):
  mesh = state_lib.make_mesh(num_devices)
  rep = NamedSharding(mesh, P())
  tx = optim.create_optimizer(config, num_steps)
  state = jax.jit(lambda k: state_lib.create_train_state(config, k, tx),
                  out_shardings=rep)(jax.random.key(0))
  before = jax.device_get(state)
  step = step_lib.make_train_step(config, mesh, tx, num_steps)
  shard = NamedSharding(mesh, P('data'))
  state, metrics = step(state, jax.device_put(crops, shard), jax.device_put(labels, shard))
  return before, jax.device_get(state), jax.device_get(metrics)


def test_one_step_on_one_and_eight_devices_agree():
  """Same global batch on 1 and 8 devices: same loss and updated params (f32)."""
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
  _, s8, m8 = _one_step(config, 8, crops, labels)
  assert np.isfinite(m1['loss'])
  for k in m1:
    np.testing.assert_allclose(m1[k], m8[k], rtol=1e-5, atol=1e-6, err_msg=k)
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: np.max(np.abs(a - b)), s1.params, s8.params))
  print(f'1 vs 8 devices: loss {m1["loss"]:.6f} vs {m8["loss"]:.6f}, '
        f'max |param diff| {max(diffs):.2e}')
  assert max(diffs) <= 1e-5
  # The step moved the online params, and the target followed by EMA with m_0.
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.max(np.abs(a - b)),
                                       before.params, s1.params))
  assert max(moved) > 0
  m0 = float(state_lib.ema_momentum(0, 10, config.optim.ema_base_momentum))
  assert m0 == pytest.approx(config.optim.ema_base_momentum)
  expect = optax.incremental_update(model_lib.encoder_subtree(s1.params),
                                    before.target_params, 1.0 - m0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               expect, s1.target_params)
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
  assert float(sched(0)) == pytest.approx(lr * 1e-4, rel=1e-3)  # f32 schedule
  assert float(sched(10)) == pytest.approx(lr, rel=1e-6)
  assert float(sched(5)) == pytest.approx(lr * 1e-4 + (lr - lr * 1e-4) / 2, rel=1e-6)
  assert float(sched(100)) == pytest.approx(1e-4, rel=1e-4)
  # Target momentum: 0.99 -> 1 along a half cosine.
  assert float(state_lib.ema_momentum(0, 100, 0.99)) == pytest.approx(0.99)
  assert float(state_lib.ema_momentum(50, 100, 0.99)) == pytest.approx(0.995)
  assert float(state_lib.ema_momentum(100, 100, 0.99)) == pytest.approx(1.0)


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
