"""The data sources behind `mcl_jax.input_pipeline`, one module per concern.

* `spec`: `DataSpec`, the `config.data` section read once, and
  `DatasetNotFoundError`.
* `lazy_tf`: TensorFlow, imported on first use and hidden from every GPU.
* `decode`: image decoding (TensorFlow and PIL), random-resized crop windows,
  the evaluation resize, and `DecodeStats`.
* `stream`: the per-process split of a batch (`ShardPlan`,
  `global_position`), per-element seeds, the epoch-permutation stream of an
  indexable source, and `TrainIterator`.
* `digits`, `folder`, `tfds`: the sources. Each answers the same questions
  with the same functions: `num_examples`, `num_classes`, `train_stream`,
  `eval_arrays`, `eval_splits` and `has_heldout_split`.
"""
