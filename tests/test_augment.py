"""Tests of mcl_jax.data.augment against NumPy / colorsys references."""

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.mcl_100ep import get_config
from mcl_jax.data import augment

LUMA = np.asarray(augment.LUMA_WEIGHTS, np.float32)


@pytest.fixture(scope='module')
def aug_cfg():
  return get_config().augment


def _random_images(seed, n=4, size=12):
  return np.random.default_rng(seed).random((n, size, size, 3)).astype(
      np.float32)


# ---- references -------------------------------------------------------------


def _np_gray(img):
  return np.sum(img * LUMA, axis=-1, keepdims=True)


def _np_blend(img, ref, f):
  return np.clip(f * img + (1 - f) * ref, 0, 1)


def _np_hue(img, delta):
  flat = img.reshape(-1, 3).astype(np.float64)
  out = []
  for r, g, b in flat:
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    out.append(colorsys.hsv_to_rgb((h + delta) % 1.0, s, v))
  return np.clip(np.asarray(out).reshape(img.shape), 0, 1)


def _np_blur(img, sigma, k):
  x = np.arange(k) - k // 2
  w = np.exp(-0.5 * (x / sigma) ** 2)
  w /= w.sum()
  r = k // 2
  p = np.pad(img, ((r, r), (0, 0), (0, 0)), mode='reflect')
  img = sum(w[i] * p[i:i + img.shape[0]] for i in range(k))
  p = np.pad(img, ((0, 0), (r, r), (0, 0)), mode='reflect')
  return sum(w[i] * p[:, i:i + img.shape[1]] for i in range(k))


def _np_pipeline(img_u8, d, cfg, k):
  """Reference of one crop: docs/METHOD.md section 1, steps 2-7, with the given decisions."""
  x = img_u8.astype(np.float64) / 255.0
  if d['flip']:
    x = x[:, ::-1]
  if d['jitter']:
    for op in d['order']:
      if op == 0:
        x = _np_blend(x, 0.0, d['brightness'])
      elif op == 1:
        x = _np_blend(x, _np_gray(x).mean(), d['contrast'])
      elif op == 2:
        x = _np_blend(x, _np_gray(x), d['saturation'])
      else:
        x = _np_hue(x, d['hue'])
  if d['grayscale']:
    x = np.repeat(_np_gray(x), 3, axis=-1)
  if d['blur']:
    x = _np_blur(x, d['sigma'], k)
  if d['solarize']:
    x = np.where(x >= 0.5, 1 - x, x)
  return (x - np.asarray(cfg.mean)) / np.asarray(cfg.std)


# ---- individual ops ---------------------------------------------------------


@pytest.mark.parametrize('factor', [0.6, 1.0, 1.4])
def test_brightness(factor):
  img = _random_images(0)
  got = augment.adjust_brightness(jnp.asarray(img), factor)
  np.testing.assert_allclose(got, np.clip(img * factor, 0, 1), atol=1e-6)


@pytest.mark.parametrize('factor', [0.6, 1.4])
def test_contrast(factor):
  for img in _random_images(1):
    got = augment.adjust_contrast(jnp.asarray(img), factor)
    want = _np_blend(img, _np_gray(img).mean(), factor)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize('factor', [0.0, 0.8, 1.2])
def test_saturation(factor):
  img = _random_images(2)
  got = augment.adjust_saturation(jnp.asarray(img), factor)
  np.testing.assert_allclose(got, _np_blend(img, _np_gray(img), factor),
                             atol=1e-5)


@pytest.mark.parametrize('delta', [-0.1, 0.03, 0.1, 0.5])
def test_hue_matches_colorsys(delta):
  img = _random_images(3, n=2)
  # Include grey pixels (s = 0) and pure primaries, the edge cases of HSV.
  img[0, 0, :4] = [[0.5, 0.5, 0.5], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
  got = augment.adjust_hue(jnp.asarray(img), delta)
  np.testing.assert_allclose(got, _np_hue(img, delta), atol=2e-6)


def test_hsv_round_trip_and_reference():
  img = _random_images(4, n=1)[0]
  hsv = np.asarray(augment.rgb_to_hsv(jnp.asarray(img)))
  want = np.asarray([colorsys.rgb_to_hsv(*p) for p in img.reshape(-1, 3)])
  np.testing.assert_allclose(hsv.reshape(-1, 3), want, atol=1e-6)
  np.testing.assert_allclose(augment.hsv_to_rgb(hsv), img, atol=1e-6)


def test_grayscale_equal_channels_and_luma():
  img = _random_images(5)
  got = np.asarray(augment.to_grayscale(jnp.asarray(img)))
  np.testing.assert_allclose(got, np.repeat(_np_gray(img), 3, -1), atol=1e-6)
  assert np.all(got[..., 0] == got[..., 1])
  assert np.all(got[..., 1] == got[..., 2])


def test_solarize_threshold():
  x = jnp.asarray([0.0, 127 / 255, 128 / 255, 1.0])
  np.testing.assert_allclose(augment.solarize(x),
                             [0.0, 127 / 255, 127 / 255, 0.0], atol=1e-7)


def test_blur_kernel_size():
  assert augment.blur_kernel_size(224) == 23  # BYOL / SimCLR
  assert augment.blur_kernel_size(32) == 3
  assert augment.blur_kernel_size(8) == 3
  assert augment.blur_kernel_size(96) % 2 == 1


def test_blur_matches_reference_and_lowers_high_frequencies():
  img = _random_images(6, n=1, size=32)[0]
  k = augment.blur_kernel_size(32, 0.2)
  got = np.asarray(augment.gaussian_blur(jnp.asarray(img), 1.5, k))
  np.testing.assert_allclose(got, _np_blur(img, 1.5, k), atol=1e-5)

  def hf_energy(x):  # energy of the discrete Laplacian
    lap = (4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] -
           x[1:-1, 2:])
    return float(np.sum(lap ** 2))

  assert hf_energy(got) < 0.1 * hf_energy(img)
  # Normalised taps: constants stay constant; tiny sigma is ~identity.
  const = jnp.full((16, 16, 3), 0.3)
  np.testing.assert_allclose(augment.gaussian_blur(const, 2.0, 5), const,
                             atol=1e-6)
  np.testing.assert_allclose(augment.gaussian_blur(jnp.asarray(img), 0.1, 5),
                             img, atol=1e-5)


def test_normalize_denormalize_round_trip(aug_cfg):
  img = _random_images(7)
  x = augment.normalize(jnp.asarray(img), aug_cfg.mean, aug_cfg.std)
  np.testing.assert_allclose(augment.denormalize(x, aug_cfg), img, atol=1e-6)


def test_view_params_table(aug_cfg):
  a, b = augment.view_params(aug_cfg)
  assert (a.blur_p, b.blur_p) == (1.0, 0.1)
  assert (a.solarize_p, b.solarize_p) == (0.0, 0.2)
  assert a.grayscale_p == b.grayscale_p == 0.2
  assert a.jitter_p == b.jitter_p == 0.8
  assert a.brightness == 0.4 and a.hue == 0.1 and a.blur_sigma == (0.1, 2.0)


# ---- sampled decisions ------------------------------------------------------


def _within_binomial(flags, p, sigmas=5.0):
  n = flags.size
  freq = float(np.mean(flags))
  tol = sigmas * np.sqrt(max(p * (1 - p), 1e-12) / n)
  return abs(freq - p) <= tol, freq


def test_application_frequencies(aug_cfg):
  d = jax.tree.map(np.asarray, augment.sample_decisions(
      jax.random.key(0), 2048, aug_cfg, num_crops=8))
  view_a, view_b = np.s_[:, :4], np.s_[:, 4:]
  expected = {
      ('solarize', 'A'): 0.0, ('solarize', 'B'): 0.2,
      ('blur', 'A'): 1.0, ('blur', 'B'): 0.1,
      ('grayscale', 'A'): 0.2, ('grayscale', 'B'): 0.2,
      ('jitter', 'A'): 0.8, ('jitter', 'B'): 0.8,
      ('flip', 'A'): 0.5, ('flip', 'B'): 0.5,
  }
  for (name, view), p in expected.items():
    flags = d[name][view_a if view == 'A' else view_b]
    ok, freq = _within_binomial(flags, p)
    assert ok, f'{name} view {view}: frequency {freq:.4f}, expected {p}'
  # Certain events are exact, not just within tolerance.
  assert not d['solarize'][view_a].any() and d['blur'][view_a].all()
  # Factor ranges (torchvision: U[1 - s, 1 + s], hue U[-h, h]).
  for name, lo, hi in [('brightness', 0.6, 1.4), ('contrast', 0.6, 1.4),
                       ('saturation', 0.8, 1.2), ('hue', -0.1, 0.1),
                       ('sigma', 0.1, 2.0)]:
    assert d[name].min() >= lo and d[name].max() <= hi, name
    assert d[name].max() - d[name].min() > 0.9 * (hi - lo), name
  # Jitter order: a permutation, each op at each round about 1/4 of the time.
  assert np.all(np.sort(d['order'], -1) == np.arange(4))
  for r in range(4):
    for op in range(4):
      ok, freq = _within_binomial(d['order'][..., r] == op, 0.25)
      assert ok, (r, op, freq)
  # Crops and examples draw independently (no shared keys): only the odd
  # float32 birthday collision among 16k draws.
  assert len(np.unique(d['sigma'])) > 0.99 * d['sigma'].size


# ---- the full batch function ------------------------------------------------


@pytest.fixture(scope='module')
def augmented(aug_cfg):
  crops = np.random.default_rng(8).integers(
      0, 256, (6, 8, 16, 16, 3), dtype=np.uint8)
  key = jax.random.key(3)
  out, flags = augment.augment_crops(crops, key, aug_cfg, return_flags=True)
  return crops, key, np.asarray(out), jax.tree.map(np.asarray, flags)


def test_augment_crops_matches_reference(aug_cfg, augmented):
  crops, _, out, d = augmented
  assert out.shape == crops.shape and out.dtype == np.float32
  k = augment.blur_kernel_size(16)
  for b in range(crops.shape[0]):
    for c in range(crops.shape[1]):
      dc = {name: v[b, c] for name, v in d.items()}
      want = _np_pipeline(crops[b, c], dc, aug_cfg, k)
      np.testing.assert_allclose(out[b, c], want, atol=2e-4,
                                 err_msg=f'example {b} crop {c}: {dc}')


def test_flags_use_the_same_key_derivation(aug_cfg, augmented):
  crops, key, _, d = augmented
  again = augment.sample_decisions(key, crops.shape[0], aug_cfg, num_crops=8)
  for name, v in again.items():
    np.testing.assert_array_equal(np.asarray(v), d[name])


def test_outputs_finite_normalised_and_gray_equal(aug_cfg, augmented):
  _, _, out, d = augmented
  assert np.isfinite(out).all()
  x01 = out * np.asarray(aug_cfg.std) + np.asarray(aug_cfg.mean)
  assert x01.min() >= -1e-5 and x01.max() <= 1 + 1e-5
  gray = x01[d['grayscale']]
  assert gray.size, 'seed should give at least one grayscale crop'
  np.testing.assert_allclose(gray[..., 0], gray[..., 1], atol=1e-5)
  np.testing.assert_allclose(gray[..., 1], gray[..., 2], atol=1e-5)
  preview = np.asarray(augment.denormalize(out, aug_cfg))
  assert preview.min() >= 0 and preview.max() <= 1


def test_augment_crops_rejects_wrong_crop_count(aug_cfg):
  with pytest.raises(ValueError):
    augment.augment_crops(np.zeros((2, 4, 8, 8, 3), np.uint8),
                          jax.random.key(0), aug_cfg, num_crops=8)
