"""Supervised MCL (docs/METHOD.md section 7): loss, labelled-source check, a short run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import demo_supervised, mcl_supervised_100ep, test_tiny
from mcl_jax.eval import exporters
from mcl_jax.data import input_pipeline
from mcl_jax.pretext import losses
from mcl_jax.training import step as step_lib
from mcl_jax.training import state as state_lib
from mcl_jax.training import optim
from tests import tolerance


def _np_supervised(logits, classes, weights, smoothing):
  total, per_level = 0.0, []
  for z, y, w in zip(logits, classes, weights):
    z = z.astype(np.float64)
    k = z.shape[1]
    target = np.full_like(z, smoothing / k)
    target[np.arange(len(y)), y] += 1.0 - smoothing
    logp = z - z.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    loss = -(target * logp).sum(1).mean() * w
    per_level.append(loss)
    total += loss
  return total, per_level


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_supervised_loss_matches_numpy(smoothing):
  rng = np.random.RandomState(0)
  weights = (0.5, 0.25, 0.125, 0.125)
  counts = (16, 16, 16, 32)
  logits = [rng.randn(n, 10).astype(np.float32) * 3 for n in counts]
  classes = [rng.randint(0, 10, n).astype(np.int32) for n in counts]
  got, metrics = losses.supervised_loss([jnp.asarray(z) for z in logits],
                                        [jnp.asarray(y) for y in classes], weights, smoothing)
  want, per_level = _np_supervised(logits, classes, weights, smoothing)
  # float32 against float64, per level: the logsumexp over the 10 classes (a
  # sum of positive terms, relative to itself; an exp and a log), the
  # smoothed target's sum over the classes and the mean over the tiles, both
  # relative to the largest |log p| (|logits| + log 10); the total sums them.
  t = lambda *a, **k: tolerance.tol(np.float32, *a, **k)
  level_tols = []
  for z, w in zip(logits, weights):
    scale = 2 * np.abs(z).max() + np.log(10)
    level_tols.append(w * (t(10, 1.0) + t(2 * tolerance.TRANSCENDENTAL, scale, worst_case=True)
                           + t([10, len(z)], scale)))
  tolerance.check(abs(float(got) - want), sum(level_tols), f'supervised loss, smoothing {smoothing}')
  for i, w in enumerate(per_level):
    tolerance.check(abs(float(metrics[f'loss_level{i}']) - w), level_tols[i],
                    f'supervised loss level {i}, smoothing {smoothing}')
    # A count of correct tiles (exact) divided by the tile count: one rounding.
    acc = (logits[i].argmax(1) == classes[i]).mean()
    tolerance.check(abs(float(metrics[f'acc_level{i}']) - acc), t(1, acc, worst_case=True),
                    f'supervised accuracy level {i}')


def test_supervised_config():
  c = mcl_supervised_100ep.get_config()
  assert c.objective == 'supervised' and c.data.num_classes == 1000
  assert tuple(c.loss.level_weights) == (0.5, 0.25, 0.125, 0.125)


def test_unlabelled_folder_is_refused(tmp_path):
  from PIL import Image
  for i in range(3):
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f'{i}.png')
  c = test_tiny.get_config()
  c.objective = 'supervised'
  c.data.source = 'folder'
  c.data.folder = str(tmp_path)
  with pytest.raises(ValueError, match='needs labels'):
    input_pipeline.open_source(c.data).require_labels()
  c.data.source = 'digits'
  assert input_pipeline.open_source(c.data).require_labels() == 10
  c.data.num_classes = 5
  with pytest.raises(ValueError, match='num_classes'):
    input_pipeline.open_source(c.data).require_labels()


def test_short_supervised_run_on_digits_learns():
  """Real steps on digits: level-0 tile accuracy gets high; export still works."""
  config = demo_supervised.get_config()
  # 32 px digits whatever the demo's recipe: this test's cost (100 steps and
  # their compile) grows with the square of the image size.
  config.data.image_size = 32
  steps = config.optim.num_steps
  mesh = state_lib.make_mesh(1)
  tx = optim.create_optimizer(config, steps)
  # rbg keys: the same Kaiming init, much cheaper to compile than threefry.
  state = jax.jit(lambda k: state_lib.create_train_state(config, k, tx),
                  out_shardings=NamedSharding(mesh, P()))(jax.random.key(0, impl='rbg'))
  assert 'classifiers_0' in state.params and not state.target_params
  step_fn = step_lib.make_train_step(config, mesh, tx, steps)
  data = input_pipeline.open_source(config.data).train_iterator(global_batch=64, seed=0)
  sharding = NamedSharding(mesh, P('data'))
  accs = []
  for i in range(steps):
    batch = input_pipeline.to_global_batch(next(data), sharding)
    if i == 0:  # 100 steps: LLVM's optimisation pays here (tests/conftest.py turns it off)
      step_fn = step_fn.lower(state, batch['crops'], batch['label']).compile(
          compiler_options={'xla_backend_optimization_level': 3})
    state, metrics = step_fn(state, batch['crops'], batch['label'])
    accs.append(float(metrics['acc_level0']))
  first, last = np.mean(accs[:5]), np.mean(accs[-10:])
  print(f'supervised digits: level-0 tile accuracy {first:.3f} -> {last:.3f}')
  assert last > 0.8 and last > first + 0.5
  d2 = exporters.to_detectron2({'params': state.params, 'batch_stats': state.batch_stats})
  assert 'box_head.conv4.weight' in d2['model']
