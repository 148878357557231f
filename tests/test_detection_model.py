"""Mask R-CNN model: train step, losses vs NumPy, pooler, pretrained loading, export vs torch."""

import os
import pickle

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mcl_jax.detection import boxes as box_ops
from mcl_jax.detection import export as det_export
from mcl_jax.detection import model as model_lib
from mcl_jax.detection import pretrained
from mcl_jax.detection import roi_heads
from mcl_jax.detection import rpn as rpn_lib
from mcl_jax.eval import exporters as export_lib
from mcl_jax.nn import roi_align as roi_align_lib
from tests import tolerance

B, G, H, W, K, M = 2, 4, 64, 96, 3, 16


def tiny_config(width: int = 8):
  """A detection config with the pretraining test config's trunk (configs/test_tiny.py)."""
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(dict(num_classes=K, mask_size=M, max_gt=G))
  c.model = ml_collections.ConfigDict(dict(
      depth=18, width=width, stage_sizes=(1, 1, 1, 1), block=None, dtype='float32',
      remat='none', fpn_channels=16, anchor_sizes=(8, 16, 32, 64, 128),
      aspect_ratios=(0.5, 1.0, 2.0)))
  c.model.rpn = ml_collections.ConfigDict(dict(
      pre_nms_topk_train=64, pre_nms_topk_test=64, post_nms_topk_train=32,
      post_nms_topk_test=32, nms_thresh=0.7, batch_size_per_image=64, positive_fraction=0.5,
      iou_thresholds=(0.3, 0.7)))
  c.model.roi = ml_collections.ConfigDict(dict(
      batch_size_per_image=32, positive_fraction=0.25, iou_threshold=0.5, num_convs=4,
      fc_dim=32, mask_conv_dim=16, box_pool=7, mask_pool=14, sampling_ratio=2,
      bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), score_thresh=0.05, nms_thresh=0.5,
      detections_per_image=8))
  return c


@pytest.fixture(scope='module')
def detector():
  model = model_lib.create_detector(tiny_config())
  return model, model_lib.init_variables(model, jax.random.key(0), (H, W))


def make_batch(rng, with_gt: bool):
  boxes = np.zeros((B, G, 4), np.float32)
  valid = np.zeros((B, G), bool)
  classes = np.full((B, G), -1, np.int32)
  if with_gt:
    for i in range(B):
      for g in range(3 - i):  # image 1 has fewer instances than image 0
        x1, y1 = rng.uniform(0, 40), rng.uniform(0, 24)
        boxes[i, g] = (x1, y1, x1 + rng.uniform(10, 50), y1 + rng.uniform(10, 36))
        valid[i, g], classes[i, g] = True, rng.integers(K)
  return dict(images=rng.integers(0, 256, (B, H, W, 3), dtype=np.uint8),
              image_hw=np.array([[H, W], [48, 80]], np.int32), gt_boxes=boxes,
              gt_classes=classes, gt_valid=valid,
              gt_masks=(rng.random((B, G, M, M)) > 0.5).astype(np.uint8))


def test_train_step_finite_compiles_once_and_predict(detector):
  model, variables = detector
  traces = []

  def loss_fn(params, stats, batch, key):
    traces.append(1)  # runs once per compilation
    losses, new = model.apply({'params': params, 'batch_stats': stats}, batch, train=True,
                              rngs={'sampling': key}, mutable=['batch_stats'])
    return sum(losses.values()), (losses, new['batch_stats'])

  step = jax.jit(jax.grad(loss_fn, has_aux=True))
  rng = np.random.default_rng(0)
  for i, with_gt in enumerate((True, False)):
    grads, (losses, stats) = step(variables['params'], variables['batch_stats'],
                                  make_batch(rng, with_gt), jax.random.key(i))
    assert sorted(losses) == sorted(model_lib.LOSS_NAMES)
    assert all(np.isfinite(float(v)) for v in losses.values()), losses
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert jax.tree.structure(stats) == jax.tree.structure(variables['batch_stats'])
    if with_gt:
      assert float(losses['loss_mask']) > 0 and float(losses['loss_box_reg']) > 0
    else:  # background only: no foreground RoI, no regression or mask target
      assert float(losses['loss_box_reg']) == 0 and float(losses['loss_mask']) == 0
      assert float(losses['loss_rpn_loc']) == 0 and float(losses['loss_cls']) > 0
  assert len(traces) == 1

  batch = make_batch(rng, True)
  out = jax.jit(lambda v, im, hw: model.apply(v, im, hw, method=model_lib.MaskRCNN.predict))(
      variables, batch['images'], batch['image_hw'])
  d = model.roi.detections_per_image
  assert out['boxes'].shape == (B, d, 4) and out['masks'].shape == (B, d, 28, 28)
  assert out['classes'].dtype == jnp.int32 and out['valid'].dtype == jnp.bool_
  boxes, valid = np.asarray(out['boxes']), np.asarray(out['valid'])
  hw = batch['image_hw'][:, None, :]
  assert np.all(boxes[..., 2] <= hw[..., 1]) and np.all(boxes[..., 3] <= hw[..., 0])
  scores = np.asarray(out['scores'])
  assert np.all(scores[valid] > model.roi.score_thresh)
  assert np.all(np.diff(np.where(valid, scores, -1), axis=1) <= 0)  # by decreasing score


def np_bce(x, y):
  x = x.astype(np.float64)
  return np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))


def np_encode(gt, src, weights):
  wx, wy, ww, wh = weights
  sw, sh = src[:, 2] - src[:, 0], src[:, 3] - src[:, 1]
  gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
  sx, sy = src[:, 0] + 0.5 * sw, src[:, 1] + 0.5 * sh
  gx, gy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
  return np.stack([wx * (gx - sx) / sw, wy * (gy - sy) / sh, ww * np.log(gw / sw),
                   wh * np.log(gh / sh)], -1)


def random_boxes(rng, n, lo=4.0, hi=60.0):
  xy = rng.uniform(0, 100, (n, 2))
  return np.concatenate([xy, xy + rng.uniform(lo, hi, (n, 2))], 1).astype(np.float32)


def test_rpn_loss_vs_numpy():
  rng = np.random.default_rng(1)
  n, per_image = 300, 64
  anchors = random_boxes(rng, n)
  logits = rng.normal(0, 2, (B, n)).astype(np.float32)
  deltas = rng.normal(0, 0.5, (B, n, 4)).astype(np.float32)
  labels = rng.choice([-1, 0, 1], (B, n), p=[0.6, 0.3, 0.1]).astype(np.int32)
  matched = np.stack([random_boxes(rng, n) for _ in range(B)])
  cls, loc = rpn_lib.rpn_losses(jnp.asarray(logits), jnp.asarray(deltas), jnp.asarray(anchors),
                                jnp.asarray(labels), jnp.asarray(matched), per_image)
  want_cls = want_loc = 0.0
  for i in range(B):
    for a in range(n):
      if labels[i, a] >= 0:
        want_cls += np_bce(logits[i, a:a + 1], float(labels[i, a] == 1))[0]
      if labels[i, a] == 1:
        t = np_encode(matched[i, a:a + 1].astype(np.float64), anchors[a:a + 1].astype(np.float64),
                      (1, 1, 1, 1))
        want_loc += np.abs(deltas[i, a].astype(np.float64) - t[0]).sum()
  norm = per_image * B
  count = int((labels >= 0).sum())
  tolerance.check(abs(float(cls) - want_cls / norm),
                  tolerance.tol(np.float32, [count, tolerance.TRANSCENDENTAL * 3],
                                want_cls / norm), 'RPN objectness loss')
  tolerance.check(abs(float(loc) - want_loc / norm),
                  tolerance.tol(np.float32, [count * 4, tolerance.TRANSCENDENTAL * 8],
                                want_loc / norm), 'RPN box loss')


def test_box_and_mask_losses_vs_numpy():
  rng = np.random.default_rng(2)
  n, s = 40, 28
  logits = rng.normal(0, 2, (n, K + 1)).astype(np.float32)
  deltas = rng.normal(0, 1, (n, K, 4)).astype(np.float32)
  classes = rng.integers(0, K + 1, n).astype(np.int32)
  valid = rng.random(n) < 0.8
  targets = rng.normal(0, 1, (n, 4)).astype(np.float32)
  got_cls, got_box = roi_heads.box_losses(jnp.asarray(logits), jnp.asarray(deltas),
                                          jnp.asarray(classes), jnp.asarray(valid),
                                          jnp.asarray(targets))
  lg = logits.astype(np.float64)
  logp = lg - lg.max(1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(1, keepdims=True))
  want_cls = sum(-logp[i, classes[i]] for i in range(n) if valid[i]) / valid.sum()
  want_box = sum(np.abs(deltas[i, classes[i]].astype(np.float64) - targets[i]).sum()
                 for i in range(n) if valid[i] and classes[i] < K) / valid.sum()
  tolerance.check(abs(float(got_cls) - want_cls),
                  tolerance.tol(np.float32, [n, (K + 1) * tolerance.TRANSCENDENTAL], want_cls),
                  'RoI classification loss')
  tolerance.check(abs(float(got_box) - want_box), tolerance.tol(np.float32, 4 * n, want_box),
                  'RoI box loss')

  mask_logits = rng.normal(0, 2, (n, s, s, K)).astype(np.float32)
  mask_targets = (rng.random((n, s, s)) > 0.5).astype(np.float32)
  fg = valid & (classes < K)
  got = roi_heads.mask_loss(jnp.asarray(mask_logits), jnp.asarray(classes), jnp.asarray(fg),
                            jnp.asarray(mask_targets))
  want = np.mean([np_bce(mask_logits[i, :, :, classes[i]], mask_targets[i])
                  for i in range(n) if fg[i]])
  tolerance.check(abs(float(got) - want),
                  tolerance.tol(np.float32, [fg.sum() * s * s, 3 * tolerance.TRANSCENDENTAL],
                                want), 'mask loss')


def test_pooler_level_selection_vs_numpy_loop():
  rng = np.random.default_rng(3)
  canvas, c, n, r, sr = 512, 4, 2, 64, 2
  feats = [rng.normal(0, 1, (n, canvas // 2**lvl, canvas // 2**lvl, c)).astype(np.float32)
           for lvl in roi_heads.POOL_LEVELS]
  # Sides from 16 to 500 px, and some above 460 px: every level 2..5 gets boxes.
  side = np.exp(rng.uniform(np.log(16), np.log(500), (r, 2)))
  side[-8:] = rng.uniform(460, 510, (8, 2))
  xy = rng.uniform(0, canvas - side)
  boxes = np.concatenate([xy, xy + side], 1).astype(np.float32)
  idx = rng.integers(0, n, r).astype(np.int32)
  levels = np.asarray(box_ops.assign_levels(jnp.asarray(boxes)))
  area = (boxes[:, 2] - boxes[:, 0]).astype(np.float64) * (boxes[:, 3] - boxes[:, 1])
  want_levels = np.clip(np.floor(4 + np.log2(np.sqrt(area) / 224 + 1e-8)), 2, 5) - 2
  np.testing.assert_array_equal(levels, want_levels)
  assert set(levels.tolist()) == {0, 1, 2, 3}
  got = np.asarray(jax.jit(roi_heads.multilevel_roi_align, static_argnums=(4, 5))(
      [jnp.asarray(f) for f in feats], jnp.asarray(boxes), jnp.asarray(idx), jnp.asarray(levels),
      7, sr))
  # The reference: every box pooled on every level by roi_align, then a loop
  # that takes each box's row from its own level.
  align = jax.jit(roi_align_lib.roi_align, static_argnums=(3, 4, 5, 6))
  per_level = [np.asarray(align(jnp.asarray(f), jnp.asarray(boxes), jnp.asarray(idx), 7,
                                2.0**-lvl, sr, True))
               for f, lvl in zip(feats, roi_heads.POOL_LEVELS)]
  want = np.stack([per_level[int(levels[i])][i] for i in range(r)])
  # Same samples and weights; the four-corner sum and the bin mean may round differently.
  tolerance.assert_close(got, want, tolerance.tol(np.float32, [4, sr * sr], 1.0, sides=2),
                         what='pooled boxes at their levels')
  # `pool`, per image: image i's boxes read image i's maps.
  order = np.argsort(idx, kind='stable')
  per_image = np.bincount(idx, minlength=n)
  keep = np.concatenate([order[idx[order] == i][:per_image.min()] for i in range(n)])
  pooled = jax.jit(roi_heads.pool, static_argnums=(2, 3))(
      [jnp.asarray(f) for f in feats], jnp.asarray(boxes[keep].reshape(n, -1, 4)), 7, sr)
  tolerance.assert_close(pooled, want[keep],
                         tolerance.tol(np.float32, [4, sr * sr], 1.0, sides=2),
                         what='pool() per image')


# ----------------------------------------------------------------- pretrained --

@pytest.fixture(scope='module')
def pretraining_workdir(tmp_path_factory):
  """A pretraining workdir (configs/test_tiny.py) written by the training code's own
  checkpointing, with every array randomised so that a load is visible."""
  from configs import test_tiny  # pylint: disable=g-import-not-at-top
  from mcl_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from mcl_jax.training import optim  # pylint: disable=g-import-not-at-top
  from mcl_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  config = test_tiny.get_config()
  workdir = str(tmp_path_factory.mktemp('pretraining'))
  tx = optim.create_optimizer(config, int(config.optim.warmup_steps) + 2)
  state = jax.jit(lambda k: state_lib.create_train_state(config, k, tx))(jax.random.key(0))
  rng = np.random.default_rng(4)
  noisy = lambda t: jax.tree.map(
      lambda x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape).astype(np.float32)), t)
  state = state.replace(params=noisy(state.params), batch_stats=noisy(state.batch_stats))
  checkpointing.save_config(workdir, config)
  manager = checkpointing.make_manager(workdir, 1, async_save=False)
  checkpointing.save(manager, 2, state, force=True)
  manager.wait_until_finished()
  manager.close()
  return workdir, {'params': state.params, 'batch_stats': state.batch_stats}


def test_pretrained_workdir_loads_backbone_fpn_and_box_head(detector, pretraining_workdir):
  model, variables = detector
  workdir, pre = pretraining_workdir
  loaded, report = pretrained.load_pretrained(workdir, tiny_config(), variables)
  flat = lambda t: {jax.tree_util.keystr(p): np.asarray(x)
                    for p, x in jax.tree_util.tree_leaves_with_path(t)}
  for part in ('backbone', 'fpn'):
    for coll in ('params', 'batch_stats'):
      got, want = flat(loaded[coll][part]), flat(pre[coll][part])
      assert got.keys() == want.keys()
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f'{part}{k}')
  # The box head holds what the detectron2 exporter maps for the reference converter.
  reference = export_lib.to_detectron2(pre)['model']
  exported = det_export.to_detectron2_maskrcnn(loaded)
  names = [k for k in reference if k.startswith('box_head.')]
  assert len(names) == 4 * 5
  for name in names:
    np.testing.assert_array_equal(exported['roi_heads.' + name], reference[name], err_msg=name)
  for name, value in reference.items():  # backbone and FPN under their full names
    if not name.startswith('box_head.'):
      prefix = 'backbone.' if name.startswith('fpn_') else 'backbone.bottom_up.'
      np.testing.assert_array_equal(exported[prefix + name], value, err_msg=name)
  assert report['arrays']['box_head'] == 20 and report['kind'] == 'workdir'
  # The fresh parts are untouched.
  np.testing.assert_array_equal(loaded['params']['rpn_head']['conv']['kernel'],
                                variables['params']['rpn_head']['conv']['kernel'])
  none, report = pretrained.load_pretrained('none', tiny_config(), variables)
  assert report['arrays'] == {}
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), none, variables))


def _assert_file_loads_as_workdir(spec, variables, workdir, parts, prefixes):
  """`load_pretrained(spec)` loads `parts`, whose arrays equal the workdir's own load."""
  from_workdir, _ = pretrained.load_pretrained(workdir, tiny_config(), variables)
  want = det_export.to_detectron2_maskrcnn(from_workdir)
  got, report = pretrained.load_pretrained(spec, tiny_config(), variables)
  assert set(report['arrays']) == parts
  got = det_export.to_detectron2_maskrcnn(got)
  for name in want:
    if name.startswith(prefixes):
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_pretrained_files_and_errors(detector, pretraining_workdir, tmp_path):
  from mcl_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  _, variables = detector
  workdir, pre = pretraining_workdir
  # detectron2 .pkl (the pretraining exporter's short names).
  pkl = str(tmp_path / 'pre.pkl')
  export_lib.save_detectron2(export_lib.to_detectron2(pre), pkl)
  _assert_file_loads_as_workdir(f'detectron2:{pkl}', variables, workdir,
                                {'backbone', 'fpn', 'box_head'},
                                ('backbone.', 'roi_heads.box_head.conv'))

  with pytest.raises(pretrained.PretrainedMismatchError) as e:
    pretrained.load_pretrained(workdir, tiny_config(width=16), variables)
  assert 'model.width' in str(e.value) and '\n' not in str(e.value)
  empty = str(tmp_path / 'no_checkpoint')
  os.makedirs(empty)
  checkpointing.save_config(empty, checkpointing.load_config(workdir))
  with pytest.raises(checkpointing.CheckpointError) as e:
    pretrained.load_pretrained(empty, tiny_config(), variables)
  assert 'no checkpoint' in str(e.value) and '\n' not in str(e.value)
  with pytest.raises(pretrained.PretrainedFileError) as e:
    pretrained.load_pretrained(f'detectron2:{tmp_path / "missing.pkl"}', tiny_config(), variables)
  assert '\n' not in str(e.value)


def test_pretrained_torchvision_file(detector, pretraining_workdir, tmp_path):
  pytest.importorskip('torch')  # writing a .pth needs PyTorch (installed on Python 3.11 only)
  _, variables = detector
  workdir, pre = pretraining_workdir
  pth = str(tmp_path / 'pre.pth')
  export_lib.save_torchvision(export_lib.to_torchvision(pre), pth)
  _assert_file_loads_as_workdir(f'torchvision:{pth}', variables, workdir, {'backbone'},
                                ('backbone.bottom_up.',))


# --------------------------------------------------------------------- export --

def expected_r50_maskrcnn_shapes(k: int = 80) -> dict:
  """detectron2's Mask R-CNN R50-FPN (4conv1fc, SyncBN heads) names and shapes."""
  out = {}

  def conv_norm(name, shape):
    out[f'{name}.weight'] = shape
    for s in ('weight', 'bias', 'running_mean', 'running_var'):
      out[f'{name}.norm.{s}'] = (shape[0],)

  conv_norm('backbone.bottom_up.stem.conv1', (64, 3, 7, 7))
  cin = 64
  for stage, blocks in zip(range(2, 6), (3, 4, 6, 3)):
    width = 64 * 2**(stage - 2)
    for b in range(blocks):
      p = f'backbone.bottom_up.res{stage}.{b}'
      conv_norm(f'{p}.conv1', (width, cin if b == 0 else 4 * width, 1, 1))
      conv_norm(f'{p}.conv2', (width, width, 3, 3))
      conv_norm(f'{p}.conv3', (4 * width, width, 1, 1))
      if b == 0:
        conv_norm(f'{p}.shortcut', (4 * width, cin, 1, 1))
    cin = 4 * width
  for lvl, c in zip(range(2, 6), (256, 512, 1024, 2048)):
    conv_norm(f'backbone.fpn_lateral{lvl}', (256, c, 1, 1))
    conv_norm(f'backbone.fpn_output{lvl}', (256, 256, 3, 3))
  rpn = 'proposal_generator.rpn_head'
  out.update({f'{rpn}.conv.weight': (256, 256, 3, 3), f'{rpn}.conv.bias': (256,),
              f'{rpn}.objectness_logits.weight': (3, 256, 1, 1),
              f'{rpn}.objectness_logits.bias': (3,),
              f'{rpn}.anchor_deltas.weight': (12, 256, 1, 1), f'{rpn}.anchor_deltas.bias': (12,)})
  for i in range(1, 5):
    conv_norm(f'roi_heads.box_head.conv{i}', (256, 256, 3, 3))
    conv_norm(f'roi_heads.mask_head.mask_fcn{i}', (256, 256, 3, 3))
  out.update({'roi_heads.box_head.fc1.weight': (1024, 256 * 7 * 7),
              'roi_heads.box_head.fc1.bias': (1024,),
              'roi_heads.box_predictor.cls_score.weight': (k + 1, 1024),
              'roi_heads.box_predictor.cls_score.bias': (k + 1,),
              'roi_heads.box_predictor.bbox_pred.weight': (4 * k, 1024),
              'roi_heads.box_predictor.bbox_pred.bias': (4 * k,),
              'roi_heads.mask_head.deconv.weight': (256, 256, 2, 2),
              'roi_heads.mask_head.deconv.bias': (256,),
              'roi_heads.mask_head.predictor.weight': (k, 256, 1, 1),
              'roi_heads.mask_head.predictor.bias': (k,)})
  return out


def test_export_r50_names_and_shapes():
  model = model_lib.MaskRCNN(num_classes=80)  # ResNet-50-FPN, the COCO heads
  abstract = model_lib.abstract_variables(model)
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), abstract)
  got = {k: v.shape for k, v in det_export.to_detectron2_maskrcnn(zeros).items()}
  want = expected_r50_maskrcnn_shapes()
  assert sorted(set(got) ^ set(want)) == []
  assert {k: v for k, v in got.items() if v != want[k]} == {}


def randomize(variables, rng):
  """Every array random (BN variances positive), so a wrong layout cannot pass."""
  def leaf(path, x):
    name = getattr(path[-1], 'key', '')
    if name == 'var':
      return jnp.asarray(rng.uniform(0.5, 2.0, x.shape).astype(np.float32))
    scale = 0.3 if name == 'kernel' else 0.1
    return jnp.asarray(rng.normal(0, scale, x.shape).astype(np.float32))
  return jax.tree_util.tree_map_with_path(leaf, variables)


def test_export_heads_vs_torch(detector, tmp_path):
  torch = pytest.importorskip('torch')
  F = torch.nn.functional
  model, variables = detector
  rng = np.random.default_rng(5)
  v = randomize(variables, rng)
  path = str(tmp_path / 'detector.pkl')
  det_export.save_detectron2_maskrcnn(v, path)
  with open(path, 'rb') as f:
    ckpt = pickle.load(f)
  assert ckpt['matching_heuristics'] is False
  sd = {k: torch.from_numpy(np.array(a)) for k, a in ckpt['model'].items()}
  c, a = model.fpn_channels, len(model.aspect_ratios)
  t = lambda x: torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))

  def bn(x, p):
    return F.batch_norm(x, sd[p + '.norm.running_mean'], sd[p + '.norm.running_var'],
                        sd[p + '.norm.weight'], sd[p + '.norm.bias'], False, 0.0, 1e-5)

  # RPN head on two levels' random features.
  feats = [rng.normal(0, 1, (B, s, s + 2, c)).astype(np.float32) for s in (8, 4)]
  logits, deltas = model.apply(v, [jnp.asarray(f) for f in feats],
                               method=lambda m, f: m.rpn_head(f))
  rpn = 'proposal_generator.rpn_head'
  for f, lg, dl in zip(feats, logits, deltas):
    h = F.relu(F.conv2d(t(f), sd[f'{rpn}.conv.weight'], sd[f'{rpn}.conv.bias'], padding=1))
    want_lg = F.conv2d(h, sd[f'{rpn}.objectness_logits.weight'],
                       sd[f'{rpn}.objectness_logits.bias'])
    want_dl = F.conv2d(h, sd[f'{rpn}.anchor_deltas.weight'], sd[f'{rpn}.anchor_deltas.bias'])
    n, _, hh, ww = want_dl.shape  # detectron2's reshapes of the head outputs
    want_lg = want_lg.permute(0, 2, 3, 1).reshape(n, -1).numpy()
    want_dl = want_dl.view(n, a, 4, hh, ww).permute(0, 3, 4, 1, 2).reshape(n, -1, 4).numpy()
    atol = tolerance.tol(np.float32, [9 * c, c], np.abs(want_lg).max(), sides=2)
    tolerance.assert_close(lg, want_lg, atol, what='RPN objectness vs torch')
    tolerance.assert_close(dl, want_dl, atol, what='RPN deltas vs torch')

  # Box head (eval-mode BN) and predictor on pooled RoIs.
  r, k = 6, model.num_classes
  pooled = rng.normal(0, 1, (r, 7, 7, c)).astype(np.float32)
  cls_logits, box_deltas = model.apply(
      v, jnp.asarray(pooled),
      method=lambda m, x: m.box_predictor(m.box_head(x, jnp.ones((r,), bool), False)))
  x = t(pooled)
  for i in range(1, 5):
    p = f'roi_heads.box_head.conv{i}'
    x = F.relu(bn(F.conv2d(x, sd[p + '.weight'], padding=1), p))
  x = F.relu(F.linear(x.flatten(1), sd['roi_heads.box_head.fc1.weight'],
                      sd['roi_heads.box_head.fc1.bias']))
  p = 'roi_heads.box_predictor'
  want_cls = F.linear(x, sd[p + '.cls_score.weight'], sd[p + '.cls_score.bias']).numpy()
  want_box = F.linear(x, sd[p + '.bbox_pred.weight'], sd[p + '.bbox_pred.bias']).view(r, k, 4)
  chain = [9 * c, c * 4] * 4 + [49 * c, model.roi.fc_dim]
  for got, want, what in ((cls_logits, want_cls, 'cls_score'), (box_deltas, want_box.numpy(),
                                                               'bbox_pred')):
    tolerance.assert_close(got, want, tolerance.tol(np.float32, chain, np.abs(want).max(), sides=2),
                           what=f'box head {what} vs torch')

  # Mask head: four conv + BN, the transposed conv, the predictor.
  pooled = rng.normal(0, 1, (r, 14, 14, c)).astype(np.float32)
  got = model.apply(v, jnp.asarray(pooled),
                    method=lambda m, x: m.mask_head(x, jnp.ones((r,), bool), False))
  x = t(pooled)
  for i in range(1, 5):
    p = f'roi_heads.mask_head.mask_fcn{i}'
    x = F.relu(bn(F.conv2d(x, sd[p + '.weight'], padding=1), p))
  x = F.relu(F.conv_transpose2d(x, sd['roi_heads.mask_head.deconv.weight'],
                                sd['roi_heads.mask_head.deconv.bias'], stride=2))
  want = F.conv2d(x, sd['roi_heads.mask_head.predictor.weight'],
                  sd['roi_heads.mask_head.predictor.bias']).numpy().transpose(0, 2, 3, 1)
  chain = [9 * c, c * 4] * 4 + [c, c]
  tolerance.assert_close(got, want, tolerance.tol(np.float32, chain, np.abs(want).max(), sides=2),
                         what='mask head (transposed conv) vs torch')


def np_iou(a, b):
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), -1)
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
  union = area(a)[:, None] + area(b)[None, :] - inter
  return np.where(inter > 0, inter / np.where(inter > 0, union, 1), 0.0)


def test_sample_rois_fixed_counts_and_labels():
  settings = roi_heads.ROISettings(batch_size_per_image=32, positive_fraction=0.25)
  rng = np.random.default_rng(6)
  gt = random_boxes(rng, G, 20, 50)
  gt_valid = np.array([True, True, True, False])
  gt_classes = np.array([2, 0, 1, -1], np.int32)
  # Proposals: jittered copies of the gt (many foreground) and random boxes.
  near = np.repeat(gt[:3], 6, 0) + rng.normal(0, 3, (18, 4)).astype(np.float32)
  proposals = np.concatenate([near, random_boxes(rng, 22)])
  valid = rng.random(40) < 0.9
  s = jax.jit(lambda *a: roi_heads.sample_rois(*a, settings, K))(
      proposals, valid, gt, gt_classes, gt_valid, jax.random.key(0))
  s = jax.tree.map(np.asarray, s)
  cand = np.concatenate([proposals, gt])
  cand_valid = np.concatenate([valid, gt_valid])
  iou = np_iou(gt[gt_valid], cand)
  best = iou.max(0)
  n_pos = int(np.sum(cand_valid & (best >= 0.5)))
  n_neg = int(np.sum(cand_valid & (best < 0.5)))
  want_fg = min(n_pos, settings.mask_rois)
  assert n_pos > settings.mask_rois  # the cap is exercised
  assert s['fg'].sum() == want_fg and s['fg'][:want_fg].all()  # foreground first
  assert s['valid'].sum() == min(32, want_fg + n_neg) and not s['valid'][s['valid'].sum():].any()
  rois_iou = np_iou(gt[gt_valid], s['rois'])
  np.testing.assert_array_equal(s['fg'][s['valid']], rois_iou.max(0)[s['valid']] >= 0.5)
  fg = s['fg']
  np.testing.assert_array_equal(s['classes'][fg], gt_classes[gt_valid][rois_iou.argmax(0)][fg])
  assert np.all(s['classes'][s['valid'] & ~fg] == K)


def np_nms(boxes, scores, threshold):
  keep = []
  for i in np.argsort(-scores, kind='stable'):
    if all(np_iou(boxes[i:i + 1], boxes[j:j + 1])[0, 0] <= threshold for j in keep):
      keep.append(i)
  return keep


def test_detect_vs_numpy():
  settings = roi_heads.ROISettings(score_thresh=0.2, nms_thresh=0.5, detections_per_image=12)
  rng = np.random.default_rng(7)
  r, hw = 30, (70, 90)
  # Clusters of overlapping proposals, so that NMS suppresses.
  proposals = (np.repeat(random_boxes(rng, 5, 15, 40), 6, 0)
               + rng.normal(0, 2, (r, 4))).astype(np.float32)
  proposal_valid = rng.random(r) < 0.9
  logits = rng.normal(0, 1.5, (r, K + 1)).astype(np.float32)
  deltas = rng.normal(0, 0.5, (r, K, 4)).astype(np.float32)
  got = jax.jit(lambda *a: roi_heads.detect(*a, settings))(
      logits, deltas, proposals, proposal_valid, np.array(hw, np.int32))
  boxes, scores, classes, valid = (np.asarray(x) for x in got)
  # NumPy: softmax, decode with weights (10, 10, 5, 5) and the clamp, clip,
  # threshold, greedy NMS per class, the best D.
  p = np.exp(logits.astype(np.float64) - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  px = proposals.astype(np.float64)
  pw, ph = px[:, 2] - px[:, 0], px[:, 3] - px[:, 1]
  cx, cy = px[:, 0] + 0.5 * pw, px[:, 1] + 0.5 * ph
  d = deltas.astype(np.float64)
  clamp = np.log(1000.0 / 16)
  bx = d[..., 0] / 10 * pw[:, None] + cx[:, None]
  by = d[..., 1] / 10 * ph[:, None] + cy[:, None]
  bw = np.exp(np.minimum(d[..., 2] / 5, clamp)) * pw[:, None]
  bh = np.exp(np.minimum(d[..., 3] / 5, clamp)) * ph[:, None]
  dec = np.stack([np.clip(bx - bw / 2, 0, hw[1]), np.clip(by - bh / 2, 0, hw[0]),
                  np.clip(bx + bw / 2, 0, hw[1]), np.clip(by + bh / 2, 0, hw[0])], -1)
  kept, candidates = [], 0
  for c in range(K):
    rows = np.flatnonzero((p[:, c] > settings.score_thresh) & proposal_valid)
    candidates += len(rows)
    kept += [(p[i, c], i, c) for i in rows[np_nms(dec[rows, c], p[rows, c], 0.5)]]
  suppressed = candidates - len(kept)
  kept = sorted(kept, key=lambda x: -x[0])[:settings.detections_per_image]
  print(f'{candidates} candidates, {suppressed} suppressed, {len(kept)} kept')
  assert suppressed > 0 and len(kept) == settings.detections_per_image  # NMS and the cap act
  assert valid.sum() == len(kept) and valid[:len(kept)].all()
  want_scores = np.array([k[0] for k in kept])
  want_boxes = np.stack([dec[i, c] for _, i, c in kept])
  np.testing.assert_array_equal(classes[:len(kept)], [k[2] for k in kept])
  tolerance.assert_close(scores[:len(kept)], want_scores,
                         tolerance.tol(np.float32, [K + 1, 2 * tolerance.TRANSCENDENTAL], 1.0),
                         what='detection scores')
  tolerance.assert_close(boxes[:len(kept)], want_boxes,
                         tolerance.tol(np.float32, 3 * tolerance.TRANSCENDENTAL + 4,
                                       float(np.abs(want_boxes).max()), worst_case=True),
                         what='detection boxes')


def test_deconv_layout_vs_torch_conv_transpose():
  torch = pytest.importorskip('torch')
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(8)
  cin, cout = 5, 7
  x = rng.normal(0, 1, (2, 6, 5, cin)).astype(np.float32)
  layer = nn.ConvTranspose(cout, (2, 2), strides=(2, 2), padding='VALID')
  params = layer.init(jax.random.key(0), x)
  kernel = rng.normal(0, 1, (2, 2, cin, cout)).astype(np.float32)  # asymmetric: a flip shows
  bias = rng.normal(0, 1, cout).astype(np.float32)
  got = layer.apply({'params': {'kernel': kernel, 'bias': bias}}, x)
  assert params['params']['kernel'].shape == kernel.shape
  ref = torch.nn.ConvTranspose2d(cin, cout, 2, stride=2)
  with torch.no_grad():
    ref.weight.copy_(torch.from_numpy(det_export.deconv_weight(kernel)))
    ref.bias.copy_(torch.from_numpy(bias))
    want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  # Stride 2, kernel 2: each output is one input pixel's dot product over cin.
  tolerance.assert_close(got, want, tolerance.tol(np.float32, [cin, 1], np.abs(want).max(),
                                                  sides=2), what='ConvTranspose vs torch')


def test_masked_batch_norm_vs_numpy():
  rng = np.random.default_rng(9)
  x = rng.normal(2, 3, (10, 3, 3, 5)).astype(np.float32)
  mask = rng.random(10) < 0.6
  layer = roi_heads.MaskedBatchNorm()
  v = layer.init(jax.random.key(0), x, mask)
  scale = rng.uniform(0.5, 2, 5).astype(np.float32)
  bias = rng.normal(0, 1, 5).astype(np.float32)
  v = {'params': {'scale': scale, 'bias': bias}, 'batch_stats': v['batch_stats']}
  apply = jax.jit(lambda v, x, m: layer.apply(v, x, m, mutable=['batch_stats']))
  y, new = apply(v, x, mask)
  rows = x[mask].astype(np.float64)
  mean, var = rows.mean((0, 1, 2)), rows.var((0, 1, 2))
  want = (x - mean) / np.sqrt(var + 1e-5) * scale + bias
  n = int(mask.sum()) * 9
  tolerance.assert_close(y, want, tolerance.tol(np.float32, [n, n, 8], np.abs(want).max()),
                         what='masked BN output')
  tolerance.assert_close(new['batch_stats']['mean'], 0.1 * mean,
                         tolerance.tol(np.float32, n, np.abs(mean).max()), what='running mean')
  tolerance.assert_close(new['batch_stats']['var'], 0.9 + 0.1 * var,
                         tolerance.tol(np.float32, [n, n], var.max()), what='running var')
  # No valid row: mean 0, variance 1, running averages unchanged.
  y, new = apply(v, x, np.zeros(10, bool))
  tolerance.assert_close(y, x / np.sqrt(1 + 1e-5) * scale + bias,
                         tolerance.tol(np.float32, tolerance.TRANSCENDENTAL + 3,
                                       np.abs(x * scale).max() + np.abs(bias).max(),
                                       worst_case=True),
                         what='masked BN without valid rows')
  np.testing.assert_array_equal(new['batch_stats']['mean'], v['batch_stats']['mean'])
  np.testing.assert_array_equal(new['batch_stats']['var'], v['batch_stats']['var'])
