"""Tiny ImageNet-2012 archives in the real layout, for preparing tfds's `imagenet2012`.

The layout is that of image-net.org's downloads, which tfds's registered
`imagenet2012` builder reads from its manual dir:
  ILSVRC2012_img_train.tar  one tar per synset, <wnid>.tar, holding
                            <wnid>_<n>.JPEG
  ILSVRC2012_img_val.tar    ILSVRC2012_val_%08d.JPEG (labels come with tfds:
                            its validation_labels.txt, in file-name order)
"""

import io
import os
import tarfile

import numpy as np
from PIL import Image

# Two real synsets (the first two of tfds's labels.txt, i.e. labels 0 and 1).
SYNSETS = ('n01440764', 'n01443537')


def _jpeg(rng, size) -> bytes:
  img = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, 'JPEG', quality=80)
  return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write(manual_dir: str, per_synset: int = 8, num_val: int = 4, size: int = 40,
          seed: int = 0) -> dict:
  """Writes both archives into `manual_dir`; returns {'train': n, 'validation': n}."""
  rng = np.random.default_rng(seed)
  os.makedirs(manual_dir, exist_ok=True)
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_train.tar'), 'w') as train:
    for wnid in SYNSETS:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as synset:
        for i in range(per_synset):
          _add(synset, f'{wnid}_{i + 1}.JPEG', _jpeg(rng, size))
      _add(train, f'{wnid}.tar', inner.getvalue())
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_val.tar'), 'w') as val:
    for i in range(num_val):
      _add(val, f'ILSVRC2012_val_{i + 1:08d}.JPEG', _jpeg(rng, size))
  return {'train': per_synset * len(SYNSETS), 'validation': num_val}
