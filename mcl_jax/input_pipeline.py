"""Host input pipeline: the entry point to the data sources.

MCL_SPEC.md section 1, step 1: every image yields `num_crops` independent
random-resized crops (uint8, `image_size` square); the rest of the
augmentation runs on the device (`mcl_jax.augment`). The crop windows are
always drawn here; `data.crop_on` says where they are cut and resized: on the
host ('host': batches carry 'crops'), or in the train step ('device': batches
carry the decoded image in a padded buffer with its size and windows, and
`mcl_jax.device_crops` cuts them).

Owns the source table and the public questions asked of the configured
source: `num_train_examples` / `steps_per_epoch`, `require_labels`,
`create_train_iterator`, `load_eval_arrays`, `eval_splits` /
`has_heldout_split`, and `to_global_batch` (host -> device). Each function
reads `config.data` once into a frozen `DataSpec` and passes only that on.

Sources (`config.data.source`), one module each in `mcl_jax/data/`:
  'tfds'    any TFDS image dataset, read undecoded and decoded with the crop.
  'folder'  root/[split/]class/*.jpg|png|...; files directly in the root are
            unlabelled (label -1).
  'digits'  scikit-learn's 8x8 digits, upsampled; no download.
Sharding and determinism are described in `mcl_jax/data/stream.py`.

TensorFlow is imported lazily (and hidden from any GPU) so that importing
`mcl_jax.augment` or the rest of the project never needs it.
"""

import functools
import itertools
from typing import Optional

import jax
import numpy as np

from mcl_jax.data import digits, folder, tfds
from mcl_jax.data.digits import digits_arrays
from mcl_jax.data.spec import DataSpec, DatasetNotFoundError
from mcl_jax.data.stream import ShardPlan, TrainIterator

__all__ = [
    'DataSpec', 'DatasetNotFoundError', 'SOURCES', 'TrainIterator',
    'create_train_iterator', 'digits_arrays', 'eval_splits',
    'has_heldout_split', 'load_eval_arrays', 'num_train_examples',
    'require_labels', 'scan_folder', 'source_for', 'steps_per_epoch',
    'to_global_batch',
]

# Each source module answers num_examples, num_classes, train_stream,
# eval_arrays, eval_splits and has_heldout_split for a DataSpec.
SOURCES = {'tfds': tfds, 'folder': folder, 'digits': digits}


def source_for(spec: DataSpec):
  """The module of `spec.source` (see `SOURCES`).

  Raises:
    ValueError: an unknown source.
  """
  try:
    return SOURCES[spec.source]
  except KeyError:
    raise ValueError(f'unknown data.source {spec.source!r}: expected one of '
                     f'{", ".join(map(repr, SOURCES))}') from None


def _resolve(data_cfg):
  """(DataSpec, source module) of the `data` config section or a DataSpec."""
  spec = DataSpec.from_config(data_cfg)
  return spec, source_for(spec)


def num_train_examples(data_cfg) -> int:
  """Training examples of the configured source.

  digits: the fixed train split; folder: the readable files; tfds: the
  prepared dataset's split size, else `data.num_train_examples`.
  """
  spec, source = _resolve(data_cfg)
  return source.num_examples(spec)


def steps_per_epoch(data_cfg, global_batch: int) -> int:
  """Full global batches per epoch (the last partial batch is dropped)."""
  return num_train_examples(data_cfg) // int(global_batch)


def require_labels(data_cfg) -> int:
  """Checks that the training source is labelled; returns its class count.

  Raises:
    ValueError: the source has unlabelled images (a folder without class
      subfolders, a tfds dataset without a 'label' feature), or more classes
      than `data.num_classes`.
  """
  spec, source = _resolve(data_cfg)
  num = source.num_classes(spec)
  if num > spec.num_classes:
    raise ValueError(f'data.num_classes={spec.num_classes}: the {spec.source} '
                     f'source has {num} classes; set '
                     f'--config.data.num_classes={num}.')
  return num


def create_train_iterator(data_cfg, *, global_batch: int, seed: int,
                          start_step: int = 0,
                          process_index: Optional[int] = None,
                          process_count: Optional[int] = None,
                          include_index: bool = False) -> TrainIterator:
  """Infinite, deterministic iterator of this process's training batches.

  Args:
    data_cfg: the `data` config section (or its `DataSpec`).
    global_batch: images per step over all processes.
    seed: base seed; batches depend only on (seed, step).
    start_step: first step to produce (resuming continues the stream
      exactly).
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).
    include_index: add 'index' int64 [local_batch]: the example's position in
      the source (digits: row of `load_digits()`, folder: position in
      `scan_folder(...).paths`, tfds: -1). For tests and debugging.

  Returns:
    A `TrainIterator` of dicts {'crops': uint8 [local_batch, num_crops, S, S,
    3], 'label': int32 [local_batch]}, local_batch = global_batch //
    process_count; with data.crop_on='device', 'image', 'size' and 'windows'
    replace 'crops' (see `TrainIterator`).

  Raises:
    DatasetNotFoundError: the configured data is missing (the message says
      what to provide).
  """
  spec, source = _resolve(data_cfg)
  # The source knows its size only once its data is open, so it makes the plan.
  plan_for = functools.partial(
      ShardPlan.create, global_batch=int(global_batch), start_step=start_step,
      process_index=process_index, process_count=process_count)
  stream = source.train_stream(spec, plan_for, seed, include_index)
  batches = itertools.chain.from_iterable(
      ds.as_numpy_iterator() for ds in stream.datasets)
  return TrainIterator(batches, local_batch=stream.plan.local_batch,
                       steps_per_epoch=stream.plan.steps_per_epoch,
                       num_examples=stream.num_examples, stats=stream.stats)


def load_eval_arrays(data_cfg, split: str,
                     max_examples: Optional[int] = None
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Whole evaluation split in memory, for kNN / linear-probe evaluation.

  digits: 'train' or 'heldout' (also 'validation'/'test'), upsampled;
  folder: root/split if it exists, else the whole folder; tfds: any split
  name. folder and tfds images are resized (shorter side to image_size /
  eval_crop_fraction) and centre-cropped.

  Args:
    data_cfg: the `data` config section (or its `DataSpec`).
    split: split name.
    max_examples: keep only the first max_examples (None: all).

  Returns:
    (uint8 [N, S, S, 3] images, int32 [N] labels; -1 where unlabelled).
  """
  spec, source = _resolve(data_cfg)
  return source.eval_arrays(spec, split, max_examples)


def eval_splits(data_cfg) -> tuple[str, str]:
  """(memory / training split, query / test split) of the configured source."""
  spec, source = _resolve(data_cfg)
  return source.eval_splits(spec)


def has_heldout_split(data_cfg) -> bool:
  """Whether `eval_splits` names separate sets (else hold out part of one)."""
  spec, source = _resolve(data_cfg)
  return source.has_heldout_split(spec)


def scan_folder(data_cfg, split: Optional[str] = None) -> folder.FolderIndex:
  """`folder.scan_folder` of the `data` config section (see there)."""
  return folder.scan_folder(DataSpec.from_config(data_cfg), split)


def to_global_batch(local_batch: dict[str, np.ndarray],
                    sharding) -> dict[str, jax.Array]:
  """Assembles each process's local batch into global jax.Arrays.

  Args:
    local_batch: this process's batch (leading axis = local examples).
    sharding: a `jax.sharding.Sharding` of the global arrays, typically
      NamedSharding(mesh, P('data')); its leading axis is split over
      processes in process order.

  Returns:
    Dict of global jax.Arrays, leading axis local_batch * process_count.
  """
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      local_batch)
