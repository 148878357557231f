"""Everything between the stored images and the augmented crops of a step.

* `input_pipeline`: the entry point. `open_source(config.data)` opens the
  configured data once and returns a `DataSource` (counts, the training
  iterator, evaluation arrays); `Source` is the protocol each source module
  implements; `to_global_batch` (host -> devices).
* `digits`, `folder`, `tfds`: the sources.
* `spec`: `DataSpec`, the `config.data` section read once, and
  `DatasetNotFoundError`.
* `stream`: the per-process split of a batch (`ShardPlan`,
  `global_position`), per-element seeds, the epoch-permutation stream of an
  indexable source, and `TrainIterator`.
* `decode`: image decoding (TensorFlow and PIL), random-resized crop windows,
  the evaluation resize, and `DecodeStats`.
* `device_crops`: `data.crop_on='device'`, the crops cut and resized inside
  the train step.
* `augment`: the device-side augmentation of the crops (flip, colour jitter,
  grayscale, blur, solarize).
* `segmentation`: the dense probe's data (digit scenes, VOC-layout folders).
* `lazy_tf`: TensorFlow, imported on first use and hidden from every
  accelerator.
"""
