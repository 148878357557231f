"""COCO evaluation of the detector's padded outputs (pycocotools' COCOeval).

`detections_to_coco` turns one batch of the model's predictions (canvas
pixels, fixed D detections per image, a `valid` flag) into COCO result
entries in the original image's coordinates: boxes are scaled by the
original / resized size per axis (detectron2's detector_postprocess) and
clipped, masks are pasted at the original resolution at 0.5
(`mask_targets.paste_masks`) and RLE-encoded. `evaluate` scores a list of
entries for boxes and masks; `format_table` prints one or more models'
scores side by side.
"""

import contextlib
import copy
import io
import logging

import numpy as np

from mcl_jax.detection import mask_targets

METRICS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')
IOU_TYPES = ('bbox', 'segm')
_log = logging.getLogger(__name__)


def detections_to_coco(outputs: dict, batch: dict, contiguous_to_category_id) -> list:
  """COCO result entries of one batch's predictions.

  Args:
    outputs: the model's predict dict, NumPy (or arrays NumPy can read):
      boxes [B, D, 4] canvas pixels, scores [B, D], classes int [B, D]
      (contiguous), valid bool [B, D], masks [B, D, s, s] probabilities.
    batch: the batch the predictions are for (image_id, image_hw, orig_hw).
    contiguous_to_category_id: COCO category id of each contiguous class.

  Returns:
    [{'image_id', 'category_id', 'bbox' [x, y, w, h], 'score',
      'segmentation' (RLE, counts as str)}], nothing for invalid detections
    or padding examples (image_id -1).
  """
  from pycocotools import mask as mask_util  # pylint: disable=import-outside-toplevel
  out = {k: np.asarray(v) for k, v in outputs.items()}
  cats = np.asarray(contiguous_to_category_id)
  results = []
  for b, image_id in enumerate(np.asarray(batch['image_id'])):
    keep = np.flatnonzero(out['valid'][b])
    if image_id < 0 or not keep.size:
      continue
    (rh, rw), (oh, ow) = np.asarray(batch['image_hw'][b]), np.asarray(batch['orig_hw'][b])
    boxes = out['boxes'][b, keep].astype(np.float64) * (ow / rw, oh / rh, ow / rw, oh / rh)
    boxes = np.clip(boxes, 0, (ow, oh, ow, oh))
    masks = mask_targets.paste_masks(out['masks'][b, keep], boxes, (oh, ow))
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for j, d in enumerate(keep):
      x1, y1, x2, y2 = (float(v) for v in boxes[j])
      results.append({
          'image_id': int(image_id),
          'category_id': int(cats[int(out['classes'][b, d])]),
          'bbox': [x1, y1, x2 - x1, y2 - y1],
          'score': float(out['scores'][b, d]),
          'segmentation': {'size': [int(v) for v in rles[j]['size']],
                           'counts': rles[j]['counts'].decode('ascii')},
      })
  return results


def _zeros() -> dict:
  return {k: 0.0 for k in METRICS}


def evaluate(coco_gt, results: list, area_ranges=None) -> dict:
  """Box and mask AP of COCO result entries (COCOeval; its printout goes to the log).

  Args:
    coco_gt: the split's pycocotools COCO (`coco.CocoSplit.coco`).
    results: entries as `detections_to_coco` makes them.
    area_ranges: COCOeval's areaRng ([all, small, medium, large], each
      [lo, hi] in px of area) for data whose objects are not sized like
      COCO's (`CocoSplit.area_ranges`); None keeps COCO's.

  Returns:
    {'bbox': {AP, AP50, AP75, APs, APm, APl}, 'segm': {...}} as fractions;
    zeros for no results. A size bin without ground truth scores 0 (COCOeval
    reports -1).
  """
  from pycocotools.cocoeval import COCOeval  # pylint: disable=import-outside-toplevel
  if not results:
    return {t: _zeros() for t in IOU_TYPES}
  scores = {}
  for iou_type in IOU_TYPES:
    # loadRes adds 'area' (and for segm a 'bbox') to the entries it is given.
    entries = copy.deepcopy(results)
    if iou_type == 'bbox':
      for e in entries:
        e.pop('segmentation', None)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
      coco_dt = coco_gt.loadRes(entries)
      ev = COCOeval(coco_gt, coco_dt, iou_type)
      if area_ranges is not None:
        ev.params.areaRng = [list(map(float, r)) for r in area_ranges]
      ev.evaluate()
      ev.accumulate()
      ev.summarize()
    _log.info('COCOeval %s:\n%s', iou_type, text.getvalue().rstrip())
    scores[iou_type] = {k: max(float(v), 0.0) for k, v in zip(METRICS, ev.stats[:6])}
  return scores


def format_table(rows: dict) -> str:
  """The box and mask AP table, models side by side (percent, one decimal).

  Args:
    rows: model name -> `evaluate`'s result.

  Returns:
    The table as text, one line per model.
  """
  names = list(rows)
  width = max([len(n) for n in names] + [5])
  head = (f'{"model":<{width}} | ' + ' '.join(f'{"box " + m:>8}' for m in METRICS) + ' | '
          + ' '.join(f'{"mask " + m:>9}' for m in METRICS))
  lines = [head, '-' * len(head)]
  for name in names:
    r = rows[name]
    lines.append(f'{name:<{width}} | '
                 + ' '.join(f'{100 * r["bbox"][m]:8.1f}' for m in METRICS) + ' | '
                 + ' '.join(f'{100 * r["segm"][m]:9.1f}' for m in METRICS))
  return '\n'.join(lines)
