"""A COCO-layout folder (local or gs://) read with pycocotools.

The layout is COCO's own::

  ROOT/train2017/*.jpg, ROOT/val2017/*.jpg
  ROOT/annotations/instances_train2017.json, instances_val2017.json

(the digit scenes of `scenes` use the same layout with PNGs). `load_split`
reads one split's annotation file, checks that every image it names is in
the folder (one listing, before anything trains), and maps COCO's category
ids to contiguous indices 0..K-1 in id order.

The training list follows detectron2's protocol: crowd annotations, boxes
with no area after clipping to the image and annotations without a mask
are dropped, and so are the images left with no annotation. Evaluation keeps
every image (COCOeval handles crowds itself). Every problem with the folder
is one `DetectionDataError` line naming the file.
"""

import contextlib
import dataclasses
import functools
import io
import json

import numpy as np

from mcl_jax import errors, paths


class DetectionDataError(errors.RunError, ValueError):
  """Detection data that cannot be read (one line: which file, what is wrong)."""


LAYOUT = ('expected the COCO layout ROOT/{split}/<images> and '
          'ROOT/annotations/instances_{split}.json')


@dataclasses.dataclass
class CocoSplit:
  """One split of a COCO-layout folder.

  Attributes:
    root: the folder.
    split: 'train2017', 'val2017', ...
    coco: the pycocotools COCO object of the split (the evaluation's ground truth).
    image_ids: every image id of the split, sorted (evaluation).
    train_ids: the image ids training uses (protocol filter, see the module doc).
    category_ids: COCO category id of each contiguous class 0..K-1.
    class_names: the categories' names, in the same order.
    area_ranges: COCOeval's areaRng for this data (the annotation file's
      `info.area_ranges`, written by the digit scenes), None for COCO's own.
  """
  root: str
  split: str
  coco: object
  image_ids: list
  train_ids: list
  category_ids: list
  class_names: list
  area_ranges: list | None = None

  @property
  def num_classes(self) -> int:
    return len(self.category_ids)

  @functools.cached_property
  def contiguous_of(self) -> dict:
    """COCO category id -> contiguous class index."""
    return {c: k for k, c in enumerate(self.category_ids)}

  def image_info(self, image_id: int) -> dict:
    return self.coco.imgs[image_id]

  def image_path(self, image_id: int) -> str:
    return paths.join(self.root, self.split, self.coco.imgs[image_id]['file_name'])

  def load_image(self, image_id: int) -> np.ndarray:
    """uint8 [h, w, 3] RGB, decoded with PIL."""
    return decode_image(self.image_path(image_id))

  def training_annotations(self, image_id: int) -> list:
    """The image's annotations that training keeps (non-crowd, non-empty)."""
    info = self.coco.imgs[image_id]
    return [a for a in self.coco.imgToAnns.get(image_id, [])
            if _trainable(a, info['height'], info['width'])]

  def ann_mask(self, ann: dict) -> np.ndarray:
    """uint8 [h, w] full-resolution mask of an annotation (its box if it has none)."""
    info = self.coco.imgs[ann['image_id']]
    if ann.get('segmentation'):
      return self.coco.annToMask(ann)
    mask = np.zeros((info['height'], info['width']), np.uint8)
    x, y, w, h = ann['bbox']
    mask[int(np.floor(y)):int(np.ceil(y + h)), int(np.floor(x)):int(np.ceil(x + w))] = 1
    return mask


def clipped_box(ann: dict, height: int, width: int) -> tuple:
  """The annotation's [x, y, w, h] as (x1, y1, x2, y2) clipped to the image."""
  x, y, w, h = (float(v) for v in ann['bbox'])
  return (min(max(x, 0.0), width), min(max(y, 0.0), height),
          min(max(x + w, 0.0), width), min(max(y + h, 0.0), height))


def _trainable(ann: dict, height: int, width: int) -> bool:
  if ann.get('iscrowd', 0):
    return False
  x1, y1, x2, y2 = clipped_box(ann, height, width)
  if x2 <= x1 or y2 <= y1:
    return False
  seg = ann.get('segmentation', None)
  if isinstance(seg, list):  # polygons: an empty list or polygons of < 3 points
    return any(len(p) >= 6 for p in seg)
  return True  # an RLE (COCO keeps RLE for crowds) or no mask: the box stands in


def decode_image(path: str) -> np.ndarray:
  """uint8 [h, w, 3] RGB of an image file; DetectionDataError if it cannot be decoded."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=import-outside-toplevel
  try:
    data = paths.read_bytes(path)
  except FileNotFoundError as e:
    raise DetectionDataError(f'{path}: image file not found') from e
  try:
    with Image.open(io.BytesIO(data)) as im:
      return np.asarray(im.convert('RGB'))
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
    raise DetectionDataError(f'{path}: cannot decode the image ({type(e).__name__}: '
                             f'{" ".join(str(e).split())}); replace or remove it') from e


def _read_annotations(path: str, split: str) -> dict:
  if not paths.isfile(path):
    raise DetectionDataError(f'{path}: annotation file not found ({LAYOUT.format(split=split)})')
  try:
    dataset = json.loads(paths.read_text(path))
  except (ValueError, UnicodeDecodeError) as e:
    raise DetectionDataError(f'{path}: not valid JSON ({" ".join(str(e).split())})') from e
  if not isinstance(dataset, dict) or not all(
      isinstance(dataset.get(k), list) for k in ('images', 'annotations', 'categories')):
    raise DetectionDataError(f'{path}: not a COCO instances file (it needs the lists '
                             '"images", "annotations" and "categories")')
  return dataset


def _coco(dataset: dict, path: str):
  from pycocotools.coco import COCO  # pylint: disable=import-outside-toplevel
  coco = COCO()
  coco.dataset = dataset
  try:
    with contextlib.redirect_stdout(io.StringIO()):  # "creating index..." per split
      coco.createIndex()
  except (KeyError, TypeError) as e:
    raise DetectionDataError(f'{path}: malformed COCO entry (missing or bad field {e})') from e
  return coco


def _check_images(root: str, split: str, coco, ann_path: str):
  folder = paths.join(root, split)
  if not paths.isdir(folder):
    raise DetectionDataError(f'{folder}: image folder not found ({LAYOUT.format(split=split)})')
  present = set(paths.listdir(folder))
  missing = [im['file_name'] for im in coco.dataset['images'] if im['file_name'] not in present]
  if missing:
    more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
    raise DetectionDataError(f'{paths.join(folder, missing[0])}: image named in {ann_path} is '
                             f'missing from the folder{more}')


def load_split(root: str, split: str) -> CocoSplit:
  """Reads ROOT/annotations/instances_{split}.json and checks ROOT/{split}/.

  Args:
    root: a COCO-layout folder, local or gs://.
    split: e.g. 'train2017' or 'val2017'.

  Returns:
    A CocoSplit.

  Raises:
    DetectionDataError: a missing folder or annotation file, JSON that does
      not parse or is not a COCO instances file, an image it names that the
      folder lacks.
  """
  paths.check_user_path(root, '--config.data.coco_root')
  if not paths.isdir(root):
    raise DetectionDataError(f'{root}: COCO folder not found ({LAYOUT.format(split=split)})')
  ann_path = paths.join(root, 'annotations', f'instances_{split}.json')
  dataset = _read_annotations(ann_path, split)
  coco = _coco(dataset, ann_path)
  _check_images(root, split, coco, ann_path)
  cats = sorted(coco.cats)
  if not cats:
    raise DetectionDataError(f'{ann_path}: no categories')
  image_ids = sorted(coco.imgs)
  train_ids = [i for i in image_ids if any(
      _trainable(a, coco.imgs[i]['height'], coco.imgs[i]['width'])
      for a in coco.imgToAnns.get(i, []))]
  info = dataset.get('info') if isinstance(dataset.get('info'), dict) else {}
  return CocoSplit(root=root, split=split, coco=coco, image_ids=image_ids, train_ids=train_ids,
                   category_ids=cats, class_names=[coco.cats[c]['name'] for c in cats],
                   area_ranges=info.get('area_ranges'))
