"""The 'tfds' source: any TFDS image dataset.

Records are read undecoded and decoded with the crop (`decode.decode_features`:
a fused `tf.image.decode_and_crop_jpeg` for JPEG). Record files can only be
streamed, so each process reads its own even split, shuffled per epoch with
seeds derived from (seed, epoch, process), and skips consumed records
(undecoded) when resuming. Owns the builder and its missing-data messages
(`builder`), and the source's answers: `num_examples`, `num_classes`,
`train_stream`, `eval_arrays`, `eval_splits`, `has_heldout_split`.
"""

import itertools
import os
from typing import Optional

import numpy as np

from mcl_jax.data import decode, stream
from mcl_jax.data.lazy_tf import tf as _tf
from mcl_jax.data.spec import DataSpec, DatasetNotFoundError


def _missing_message(tfds_builder, spec: DataSpec) -> str:
  name = spec.tfds_name
  data_dir = spec.tfds_data_dir or '~/tensorflow_datasets'
  manual_dir = (spec.tfds_manual_dir or
                os.path.join(data_dir, 'downloads', 'manual'))
  head = (f'TFDS dataset {name!r} is not prepared: no files under '
          f'{tfds_builder.data_dir}. ')
  if name.split('/')[0].split(':')[0] == 'imagenet2012':
    return head + (
        'ImageNet cannot be downloaded automatically. Register at '
        'https://image-net.org/download-images, download '
        'ILSVRC2012_img_train.tar (~138 GB) and ILSVRC2012_img_val.tar '
        f'(~6.3 GB) and put both files in the manual_dir {manual_dir} '
        '(--config.data.tfds_manual_dir). Then either run '
        f'`tfds build imagenet2012 --data_dir={data_dir} '
        f'--manual_dir={manual_dir}` once, or set '
        '--config.data.tfds_download_and_prepare=True to let the loader '
        'prepare it (several hours, ~150 GB of output in data_dir). '
        'Alternatively point --config.data.source=folder at an extracted '
        'copy (root/train/<wnid>/*.JPEG).')
  if getattr(tfds_builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):
    return head + (
        f'It needs a manual download into {manual_dir}: '
        f'{tfds_builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()} Then run `tfds '
        f'build {name} --data_dir={data_dir} --manual_dir={manual_dir}` or set '
        '--config.data.tfds_download_and_prepare=True.')
  return head + (
      f'Run `tfds build {name} --data_dir={data_dir}` on a machine with '
      'network access (then copy data_dir here), or set '
      '--config.data.tfds_download_and_prepare=True to download it on first '
      'use.')


def builder(spec: DataSpec):
  """The prepared TFDS builder of `data.tfds_name`.

  Raises:
    DatasetNotFoundError: unknown name, or files missing and
      `data.tfds_download_and_prepare` is off; the message says what to
      download and where to put it.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _tf()
  try:
    b = tfds.builder(spec.tfds_name, data_dir=spec.tfds_data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotFoundError(
        f'unknown TFDS dataset {spec.tfds_name!r}: check '
        '--config.data.tfds_name (see `tfds.list_builders()`).') from e
  if b.is_prepared():
    return b
  if spec.tfds_download_and_prepare:
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=spec.tfds_manual_dir))
    return b
  raise DatasetNotFoundError(_missing_message(b, spec))


def _keys(tfds_builder) -> tuple[str, Optional[str]]:
  """(image feature, label feature or None) of a builder."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features = tfds_builder.info.features
  image_keys = [k for k, f in features.items()
                if isinstance(f, tfds.features.Image)]
  if not image_keys:
    raise ValueError(f'{tfds_builder.name} has no Image feature')
  return image_keys[0], ('label' if 'label' in features else None)


def num_examples(spec: DataSpec) -> int:
  """The prepared dataset's train split size, else `data.num_train_examples`.

  Never downloads: sizes are needed (to turn epochs into steps) before the
  data itself.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _tf()
  try:
    b = tfds.builder(spec.tfds_name, data_dir=spec.tfds_data_dir)
    if b.is_prepared():
      return int(b.info.splits[spec.train_split].num_examples)
  except (tfds.core.registered.DatasetNotFoundError, KeyError):
    pass
  return spec.num_train_examples


def num_classes(spec: DataSpec) -> int:
  """Classes of the 'label' feature; a dataset without one has no labels."""
  b = builder(spec)
  _, label_key = _keys(b)
  if label_key is None:
    raise ValueError(f"objective='supervised' needs labels, but tfds dataset "
                     f"{spec.tfds_name!r} has no 'label' feature.")
  return b.info.features[label_key].num_classes


def eval_splits(spec: DataSpec) -> tuple[str, str]:
  """(memory / training split, query / test split) for evaluation."""
  return spec.train_split, spec.eval_split


def has_heldout_split(spec: DataSpec) -> bool:
  """TFDS splits are separate sets."""
  del spec
  return True


def _epoch(tfds_builder, spec: DataSpec, plan: stream.ShardPlan, seed: int,
           epoch: int, skip: int, stats: decode.DecodeStats,
           include_index: bool):
  """One epoch of this process's TFDS split, shuffled, skipped, mapped."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tf = _tf()
  image_key, label_key = _keys(tfds_builder)
  split = tfds.even_splits(spec.train_split, n=plan.process_count,
                           drop_remainder=True)[plan.process_index]
  # One seed per (seed, epoch, process) for file order and the buffer.
  epoch_seed = int(np.random.SeedSequence(
      [seed, epoch, plan.process_index]).generate_state(1)[0] & 0x7FFFFFFF)
  read_config = tfds.ReadConfig(
      shuffle_seed=epoch_seed, interleave_cycle_length=16,
      interleave_block_length=1, options=stream.dataset_options(spec))
  ds = tfds_builder.as_dataset(
      split=split, shuffle_files=True, read_config=read_config,
      decoders={image_key: tfds.decode.SkipDecoding()})
  ds = ds.shuffle(spec.shuffle_buffer, seed=epoch_seed,
                  reshuffle_each_iteration=False)
  # Every process contributes exactly steps_per_epoch local batches.
  ds = ds.take(plan.steps_per_epoch * plan.local_batch).enumerate().skip(skip)
  pil_decoder = decode.make_pil_decoder(stats)

  def load(pos, ex):
    elem_seed = stream.element_seed(seed, epoch,
                                    stream.global_position(pos, plan))
    features, ok = decode.decode_features(ex[image_key], tf.constant(False),
                                          elem_seed, spec, pil_decoder)
    label = (tf.cast(ex[label_key], tf.int32) if label_key
             else tf.constant(-1, tf.int32))
    out = dict(features, label=label, ok=ok)
    if include_index:
      out['index'] = tf.constant(-1, tf.int64)
    return out

  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return stream.batched(ds, spec, plan.local_batch)


def train_stream(spec: DataSpec, plan_for, seed: int,
                 include_index: bool) -> stream.TrainStream:
  """This process's even split, one pipeline per epoch; 'index' is -1.

  The `input_pipeline.Source.train_stream` of this source.
  """
  b = builder(spec)
  n = int(b.info.splits[spec.train_split].num_examples)
  plan = plan_for(n)
  stats = decode.DecodeStats()

  def epochs():
    # Record files can only be streamed, so each epoch is its own pipeline,
    # seeded by its epoch number; batches never straddle epochs. The price is
    # one shuffle-buffer fill at each epoch boundary.
    for epoch in itertools.count(plan.start_epoch):
      skip = plan.start_offset if epoch == plan.start_epoch else 0
      yield _epoch(b, spec, plan, seed, epoch, skip, stats, include_index)

  return stream.TrainStream(epochs(), plan, n, stats)


def eval_arrays(spec: DataSpec, split: str, max_examples=None):
  """Any split name; shorter side resized, centre-cropped (TensorFlow)."""
  tf = _tf()
  b = builder(spec)
  image_key, label_key = _keys(b)
  size, resize = spec.image_size, decode.eval_resize_size(spec)
  ds = b.as_dataset(split=split, shuffle_files=False)
  if max_examples:
    ds = ds.take(max_examples)

  def prep(ex):
    img = ex[image_key]
    if img.shape.rank == 3 and img.shape[-1] == 1:
      img = tf.image.grayscale_to_rgb(img)
    shape = tf.cast(tf.shape(img)[:2], tf.float32)
    new = tf.cast(tf.round(shape * resize / tf.reduce_min(shape)), tf.int32)
    img = tf.image.resize(img, tf.maximum(new, size), method='bilinear',
                          antialias=True)
    img = tf.image.resize_with_crop_or_pad(img, size, size)
    img = tf.cast(tf.clip_by_value(tf.round(img), 0.0, 255.0), tf.uint8)
    label = (tf.cast(ex[label_key], tf.int32) if label_key
             else tf.constant(-1, tf.int32))
    return img, label

  ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE).batch(256)
  images, labels = [], []
  for x, y in ds.as_numpy_iterator():
    images.append(x)
    labels.append(y)
  if not images:
    return np.zeros((0, size, size, 3), np.uint8), np.zeros((0,), np.int32)
  return np.concatenate(images), np.concatenate(labels)
