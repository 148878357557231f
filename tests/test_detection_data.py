"""Detection data: digit scenes, the COCO-layout reader, the host pipeline, COCO evaluation."""

import copy
import json
import math
import os
import shutil

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mcl_jax.detection import coco as coco_lib
from mcl_jax.detection import coco_eval, inputs, mask_targets, scenes
from tests.tolerance import assert_close, tol

SCENES = scenes.scene_config(num_train=24, num_val=12, image_size=64, digits_per_scene=(2, 4),
                             sides=(5, 28), seed=3)


def data_config(**overrides):
  d = dict(train_short_sides=(48, 64, 80), test_short_side=64, max_long_side=107,
           canvas_sizes=((64, 64), (96, 96)), flip_p=0.5, max_gt=6, mask_size=16)
  d.update(overrides)
  return ml_collections.ConfigDict({'data': d})


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  return scenes.ensure_scenes(SCENES, str(tmp_path_factory.mktemp('scenes')))


@pytest.fixture(scope='module')
def val(root):
  return coco_lib.load_split(root, 'val2017')


@pytest.fixture(scope='module')
def train(root):
  return coco_lib.load_split(root, 'train2017')


def _files(folder):
  out = {}
  for d, _, names in os.walk(folder):
    for n in names:
      with open(os.path.join(d, n), 'rb') as f:
        out[os.path.relpath(os.path.join(d, n), folder)] = f.read()
  return out


def _copy(root, tmp_path):
  dst = str(tmp_path / 'copy')
  shutil.copytree(root, dst)
  return dst


# ------------------------------------------------------------------ scenes --


def test_scenes_deterministic_and_reused(root, tmp_path):
  again = scenes.ensure_scenes(SCENES, str(tmp_path))
  assert os.path.basename(again) == os.path.basename(root)
  assert _files(again) == _files(root)  # same settings, same bytes
  marker = os.path.join(again, scenes.MARKER)
  stamp = os.stat(marker).st_mtime_ns
  assert scenes.ensure_scenes(SCENES, str(tmp_path)) == again
  assert os.stat(marker).st_mtime_ns == stamp  # reused, not rewritten
  other = scenes.scene_config(**{**SCENES.to_dict(), 'seed': 4, 'num_train': 2, 'num_val': 1})
  assert scenes.scenes_folder(other, str(tmp_path)) != again
  assert sorted(os.listdir(tmp_path)) == [os.path.basename(again)]  # no temporary left


def test_scene_annotations(train, val):
  from pycocotools import mask as mask_util  # pylint: disable=import-outside-toplevel
  assert train.class_names == [str(d) for d in range(10)] and train.num_classes == 10
  assert len(train.image_ids) == 24 and len(val.image_ids) == 12
  # The first training scene, rendered again from the same draws.
  images8, labels, splits = scenes.digits_arrays(SCENES.heldout_fraction)
  rows = splits['train']
  image, drawn = scenes.render_scene(np.random.default_rng([SCENES.seed, 0]), images8[rows],
                                     labels[rows], scenes._settings(SCENES))
  np.testing.assert_array_equal(train.load_image(1), image)
  anns = train.coco.imgToAnns[1]
  assert [a['category_id'] - 1 for a in anns] == [c for c, _ in drawn]
  for a, (_, mask) in zip(anns, drawn):
    np.testing.assert_array_equal(mask_util.decode(a['segmentation']).astype(bool), mask)
  bins = set()
  for split in (train, val):
    for a in split.coco.dataset['annotations']:
      m = split.ann_mask(a)
      ys, xs = np.nonzero(m)
      assert a['area'] == m.sum() > 0 and a['iscrowd'] == 0
      assert a['bbox'] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
      bins.add(scenes.size_bin(a['area'], split.area_ranges))
  assert bins == {0, 1, 2}
  assert train.area_ranges == scenes.area_ranges(64)


def test_val_scenes_use_heldout_digits(val):
  # Every val digit's 8x8 source must be a held-out digit: render the first scene
  # from the held-out rows and compare pixels.
  images8, labels, splits = scenes.digits_arrays(SCENES.heldout_fraction)
  rows = splits['heldout']
  image, _ = scenes.render_scene(np.random.default_rng([SCENES.seed, 1]), images8[rows],
                                 labels[rows], scenes._settings(SCENES))
  np.testing.assert_array_equal(val.load_image(1), image)


# -------------------------------------------------------------- evaluation --


# COCOeval's AP is a float64 mean over up to 10 IoUs x 101 recalls x 10 classes.
ONE = pytest.approx(1.0, rel=0, abs=tol(np.float64, 10 * 101 * 10, worst_case=True))


def _gt_results(coco_gt):
  return [{'image_id': a['image_id'], 'category_id': a['category_id'], 'bbox': a['bbox'],
           'score': 1.0, 'segmentation': a['segmentation']}
          for a in coco_gt.dataset['annotations'] if not a.get('iscrowd', 0)]


def test_ground_truth_scores_one_and_shuffled_low(val):
  res = _gt_results(val.coco)
  r = coco_eval.evaluate(val.coco, res, val.area_ranges)
  for t in coco_eval.IOU_TYPES:
    assert r[t] == {m: ONE for m in coco_eval.METRICS}, (t, r[t])
  ids = sorted(val.coco.imgs)
  wrong_image = [{**e, 'image_id': ids[(ids.index(e['image_id']) + 1) % len(ids)]} for e in res]
  wrong_class = [{**e, 'category_id': e['category_id'] % 10 + 1} for e in res]
  for bad in (wrong_image, wrong_class):
    r = coco_eval.evaluate(val.coco, bad, val.area_ranges)
    assert max(r[t]['AP'] for t in coco_eval.IOU_TYPES) < 0.2, r
  zeros = coco_eval.evaluate(val.coco, [], val.area_ranges)
  assert zeros['bbox']['AP'] == 0.0 and zeros['segm']['APl'] == 0.0
  table = coco_eval.format_table({'gt': coco_eval.evaluate(val.coco, res), 'empty': zeros})
  assert '100.0' in table.splitlines()[2] and '0.0' in table.splitlines()[3]


def test_pipeline_round_trip_scores_one(val):
  """Ground truth through eval_batches -> model-shaped outputs -> detections_to_coco."""
  cfg = data_config(test_short_side=80, mask_size=28)  # 64 px scenes resized to 80
  results = []
  for b in inputs.eval_batches(val, cfg, 0, 1, 5, with_gt=True):
    out = {'boxes': b['gt_boxes'], 'scores': np.ones(b['gt_valid'].shape, np.float32),
           'classes': np.maximum(b['gt_classes'], 0), 'valid': b['gt_valid'],
           'masks': b['gt_masks'].astype(np.float32)}
    results += coco_eval.detections_to_coco(out, b, val.category_ids)
  assert len(results) == len(val.coco.dataset['annotations'])
  r = coco_eval.evaluate(val.coco, results, val.area_ranges)
  assert r['bbox']['AP'] == ONE
  # Box-local 28 x 28 masks pasted back: every mask matches at IoU 0.5.
  assert r['segm']['AP50'] == ONE and r['segm']['AP'] > 0.8


def test_crowd_is_not_a_miss_and_training_drops_it(root, tmp_path):
  folder = _copy(root, tmp_path)
  path = os.path.join(folder, 'annotations', 'instances_val2017.json')
  with open(path) as f:
    data = json.load(f)
  from pycocotools import mask as mask_util  # pylint: disable=import-outside-toplevel
  crowd = np.zeros((64, 64), np.uint8)
  crowd[2:20, 40:62] = 1
  rle = mask_util.encode(np.asfortranarray(crowd))
  # Image 1 gets a crowd region; an extra image holds only a crowd.
  data['images'].append({**data['images'][0], 'id': 999})
  for image_id, ann_id in ((1, 10 ** 6), (999, 10 ** 6 + 1)):
    data['annotations'].append({
        'id': ann_id, 'image_id': image_id, 'category_id': 3, 'iscrowd': 1,
        'bbox': [40, 2, 22, 18], 'area': int(crowd.sum()),
        'segmentation': {'size': [64, 64], 'counts': rle['counts'].decode('ascii')}})
  with open(path, 'w') as f:
    json.dump(data, f)
  split = coco_lib.load_split(folder, 'val2017')
  res = _gt_results(split.coco)
  r = coco_eval.evaluate(split.coco, res, split.area_ranges)
  assert r['bbox']['AP'] == ONE and r['segm']['AP'] == ONE  # crowds missed: no penalty
  # A detection on the crowd is ignored, not a false positive.
  on_crowd = res + [{'image_id': 1, 'category_id': 3, 'bbox': [40, 2, 22, 18], 'score': 1.0,
                     'segmentation': {'size': [64, 64],
                                      'counts': rle['counts'].decode('ascii')}}]
  assert coco_eval.evaluate(split.coco, on_crowd, split.area_ranges)['bbox']['AP'] == ONE
  assert 999 in split.image_ids and 999 not in split.train_ids
  assert all(not a['iscrowd'] for a in split.training_annotations(1))
  assert len(split.training_annotations(1)) == len(split.coco.imgToAnns[1]) - 1


# ------------------------------------------------------------------ inputs --


def _detectron2_resize(h, w, size, max_size):
  """detectron2's ResizeShortestEdge.get_output_shape, transcribed."""
  scale = size * 1.0 / min(h, w)
  if h < w:
    newh, neww = size, scale * w
  else:
    newh, neww = scale * h, size
  if max(newh, neww) > max_size:
    scale = max_size * 1.0 / max(newh, neww)
    newh = newh * scale
    neww = neww * scale
  return int(newh + 0.5), int(neww + 0.5)


def test_resize_shape_matches_detectron2():
  for h in range(1, 1400, 11):
    for w in range(1, 1400, 13):
      for short, long_ in ((800, 1333), (640, 1333), (64, 107)):
        assert inputs.resize_shape(h, w, short, long_) == _detectron2_resize(h, w, short, long_)
  assert inputs.resize_shape(480, 640, 800, 1333) == (800, 1067)
  assert inputs.resize_shape(427, 640, 800, 1333) == (800, 1199)
  assert inputs.resize_shape(200, 640, 800, 1333) == (417, 1333)


def _reference_crop(mask, box, m):
  """Bilinear sampling at bin centres, one scalar at a time."""
  h, w = mask.shape
  x1, y1, x2, y2 = box
  out = np.zeros((m, m))
  for i in range(m):
    for j in range(m):
      y = min(max(y1 + (i + 0.5) * (y2 - y1) / m - 0.5, 0.0), h - 1.0)
      x = min(max(x1 + (j + 0.5) * (x2 - x1) / m - 0.5, 0.0), w - 1.0)
      ya, xa = int(math.floor(y)), int(math.floor(x))
      yb, xb = min(ya + 1, h - 1), min(xa + 1, w - 1)
      fy, fx = y - ya, x - xa
      out[i, j] = ((1 - fy) * ((1 - fx) * mask[ya, xa] + fx * mask[ya, xb])
                   + fy * ((1 - fx) * mask[yb, xa] + fx * mask[yb, xb]))
  return out


def test_box_local_masks_match_reference():
  rng = np.random.default_rng(0)
  for _ in range(20):
    h, w, m = int(rng.integers(5, 40)), int(rng.integers(5, 40)), int(rng.integers(4, 20))
    mask = (rng.random((h, w)) < 0.5).astype(np.uint8)
    x = np.sort(rng.uniform(0, w, 2))
    y = np.sort(rng.uniform(0, h, 2))
    box = (x[0], y[0], x[1] + 0.1, y[1] + 0.1)
    got = inputs.crop_and_resize(mask, box, m)
    want = _reference_crop(mask.astype(np.float64), box, m)
    # Each value is a two-level bilinear blend of 0/1 pixels: a few float64 roundings.
    assert_close(got, want, atol=tol(np.float64, 8, worst_case=True), what='crop_and_resize')
    flipped = inputs.box_local_mask(mask, box, m, flip=True)
    mirrored = _reference_crop(mask[:, ::-1].astype(np.float64),
                               (w - box[2], box[1], w - box[0], box[3]), m)
    # Away from the 0.5 threshold the flipped box-local mask is the crop of the flipped mask.
    sure = np.abs(mirrored - 0.5) > 1e-9
    np.testing.assert_array_equal(flipped[sure], (mirrored >= 0.5)[sure])


def _pasted(ex, k):
  """Gt k's box-local mask pasted back into the canvas (bool [H, W])."""
  pasted = mask_targets.paste_masks(ex['gt_masks'][k][None].astype(np.float32),
                                    ex['gt_boxes'][k][None], ex['images'].shape[:2])[0]
  return pasted


def test_flip_moves_boxes_and_masks_together(train):
  cfg = data_config()
  image_id = train.train_ids[0]
  plain = inputs.prepare_example(train, image_id, 80, False, (96, 96), cfg.data)
  flip = inputs.prepare_example(train, image_id, 80, True, (96, 96), cfg.data)
  h, w = plain['image_hw']
  np.testing.assert_array_equal(flip['images'][:h, :w], plain['images'][:h, :w][:, ::-1])
  assert not flip['images'][h:].any() and not flip['images'][:, w:].any()
  v = plain['gt_valid']
  assert v.any() and np.array_equal(v, flip['gt_valid'])
  pb, fb = plain['gt_boxes'][v], flip['gt_boxes'][v]
  np.testing.assert_allclose(fb[:, [0, 2]], w - pb[:, [2, 0]], rtol=0, atol=1e-4)
  np.testing.assert_array_equal(fb[:, [1, 3]], pb[:, [1, 3]])
  np.testing.assert_array_equal(flip['gt_masks'][v], plain['gt_masks'][v][:, :, ::-1])
  # The box-local mask, pasted into the canvas, is the instance's full mask
  # resized (nearest) and flipped like the image, and covers its bright ink.
  anns = train.training_annotations(image_id)
  for ex, flipped in ((plain, False), (flip, True)):
    gray = ex['images'].astype(np.float64).mean(-1)
    for k in np.flatnonzero(ex['gt_valid']):
      pasted = _pasted(ex, k)
      full = Image.fromarray(train.ann_mask(anns[k]) * 255).resize((w, h), Image.NEAREST)
      full = np.asarray(full)[:, ::-1] if flipped else np.asarray(full)
      want = np.zeros_like(pasted)
      want[:h, :w] = full > 0
      assert (pasted & want).sum() / (pasted | want).sum() > 0.6
      x1, y1, x2, y2 = ex['gt_boxes'][k]
      box = np.zeros_like(pasted)
      box[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = True
      assert pasted.any() and not (pasted & ~box).any()
      assert gray[pasted].mean() > gray[box & ~pasted].mean() + 20


def test_batch_keys_dtypes_and_shapes(train):
  cfg = data_config()
  b = next(inputs.train_batches(train, cfg, 0, 1, 3, seed=0, workers=2))
  bsz, (hh, ww) = 3, b['images'].shape[1:3]
  want = {'images': (np.uint8, (bsz, hh, ww, 3)), 'image_hw': (np.int32, (bsz, 2)),
          'gt_boxes': (np.float32, (bsz, 6, 4)), 'gt_classes': (np.int32, (bsz, 6)),
          'gt_valid': (np.bool_, (bsz, 6)), 'gt_masks': (np.uint8, (bsz, 6, 16, 16)),
          'image_id': (np.int64, (bsz,)), 'scale': (np.float32, (bsz,)),
          'orig_hw': (np.int32, (bsz, 2))}
  assert set(b) == set(want)
  for k, (dtype, shape) in want.items():
    assert b[k].dtype == dtype and b[k].shape == shape, k
  assert (hh, ww) in cfg.data.canvas_sizes and hh % 32 == 0 and ww % 32 == 0
  assert (b['gt_classes'][~b['gt_valid']] == -1).all() and not b['gt_boxes'][~b['gt_valid']].any()
  assert (b['gt_classes'][b['gt_valid']] >= 0).all() and (b['gt_classes'] < 10).all()
  for i in range(bsz):
    h, w = b['image_hw'][i]
    assert not b['images'][i, h:].any() and not b['images'][i, :, w:].any()
    boxes = b['gt_boxes'][i][b['gt_valid'][i]]
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 2] <= w + 1e-4).all()
    assert (boxes[:, 3] <= h + 1e-4).all()
    np.testing.assert_allclose(b['scale'][i], h / b['orig_hw'][i][0], rtol=1e-6)


def test_too_many_instances_keep_the_largest(train):
  cfg = data_config(max_gt=2)
  image_id = max(train.train_ids, key=lambda i: len(train.training_annotations(i)))
  anns = train.training_annotations(image_id)
  assert len(anns) > 2
  ex = inputs.prepare_example(train, image_id, 64, False, (64, 64), cfg.data)
  areas = sorted((a['bbox'][2] * a['bbox'][3] for a in anns), reverse=True)[:2]
  b = ex['gt_boxes']
  got = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  assert ex['gt_valid'].all() and sorted(got, reverse=True) == pytest.approx(areas)


def test_eval_batches_cover_every_image_once_with_padding(val):
  cfg = data_config(canvas_sizes=((64, 64), (96, 96)), test_short_side=64)
  seen, counts = [], []
  for p in range(5):
    batches = list(inputs.eval_batches(val, cfg, p, 5, 2, workers=1))
    counts.append([b['images'].shape for b in batches])
    for b in batches:
      pad = b['image_id'] < 0
      assert not b['images'][pad].any() and not b['image_hw'][pad].any()
      assert not b['gt_valid'].any()
      seen += list(b['image_id'][~pad])
  assert all(c == counts[0] for c in counts)  # the processes' batches line up
  assert sorted(seen) == sorted(val.image_ids)
  assert any(i < 0 for b in inputs.eval_batches(val, cfg, 4, 5, 2) for i in b['image_id'])


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_training_batches_deterministic_by_seed_and_step(train):
  cfg = data_config()
  a = _take(inputs.train_batches(train, cfg, 0, 1, 2, seed=7, workers=1), 4)
  b = _take(inputs.train_batches(train, cfg, 0, 1, 2, seed=7, workers=2), 4)
  resumed = _take(inputs.train_batches(train, cfg, 0, 1, 2, seed=7, start_step=2), 2)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  for x, y in zip(a[2:], resumed):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  other = _take(inputs.train_batches(train, cfg, 0, 1, 2, seed=8), 4)
  assert any(not np.array_equal(x['image_id'], y['image_id']) for x, y in zip(a, other))


def test_training_shards_disjoint_covering_and_canvases_agree(train):
  # The plan reads image sizes only: make every third scene a 64 x 128 landscape.
  split = copy.copy(train)
  split.coco = copy.copy(train.coco)
  split.coco.imgs = {i: {**v, 'width': 128} if i % 3 == 0 else v
                     for i, v in train.coco.imgs.items()}
  cfg = data_config(canvas_sizes=((64, 64), (96, 96), (64, 128), (96, 160)), max_long_side=170)
  procs, per = 3, 2
  keys, members = inputs.training_groups(split, cfg.data)
  assert keys == [((64, 64), (64, 64), (96, 96)), ((64, 128), (64, 128), (96, 160))]
  plans = [inputs.train_plan(split, cfg.data, p, procs, per, seed=1) for p in range(procs)]
  drawn = [set() for _ in range(procs)]
  canvases = set()
  for _ in range(60):
    steps = [next(pl) for pl in plans]
    assert len({(s[0], s[1], s[2]) for s in steps}) == 1  # same step, canvas, short side
    canvases.add(steps[0][1])
    for p, s in enumerate(steps):
      drawn[p] |= {i for i, _ in s[3]}
      group = members[[k[cfg.data.train_short_sides.index(s[2])] for k in keys].index(s[1])]
      assert all(i in group for i, _ in s[3])
  assert canvases == {(64, 64), (96, 96), (64, 128), (96, 160)}
  for p in range(procs):
    for q in range(p):
      assert not drawn[p] & drawn[q]
  assert set().union(*drawn) == set(split.train_ids)


# --------------------------------------------------------------- bad input --


def _expect_error(fn, name):
  with pytest.raises(coco_lib.DetectionDataError) as e:
    fn()
  msg = str(e.value)
  assert '\n' not in msg and name in msg, msg
  return msg


def test_bad_folders_fail_with_one_line(root, tmp_path):
  folder = _copy(root, tmp_path)
  ann = os.path.join(folder, 'annotations', 'instances_val2017.json')
  os.rename(ann, ann + '.bak')
  _expect_error(lambda: coco_lib.load_split(folder, 'val2017'), 'instances_val2017.json')
  with open(ann, 'w') as f:
    f.write('{"images": [')
  _expect_error(lambda: coco_lib.load_split(folder, 'val2017'), 'instances_val2017.json')
  os.replace(ann + '.bak', ann)
  os.remove(os.path.join(folder, 'val2017', '000000000003.png'))
  _expect_error(lambda: coco_lib.load_split(folder, 'val2017'), '000000000003.png')
  _expect_error(lambda: coco_lib.load_split(str(tmp_path / 'nothing'), 'val2017'), 'nothing')


def test_undecodable_image_and_empty_image(root, tmp_path):
  folder = _copy(root, tmp_path)
  with open(os.path.join(folder, 'train2017', '000000000002.png'), 'wb') as f:
    f.write(b'not a png at all')
  split = coco_lib.load_split(folder, 'train2017')
  cfg = data_config()
  _expect_error(lambda: inputs.prepare_example(split, 2, 64, False, (64, 64), cfg.data),
                '000000000002.png')
  # An image without annotations trains on as background.
  empty = copy.deepcopy(split.coco.imgs[1])
  split.coco.imgs[12345] = {**empty, 'id': 12345}
  ex = inputs.prepare_example(split, 12345, 64, True, (64, 64), cfg.data)
  assert not ex['gt_valid'].any() and (ex['gt_classes'] == -1).all() and ex['images'].any()
  batch = inputs.make_batch([ex, ex])
  assert batch['gt_valid'].shape == (2, 6) and not batch['gt_valid'].any()


def test_canvas_errors_name_the_config_field():
  from mcl_jax.errors import UsageError  # pylint: disable=import-outside-toplevel
  with pytest.raises(UsageError, match='config.data.canvas_sizes'):
    inputs.choose_canvas((100, 200), ((64, 64), (96, 192)))
  with pytest.raises(UsageError, match='multiple of 32'):
    inputs.check_canvas_sizes(((64, 70),))
  assert inputs.choose_canvas((60, 90), ((128, 128), (64, 96), (96, 96))) == (64, 96)


def test_scenes_and_split_on_gcs(gs_bucket, root):
  tiny = scenes.scene_config(**{**SCENES.to_dict(), 'num_train': 3, 'num_val': 2})
  folder = scenes.ensure_scenes(tiny, f'{gs_bucket}/data')
  assert folder.startswith('gs://') and scenes.ensure_scenes(tiny, f'{gs_bucket}/data') == folder
  split = coco_lib.load_split(folder, 'train2017')
  assert len(split.image_ids) == 3
  # The same settings' first scene, written locally, has the same pixels.
  local = scenes.ensure_scenes(tiny, os.path.dirname(root))
  np.testing.assert_array_equal(split.load_image(1),
                                coco_lib.load_split(local, 'train2017').load_image(1))
  b = next(inputs.train_batches(split, data_config(), 0, 1, 2, seed=0, workers=1))
  assert b['images'].shape[0] == 2 and b['gt_valid'].any()
  from mcl_jax import paths  # pylint: disable=import-outside-toplevel
  paths.remove(f'{folder}/val2017/000000000002.png')
  _expect_error(lambda: coco_lib.load_split(folder, 'val2017'), '000000000002.png')
