"""kNN / linear probe / feature extraction of mcl_jax.eval.probes."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mcl_jax import evaluate as evaluate_cmd
from mcl_jax.eval import probes
from mcl_jax.data import input_pipeline
from mcl_jax.nn import model as model_lib
from mcl_jax.nn.model import MCLNet
from tests import tolerance


def knn_reference(train_f, train_y, test_f, k, t):
  """DINO's weighted kNN, one query at a time in NumPy."""
  tr = train_f / np.linalg.norm(train_f, axis=1, keepdims=True)
  te = test_f / np.linalg.norm(test_f, axis=1, keepdims=True)
  preds = []
  for q in te:
    sims = tr @ q
    votes = np.zeros(train_y.max() + 1)
    for j in np.argsort(-sims)[:k]:
      votes[train_y[j]] += np.exp(sims[j] / t)
    preds.append(int(np.argmax(votes)))
  return np.asarray(preds)


def separable(rng, n_train, n_test, dim=16, classes=5, noise=0.3):
  """(train_f, train_y, test_f, test_y): Gaussian clusters around shared centres."""
  centres = rng.normal(size=(classes, dim)) * 3.0
  y = rng.integers(0, classes, n_train + n_test)
  f = (centres[y] + noise * rng.normal(size=(len(y), dim))).astype(np.float32)
  return f[:n_train], y[:n_train], f[n_train:], y[n_train:]


def tiny_config():
  from configs import mcl_100ep  # pylint: disable=import-outside-toplevel
  c = mcl_100ep.get_config()
  c.data.source = 'digits'
  c.data.image_size = 32
  c.model.depth, c.model.width, c.model.stage_sizes = 18, 8, (1, 1, 1, 1)
  c.model.fpn_channels, c.model.neck_hidden = 16, 32
  c.model.embed_dim, c.model.predictor_hidden = 16, 32
  c.model.dtype = 'float32'
  return c


def random_fill(shapes, seed):
  """Random backbone + FPN variables drawn in NumPy (compiling the initialiser is slow)."""
  rng = np.random.default_rng(seed)

  def f(path, s):
    name = path[-1].key
    if name == 'kernel':
      return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / np.prod(s.shape[:-1])), s.shape), s.dtype)
    if name in ('scale', 'var'):
      return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype)
    return jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype)
  return jax.tree_util.tree_map_with_path(f, shapes)


@pytest.fixture(scope='module')
def tiny():
  config = tiny_config()
  model = model_lib.create_model(config)
  x = jnp.zeros((1, 32, 32, 3), jnp.float32)
  shapes = jax.eval_shape(lambda key: model.init(key, x, False, method=MCLNet.features),
                          jax.random.key(3))
  return config, model, random_fill(shapes, 3)


def synthetic_images(rng, n, size=32):
  """Two visually distinct classes: dark vs bright images with noise."""
  y = rng.integers(0, 2, n).astype(np.int32)
  base = np.where(y[:, None, None, None] == 1, 190, 60)
  x = np.clip(base + rng.normal(0, 20, (n, size, size, 3)), 0, 255).astype(np.uint8)
  return x, y


@pytest.mark.parametrize('k,chunk', [(20, 1024), (5, 7), (1, 16), (500, 13)])
def test_knn_matches_numpy_loop(k, chunk):
  rng = np.random.default_rng(k)
  train_f = rng.normal(size=(200, 16)).astype(np.float32)
  train_y = rng.integers(0, 6, 200)
  test_f = rng.normal(size=(50, 16)).astype(np.float32)
  test_y = rng.integers(0, 6, 50)
  want = knn_reference(train_f, train_y, test_f, min(k, 200), 0.07)
  got = probes.knn_predict(train_f, train_y, test_f, k=k, t=0.07, chunk=chunk)
  np.testing.assert_array_equal(got, want)
  # A count of correct predictions over 50: one rounding.
  assert probes.knn_top1(train_f, train_y, test_f, test_y, k, 0.07, chunk) == pytest.approx(
      np.mean(want == test_y), rel=tolerance.tol(np.float32, 1, worst_case=True))


def test_knn_on_separable_features():
  rng = np.random.default_rng(0)
  train_f, train_y, test_f, test_y = separable(rng, 300, 100)
  assert probes.knn_top1(train_f, train_y, test_f, test_y) >= 0.99


def test_linear_probe_on_separable_features():
  rng = np.random.default_rng(1)
  train_f, train_y, test_f, test_y = separable(rng, 300, 100, noise=1.0)
  assert probes.linear_probe(train_f, train_y, test_f, test_y) > 0.9


def test_extract_features_tiny_model(tiny):
  config, model, variables = tiny
  images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
  feats = probes.extract_features(model, variables, images, config.augment, batch_size=3)
  assert feats.shape == (5, model.width * 8) and feats.dtype == np.float32
  assert np.isfinite(feats).all() and feats.std() > 0
  # Same as pooling MCLNet.features' C5 of the normalised images, eval mode.
  x = (images / 255.0 - np.asarray(config.augment.mean)) / np.asarray(config.augment.std)
  c5 = model.apply(variables, jnp.asarray(x, jnp.float32), train=False,
                   method=MCLNet.features)['C5']
  # Two float32 programs of the same eval-mode network (no batch statistics):
  # each conv's fan-in and the BN's elementwise roundings, along the whole
  # chain, then the mean over C5's pixels; relative to the largest feature.
  # The input normalisation differs by a few roundings, which the chain's
  # first stage covers.
  chain = tolerance.network_chain(variables['params'], 1) + [int(np.prod(c5.shape[1:3]))]
  tol = tolerance.tol(np.float32, chain, np.abs(feats).max(), sides=2, walk=True)
  tolerance.assert_close(feats, np.asarray(c5).mean(axis=(1, 2)), atol=tol,
                         what='extract_features vs pooled C5')
  # Batch size (padding, device split) does not change the features.
  feats8 = probes.extract_features(model, variables, images, config.augment, batch_size=8)
  tolerance.assert_close(feats, feats8, atol=tol, what='extract_features, batch 3 vs 8')


def test_evaluate_variables_and_table(tiny):
  config, model, variables = tiny
  rng = np.random.default_rng(4)
  data = (synthetic_images(rng, 40), synthetic_images(rng, 16))
  result = probes.evaluate_variables(config, variables, compare_random_init=True,
                                       data=data, batch_size=8)
  for key in ('knn_top1', 'linear_top1', 'random_knn_top1', 'random_linear_top1'):
    assert 0.0 <= result[key] <= 1.0
  assert result['num_train'] == 40 and result['num_test'] == 16
  assert result['knn_top1'] >= 0.9  # brightness survives any random backbone
  table = probes.format_table(result)
  assert 'random init' in table and 'trained' in table


def test_missing_backbone_is_a_clear_error(tiny):
  config, model, _ = tiny
  with pytest.raises(ValueError, match='backbone'):
    probes.extract_features(model, {'params': {}}, np.zeros((1, 32, 32, 3), np.uint8),
                              config.augment)


def test_cli_with_patched_loaders(tiny, monkeypatch, capsys):
  """The command's wiring: checkpointing.load_variables + DataSource.eval_arrays."""
  checkpointing = pytest.importorskip('mcl_jax.training.checkpointing')
  config, _, variables = tiny
  rng = np.random.default_rng(5)
  arrays = {'train': synthetic_images(rng, 24), 'heldout': synthetic_images(rng, 8)}
  seen = []

  def eval_arrays(self, split, max_examples=None):
    seen.append((self.spec.source, split, max_examples))
    x, y = arrays[split]
    return x[:max_examples], y[:max_examples]

  # The source still names its splits: only the arrays are faked.
  monkeypatch.setattr(input_pipeline.DataSource, 'eval_arrays', eval_arrays)
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.data.source = 'tfds'
  monkeypatch.setattr(checkpointing, 'load_variables', lambda w, step=None, which='online': (cfg, variables))
  monkeypatch.setattr(checkpointing, 'latest_steps', lambda w: [7])
  result = evaluate_cmd.main(['--workdir', 'W', '--dataset', 'digits', '--max-train', '20',
                              '--batch-size', '8'])
  assert seen == [('digits', 'train', 20), ('digits', 'heldout', None)]
  assert result['num_train'] == 20 and result['num_test'] == 8
  out = capsys.readouterr().out
  assert 'random init' in out and 'online step 7' in out
