"""The data entry point: `DataSource`, the configured data opened once per run.

docs/METHOD.md section 1, step 1: every image yields `num_crops` independent
random-resized crops (uint8, `image_size` square); the rest of the
augmentation runs on the device (`mcl_jax.data.augment`). The crop windows
are always drawn here; `data.crop_on` says where they are cut and resized: on
the host ('host': batches carry 'crops'), or in the train step ('device':
batches carry the decoded image in a padded buffer with its size and
windows, and `mcl_jax.data.device_crops` cuts them).

`open_source(config.data)` reads the section once into a frozen `DataSpec`,
picks the source module, checks that its data is there (a missing dataset
fails here, before any set-up) and counts its training examples. The
returned `DataSource` answers every later question of the run (steps per
epoch, labels, the training iterator, evaluation arrays) without opening
the data again.

Sources (`config.data.source`), one module each in this package, each
implementing the `Source` protocol below:
  'tfds'    any TFDS image dataset, read undecoded and decoded with the crop.
  'folder'  root/[split/]class/*.jpg|png|...; files directly in the root are
            unlabelled (label -1).
  'digits'  scikit-learn's 8x8 digits, upsampled; no download.
Sharding and determinism are described in `mcl_jax/data/stream.py`.

TensorFlow is imported lazily (and hidden from every accelerator) so that
importing the rest of the project never needs it.
"""

import dataclasses
import functools
import itertools
from typing import Callable, Optional, Protocol

import jax
import numpy as np

from mcl_jax.data import digits, folder, tfds
from mcl_jax.data.digits import digits_arrays
from mcl_jax.data.spec import DataSpec, DatasetNotFoundError
from mcl_jax.data.stream import ShardPlan, TrainIterator, TrainStream

__all__ = [
    'DataSource', 'DataSpec', 'DatasetNotFoundError', 'SOURCES', 'Source',
    'TrainIterator', 'digits_arrays', 'open_source', 'to_global_batch',
]


class Source(Protocol):
  """What a source module (`digits`, `folder`, `tfds`) answers for a DataSpec."""

  def num_examples(self, spec: DataSpec) -> int:
    """Training examples (tfds: the prepared split, else data.num_train_examples)."""

  def num_classes(self, spec: DataSpec) -> int:
    """Classes of the training split.

    Raises:
      ValueError: the source is unlabelled.
    """

  def train_stream(self, spec: DataSpec, plan_for: Callable[[int], ShardPlan],
                   seed: int, include_index: bool) -> TrainStream:
    """This process's training batches.

    Args:
      spec: the data settings.
      plan_for: num_examples -> this process's `ShardPlan` (the source knows
        its size only once its data is open, so it makes the plan).
      seed: config seed.
      include_index: also emit 'index', the example's position in the source.
    """

  def eval_arrays(self, spec: DataSpec, split: str,
                  max_examples: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """A whole split in memory: uint8 [N, S, S, 3] images, int32 [N] labels (-1: none)."""

  def eval_splits(self, spec: DataSpec) -> tuple[str, str]:
    """(memory / training split, query / test split) for evaluation."""

  def has_heldout_split(self, spec: DataSpec) -> bool:
    """Whether `eval_splits` names separate sets (else part of one is held out)."""


SOURCES: dict[str, Source] = {'tfds': tfds, 'folder': folder, 'digits': digits}


@dataclasses.dataclass(frozen=True)
class DataSource:
  """The configured data of a run, opened once (see `open_source`).

  Attributes:
    spec: the `data` config section, read once.
    source: the source module.
    num_examples: training examples.
  """
  spec: DataSpec
  source: Source
  num_examples: int

  def steps_per_epoch(self, global_batch: int) -> int:
    """Full global batches per epoch (the last partial batch is dropped)."""
    return self.num_examples // int(global_batch)

  def require_labels(self) -> int:
    """Checks that the training source is labelled; returns its class count.

    Raises:
      ValueError: the source has unlabelled images (a folder without class
        subfolders, a tfds dataset without a 'label' feature), or more classes
        than `data.num_classes`.
    """
    num = self.source.num_classes(self.spec)
    if num > self.spec.num_classes:
      raise ValueError(f'data.num_classes={self.spec.num_classes}: the {self.spec.source} '
                       f'source has {num} classes; set '
                       f'--config.data.num_classes={num}.')
    return num

  def train_iterator(self, *, global_batch: int, seed: int, start_step: int = 0,
                     process_index: Optional[int] = None,
                     process_count: Optional[int] = None,
                     include_index: bool = False) -> TrainIterator:
    """Infinite, deterministic iterator of this process's training batches.

    Args:
      global_batch: images per step over all processes.
      seed: base seed; batches depend only on (seed, step).
      start_step: first step to produce (resuming continues the stream
        exactly).
      process_index: this process (default `jax.process_index()`).
      process_count: number of processes (default `jax.process_count()`).
      include_index: add 'index' int64 [local_batch]: the example's position in
        the source (digits: row of `load_digits()`, folder: position in
        `folder.scan_folder(...).paths`, tfds: -1). For tests and debugging.

    Returns:
      A `TrainIterator` of dicts {'crops': uint8 [local_batch, num_crops, S, S,
      3], 'label': int32 [local_batch]}, local_batch = global_batch //
      process_count; with data.crop_on='device', 'image', 'size' and 'windows'
      replace 'crops' (see `TrainIterator`).
    """
    plan_for = functools.partial(
        ShardPlan.create, global_batch=int(global_batch), start_step=start_step,
        process_index=process_index, process_count=process_count)
    stream = self.source.train_stream(self.spec, plan_for, seed, include_index)
    batches = itertools.chain.from_iterable(
        ds.as_numpy_iterator() for ds in stream.datasets)
    return TrainIterator(batches, local_batch=stream.plan.local_batch,
                         steps_per_epoch=stream.plan.steps_per_epoch,
                         num_examples=stream.num_examples, stats=stream.stats)

  def eval_arrays(self, split: str, max_examples: Optional[int] = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Whole evaluation split in memory, for kNN / linear-probe evaluation.

    digits: 'train' or 'heldout' (also 'validation'/'test'), upsampled;
    folder: root/split if it exists, else the whole folder; tfds: any split
    name. folder and tfds images are resized (shorter side to image_size /
    eval_crop_fraction) and centre-cropped.

    Returns:
      (uint8 [N, S, S, 3] images, int32 [N] labels; -1 where unlabelled).
    """
    return self.source.eval_arrays(self.spec, split, max_examples)

  def eval_splits(self) -> tuple[str, str]:
    """(memory / training split, query / test split) of the source."""
    return self.source.eval_splits(self.spec)

  def has_heldout_split(self) -> bool:
    """Whether `eval_splits` names separate sets (else hold out part of one)."""
    return self.source.has_heldout_split(self.spec)


def open_source(data_cfg) -> DataSource:
  """Opens the configured data: checks it is there and counts it.

  tfds data is prepared here when `data.tfds_download_and_prepare` asks for
  it; a folder is scanned (the scan is cached); digits are loaded.

  Args:
    data_cfg: the `data` config section (or its `DataSpec`).

  Raises:
    ValueError: an unknown data.source.
    DatasetNotFoundError: the configured data is missing (the message says
      what to provide).
  """
  spec = DataSpec.from_config(data_cfg)
  try:
    source = SOURCES[spec.source]
  except KeyError:
    raise ValueError(f'unknown data.source {spec.source!r}: expected one of '
                     f'{", ".join(map(repr, SOURCES))}') from None
  if spec.source == 'tfds':
    tfds.builder(spec)  # a missing dataset fails (or is prepared) here
  return DataSource(spec, source, source.num_examples(spec))


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
