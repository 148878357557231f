"""The training stream: per-process sharding, element seeds, batching.

Determinism. Every random choice is a stateless op seeded from
(seed, epoch, global element position), so a batch depends only on
(seed, step) and never on thread scheduling. For the indexable sources
(folder, digits) epoch e visits a seeded permutation of the examples; batch b
of that epoch is permutation[b * G : (b + 1) * G] (G = global batch) and
process p reads the p-th 1/process_count slice of it, so processes read
disjoint parts that together cover the epoch (less the final partial batch)
and the union of a step's local batches does not depend on process_count.
`start_step` resumes at epoch = step // steps_per_epoch and skips the
consumed indices of that epoch before anything is read or decoded. TFDS
record files are read as a stream instead (data/tfds.py): each process reads
its own even split, shuffled per epoch, and skips consumed records (undecoded)
when resuming. A file that passes the folder scan but then fails to decode is
dropped from the stream (and counted), which shifts the later batches of that
run; resuming stays exact on data without such files.

Owns `ShardPlan` (which process reads which part of each global batch, and
where a resumed run starts) with `global_position`, `element_seed`,
`indexed_stream` (the epoch permutations of an indexable source), `batched`
(drop failures, batch, prefetch), the tf.data options, `TrainStream` (what a
source's `train_stream` returns) and `TrainIterator`.
"""

import dataclasses
from typing import Any, Iterable, Iterator, NamedTuple, Optional

import jax
import numpy as np

from mcl_jax.data.decode import DecodeStats
from mcl_jax.data.lazy_tf import tf as _tf
from mcl_jax.data.spec import DataSpec


@dataclasses.dataclass(frozen=True)
class ShardPlan:
  """How the global batches of an epoch map to processes.

  Process p reads positions [p * local_batch, (p + 1) * local_batch) of every
  global batch (see the module docstring).

  Attributes:
    global_batch: examples per step over all processes.
    local_batch: examples per step of this process.
    process_index: this process.
    process_count: number of processes.
    steps_per_epoch: full global batches per epoch.
    start_epoch: epoch of the first step produced.
    start_offset: elements of start_epoch this process has already consumed.
  """
  global_batch: int
  local_batch: int
  process_index: int
  process_count: int
  steps_per_epoch: int
  start_epoch: int
  start_offset: int

  @classmethod
  def create(cls, num_examples: int, *, global_batch: int, start_step: int,
             process_index: Optional[int],
             process_count: Optional[int]) -> 'ShardPlan':
    """The plan of this process (default: jax's process index and count)."""
    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
    if global_batch % process_count:
      raise ValueError(f'global_batch {global_batch} is not divisible by '
                       f'process_count {process_count}')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} not in '
                       f'[0, {process_count})')
    spe = num_examples // global_batch
    if spe == 0:
      raise ValueError(f'{num_examples} training examples are fewer than one '
                       f'global batch of {global_batch}')
    local = global_batch // process_count
    epoch, step_in_epoch = divmod(int(start_step), spe)
    return cls(global_batch, local, process_index, process_count, spe,
               epoch, step_in_epoch * local)


def global_position(pos, plan: ShardPlan):
  """Position in the epoch's global order of this process's pos-th element."""
  return ((pos // plan.local_batch) * plan.global_batch +
          plan.process_index * plan.local_batch + pos % plan.local_batch)


def element_seed(seed: int, epoch, position):
  """Stateless seed of one element from (seed, epoch, global position)."""
  tf = _tf()
  base = tf.stack([tf.constant(seed, tf.int64),
                   2 * tf.cast(epoch, tf.int64) + 1])
  return tf.random.experimental.stateless_fold_in(
      base, tf.cast(position, tf.int64))


def dataset_options(spec: DataSpec):
  """Deterministic tf.data options with the configured thread pool."""
  tf = _tf()
  opts = tf.data.Options()
  opts.deterministic = True
  if spec.num_threads:
    opts.threading.private_threadpool_size = spec.num_threads
  # One thread per op: parallelism comes from elements, not within a decode.
  opts.threading.max_intra_op_parallelism = 1
  return opts


def batched(ds, spec: DataSpec, local_batch: int):
  """Drops failed elements, batches, prefetches."""
  tf = _tf()
  # Last line of defence: an element whose TensorFlow decode raises (a JPEG
  # damaged past its header and end marker) is dropped with a logged warning
  # instead of ending training.
  ds = ds.ignore_errors(log_warning=True)
  ds = ds.filter(lambda ex: ex['ok'])
  ds = ds.map(lambda ex: {k: v for k, v in ex.items() if k != 'ok'})
  if spec.crop_on == 'device':
    # Each image is padded into its max_side^2 buffer as it is copied into
    # the batch (see decode.device_buffer); every other entry has its shape.
    m = spec.max_side
    shapes = {k: ([m, m, 3] if k == 'image' else v.shape)
              for k, v in ds.element_spec.items()}
    ds = ds.padded_batch(local_batch, padded_shapes=shapes, drop_remainder=True)
  else:
    ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.prefetch(spec.prefetch or tf.data.AUTOTUNE)
  return ds.with_options(dataset_options(spec))


def indexed_stream(num_examples: int, plan: ShardPlan, seed: int,
                   element_fn, include_index: bool, spec: DataSpec,
                   source_ids=None):
  """Epoch permutations of range(N), this process's slice, mapped.

  Args:
    num_examples: N.
    plan: this process's `ShardPlan`.
    seed: config seed.
    element_fn: (i, element_seed) -> (image features, label, ok), i in
      [0, N); the features are a dict (`decode.decode_features`).
    include_index: also emit 'index': source_ids[i], or i when None.
    spec: the data settings.
    source_ids: optional int64 [N] tensor mapping i to the source's own id.

  Returns:
    The batched tf.data.Dataset (infinite).
  """
  tf = _tf()
  n_used = plan.steps_per_epoch * plan.global_batch
  lo = plan.process_index * plan.local_batch

  def epoch_indices(epoch):
    perm = tf.random.experimental.stateless_shuffle(
        tf.range(num_examples, dtype=tf.int64),
        seed=tf.stack([tf.constant(seed, tf.int64), 2 * epoch]))
    # Batch b of the epoch is perm[b*G:(b+1)*G]; this process reads its slice.
    mine = tf.reshape(perm[:n_used], [plan.steps_per_epoch, plan.global_batch])
    mine = tf.reshape(mine[:, lo:lo + plan.local_batch], [-1])
    pos = tf.range(tf.size(mine, out_type=tf.int64), dtype=tf.int64)
    ds = tf.data.Dataset.from_tensor_slices(
        (mine, global_position(pos, plan), tf.fill(tf.shape(mine), epoch)))
    # Resuming: drop consumed indices before anything is read or decoded.
    return ds.skip(tf.where(epoch == plan.start_epoch,
                            tf.constant(plan.start_offset, tf.int64),
                            tf.constant(0, tf.int64)))

  ds = tf.data.Dataset.range(plan.start_epoch, 2**62).flat_map(epoch_indices)

  def load(i, position, epoch):
    features, label, ok = element_fn(i, element_seed(seed, epoch, position))
    ex = dict(features, label=tf.cast(label, tf.int32), ok=ok)
    if include_index:
      ex['index'] = i if source_ids is None else tf.gather(source_ids, i)
    return ex

  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return batched(ds, spec, plan.local_batch)


class TrainStream(NamedTuple):
  """What a source's `train_stream` returns.

  Attributes:
    datasets: batched tf.data.Datasets, read one after the other.
    plan: this process's `ShardPlan`.
    num_examples: training examples of the source.
    stats: `DecodeStats` of skipped files.
  """
  datasets: Iterable[Any]
  plan: ShardPlan
  num_examples: int
  stats: DecodeStats


class TrainIterator:
  """Infinite iterator of local batches.

  Yields dicts with 'label' int32 [local_batch] (plus 'index' int64 when
  requested) and the image features: data.crop_on='host': 'crops' uint8
  [local_batch, num_crops, S, S, 3]; 'device': 'image' uint8 [local_batch,
  max_side, max_side, 3], 'size' int32 [local_batch, 2] and 'windows'
  float32 [local_batch, num_crops, 4] (see `mcl_jax.data.device_crops`).

  Attributes:
    local_batch: examples per yielded batch.
    steps_per_epoch: global steps per epoch.
    num_examples: training examples of the source.
    stats: `DecodeStats` of skipped files.
  """

  def __init__(self, batches: Iterator[dict[str, np.ndarray]], *,
               local_batch: int, steps_per_epoch: int, num_examples: int,
               stats: DecodeStats):
    self._batches = batches
    self.local_batch = local_batch
    self.steps_per_epoch = steps_per_epoch
    self.num_examples = num_examples
    self.stats = stats

  @property
  def num_skipped(self) -> int:
    """Files skipped so far (unreadable at scan + failed decodes)."""
    return self.stats.total

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._batches)
