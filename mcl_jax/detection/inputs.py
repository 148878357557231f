"""The host input pipeline of detection: COCO-layout images to padded batches.

Per image (detectron2's protocol, with static shapes):

* resize: the short side to a target (drawn from
  `config.data.train_short_sides` in training, `test_short_side` for
  evaluation) unless the long side would pass `max_long_side`
  (`resize_shape`, detectron2's ResizeShortestEdge); PIL bilinear.
* flip: horizontal with probability `flip_p` (training), image, boxes and
  masks together.
* pad: the resized image at the top-left of the smallest canvas of
  `config.data.canvas_sizes` that holds it, zeros elsewhere.
* ground truth: boxes (x1, y1, x2, y2) in canvas pixels, contiguous classes,
  padded to `max_gt` (an image with more keeps its largest boxes); masks
  box-local: each instance's mask cropped to its own box and resampled to
  M x M (`mask_size`), then >= 0.5.

Box-local masks are the one static departure from detectron2, which keeps
COCO's polygons and rasterises each one inside each proposal box. Here the
crop-and-resample happens once on the host: the M x M grid of bin centres of
the box is sampled bilinearly (half-pixel centres, edges clamped) from the
full-resolution mask of the original image (pycocotools' annToMask) and
thresholded; the device then resamples that M x M mask into each proposal
(`mask_targets`). Sampling the original mask at the box's positions is the
crop of the resized mask without a second interpolation; a flip mirrors the
M x M mask's columns, which is exactly the crop of the flipped mask.

Batches: one canvas per batch (every process of a step agrees on it: the
canvas is drawn from the seed and the step alone). Images are grouped by the
canvases they need at every training short side (detectron2 groups by
aspect ratio; here a group is images that share a canvas at each scale), a
step draws a group (in proportion to its size) and one short side for the
whole batch, and each process takes its next images of that group from its
own shard, in epochs of a seeded permutation. Everything is a function of
(seed, step): a resumed run sees the same batches.
"""

import collections
import concurrent.futures
import functools
import logging
import math
import os

import numpy as np

from mcl_jax.detection import coco as coco_lib
from mcl_jax.errors import UsageError

BLOCK = 1024  # steps per block of group draws (see _GroupSchedule)
_log = logging.getLogger(__name__)
_WARNED = set()


def resize_shape(h: int, w: int, short: int, max_long: int) -> tuple[int, int]:
  """(new_h, new_w) of detectron2's ResizeShortestEdge, in its arithmetic order.

  The short side becomes `short` and the other side scales with it; if the
  long side then passes `max_long`, both are scaled down so it equals
  `max_long`. Each side is rounded half up last. (Scaling the already
  scaled sides, as detectron2 does, rounds differently from one combined
  scale in a few sizes per hundred thousand; this follows detectron2.)
  """
  scale = short / min(h, w)
  new_h, new_w = (short, scale * w) if h < w else (scale * h, short)
  if max(new_h, new_w) > max_long:
    scale = max_long / max(new_h, new_w)
    new_h, new_w = new_h * scale, new_w * scale
  return int(new_h + 0.5), int(new_w + 0.5)


def check_canvas_sizes(canvas_sizes) -> tuple:
  """The canvases as ((H, W), ...); UsageError unless each is a positive multiple of 32."""
  sizes = tuple((int(h), int(w)) for h, w in canvas_sizes)
  if not sizes or any(h <= 0 or w <= 0 or h % 32 or w % 32 for h, w in sizes):
    raise UsageError(f'config.data.canvas_sizes={sizes}: need one or more (H, W), each a '
                     'positive multiple of 32')
  return sizes


def choose_canvas(hw, canvas_sizes) -> tuple[int, int]:
  """The smallest (by area, then H) canvas that holds an image of size hw."""
  fits = [c for c in canvas_sizes if c[0] >= hw[0] and c[1] >= hw[1]]
  if not fits:
    raise UsageError(f'a resized image of {hw[0]}x{hw[1]} fits none of config.data.canvas_sizes='
                     f'{tuple(canvas_sizes)}: add a canvas of at least that size (multiples of '
                     '32) or lower config.data.max_long_side')
  return min(fits, key=lambda c: (c[0] * c[1], c[0]))


# (long side / short side) buckets for COCO's images: 1:1, 4:3, 3:2 and 16:9.
COCO_ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9)


def propose_canvases(short_sides, aspects=COCO_ASPECTS, max_long: int = 1333) -> tuple:
  """Canvases for images of the given aspect ratios at the given short sides.

  For each short side s and aspect a, the landscape canvas
  (ceil32(s), ceil32(min(s a, max_long))) and its portrait transpose. An
  image resized to a short side s' <= s whose aspect is at most a fits it, so
  `choose_canvas` picks the tightest of these; benchmarks/detection_input.py
  reports the padding each set costs on COCO-like image sizes.
  """
  def up(x):
    return int(math.ceil(x / 32) * 32)
  out = set()
  for s in short_sides:
    for a in aspects:
      h, w = up(s), up(min(s * a, max_long))
      out |= {(h, w), (w, h)}
  return tuple(sorted(out))


# ------------------------------------------------------------------ masks --


def _sample_points(lo: float, hi: float, m: int, n: int):
  """(left pixel, right pixel, right weight) of the m bin centres of [lo, hi] on n pixels.

  Half-pixel centres (pixel i covers [i, i + 1]); positions are clamped to
  the edge pixels.
  """
  x = np.clip(lo + (np.arange(m) + 0.5) * (hi - lo) / m - 0.5, 0, n - 1)
  x0 = np.floor(x).astype(np.intp)
  return x0, np.minimum(x0 + 1, n - 1), x - x0


def crop_and_resize(mask: np.ndarray, box, m: int) -> np.ndarray:
  """float [m, m]: `mask` sampled bilinearly at the bin centres of `box` (x1, y1, x2, y2).

  Four gathers of m x m pixels (no matrix products: BLAS threads would fight
  the loader's threads for the cores).
  """
  h, w = mask.shape
  x1, y1, x2, y2 = (float(v) for v in box)
  ya, yb, fy = _sample_points(y1, y2, m, h)
  xa, xb, fx = _sample_points(x1, x2, m, w)
  top, bottom = mask[ya].astype(np.float64), mask[yb].astype(np.float64)
  fx = fx[None, :]
  rows_a = top[:, xa] * (1 - fx) + top[:, xb] * fx
  rows_b = bottom[:, xa] * (1 - fx) + bottom[:, xb] * fx
  return rows_a * (1 - fy[:, None]) + rows_b * fy[:, None]


def box_local_mask(mask: np.ndarray, box, m: int, flip: bool) -> np.ndarray:
  """uint8 [m, m] box-local mask (>= 0.5), mirrored if the image is flipped."""
  out = (crop_and_resize(mask, box, m) >= 0.5).astype(np.uint8)
  return out[:, ::-1] if flip else out


# --------------------------------------------------------------- examples --


def _warn_once(key, msg, *args):
  if key not in _WARNED:
    _WARNED.add(key)
    _log.warning(msg, *args)


def padding_example(canvas, max_gt: int, mask_size: int) -> dict:
  """An example that is no image (image_id -1): fills a partial evaluation batch."""
  return {
      'images': np.zeros((*canvas, 3), np.uint8),
      'image_hw': np.zeros(2, np.int32),
      'gt_boxes': np.zeros((max_gt, 4), np.float32),
      'gt_classes': np.full(max_gt, -1, np.int32),
      'gt_valid': np.zeros(max_gt, bool),
      'gt_masks': np.zeros((max_gt, mask_size, mask_size), np.uint8),
      'image_id': np.int64(-1),
      'scale': np.float32(0.0),
      'orig_hw': np.zeros(2, np.int32),
  }


def _resize_image(image: np.ndarray, hw) -> np.ndarray:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  if image.shape[:2] == tuple(hw):
    return image
  return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.BILINEAR))


def prepare_example(split, image_id: int, short: int, flip: bool, canvas, data_cfg,
                    with_gt: bool = True) -> dict:
  """One image of `split` as a padded example (the batch's keys without B).

  Args:
    split: a coco.CocoSplit.
    image_id: COCO image id.
    short: the target short side.
    flip: flip horizontally.
    canvas: (H, W) that holds the resized image.
    data_cfg: config.data (max_long_side, max_gt, mask_size).
    with_gt: fill the ground truth (the training filter's instances); False
      leaves it as padding (evaluation needs only the image).
  """
  info = split.image_info(image_id)
  oh, ow = int(info['height']), int(info['width'])
  nh, nw = resize_shape(oh, ow, short, int(data_cfg.max_long_side))
  if nh > canvas[0] or nw > canvas[1]:
    raise UsageError(f'image {image_id} resized to {nh}x{nw} does not fit the canvas {canvas}: '
                     'check config.data.canvas_sizes')
  g, m = int(data_cfg.max_gt), int(data_cfg.mask_size)
  ex = padding_example(canvas, g, m)
  image = split.load_image(image_id)
  if image.shape[:2] != (oh, ow):
    raise coco_lib.DetectionDataError(
        f'{split.image_path(image_id)}: image is {image.shape[1]}x{image.shape[0]} but the '
        f'annotation file says {ow}x{oh}')
  image = _resize_image(image, (nh, nw))
  ex['images'][:nh, :nw] = image[:, ::-1] if flip else image
  ex['image_hw'] = np.array([nh, nw], np.int32)
  ex['image_id'] = np.int64(image_id)
  ex['scale'] = np.float32(nh / oh if oh <= ow else nw / ow)  # resized / original short side
  ex['orig_hw'] = np.array([oh, ow], np.int32)
  if with_gt:
    _fill_gt(ex, split, image_id, (oh, ow), (nh, nw), flip, g, m)
  return ex


def _fill_gt(ex, split, image_id, orig_hw, new_hw, flip, g, m):
  anns = split.training_annotations(image_id)
  boxes = np.array([coco_lib.clipped_box(a, *orig_hw) for a in anns], np.float64).reshape(-1, 4)
  if len(anns) > g:
    _warn_once('max_gt', 'an image has %d instances, more than config.data.max_gt=%d: keeping '
               'the largest boxes (logged once)', len(anns), g)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = np.sort(np.argsort(-areas, kind='stable')[:g])
    anns, boxes = [anns[i] for i in keep], boxes[keep]
  sy, sx = new_hw[0] / orig_hw[0], new_hw[1] / orig_hw[1]
  contiguous = split.contiguous_of
  for i, ann in enumerate(anns):
    x1, y1, x2, y2 = boxes[i] * (sx, sy, sx, sy)
    if flip:
      x1, x2 = new_hw[1] - x2, new_hw[1] - x1
    ex['gt_boxes'][i] = (x1, y1, x2, y2)
    ex['gt_classes'][i] = contiguous[ann['category_id']]
    ex['gt_valid'][i] = True
    ex['gt_masks'][i] = box_local_mask(split.ann_mask(ann), boxes[i], m, flip)


def make_batch(examples: list) -> dict:
  """Stacks examples that share one canvas into the batch dict (the keys of `MaskRCNN.__call__`'s batch)."""
  shapes = {e['images'].shape for e in examples}
  if len(shapes) != 1:
    raise ValueError(f'make_batch: examples on different canvases {sorted(shapes)}')
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


# -------------------------------------------------------------- iterators --


def _shard(ids: list, process_index: int, process_count: int) -> list:
  """This process's part of `ids`; a group smaller than the process count is shared."""
  part = ids[process_index::process_count]
  return part if part else list(ids)


class _GroupSchedule:
  """Which group each step draws, and how many times a group was drawn before a step.

  Group draws come in blocks of BLOCK steps from one generator per block, so
  the count before step t (for the epoch position of a resumed run) is a sum
  over t // BLOCK blocks, not a replay of t generators.
  """

  def __init__(self, seed: int, sizes):
    self.seed = seed
    self.p = np.asarray(sizes, np.float64) / np.sum(sizes)
    self._blocks = {}

  def block(self, b: int) -> np.ndarray:
    if b not in self._blocks:
      rng = np.random.default_rng([self.seed, 0x6A7, b])
      self._blocks[b] = rng.choice(len(self.p), size=BLOCK, p=self.p)
    return self._blocks[b]

  def group(self, step: int) -> int:
    return int(self.block(step // BLOCK)[step % BLOCK])

  def count_before(self, group: int, step: int) -> int:
    b, r = divmod(step, BLOCK)
    return (sum(int(np.sum(self.block(i) == group)) for i in range(b))
            + int(np.sum(self.block(b)[:r] == group)))


def training_groups(split, data_cfg) -> tuple[list, list]:
  """(group keys, [image ids per group]): images sharing a canvas at every train short side."""
  sizes = check_canvas_sizes(data_cfg.canvas_sizes)
  shorts = tuple(int(s) for s in data_cfg.train_short_sides)
  groups = collections.defaultdict(list)
  for i in split.train_ids:
    info = split.image_info(i)
    key = tuple(choose_canvas(resize_shape(info['height'], info['width'], s,
                                           int(data_cfg.max_long_side)), sizes) for s in shorts)
    groups[key].append(i)
  keys = sorted(groups)
  return keys, [groups[k] for k in keys]


def _workers() -> int:
  return max(1, min(8, (os.cpu_count() or 1)))


def _prefetched(jobs, pool, depth: int = 2):
  """Yields make_batch of each job (a list of thunks), `depth` batches ahead."""
  pending = collections.deque()
  for job in jobs:
    pending.append([pool.submit(f) for f in job])
    if len(pending) > depth:
      yield make_batch([f.result() for f in pending.popleft()])
  while pending:
    yield make_batch([f.result() for f in pending.popleft()])


def train_plan(split, data_cfg, process_index: int, process_count: int,
               per_process_batch: int, seed: int, start_step: int = 0):
  """Yields forever (step, canvas, short side, [(image id, flip)]) of this process."""
  if not split.train_ids:
    raise coco_lib.DetectionDataError(f'{split.root}: split {split.split} has no image with a '
                                      'trainable annotation')
  keys, members = training_groups(split, data_cfg)
  shorts = tuple(int(s) for s in data_cfg.train_short_sides)
  schedule = _GroupSchedule(seed, [len(m) for m in members])
  shards = [_shard(m, process_index, process_count) for m in members]
  perms = {}

  def image_at(g, k):
    """The k-th image this process draws from group g: epochs of seeded permutations."""
    epoch, pos = divmod(k, len(shards[g]))
    if (g, epoch) not in perms:
      if len(perms) > 64:
        perms.clear()
      rng = np.random.default_rng([seed, 0x5E1, g, process_index, epoch])
      perms[(g, epoch)] = rng.permutation(len(shards[g]))
    return shards[g][perms[(g, epoch)][pos]]

  step, drawn = start_step, {}
  while True:
    g = schedule.group(step)
    if g not in drawn:
      drawn[g] = schedule.count_before(g, step)
    short = shorts[np.random.default_rng([seed, 0x5D, step]).integers(len(shorts))]
    flips = np.random.default_rng([seed, 0xF1, step, process_index]).random(per_process_batch)
    k0 = drawn[g] * per_process_batch
    items = [(image_at(g, k0 + j), bool(flips[j] < float(data_cfg.flip_p)))
             for j in range(per_process_batch)]
    drawn[g] += 1
    yield step, keys[g][shorts.index(short)], short, items
    step += 1


def train_batches(split, config, process_index: int, process_count: int,
                  per_process_batch: int, seed: int, start_step: int = 0, workers=None):
  """Training batches of this process, forever, from `start_step` on.

  Args:
    split: the training coco.CocoSplit.
    config: the run config (config.data.* as in the module doc).
    process_index, process_count: this process among all (jax.process_index()...).
    per_process_batch: images per batch on this process.
    seed: with the step, determines every batch.
    start_step: the first step (resume).
    workers: decoding threads (default: the CPU count, at most 8).

  Yields:
    Batch dicts (see `make_batch`); all processes' batches of one step share
    one canvas.
  """
  data_cfg = config.data
  plan = train_plan(split, data_cfg, process_index, process_count, per_process_batch, seed,
                    start_step)
  jobs = ([functools.partial(prepare_example, split, i, short, flip, canvas, data_cfg)
           for i, flip in items] for _, canvas, short, items in plan)
  with concurrent.futures.ThreadPoolExecutor(workers or _workers()) as pool:
    yield from _prefetched(jobs, pool)


def eval_plan(split, data_cfg, process_index: int, process_count: int,
              per_process_batch: int):
  """[(canvas, [image id or None for padding])] of this process, over every image once.

  Images are grouped by their canvas at the test short side; every process
  has the same number of batches per canvas (its shard of that canvas's
  images, then padding), so the processes' batches line up step by step.
  """
  sizes = check_canvas_sizes(data_cfg.canvas_sizes)
  short, max_long = int(data_cfg.test_short_side), int(data_cfg.max_long_side)
  groups = collections.defaultdict(list)
  for i in split.image_ids:
    info = split.image_info(i)
    groups[choose_canvas(resize_shape(info['height'], info['width'], short, max_long),
                         sizes)].append(i)
  plan = []
  for canvas in sorted(groups):
    ids = groups[canvas]
    mine = ids[process_index::process_count]
    n = math.ceil(math.ceil(len(ids) / process_count) / per_process_batch)
    mine = mine + [None] * (n * per_process_batch - len(mine))
    plan += [(canvas, mine[b * per_process_batch:(b + 1) * per_process_batch])
             for b in range(n)]
  return plan


def eval_batches(split, config, process_index: int, process_count: int,
                 per_process_batch: int, with_gt: bool = False, workers=None):
  """Every image of `split` once (this process's shard) at the test short side.

  Partial batches are filled with padding examples (image_id -1). Ground
  truth is left as padding unless `with_gt` (COCOeval reads the annotation
  file instead).
  """
  data_cfg = config.data
  short = int(data_cfg.test_short_side)
  g, m = int(data_cfg.max_gt), int(data_cfg.mask_size)

  def job(canvas, ids):
    return [functools.partial(prepare_example, split, i, short, False, canvas, data_cfg, with_gt)
            if i is not None else functools.partial(padding_example, canvas, g, m)
            for i in ids]

  plan = eval_plan(split, data_cfg, process_index, process_count, per_process_batch)
  with concurrent.futures.ThreadPoolExecutor(workers or _workers()) as pool:
    yield from _prefetched((job(c, ids) for c, ids in plan), pool)
