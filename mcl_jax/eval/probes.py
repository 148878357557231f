"""Frozen-feature evaluation: weighted kNN and a linear probe on pooled C5.

Features are the global-average-pooled C5 of the ResNet in eval mode (BN with
running statistics), the same map `MCLNet.features(train=False)` returns as
'C5', computed on uint8 images normalised with `config.augment.mean/std`.

* kNN: DINO's weighted kNN (Caron et al. 2021): L2-normalised features,
  cosine similarity, the k = 20 nearest memory items vote for their class
  with weight exp(sim / T), T = 0.07; top-1 of the summed votes.
* Linear probe: multinomial logistic regression (scikit-learn, L-BFGS, L2
  penalty C = 1) on features standardised with the memory set's mean / std.
  Chosen over SGD on a Dense layer because it has no schedule to tune and is
  deterministic; it is meant for the small-scale sanity evaluation of the
  demo and ablations, not for ImageNet-scale linear evaluation protocols.

The frame (normalised forward, padded batches, random-init baseline, the
table) is `mcl_jax.eval.core`'s. Command line (prints random init vs trained):

    python -m mcl_jax.evaluate --workdir runs/demo [--dataset digits] [--step N]
"""

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcl_jax.eval import core
from mcl_jax.nn import model as model_lib
from mcl_jax.pretext import losses

KNN_K = 20
KNN_T = 0.07
FOLDER_HELDOUT_FRACTION = 0.2


# ------------------------------------------------------------------ features --


def _pooled_c5(module, images):
  """Global-average-pooled C5 (float32) of normalised images, BN in eval mode."""
  c5 = module.backbone(images, False)['C5']
  return c5.astype(jnp.float32).mean(axis=(1, 2))


def backbone_variables(variables) -> dict[str, Any]:
  """The backbone share of {'params', 'batch_stats'}, with a clear error if absent."""
  return core.variable_subset(variables, ('backbone',), ValueError, 'evaluation')


def extract_features(model, variables, images_uint8: np.ndarray, aug_cfg,
                     batch_size: int = 256) -> np.ndarray:
  """Pooled C5 features of uint8 images.

  Args:
    model: an MCLNet (only its backbone runs).
    variables: {'params', 'batch_stats'} holding a 'backbone' subtree.
    images_uint8: [N, S, S, 3] uint8 RGB.
    aug_cfg: `config.augment` (mean / std in [0, 1] units).
    batch_size: images per forward pass; the last batch is padded, so one
      compilation serves all batches. Split over the local devices when it
      divides evenly.

  Returns:
    float32 [N, C5 channels].
  """
  variables = backbone_variables(variables)
  batch_size = max(1, min(batch_size, len(images_uint8)))
  batch_sharding, replicated = core.data_sharding(batch_size)
  if replicated is not None:
    variables = jax.device_put(variables, replicated)
  features = core.forward(model, _pooled_c5, (), aug_cfg)
  return core.map_batches(lambda batch: features(variables, batch), [images_uint8],
                          batch_size, batch_sharding).astype(np.float32)


# ------------------------------------------------------------------------ kNN --


@functools.partial(jax.jit, static_argnames=('k', 'num_classes'))
def _knn_predict(queries, memory, memory_labels, k: int, t: float, num_classes: int):
  """Weighted-vote class predictions of a chunk of L2-normalised queries."""
  sims = jnp.matmul(queries, memory.T, precision=jax.lax.Precision.HIGHEST)
  top, idx = jax.lax.top_k(sims, k)
  weights = jnp.exp(top / t)
  votes = jnp.einsum('qkc,qk->qc', jax.nn.one_hot(memory_labels[idx], num_classes), weights)
  return jnp.argmax(votes, axis=-1)


def knn_predict(train_f, train_y, test_f, k: int = KNN_K, t: float = KNN_T,
                chunk: int = 1024, num_classes: int | None = None) -> np.ndarray:
  """DINO's weighted-kNN class predictions.

  Args:
    train_f, train_y: memory features [N, D] and int labels [N].
    test_f: query features [M, D].
    k: neighbours (clipped to N).
    t: temperature of the vote weights exp(cos / t).
    chunk: queries per device call (the last chunk is padded).
    num_classes: vote slots (default: max label + 1).

  Returns:
    int32 [M] predictions; ties go to the lowest class index.
  """
  train_y = np.asarray(train_y, np.int32)
  num_classes = int(train_y.max()) + 1 if num_classes is None else num_classes
  k = min(k, len(train_y))
  memory = losses.l2_normalize(jnp.asarray(train_f))
  labels = jnp.asarray(train_y)
  queries = np.asarray(losses.l2_normalize(jnp.asarray(test_f)))
  vote = lambda q: _knn_predict(q, memory, labels, k, t, num_classes)
  return core.map_batches(vote, [queries], chunk).astype(np.int32)


def knn_top1(train_f, train_y, test_f, test_y, k: int = KNN_K, t: float = KNN_T,
             chunk: int = 1024) -> float:
  """DINO's weighted-kNN top-1 accuracy (see `knn_predict`).

  Returns:
    Fraction of queries whose highest-voted class is their label.
  """
  pred = knn_predict(train_f, train_y, test_f, k, t, chunk)
  return float(np.mean(pred == np.asarray(test_y)))


# --------------------------------------------------------------- linear probe --


def linear_probe(train_f, train_y, test_f, test_y, c: float = 1.0,
                 max_iter: int = 1000) -> float:
  """Top-1 of multinomial logistic regression on standardised features.

  Args:
    train_f, train_y: training features [N, D] and labels.
    test_f, test_y: test features [M, D] and labels.
    c: inverse L2 strength (scikit-learn's C).
    max_iter: L-BFGS iterations (a non-converged fit is still scored).

  Returns:
    Test accuracy.
  """
  from sklearn.exceptions import ConvergenceWarning  # pylint: disable=import-outside-toplevel
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel
  train_f = np.asarray(train_f, np.float64)
  mean, std = train_f.mean(0), train_f.std(0)
  std = np.where(std > 1e-8, std, 1.0)
  clf = LogisticRegression(C=c, max_iter=max_iter)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', ConvergenceWarning)
    clf.fit((train_f - mean) / std, np.asarray(train_y))
  pred = clf.predict((np.asarray(test_f, np.float64) - mean) / std)
  return float(np.mean(pred == np.asarray(test_y)))


# ----------------------------------------------------------------------- data --


def _labelled(x, y):
  keep = np.asarray(y) >= 0
  return np.asarray(x)[keep], np.asarray(y, np.int32)[keep]


def _holdout(x, y, fraction: float, seed: int = 0):
  """A fixed random (train, test) split of one labelled set."""
  perm = np.random.default_rng(seed).permutation(len(y))
  n_test = max(1, int(round(fraction * len(y))))
  return (x[perm[n_test:]], y[perm[n_test:]]), (x[perm[:n_test]], y[perm[:n_test]])


def load_eval_data(data_cfg, max_train: int | None = None, max_test: int | None = None,
                   source=None):
  """((train images, labels), (test images, labels)) of the configured source.

  The source names the two splits; one without a held-out split (an image
  folder without train / eval split subfolders) is split 80 / 20. Unlabelled
  images (label -1) are dropped.

  Args:
    data_cfg: `config.data`.
    max_train, max_test: caps on the two splits.
    source: the run's opened `DataSource` of `data_cfg` (default: opened here).
  """
  if source is None:
    from mcl_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
    source = input_pipeline.open_source(data_cfg)
  train_split, test_split = source.eval_splits()
  if not source.has_heldout_split():
    x, y = _labelled(*source.eval_arrays(train_split))
    train, test = _holdout(x, y, FOLDER_HELDOUT_FRACTION)
    train, test = (train[0][:max_train], train[1][:max_train]), (test[0][:max_test], test[1][:max_test])
  else:
    train = _labelled(*source.eval_arrays(train_split, max_train))
    test = _labelled(*source.eval_arrays(test_split, max_test))
  if not len(train[1]) or not len(test[1]):
    raise ValueError(f'source.source={data_cfg.source!r}: evaluation needs labelled images '
                     f'in both splits ({train_split!r}: {len(train[1])}, '
                     f'{test_split!r}: {len(test[1])})')
  return train, test


# ------------------------------------------------------------------- evaluate --


def random_variables(model, image_size: int, seed: int = 0):
  """Randomly initialised backbone variables of `model` (the untrained baseline, see
  `core.random_variables`)."""
  return core.random_variables(model, _pooled_c5, (), image_size, seed)


def probe(model, variables, data, aug_cfg, batch_size: int = 256, k: int = KNN_K,
          t: float = KNN_T) -> dict[str, float]:
  """{'knn_top1', 'linear_top1'} of one set of variables on ((x, y), (x, y))."""
  (train_x, train_y), (test_x, test_y) = data
  train_f = extract_features(model, variables, train_x, aug_cfg, batch_size)
  test_f = extract_features(model, variables, test_x, aug_cfg, batch_size)
  return {'knn_top1': knn_top1(train_f, train_y, test_f, test_y, k, t),
          'linear_top1': linear_probe(train_f, train_y, test_f, test_y)}


def evaluate_variables(config, variables, *, compare_random_init: bool = False, data=None,
                       batch_size: int = 256, k: int = KNN_K, t: float = KNN_T,
                       max_train: int | None = None, max_test: int | None = None,
                       seed: int | None = None, source=None) -> dict[str, Any]:
  """kNN and linear-probe top-1 of pretrained variables (and of a random init).

  Args:
    config: the run's config (model, augment mean/std, data source).
    variables: {'params', 'batch_stats'} of the online MCLNet or the target
      encoder (only the backbone is used).
    compare_random_init: also evaluate a freshly initialised backbone of the
      same config, as 'random_knn_top1' / 'random_linear_top1'.
    data: ((train uint8 images, labels), (test images, labels)); default:
      `load_eval_data(config.data, max_train, max_test)`.
    batch_size, k, t: feature batch and kNN settings.
    max_train, max_test: caps on the loaded splits.
    seed: random-init seed (default config.seed).
    source: the run's opened `DataSource` (default: `config.data` opened here).

  Returns:
    {'knn_top1', 'linear_top1', ['random_knn_top1', 'random_linear_top1'],
     'num_train', 'num_test', 'dataset' (str), 'protocol' (str)}.
  """
  model = model_lib.create_model(config)
  if data is None:
    data = load_eval_data(config.data, max_train, max_test, source)
  result = {'dataset': str(config.data.source), 'num_train': len(data[0][1]),
            'num_test': len(data[1][1]),
            'protocol': f'pooled C5; kNN k={k} T={t}; logistic regression'}
  result.update(probe(model, variables, data, config.augment, batch_size, k, t))
  if compare_random_init:
    init = random_variables(model, data[0][0].shape[1],
                            config.get('seed', 0) if seed is None else seed)
    core.with_random_baseline(result, probe(model, init, data, config.augment, batch_size, k, t))
  return result


SCORE_COLUMNS = (('knn_top1', 'kNN top-1'), ('linear_top1', 'linear top-1'))


def format_table(result: dict[str, Any], trained_label: str = 'trained') -> str:
  """A small text table of `evaluate_variables`'s result."""
  header = [f"{result.get('dataset', '?')}: {result.get('num_train', '?')} memory/train, "
            f"{result.get('num_test', '?')} query/test images ({result.get('protocol', '')})"]
  return core.comparison_table(header, SCORE_COLUMNS, result, trained_label)
