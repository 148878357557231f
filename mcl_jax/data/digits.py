"""The 'digits' source: scikit-learn's 8x8 digits, upsampled.

Ships with scikit-learn, so tests and smoke runs need no download. Owns the
fixed train / held-out split (`digits_arrays`), the upsampling, and the
source's answers: `num_examples`, `num_classes`, `train_stream`,
`eval_arrays`, `eval_splits`, `has_heldout_split`.
"""

import functools

import numpy as np

from mcl_jax.data import decode, stream
from mcl_jax.data.lazy_tf import tf as _tf
from mcl_jax.data.spec import DataSpec

# The train/held-out split never changes with the config seed, so the
# held-out images stay unseen by every pretraining run.
SPLIT_SEED = 2304_02010
NUM_CLASSES = 10


@functools.lru_cache(maxsize=4)
def digits_arrays(heldout_fraction: float):
  """scikit-learn digits as uint8 with a fixed train / held-out split.

  Args:
    heldout_fraction: fraction of the 1,797 images held out.

  Returns:
    (images uint8 [1797, 8, 8] in 0..255, labels int32 [1797],
     {'train': sorted indices, 'heldout': sorted indices}).
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
  labels = digits.target.astype(np.int32)
  perm = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
  n_held = int(round(heldout_fraction * len(labels)))
  splits = {'heldout': np.sort(perm[:n_held]), 'train': np.sort(perm[n_held:])}
  return images, labels, splits


def _split_name(split: str) -> str:
  if split in ('train',):
    return 'train'
  if split in ('heldout', 'validation', 'val', 'test', 'eval'):
    return 'heldout'
  raise ValueError(f'digits has splits "train" and "heldout", got {split!r}')


def _upsample(images8, size: int):
  """uint8 [..., 8, 8] -> uint8 [..., size, size, 3], bilinear."""
  tf = _tf()
  x = tf.image.resize(tf.cast(images8, tf.float32)[..., None], [size, size],
                      method='bilinear')
  x = tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)
  return tf.repeat(x, 3, axis=-1)


def num_examples(spec: DataSpec) -> int:
  """Size of the fixed train split."""
  _, _, splits = digits_arrays(spec.digits_heldout_fraction)
  return len(splits['train'])


def num_classes(spec: DataSpec) -> int:
  """Ten digits."""
  del spec
  return NUM_CLASSES


def eval_splits(spec: DataSpec) -> tuple[str, str]:
  """(memory / training split, query / test split) for evaluation."""
  del spec
  return 'train', 'heldout'


def has_heldout_split(spec: DataSpec) -> bool:
  """The held-out digits are a split of their own."""
  del spec
  return True


def train_stream(spec: DataSpec, plan_for, seed: int,
                 include_index: bool) -> stream.TrainStream:
  """Epoch permutations of the train split; 'index' is the load_digits() row.

  The `input_pipeline.Source.train_stream` of this source.
  """
  tf = _tf()
  images, labels, splits = digits_arrays(spec.digits_heldout_fraction)
  train = splits['train']
  plan = plan_for(len(train))
  t_images = tf.constant(images[train])
  t_labels = tf.constant(labels[train])
  t_ids = tf.constant(train.astype(np.int64))

  def element_fn(i, elem_seed):
    image = _upsample(tf.gather(t_images, i), spec.image_size)
    return (decode.image_features(image, elem_seed, spec),
            tf.gather(t_labels, i), tf.constant(True))

  # 'index' reports the row in load_digits(), not the train-list position.
  ds = stream.indexed_stream(len(train), plan, seed, element_fn,
                             include_index, spec, source_ids=t_ids)
  return stream.TrainStream([ds], plan, len(train), decode.DecodeStats())


def eval_arrays(spec: DataSpec, split: str, max_examples=None):
  """'train' or 'heldout' (also 'validation', 'val', 'test', 'eval'), upsampled."""
  images, labels, splits = digits_arrays(spec.digits_heldout_fraction)
  idx = splits[_split_name(split)][:max_examples]
  return _upsample(images[idx], spec.image_size).numpy(), labels[idx]
