"""Dense probe (mcl_jax.eval.dense_probe) and its data (mcl_jax.data.segmentation)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mcl_jax import cli
from mcl_jax import dense_eval as dense_eval_cmd
from mcl_jax.eval import dense_probe
from mcl_jax.data import segmentation as sd
from tests import tolerance


# ------------------------------------------------------------- digit scenes --


def test_resize_matrices_match_jax_image_resize():
  rng = np.random.default_rng(0)
  for n_in, n_out in ((8, 8), (8, 13), (8, 32), (2, 16), (16, 64)):
    x = rng.normal(size=(n_in, n_in))
    want = jax.image.resize(jnp.asarray(x), (n_out, n_out), 'linear', antialias=False)
    # jax's float32 resize: x rounded to float32, per axis 2 taps (two
    # products, a sum) whose weights (>= 0, summing to 1) come from a sample
    # position of 3 roundings of values up to n_in: an absolute weight error
    # of 3 u n_in, times a tap difference of up to 2 max |x|. The float32
    # matrices add one rounding per weight and axis on the other side.
    t = lambda n, scale: tolerance.tol(np.float32, n, scale, worst_case=True)
    tol = t(1 + 2 * 3, np.abs(x).max()) + 2 * t(3, n_in) * 2 * np.abs(x).max()
    tolerance.assert_close(sd.resize_digit(x, n_out), want, atol=tol,
                           what=f'resize_digit {n_in} -> {n_out}')
    m = dense_probe.resize_matrix(n_in, n_out)
    tolerance.assert_close(m @ x @ m.T, want,
                           atol=tol + tolerance.tol(np.float32, 2, np.abs(x).max(), worst_case=True),
                           what=f'resize_matrix {n_in} -> {n_out}')


@pytest.fixture(scope='module')
def digits():
  from mcl_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
  return input_pipeline.digits_arrays(0.2)


def test_size_edges_are_the_thirds_of_the_log_range():
  assert sd.size_edges() == (13, 21)  # 8 * 4^(1/3) = 12.7, 20.2
  # 8 * 8^(1/3) is 16.000000000000004 in floats: the edge is still 16.
  assert sd.size_edges((8, 64)) == (16, 32)
  assert sd.size_rule((8, 64)) == ('by digit side: small 8-15 px, medium 16-31 px, '
                                   'large 32-64 px')


# (scene side, digit sides, edges written out by hand)
SCENE_CASES = [(64, sd.DIGIT_SIDES, (13, 21)), (128, (8, 64), (16, 32))]


@pytest.mark.parametrize('size, sides, edges', SCENE_CASES)
def test_scene_labels_match_the_pasted_pixels(digits, size, sides, edges):
  images, labels, _ = digits
  scenes = sd.make_digit_scenes(images[:300], labels[:300], 40, seed=7, size=size,
                                sides=sides)
  sides_seen = []
  for n, objects in enumerate(scenes.objects):
    assert sd.DIGITS_PER_SCENE[0] <= len(objects) <= sd.DIGITS_PER_SCENE[1]
    # Paint the squares again, in order, and compare.
    want_label = np.zeros((size, size), np.int64)
    want_pixel = np.full((size, size), np.nan)
    want_bin = np.full((size, size), sd.NO_OBJECT)
    for digit_id, cls, y0, x0, side in objects:
      assert cls == labels[digit_id]
      sides_seen.append(side)
      up = sd.resize_digit(images[digit_id], side)  # checked against jax.image.resize above
      want_label[y0:y0 + side, x0:x0 + side] = cls + 1
      want_pixel[y0:y0 + side, x0:x0 + side] = np.asarray(up)
      want_bin[y0:y0 + side, x0:x0 + side] = (0 if side < edges[0] else
                                              (1 if side < edges[1] else 2))
    np.testing.assert_array_equal(scenes.labels[n], want_label)
    np.testing.assert_array_equal(scenes.size_bins[n], want_bin)
    fg = want_label > 0
    # Pasted pixels: the digit's value plus at most NOISE (then rounded to
    # uint8, clipped), the float64 sums a few roundings of values <= 255 + NOISE.
    diff = np.abs(scenes.images[n][fg].astype(np.float64) - want_pixel[fg][:, None])
    assert (diff <= sd.NOISE + tolerance.tol(np.uint8, 1, worst_case=True)
            + tolerance.tol(np.float64, 4, 255 + sd.NOISE, worst_case=True)).all()
    # The background is textured, not flat.
    assert scenes.images[n][~fg].std() > 5
  # Log-uniform over the range: its ends are reached.
  assert min(sides_seen) <= sides[0] + 1 and max(sides_seen) >= sides[1] - 2
  assert sides[0] <= min(sides_seen) and max(sides_seen) <= sides[1]


def test_scenes_split_disjoint_and_deterministic(digits):
  _, _, splits = digits
  a = sd.digit_scenes(0.2, num_train=30, num_test=20, seed=3)
  b = sd.digit_scenes(0.2, num_train=30, num_test=20, seed=3)
  c = sd.digit_scenes(0.2, num_train=30, num_test=20, seed=4)
  for x, y in ((a.train, b.train), (a.test, b.test)):
    np.testing.assert_array_equal(x.images, y.images)
    np.testing.assert_array_equal(x.labels, y.labels)
    assert x.objects == y.objects
  assert not np.array_equal(a.train.images, c.train.images)
  train_ids = {o[0] for scene in a.train.objects for o in scene}
  test_ids = {o[0] for scene in a.test.objects for o in scene}
  assert train_ids <= set(splits['train'].tolist())
  assert test_ids <= set(splits['heldout'].tolist())
  assert not train_ids & test_ids
  assert a.num_classes == 11 and a.train.labels.max() <= 10


# ------------------------------------------------------------------- scoring --


def reference_scores(labels, preds, bins, k):
  """mIoU / pixel accuracy / mIoU per size, one class and one pixel set at a time."""

  def miou(keep):
    ious = []
    for c in range(k):
      gt, pr = (labels == c) & keep, (preds == c) & keep
      union = (gt | pr).sum()
      if union:
        ious.append((gt & pr).sum() / union)
    return np.mean(ious)

  valid = labels != 255
  out = {'miou': miou(valid), 'pixel_acc': (preds == labels)[valid].mean()}
  for b, name in enumerate(('small', 'medium', 'large')):
    out[f'miou_{name}'] = miou(valid & ((bins == b) | (bins == 255)))
  return out


def test_score_matches_reference():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 6, (5, 20, 20)).astype(np.uint8)
  labels[rng.random(labels.shape) < 0.1] = 255
  preds = np.where(rng.random(labels.shape) < 0.6, labels, rng.integers(0, 6, labels.shape))
  preds = np.where(preds == 255, 0, preds).astype(np.uint8)
  bins = np.where(labels == 0, 255, rng.integers(0, 3, labels.shape)).astype(np.uint8)
  got = dense_probe.score(labels, preds, bins, 6)
  want = reference_scores(labels, preds, bins, 6)
  # float64 ratios of integer counts and their mean over at most 6 classes
  # (or 3 size bins): a sum of 6 and a quotient each, values <= 1.
  for key, value in want.items():
    assert got[key] == pytest.approx(value, abs=tolerance.tol(np.float64, 6 + 2, worst_case=True)), key


def test_probe_logits_equal_upsample_concat_conv():
  """The per-map shortcut equals: upsample to the finest map, concat, 1x1 conv, upsample."""
  rng = np.random.default_rng(2)
  maps = [jnp.asarray(rng.normal(size=(2, s, s, c)), jnp.float32)
          for s, c in ((8, 3), (4, 5), (2, 4), (1, 2))]
  params = {'kernel': jnp.asarray(rng.normal(size=(14, 7)), jnp.float32),
            'bias': jnp.asarray(rng.normal(size=(7,)), jnp.float32)}
  up = [jax.image.resize(m, (2, 8, 8, m.shape[3]), 'linear', antialias=False) for m in maps]
  x = jnp.concatenate(up, axis=-1)
  want = jax.image.resize(x @ params['kernel'] + params['bias'], (2, 32, 32, 7), 'linear',
                          antialias=False)
  got = dense_probe.probe_logits(params, maps, (32, 32))
  # Two float32 orders of the same linear map: the 1x1 conv over 14 (or a
  # map's 2-5) channels, two bilinear resizes of 2 taps per axis (4 sums of
  # 2), the sum over 4 maps; relative to the largest logit.
  tol = tolerance.tol(np.float32, [14, 2, 2, 2, 2, 4], np.abs(np.asarray(want)).max(), sides=2)
  tolerance.assert_close(np.asarray(got).transpose(0, 2, 3, 1), want, atol=tol,
                         what='probe logits vs upsample, concat, conv')


def test_cross_entropy_ignores_255():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 4, 5, 5)).astype(np.float32)
  labels = rng.integers(0, 4, (2, 5, 5)).astype(np.uint8)
  labels[0, :2] = 255
  got = float(dense_probe.masked_cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
  lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  keep = labels != 255
  nll = -np.take_along_axis(lp, np.where(keep, labels, 0)[:, None].astype(int), 1)[:, 0]
  # Both float32 (the NumPy side on float32 arrays): per pixel a logsumexp
  # over 4 classes (a sum of positive terms, an exp and a log) relative to
  # |log p| <= 2 max |logits| + log 4, then the mean over the kept pixels
  # (positive terms, relative to itself).
  scale = 2 * np.abs(logits).max() + np.log(4)
  tol = (tolerance.tol(np.float32, [4, int(keep.sum())], scale, sides=2)
         + tolerance.tol(np.float32, 2 * tolerance.TRANSCENDENTAL, scale, sides=2,
                         worst_case=True))
  tolerance.check(abs(got - nll[keep].mean()), tol, 'masked cross-entropy')


def test_probe_on_one_hot_labels_is_perfect(digits):
  """Features that are a one-hot encoding of the labels: mIoU 1.0 everywhere."""
  images, labels, _ = digits
  train = sd.make_digit_scenes(images[:200], labels[:200], 24, seed=1, size=32, sides=(8, 32))
  test = sd.make_digit_scenes(images[200:400], labels[200:400], 12, seed=2, size=32,
                              sides=(8, 32))
  test.labels[:, :3] = 255  # ignored pixels play no part
  one_hot = lambda s: [np.eye(11, dtype=np.float32)[np.where(s.labels == 255, 0, s.labels)]]
  result, preds = dense_probe.fit_and_score(one_hot(train), train.labels, one_hot(test), test, 11)
  keep = test.labels != 255
  np.testing.assert_array_equal(preds[keep], test.labels[keep])
  for key in ('miou', 'pixel_acc', 'miou_small', 'miou_medium', 'miou_large'):
    assert result[key] == 1.0, key


# ----------------------------------------------------------------------- VOC --


def _palette_png(path, array):
  im = Image.fromarray(array.astype(np.uint8), mode='P')
  im.putpalette(dense_probe.palette().reshape(-1).tolist())
  im.save(path)


def make_voc(root, sizes=None):
  """A tiny VOC-layout folder: 3 train and 2 val images of several sizes."""
  rng = np.random.default_rng(0)
  sizes = sizes or {'a': (40, 50), 'b': (48, 36), 'c': (64, 64), 'd': (50, 40), 'e': (36, 60)}
  for d in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
    os.makedirs(os.path.join(root, d), exist_ok=True)
  for i, (h, w) in sizes.items():
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
        os.path.join(root, 'JPEGImages', f'{i}.jpg'))
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4:3 * h // 4, w // 4:3 * w // 4] = 15  # a large 'person'
    mask[1:3, 1:3] = 7  # a small 'car'
    mask[h // 4 - 1, :] = 255  # a boundary line: ignored
    _palette_png(os.path.join(root, 'SegmentationClass', f'{i}.png'), mask)
  with open(os.path.join(root, 'ImageSets/Segmentation/train.txt'), 'w') as f:
    f.write('a\nb\nc\n')
  with open(os.path.join(root, 'ImageSets/Segmentation/val.txt'), 'w') as f:
    f.write('d\ne\n')


def test_voc_reader(tmp_path):
  make_voc(str(tmp_path))
  data = sd.voc(str(tmp_path), short_side=32)
  assert data.train.images.shape == (3, 32, 32, 3) and data.test.labels.shape == (2, 32, 32)
  assert data.num_classes == 21 and data.train.ids == ['a', 'b', 'c']
  # Palette indices come back as classes; nearest resizing invents none; 255 kept.
  assert set(np.unique(data.train.labels)) <= {0, 7, 15, 255}
  assert (data.train.labels == 255).any() and (data.train.labels == 15).any()
  person = data.train.labels == 15
  assert (data.train.size_bins[person] == 2).all()
  assert (data.train.size_bins[data.train.labels == 0] == sd.NO_OBJECT).all()
  # Ignored pixels are not scored: wrong predictions there change nothing.
  preds = np.where(data.test.labels == 255, 3, data.test.labels).astype(np.uint8)
  result = dense_probe.score(data.test.labels, preds, data.test.size_bins, 21)
  assert result['miou'] == 1.0 and result['pixel_acc'] == 1.0


def test_voc_reader_reads_a_bucket(gs_bucket, tmp_path, monkeypatch):
  """A VOC root in a bucket: the arrays of the same folder on disk, each object read once."""
  from mcl_jax import paths
  local, cloud = str(tmp_path / 'voc'), gs_bucket + '/voc'
  make_voc(local)
  for rel in paths.find(local):
    paths.write_atomic(paths.join(cloud, rel), paths.read_bytes(os.path.join(local, rel)))
  reads, read_bytes = [], paths.read_bytes
  monkeypatch.setattr(paths, 'read_bytes', lambda p: reads.append(p) or read_bytes(p))
  got, want = sd.voc(cloud, short_side=32), sd.voc(local, short_side=32)
  for split in ('train', 'test'):
    for field in ('images', 'labels', 'size_bins'):
      np.testing.assert_array_equal(getattr(getattr(got, split), field),
                                    getattr(getattr(want, split), field), err_msg=field)
  assert got.name == want.name == 'voc voc (32 px)'
  assert sorted(reads) == sorted(set(reads)) and len(reads) == 12  # 5 images, 5 masks, 2 lists


@pytest.mark.parametrize('breakage, message', [
    ('missing_mask', r'SegmentationClass/b\.png: mask missing'),
    ('mask_size', r'SegmentationClass/b\.png: mask is 10x12 but its image .* is 36x48'),
    ('absent_id', r"id 'zz' is listed in ImageSets/Segmentation/train\.txt but .*zz\.jpg "
     'does not exist'),
    ('empty_split', r'train\.txt: empty split'),
    ('rgb_mask', r'b\.png: mode RGB, expected a palette'),
])
def test_voc_bad_inputs(tmp_path, breakage, message):
  root = str(tmp_path)
  make_voc(root)
  mask_b = os.path.join(root, 'SegmentationClass', 'b.png')
  if breakage == 'missing_mask':
    os.remove(mask_b)
  elif breakage == 'mask_size':
    _palette_png(mask_b, np.zeros((12, 10)))
  elif breakage == 'absent_id':
    with open(os.path.join(root, 'ImageSets/Segmentation/train.txt'), 'a') as f:
      f.write('zz\n')
  elif breakage == 'empty_split':
    open(os.path.join(root, 'ImageSets/Segmentation/train.txt'), 'w').close()
  elif breakage == 'rgb_mask':
    Image.fromarray(np.zeros((48, 36, 3), np.uint8)).save(mask_b)
  with pytest.raises(sd.SegmentationDataError, match=message) as err:
    sd.voc(root, short_side=32)
  assert '\n' not in str(err.value)


# ----------------------------------------------------------------------- CLI --


def _random_fill(tree, seed):
  """Random arrays of a tree's shapes and dtypes, drawn in NumPy (no compilation)."""
  rng = np.random.default_rng(seed)

  def draw(x):
    if np.issubdtype(x.dtype, np.integer):
      return np.full(x.shape, 2, x.dtype)
    if x.ndim > 1:  # kernels: He-scaled, so that features neither vanish nor explode
      return (rng.normal(size=x.shape) * np.sqrt(2.0 / np.prod(x.shape[:-1]))).astype(x.dtype)
    return rng.uniform(0.5, 1.5, x.shape).astype(x.dtype)
  return jax.tree.map(draw, tree)


@pytest.fixture(scope='module')
def tiny_workdir(tmp_path_factory):
  """A real workdir of configs/test_tiny.py: config.json and an Orbax checkpoint of step 2.

  The state is the model's own TrainState structure (state.create_train_state)
  filled with random values and saved through checkpointing.save; compiling a
  train step here would cost minutes on 8 simulated CPU devices, and the
  probe's CLI only needs a checkpoint that load_variables restores.
  """
  from configs import test_tiny  # pylint: disable=import-outside-toplevel
  from mcl_jax.training import checkpointing, state as state_lib  # pylint: disable=import-outside-toplevel
  from mcl_jax.training import optim  # pylint: disable=g-import-not-at-top
  config = test_tiny.get_config()
  workdir = str(tmp_path_factory.mktemp('dense') / 'run')
  checkpointing.check_workdir(workdir)
  tx = optim.create_optimizer(config, config.optim.num_steps)
  state = _random_fill(jax.eval_shape(lambda k: state_lib.create_train_state(config, k, tx),
                                      jax.random.key(0)), 0)
  state = state.replace(step=np.asarray(2, np.int32))
  manager = checkpointing.make_manager(workdir, 1, async_save=False)
  checkpointing.save(manager, 2, state, force=True)
  manager.wait_until_finished()
  manager.close()
  checkpointing.save_config(workdir, config)
  return workdir


@pytest.fixture
def short_probe(monkeypatch):
  """The CLI tests check the wiring: 50 probe steps instead of the recipe's 500."""
  monkeypatch.setattr(dense_probe, 'PROBE_STEPS', 50)


def _run_cli(argv):
  """`python -m mcl_jax.dense_eval ARGV` in this process: (exit status, stderr via capsys)."""
  try:
    cli.run(dense_eval_cmd._cli_main, 'python -m mcl_jax.dense_eval',  # pylint: disable=protected-access
            ['python -m mcl_jax.dense_eval', *argv])
  except SystemExit as e:
    return e.code
  finally:
    cli.reset_logging()


def test_cli_end_to_end(tiny_workdir, tmp_path, capsys, short_probe):
  png = str(tmp_path / 'scenes.png')
  result = dense_eval_cmd.main(['--workdir', tiny_workdir, '--num_train', '16',
                                '--num_test', '8', '--png', png, '--digit_sides', '8', '64'])
  out = capsys.readouterr().out
  assert 'random init' in out and 'online step 2' in out and 'mIoU S' in out
  assert 'digits 8-64 px' in out and 'small 8-15 px, medium 16-31 px, large 32-64 px' in out
  for key in ('miou', 'pixel_acc', 'miou_small', 'miou_medium', 'miou_large'):
    assert 0.0 <= result[key] <= 1.0 and 0.0 <= result[f'random_{key}'] <= 1.0
  assert result['num_train'] == 16 and result['num_test'] == 8
  assert '50 steps' in out
  with Image.open(png) as im:  # 6 rows of image | labels | trained | random, 64 px each
    assert im.size[0] > 3 * im.size[1] // 6


def test_cli_c5_features_on_voc(tiny_workdir, tmp_path, capsys, short_probe):
  make_voc(str(tmp_path / 'voc'))
  # The dashed spellings of the flags still work.
  result = dense_eval_cmd.main(['--workdir', tiny_workdir, '--dataset', 'voc', '--voc-root',
                                str(tmp_path / 'voc'), '--image-size', '32', '--features',
                                'C5', '--png', 'none'])
  assert 'C5 features' in capsys.readouterr().out and 'png' not in result
  assert result['num_train'] == 3 and result['num_test'] == 2


@pytest.mark.parametrize('argv, code, message', [
    (['--dataset', 'voc'], 2, 'error: --dataset voc needs --voc_root'),
    (['--image_size', '40'], 2, 'must be a positive multiple of 32'),
    (['--features', 'P6'], 2, "invalid choice: 'P6'"),
    (['--digit_sides', '8', '96'], 2, 'need 1 <= MIN <= MAX <= the scene side (64)'),
    (['--digit_sides', '16', '8', '--image_size', '128'], 2, 'need 1 <= MIN <= MAX'),
    (['--dataset', 'voc', '--voc_root', '/x', '--digit_sides', '8', '16'], 2,
     '--digit_sides applies to --dataset digit_scenes only'),
    (['--dataset', 'voc', '--voc_root', '/nonexistent/voc'], 1,
     "error: VOC root '/nonexistent/voc' is not a directory"),
])
def test_cli_errors_are_one_line(tiny_workdir, capsys, argv, code, message):
  assert _run_cli(['--workdir', tiny_workdir, *argv]) == code
  err = capsys.readouterr().err
  assert message in err and err.count('\n') == 1 and 'Traceback' not in err


def test_cli_missing_workdir_is_one_line(tmp_path, capsys):
  assert _run_cli(['--workdir', str(tmp_path / 'nothing')]) == 1
  err = capsys.readouterr().err
  assert 'error: workdir' in err and 'does not exist' in err and err.count('\n') == 1
