"""Tests of mcl_jax.data.input_pipeline: sources, sharding, determinism, errors."""

import dataclasses
import io
import itertools

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs.mcl_100ep import get_config
from mcl_jax.data import device_crops, digits, folder
from mcl_jax.data import tfds as tfds_source
from mcl_jax.data import input_pipeline as ip
from tests import tolerance

# Tests of both crop paths (data.crop_on) run once per path.
both_paths = pytest.mark.parametrize('crop_on', ['host', 'device'])


def _data_cfg(**overrides):
  cfg = get_config().data
  cfg.image_size = 8
  cfg.num_crops = 2
  cfg.shuffle_buffer = 64
  cfg.max_side = 32
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _crops(batch, cfg):
  """uint8 crops of a batch of either path (the device path cuts them here)."""
  return np.asarray(device_crops.crops_of(
      device_crops.step_images(batch, cfg.crop_on), cfg))


def _image_keys(crop_on):
  return {'crops'} if crop_on == 'host' else set(device_crops.DEVICE_KEYS)


def _take(it, n):
  return list(itertools.islice(it, n))


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---- digits: sharding and determinism ---------------------------------------


def test_digits_shards_are_disjoint_and_cover():
  cfg = _data_cfg(source='digits')
  g = 240  # divisible by 1, 2 and 3 processes
  spe = ip.open_source(cfg).steps_per_epoch(g)
  n = ip.open_source(cfg).num_examples
  assert spe == n // g and n == 1797 - round(0.2 * 1797)
  _, _, splits = digits.digits_arrays(0.2)

  def batches(p, count, steps, start_step=0):
    it = ip.open_source(cfg).train_iterator(global_batch=g, seed=1,
                                  start_step=start_step, process_index=p,
                                  process_count=count, include_index=True)
    assert it.local_batch == g // count and it.steps_per_epoch == spe
    return _take(it, steps)

  # Three processes over one epoch: disjoint, inside the train split,
  # covering it but for the final partial batch.
  per_process = [batches(p, 3, spe) for p in range(3)]
  seen = np.concatenate([b['index'] for bs in per_process for b in bs])
  assert len(np.unique(seen)) == len(seen) == spe * g
  assert np.isin(seen, splits['train']).all()
  assert n - len(seen) < g
  # The union of a step's local batches does not depend on process_count:
  # same examples, same crops, in process order.
  for step in (0, spe - 1):
    single = batches(0, 1, 1, start_step=step)[0]
    two = [batches(p, 2, 1, start_step=step)[0] for p in range(2)]
    for shards in (two, [bs[step] for bs in per_process]):
      joined = {k: np.concatenate([b[k] for b in shards]) for k in single}
      _assert_batches_equal(joined, single)
  # The next epoch is a different permutation.
  next_epoch = batches(0, 1, 1, start_step=spe)[0]
  first = np.concatenate([bs[0]['index'] for bs in per_process])
  assert not np.array_equal(first, next_epoch['index'])


@both_paths
def test_digits_batch_format_and_eval_split(crop_on):
  cfg = _data_cfg(source='digits', image_size=16, num_crops=3, crop_on=crop_on)
  batch = next(ip.open_source(cfg).train_iterator(global_batch=8, seed=0,
                                        process_index=0, process_count=1))
  assert set(batch) == _image_keys(crop_on) | {'label'}
  if crop_on == 'device':
    assert batch['image'].shape == (8, 32, 32, 3)
    assert batch['image'].dtype == np.uint8
    # The buffer holds the union of the windows, which touches its edges.
    size, w = batch['size'], batch['windows']
    assert size.shape == (8, 2) and (size >= 1).all() and (size <= 16).all()
    assert w.shape == (8, 3, 4) and w.dtype == np.float32
    assert (w[..., :2] >= 0).all() and (w[..., 2:] > 0).all()
    np.testing.assert_array_equal(w[..., :2].min(1), 0)
    np.testing.assert_array_equal((w[..., :2] + w[..., 2:]).max(1), size)
    for img, (h, wd) in zip(batch['image'], size):  # zero padding beyond
      assert not img[h:].any() and not img[:, wd:].any()
  crops = _crops(batch, cfg)
  assert crops.shape == (8, 3, 16, 16, 3)
  assert crops.dtype == np.uint8 and batch['label'].dtype == np.int32
  assert crops.max() > 100  # real digit strokes, not zeros
  # Independent crops of the same image differ.
  assert not np.array_equal(crops[:, 0], crops[:, 1])
  x, y = ip.open_source(cfg).eval_arrays('heldout')
  xt, yt = ip.open_source(cfg).eval_arrays('train')
  assert x.shape == (359, 16, 16, 3) and x.dtype == np.uint8
  assert y.dtype == np.int32 and set(y) == set(range(10))
  assert len(xt) + len(x) == 1797
  np.testing.assert_array_equal(x[..., 0], x[..., 2])  # gray -> 3 channels
  # The split is fixed: it ignores the config seed.
  _, _, splits = digits.digits_arrays(0.2)
  assert not set(splits['train']) & set(splits['heldout'])


@both_paths
def test_same_step_same_batch_and_start_step_continues(crop_on):
  cfg = _data_cfg(source='digits', crop_on=crop_on)
  g = 480  # 1438 // 480 = 2 steps per epoch: batch 2 starts epoch 1.
  make = lambda **kw: ip.open_source(cfg).train_iterator(global_batch=g, process_index=0, process_count=1,
      include_index=True, **kw)
  stream = _take(make(seed=3), 4)
  for k in (1, 2, 3):
    resumed = _take(make(seed=3, start_step=k), min(2, 4 - k))
    for i, batch in enumerate(resumed):
      _assert_batches_equal(batch, stream[k + i])
  assert not np.array_equal(_crops(stream[0], cfg), _crops(stream[1], cfg))
  other_seed = next(make(seed=4))
  assert not np.array_equal(other_seed['index'], stream[0]['index'])


def test_to_global_batch_single_process():
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('data'))
  local = {'crops': np.zeros((16, 2, 4, 4, 3), np.uint8),
           'label': np.arange(16, dtype=np.int32)}
  out = ip.to_global_batch(local, sharding)
  assert out['crops'].shape == (16, 2, 4, 4, 3)
  assert out['label'].sharding == sharding
  np.testing.assert_array_equal(np.asarray(out['label']), local['label'])


# ---- folder: odd files ------------------------------------------------------


def _save(img, path, fmt, **kw):
  path.parent.mkdir(parents=True, exist_ok=True)
  img.save(path, fmt, **kw)


@pytest.fixture(scope='module')
def odd_folder(tmp_path_factory):
  """Folder with one file of each awkward kind; values are solid colours."""
  root = tmp_path_factory.mktemp('odd')
  solid = lambda rgb: Image.new('RGB', (40, 30), rgb)
  expected = {}
  _save(solid((200, 50, 100)), root / 'a' / 'rgb.jpg', 'JPEG', quality=95)
  expected['a/rgb.jpg'] = (200, 50, 100)
  _save(solid((10, 200, 30)), root / 'a' / 'rgb.png', 'PNG')
  expected['a/rgb.png'] = (10, 200, 30)
  _save(solid((60, 120, 180)).convert('CMYK'), root / 'a' / 'cmyk.jpg',
        'JPEG', quality=95)
  expected['a/cmyk.jpg'] = (60, 120, 180)
  _save(Image.new('RGBA', (30, 40), (10, 20, 30, 50)), root / 'b' / 'rgba.png',
        'PNG')
  expected['b/rgba.png'] = (10, 20, 30)
  gray16 = Image.fromarray(np.full((30, 40), 40000, np.uint16))
  _save(gray16, root / 'b' / 'gray16.png', 'PNG')
  expected['b/gray16.png'] = (156, 156, 156)  # 40000 / 65535 * 255
  _save(Image.new('L', (40, 30), 77), root / 'b' / 'gray.jpg', 'JPEG',
        quality=95)
  expected['b/gray.jpg'] = (77, 77, 77)
  # Not an image at all: PIL cannot identify it, dropped at listing.
  (root / 'bad.jpg').write_bytes(b'\xff\xd8\xff' + bytes(range(256)) * 8)
  # Valid header, truncated data: only decoding finds out.
  png = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(
      0, 255, (30, 40, 3), dtype=np.uint8)).save(png, 'PNG')
  (root / 'trunc.png').write_bytes(png.getvalue()[:200])
  (root / 'notes.txt').write_text('not an image')
  return root, expected


@both_paths
def test_folder_reads_odd_files_and_skips_corrupt(odd_folder, crop_on):
  root, expected = odd_folder
  # max_side 16 < the 40x30 files: the device path downscales them.
  cfg = _data_cfg(source='folder', folder=str(root), train_split='train',
                  crop_on=crop_on, max_side=16)
  index = folder.scan_folder(ip.DataSpec.from_config(cfg), 'train')
  rel = [str(p)[len(str(root)) + 1:] for p in index.paths]
  assert rel == ['trunc.png', 'a/cmyk.jpg', 'a/rgb.jpg', 'a/rgb.png',
                 'b/gray.jpg', 'b/gray16.png', 'b/rgba.png']
  assert index.class_names == ('a', 'b')
  np.testing.assert_array_equal(index.labels, [-1, 0, 0, 0, 1, 1, 1])
  assert [r for r, k in zip(rel, index.kinds) if k == 0] == [
      'a/rgb.jpg', 'b/gray.jpg']  # the rest goes through PIL
  assert len(index.skipped) == 1 and index.skipped[0].endswith('bad.jpg')

  it = ip.open_source(cfg).train_iterator(global_batch=1, seed=0, process_index=0,
                                process_count=1, include_index=True)
  seen = {}
  for batch in _take(it, 12):  # two epochs of six good files
    seen.setdefault(int(batch['index'][0]), []).append(batch)
  assert sorted(rel[i] for i in seen) == sorted(expected)
  for i, batches in seen.items():
    assert len(batches) == 2
    for b in batches:
      crops = _crops(b, cfg)
      assert crops.shape == (1, 2, 8, 8, 3)
      assert b['label'][0] == index.labels[i]
      # JPEG (quality 95, chroma subsampled, CMYK converted) is lossy: 6
      # grey levels is the codec's error on a solid colour, not rounding.
      np.testing.assert_allclose(crops.reshape(-1, 3).mean(0),
                                 expected[rel[i]], atol=6, err_msg=rel[i])
  assert it.stats.skipped_at_scan == 1
  assert it.stats.failed_decodes >= 1  # trunc.png, once per epoch
  assert it.num_skipped >= 2


def test_folder_eval_arrays(odd_folder):
  root, expected = odd_folder
  cfg = _data_cfg(source='folder', folder=str(root), image_size=16)
  x, y = ip.open_source(cfg).eval_arrays('validation')  # no such subfolder: root
  assert x.shape == (6, 16, 16, 3) and x.dtype == np.uint8
  np.testing.assert_array_equal(y, [0, 0, 0, 1, 1, 1])
  # A solid colour resized: weights summing to 1 up to float rounding, far
  # below half a grey level, so the uint8 rounding gives the colour back;
  # the bound is that one rounding (the PNG is lossless).
  tolerance.assert_close(x[5].reshape(-1, 3).mean(0), expected['b/rgba.png'],
                         atol=tolerance.tol(np.uint8, 1, worst_case=True),
                         what='eval array of a solid RGBA PNG')


@pytest.mark.parametrize('setup', ['missing', 'empty', 'no_images', 'unset'])
def test_folder_errors_are_clear(tmp_path, setup):
  folder = str(tmp_path / 'nope')
  if setup == 'empty':
    (tmp_path / 'nope').mkdir()
  elif setup == 'no_images':
    (tmp_path / 'nope' / 'cls').mkdir(parents=True)
    (tmp_path / 'nope' / 'cls' / 'readme.txt').write_text('x')
  elif setup == 'unset':
    folder = None
  cfg = _data_cfg(source='folder', folder=folder)
  with pytest.raises(ip.DatasetNotFoundError, match='data.folder'):
    ip.open_source(cfg).train_iterator(global_batch=2, seed=0, process_index=0,
                             process_count=1)


# ---- tfds -------------------------------------------------------------------


class McltestTinyImages(tfds.core.GeneratorBasedBuilder):
  """Twenty 40x30 JPEG images in three classes, built locally."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3),
                                         encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(20),
            'validation': self._generate_examples(6)}

  def _generate_examples(self, n):
    rng = np.random.default_rng(n)
    for i in range(n):
      yield i, {'image': rng.integers(0, 256, (40, 30, 3), dtype=np.uint8),
                'label': i % 3}


@pytest.fixture(scope='module')
def tiny_tfds(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  McltestTinyImages(data_dir=data_dir).download_and_prepare()
  return data_dir


@both_paths
def test_tfds_stream(tiny_tfds, crop_on):
  cfg = _data_cfg(source='tfds', tfds_name='mcltest_tiny_images',
                  tfds_data_dir=tiny_tfds, crop_on=crop_on)
  assert ip.open_source(cfg).num_examples == 20
  make = lambda **kw: ip.open_source(cfg).train_iterator(global_batch=4, seed=0, process_count=2, **kw)
  stream = _take(make(process_index=1), 7)  # 5 steps per epoch
  assert set(stream[0]) == _image_keys(crop_on) | {'label'}
  assert _crops(stream[0], cfg).shape == (2, 2, 8, 8, 3)
  assert set(np.concatenate([b['label'] for b in stream])) <= {0, 1, 2}
  for k in (3, 5):
    for i, batch in enumerate(_take(make(process_index=1, start_step=k), 2)):
      _assert_batches_equal(batch, stream[k + i])
  other = _take(make(process_index=0), 5)
  assert not any(np.array_equal(_crops(a, cfg), _crops(b, cfg))
                 for a, b in zip(other, stream))
  x, y = ip.open_source(cfg).eval_arrays('validation')
  assert x.shape == (6, 8, 8, 3) and x.dtype == np.uint8
  assert sorted(y) == [0, 0, 1, 1, 2, 2]


def test_tfds_missing_dataset_error(tmp_path):
  cfg = _data_cfg(source='tfds', tfds_name='imagenet2012',
                  tfds_data_dir=str(tmp_path / 'tfds'))
  with pytest.raises(ip.DatasetNotFoundError) as err:
    ip.open_source(cfg).train_iterator(global_batch=4, seed=0, process_index=0,
                             process_count=1)
  msg = str(err.value)
  for needle in ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar',
                 str(tmp_path / 'tfds' / 'downloads' / 'manual'),
                 'tfds build imagenet2012', 'tfds_download_and_prepare'):
    assert needle in msg
  # Sizes still come from the config when the files are missing.
  assert tfds_source.num_examples(ip.DataSpec.from_config(cfg)) == 1_281_167
  cfg.tfds_name = 'mnist'
  with pytest.raises(ip.DatasetNotFoundError, match='tfds build mnist'):
    ip.open_source(cfg).train_iterator(global_batch=4, seed=0, process_index=0,
                             process_count=1)
  cfg.tfds_name = 'no_such_dataset_mcl'
  with pytest.raises(ip.DatasetNotFoundError, match='unknown TFDS dataset'):
    ip.open_source(cfg).train_iterator(global_batch=4, seed=0, process_index=0,
                             process_count=1)


# ---- the source table and the spec ------------------------------------------


def test_unknown_source_is_one_error():
  cfg = _data_cfg(source='imagenet_folder')
  # Every question goes through the opened source, so opening is the one place.
  asks = [lambda: ip.open_source(cfg),
          lambda: ip.open_source(ip.DataSpec.from_config(cfg))]
  messages = set()
  for ask in asks:
    with pytest.raises(ValueError) as err:
      ask()
    assert type(err.value) is ValueError  # not a missing-data error
    messages.add(str(err.value))
  assert messages == {"unknown data.source 'imagenet_folder': expected one "
                      "of 'tfds', 'folder', 'digits'"}


def test_spec_reads_every_base_data_field():
  data = get_config().data
  spec = ip.DataSpec.from_config(data)
  # Every field the data code reads is in the base config, and every base
  # data field is read: no defaults, no dead settings.
  assert ({f.name for f in dataclasses.fields(ip.DataSpec)} ==
          set(data.keys()))
  assert spec.crop_scale == (0.2, 1.0) and spec.num_threads is None
  assert ip.DataSpec.from_config(spec) is spec
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.image_size = 32
  del data.eval_crop_fraction
  with pytest.raises(AttributeError):
    ip.DataSpec.from_config(data)
