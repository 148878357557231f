"""`DataSpec`: the `config.data` section, read once; `DatasetNotFoundError`.

Every field a data module reads is here, and every one of them is in the base
config (configs/mcl_100ep.py), so the data code needs no defaults.
"""

import dataclasses
from typing import Optional

from mcl_jax import errors


class DatasetNotFoundError(errors.RunError, ValueError):
  """The configured data is missing; the message says what to provide."""


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """The data settings (see configs/mcl_100ep.py for each field's meaning)."""
  source: str
  train_split: Optional[str]
  eval_split: Optional[str]
  # Crops (cut on the host or, from a padded buffer, on the device).
  image_size: int
  num_crops: int
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  eval_crop_fraction: float
  crop_on: str
  max_side: int
  # tf.data.
  shuffle_buffer: int
  prefetch: int
  num_threads: Optional[int]
  # Labels and sizes.
  num_classes: int
  num_train_examples: int
  # Per source.
  folder: Optional[str]
  digits_heldout_fraction: float
  tfds_name: str
  tfds_data_dir: Optional[str]
  tfds_manual_dir: Optional[str]
  tfds_download_and_prepare: bool

  @classmethod
  def from_config(cls, data_cfg) -> 'DataSpec':
    """Reads the `data` config section (a ConfigDict); a DataSpec passes as is."""
    if isinstance(data_cfg, cls):
      return data_cfg
    d = data_cfg
    return cls(
        source=d.source,
        train_split=d.train_split,
        eval_split=d.eval_split,
        image_size=int(d.image_size),
        num_crops=int(d.num_crops),
        crop_scale=tuple(float(s) for s in d.crop_scale),
        crop_ratio=tuple(float(r) for r in d.crop_ratio),
        eval_crop_fraction=float(d.eval_crop_fraction),
        crop_on=d.crop_on,
        max_side=int(d.max_side),
        shuffle_buffer=int(d.shuffle_buffer),
        prefetch=int(d.prefetch),
        num_threads=int(d.num_threads) if d.num_threads else None,
        num_classes=int(d.num_classes),
        num_train_examples=int(d.num_train_examples),
        folder=d.folder,
        digits_heldout_fraction=float(d.digits_heldout_fraction),
        tfds_name=d.tfds_name,
        tfds_data_dir=d.tfds_data_dir,
        tfds_manual_dir=d.tfds_manual_dir,
        tfds_download_and_prepare=bool(d.tfds_download_and_prepare))
