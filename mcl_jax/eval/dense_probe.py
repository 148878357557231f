"""Dense transfer probe: linear per-pixel segmentation on frozen backbone + FPN features.

The backbone and FPN run in eval mode (BN with running statistics) on uint8
images normalised with `config.augment.mean/std`; their maps are computed
once and cached. Features are one map (C2..C5, P2..P5) or 'fpn': P2..P5,
each bilinearly upsampled to P2's resolution and concatenated. Each channel
is standardised with the mean / std of the probe-training pixels, so one
recipe serves every model whatever the scale of its features.

The probe is a 1x1 convolution (a linear map per pixel plus a bias) whose
logits are bilinearly upsampled (half-pixel centres) to the label resolution
and trained with per-pixel cross-entropy over labelled pixels (255 ignored).
The recipe is fixed and deterministic, the same for every model:
PROBE_STEPS Adam steps (lr PROBE_LR, cosine decay to 0, no weight decay) on
minibatches of PROBE_BATCH images drawn from a fixed permutation, weights
starting at zero.

Scores (on the probe-test split): mIoU over classes present in the labels
or predictions, pixel accuracy, and mIoU by object size: the same mIoU with
the pixels of objects of the other two sizes ignored (background kept), so
mIoU-small counts small objects' pixels and every false positive on the
background. The size rule of each dataset is in `mcl_jax.data.segmentation`.

Command line (prints a random init beside the checkpoint, writes a PNG):

    python -m mcl_jax.dense_eval --workdir runs/demo [--dataset digit_scenes|voc]
        [--voc_root PATH] [--features fpn|C2..C5|P2..P5] [--png PATH]

From Python (e.g. at the end of a run):

    result = dense_probe.evaluate_variables(config, variables, compare_random_init=True)
    print(dense_probe.format_table(result))

The frame (normalised forward, padded batches, random-init baseline, the
table) is `mcl_jax.eval.core`'s.
"""

import functools
import io
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mcl_jax import errors, paths
from mcl_jax.data import segmentation as seg_data
from mcl_jax.eval import core
from mcl_jax.nn import model as model_lib
from mcl_jax.nn.model import MCLNet

FEATURE_CHOICES = ('fpn', 'C2', 'C3', 'C4', 'C5', 'P2', 'P3', 'P4', 'P5')
FPN_LEVELS = ('P2', 'P3', 'P4', 'P5')

PROBE_STEPS = 500
PROBE_BATCH = 32
PROBE_LR = 0.05
EXTRACT_BATCH = 64
PNG_SCENES = 6

create_model = model_lib.create_model


class DenseEvalError(errors.RunError, ValueError):
  """Variables or inputs the probe cannot use (one line: what and why)."""


# ------------------------------------------------------------------ features --


def feature_names(features: str) -> tuple[str, ...]:
  """The maps a feature choice reads: ('P2', ..., 'P5') for 'fpn', else (name,)."""
  if features not in FEATURE_CHOICES:
    raise DenseEvalError(f'features={features!r}: must be one of {", ".join(FEATURE_CHOICES)}')
  return FPN_LEVELS if features == 'fpn' else (features,)


def feature_variables(variables, names: Sequence[str]) -> dict[str, Any]:
  """The backbone (and FPN, for P maps) share of {'params', 'batch_stats'}."""
  parts = ('backbone', 'fpn') if any(n.startswith('P') for n in names) else ('backbone',)
  return core.variable_subset(variables, parts, DenseEvalError, 'the dense probe')


def _maps(module, images, names):
  if all(n.startswith('C') for n in names):  # the backbone alone
    feats = module.backbone(images, False)
  else:
    feats = module.features(images, False)
  return tuple(feats[n].astype(jnp.float32) for n in names)


def extract_maps(model, variables, images_uint8: np.ndarray, aug_cfg, names: Sequence[str],
                 batch_size: int = EXTRACT_BATCH) -> list[np.ndarray]:
  """Feature maps of uint8 images, backbone / FPN in eval mode.

  Args:
    model: an MCLNet.
    variables: {'params', 'batch_stats'} with 'backbone' (and 'fpn').
    images_uint8: [N, S, S, 3].
    aug_cfg: `config.augment` (mean / std in [0, 1] units).
    names: maps to return, e.g. ('C5',) or FPN_LEVELS.
    batch_size: images per forward pass (the last batch is padded: one compile).

  Returns:
    Per name, float32 [N, h, w, C].
  """
  names = tuple(names)
  variables = feature_variables(variables, names)
  maps = core.forward(model, _maps, (names,), aug_cfg)
  return list(core.map_batches(lambda batch: maps(variables, batch), [images_uint8],
                               batch_size))


def random_variables(model, image_size: int = 32, seed: int = 0):
  """A random init of the backbone + FPN (the untrained baseline, `core.random_variables`).

  The parameters do not depend on the image size, so one traced size (32 px)
  serves every dataset and compiles once.
  """
  return core.random_variables(model, MCLNet.features, (False,), image_size, seed)


# ---------------------------------------------------------------------- probe --


def standardise(train_maps: list[np.ndarray], *others: list[np.ndarray]):
  """Per-channel (x - mean) / std with the training pixels' statistics."""
  stats = []
  for m in train_maps:
    mean = m.mean(axis=(0, 1, 2), dtype=np.float64)
    std = m.std(axis=(0, 1, 2), dtype=np.float64)
    stats.append((mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)))
  apply = lambda maps: [(m - mu) / sd for m, (mu, sd) in zip(maps, stats)]
  return (apply(train_maps),) + tuple(apply(o) for o in others)


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """float32 [n_out, n_in] bilinear resize (half-pixel centres); identity if equal."""
  if n_in == n_out:
    return np.eye(n_in, dtype=np.float32)
  return seg_data.linear_weights(n_in, n_out).astype(np.float32)


def probe_logits(params, maps: Sequence[jax.Array], out_size: tuple[int, int]):
  """Per-pixel logits at the label resolution, channels first: [N, K, H, W].

  What it computes: the maps bilinearly upsampled to the finest one's
  resolution and concatenated, the 1x1 conv (params 'kernel' [sum C, K],
  'bias' [K]) applied, the logits bilinearly upsampled to `out_size`.
  Resizing is linear and per channel, so it commutes with the 1x1 conv:
  each map's share of the kernel is applied at the map's own resolution and
  only its K logit channels are resized, the same function at a fraction of
  the cost. Channels-first keeps every resize a plain batched matmul.
  """
  h = max(m.shape[1] for m in maps)
  w = max(m.shape[2] for m in maps)
  z, start = 0.0, 0
  for m in maps:
    c = m.shape[-1]
    y = jnp.einsum('nhwc,ck->nkhw', m, params['kernel'][start:start + c])
    start += c
    rows = jnp.asarray(resize_matrix(m.shape[1], h))
    cols = jnp.asarray(resize_matrix(m.shape[2], w))
    z = z + jnp.matmul(jnp.matmul(rows, y), cols.T)
  rows = jnp.asarray(resize_matrix(h, out_size[0]))
  cols = jnp.asarray(resize_matrix(w, out_size[1]))
  return jnp.matmul(jnp.matmul(rows, z), cols.T) + params['bias'][:, None, None]


def masked_cross_entropy(logits, labels):
  """Mean cross-entropy of [N, K, H, W] logits over pixels whose label is not 255."""
  valid = labels != seg_data.IGNORE
  onehot = jax.nn.one_hot(jnp.where(valid, labels, 0), logits.shape[1], axis=1,
                          dtype=logits.dtype)
  nll = jax.nn.logsumexp(logits, axis=1) - jnp.sum(logits * onehot, axis=1)
  return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1)


@functools.partial(jax.jit, static_argnames=('num_classes', 'steps', 'lr'))
def _train(maps, labels, order, num_classes: int, steps: int, lr: float):
  channels = sum(m.shape[-1] for m in maps)
  params = {'kernel': jnp.zeros((channels, num_classes), jnp.float32),
            'bias': jnp.zeros((num_classes,), jnp.float32)}
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
  out_size = labels.shape[1:3]

  def loss_fn(p, idx):
    return masked_cross_entropy(probe_logits(p, [m[idx] for m in maps], out_size),
                                labels[idx])

  def step(carry, idx):
    p, opt = carry
    loss, g = jax.value_and_grad(loss_fn)(p, idx)
    updates, opt = tx.update(g, opt, p)
    return (optax.apply_updates(p, updates), opt), loss

  (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), order)
  return params, losses


def batch_order(num_images: int, steps: int = PROBE_STEPS, batch: int = PROBE_BATCH,
                seed: int = 0) -> np.ndarray:
  """[steps, batch] image indices: epochs of fixed permutations, concatenated."""
  batch = min(batch, num_images)
  rng = np.random.default_rng(seed)
  need = steps * batch
  idx = np.concatenate([rng.permutation(num_images)
                        for _ in range(-(-need // num_images))])[:need]
  return idx.reshape(steps, batch).astype(np.int32)


def train_probe(train_maps: Sequence[np.ndarray], train_labels: np.ndarray, num_classes: int,
                steps: int | None = None, batch: int | None = None, lr: float | None = None):
  """Fits the 1x1-conv probe. Returns (params, per-step losses).

  steps / batch / lr default to PROBE_STEPS / PROBE_BATCH / PROBE_LR, read at
  call time (the recipe every model gets).
  """
  steps = PROBE_STEPS if steps is None else steps
  lr = PROBE_LR if lr is None else lr
  order = batch_order(len(train_labels), steps, PROBE_BATCH if batch is None else batch)
  params, losses = _train([jnp.asarray(m) for m in train_maps], jnp.asarray(train_labels),
                          jnp.asarray(order), int(num_classes), int(steps), float(lr))
  return params, np.asarray(losses)


@functools.partial(jax.jit, static_argnames=('out_size',))
def _predict(params, maps, out_size):
  return jnp.argmax(probe_logits(params, maps, out_size), axis=1).astype(jnp.uint8)


def predict(params, maps: Sequence[np.ndarray], out_size: tuple[int, int],
            batch: int = 64) -> np.ndarray:
  """uint8 [N, H, W] class predictions (the last batch is padded: one compile)."""
  classes = lambda *chunk: _predict(params, [jnp.asarray(c) for c in chunk], tuple(out_size))
  return core.map_batches(classes, list(maps), batch)


# -------------------------------------------------------------------- scoring --


def confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int,
              valid: np.ndarray | None = None) -> np.ndarray:
  """[K, K] counts of (label, prediction) over labelled (and `valid`) pixels."""
  keep = labels != seg_data.IGNORE
  if valid is not None:
    keep &= valid
  idx = labels[keep].astype(np.int64) * num_classes + preds[keep].astype(np.int64)
  return np.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def miou(conf: np.ndarray) -> float:
  """Mean IoU over the classes present in the labels or the predictions."""
  tp = np.diag(conf).astype(np.float64)
  union = conf.sum(0) + conf.sum(1) - tp
  present = union > 0
  return float(np.mean(tp[present] / union[present])) if present.any() else float('nan')


def score(labels: np.ndarray, preds: np.ndarray, size_bins: np.ndarray,
          num_classes: int) -> dict[str, float]:
  """{'miou', 'pixel_acc', 'miou_small', 'miou_medium', 'miou_large'}.

  mIoU of a size: pixels of objects of the other sizes are ignored.
  """
  conf = confusion(labels, preds, num_classes)
  out = {'miou': miou(conf), 'pixel_acc': float(np.trace(conf) / max(conf.sum(), 1))}
  for b, name in enumerate(seg_data.SIZE_NAMES):
    keep = (size_bins == b) | (size_bins == seg_data.NO_OBJECT)
    has = bool(np.any((size_bins == b) & (labels != seg_data.IGNORE)))
    out[f'miou_{name}'] = miou(confusion(labels, preds, num_classes, keep)) if has \
        else float('nan')
  return out


def fit_and_score(train_maps, train_labels, test_maps, test_set: seg_data.SegmentationSet,
                  num_classes: int) -> tuple[dict[str, float], np.ndarray]:
  """Standardises, trains the probe, scores the test split. Returns (scores, predictions)."""
  train_maps, test_maps = standardise(list(train_maps), list(test_maps))
  params, losses = train_probe(train_maps, train_labels, num_classes)
  preds = predict(params, test_maps, test_set.labels.shape[1:3])
  result = score(test_set.labels, preds, test_set.size_bins, num_classes)
  result['probe_final_loss'] = float(losses[-20:].mean())
  return result, preds


# ----------------------------------------------------------------------- data --


@functools.lru_cache(maxsize=4)
def _digit_scenes(heldout_fraction: float, num_train: int, num_test: int, seed: int,
                  size: int, sides: tuple[int, int]):
  return seg_data.digit_scenes(heldout_fraction, num_train, num_test, seed, size, sides)


def load_probe_data(config, dataset: str = 'digit_scenes', *, voc_root: str | None = None,
                    image_size: int | None = None, num_train: int | None = None,
                    num_test: int | None = None, data_seed: int = 0,
                    train_split: str = 'train', test_split: str = 'val',
                    digit_sides: tuple[int, int] | None = None):
  """The probe's ProbeData (digit scenes are cached per argument set).

  Args:
    config: the run's config (digits split: data.digits_heldout_fraction).
    dataset: 'digit_scenes' or 'voc'.
    voc_root: the VOC-layout folder (dataset 'voc').
    image_size: scene side / VOC short side (default 64 / 224).
    num_train, num_test: scenes to draw (digit_scenes; default 1000 / 500)
      or caps on the listed ids (voc; default all).
    data_seed: digit_scenes seed.
    train_split, test_split: VOC split files.
    digit_sides: (min, max) digit side of digit_scenes (default 8, 32); the
      size bins are the thirds of its log range.
  """
  if dataset == 'digit_scenes':
    return _digit_scenes(float(config.data.digits_heldout_fraction),
                         num_train or seg_data.NUM_TRAIN_SCENES,
                         num_test or seg_data.NUM_TEST_SCENES, int(data_seed),
                         image_size or seg_data.SCENE_SIZE,
                         tuple(int(v) for v in (digit_sides or seg_data.DIGIT_SIDES)))
  if dataset == 'voc':
    if not voc_root:
      raise DenseEvalError("dataset 'voc' needs a VOC-layout folder (--voc_root)")
    return seg_data.voc(voc_root, image_size or seg_data.VOC_SHORT_SIDE, train_split,
                        test_split, num_train, num_test)
  raise DenseEvalError(f"dataset={dataset!r}: must be 'digit_scenes' or 'voc'")


# ------------------------------------------------------------------- evaluate --


def probe_variables(config, variables, data: seg_data.ProbeData, features: str = 'fpn',
                    model=None, return_predictions: bool = False):
  """Scores of one set of variables: features extracted, probe fitted and scored."""
  model = model or create_model(config)
  names = feature_names(features)
  t0 = time.time()
  # One batch size for both splits: one compilation.
  batch = min(EXTRACT_BATCH, max(len(data.train), len(data.test)))
  tr = extract_maps(model, variables, data.train.images, config.augment, names, batch)
  te = extract_maps(model, variables, data.test.images, config.augment, names, batch)
  t1 = time.time()
  result, preds = fit_and_score(tr, data.train.labels, te, data.test, data.num_classes)
  result.update(extract_s=t1 - t0, probe_s=time.time() - t1)
  return (result, preds) if return_predictions else result


def evaluate_variables(config, variables, *, compare_random_init: bool = False,
                       data: seg_data.ProbeData | None = None, features: str = 'fpn',
                       dataset: str = 'digit_scenes', seed: int | None = None,
                       png: str | None = None, **data_kwargs) -> dict[str, Any]:
  """Dense-probe scores of pretrained variables (and of a random init).

  Args:
    config: the run's config (model, augment mean / std, digits split).
    variables: {'params', 'batch_stats'} of the online MCLNet or the target
      encoder (backbone and FPN are used).
    compare_random_init: also probe a random init of the same model, as
      'random_<score>'.
    data: a ProbeData; default `load_probe_data(config, dataset, **data_kwargs)`.
    features: 'fpn' or one map name (FEATURE_CHOICES).
    dataset: 'digit_scenes' (default, no download) or 'voc'.
    seed: random-init seed (default config.seed).
    png: if set, a PNG of a few test scenes (image | labels | prediction
      of the trained variables, and of the random init when compared).

  Returns:
    {'miou', 'pixel_acc', 'miou_small', 'miou_medium', 'miou_large', ...,
     ['random_' + each of those], 'dataset', 'features', 'num_train',
     'num_test', 'size_rule', 'protocol', 'seconds'}.
  """
  t0 = time.time()
  if data is None:
    data = load_probe_data(config, dataset, **data_kwargs)
  model = create_model(config)
  result = {'dataset': data.name, 'features': features, 'num_train': len(data.train),
            'num_test': len(data.test), 'size_rule': data.size_rule,
            'protocol': (f'frozen eval-mode {features} features, standardised; 1x1 conv, '
                         f'Adam lr {PROBE_LR} cosine, {PROBE_STEPS} steps x {PROBE_BATCH} '
                         'images; logits bilinear to labels')}
  trained, preds = probe_variables(config, variables, data, features, model, True)
  result.update(trained)
  rand_preds = None
  if compare_random_init:
    init = random_variables(model, seed=config.get('seed', 0) if seed is None else seed)
    rand, rand_preds = probe_variables(config, init, data, features, model, True)
    core.with_random_baseline(result, rand)
  if png:
    write_png(png, data, preds, rand_preds)
    result['png'] = png
  result['seconds'] = time.time() - t0
  return result


SCORE_COLUMNS = (('miou', 'mIoU'), ('pixel_acc', 'pixel acc'), ('miou_small', 'mIoU S'),
                 ('miou_medium', 'mIoU M'), ('miou_large', 'mIoU L'))


def format_table(result: dict[str, Any], trained_label: str = 'trained') -> str:
  """A small text table of `evaluate_variables`'s result."""
  header = [f"dense probe, {result.get('dataset', '?')}: {result.get('num_train', '?')} "
            f"train / {result.get('num_test', '?')} test images, "
            f"{result.get('features', '?')} features ({result.get('protocol', '')})",
            f"object sizes {result.get('size_rule', '')}"]
  return core.comparison_table(header, SCORE_COLUMNS, result, trained_label)


# ------------------------------------------------------------------------ PNG --


def palette(num: int = 256) -> np.ndarray:
  """The Pascal VOC colour map [num, 3] uint8 (bit-interleaved class index)."""
  pal = np.zeros((num, 3), np.uint8)
  for i in range(num):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    pal[i] = (r, g, b)
  pal[seg_data.IGNORE] = (255, 255, 255)
  return pal


def write_png(path: str, data: seg_data.ProbeData, preds: np.ndarray,
              random_preds: np.ndarray | None = None, num: int = PNG_SCENES):
  """Rows of test scenes: image | labels | prediction (| random-init prediction)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  pal = palette()
  num = min(num, len(preds))
  rows = []
  for i in range(num):
    cols = [data.test.images[i], pal[data.test.labels[i]], pal[preds[i]]]
    if random_preds is not None:
      cols.append(pal[random_preds[i]])
    sep = np.full((cols[0].shape[0], 2, 3), 255, np.uint8)
    rows.append(np.concatenate(sum(([c, sep] for c in cols), [])[:-1], axis=1))
  grid = np.concatenate(sum(([r, np.full((2,) + r.shape[1:], 255, np.uint8)]
                             for r in rows), [])[:-1], axis=0)
  scale = max(1, 256 // data.image_size)
  try:
    buf = io.BytesIO()
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                 Image.NEAREST).save(buf, 'PNG')
    paths.makedirs(paths.dirname(paths.abspath(path)))
    paths.write_atomic(path, buf.getvalue())
  except OSError as e:
    raise DenseEvalError(f'cannot write the PNG {path!r} ({type(e).__name__}: '
                         f'{e.strerror or e})') from e
