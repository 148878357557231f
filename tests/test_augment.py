"""Tests of mcl_jax.data.augment against NumPy / colorsys references.

Tolerances (tests/tolerance.py): float32 against float64 on values in
[0, 1]. Elementwise operations take their worst-case bound, a count of
roundings: a blend f x + (1 - f) r is 5 (the constant 1 - f, two products,
the sum, the float32 factor), a luma sum 5, the HSV round trip HUE_ROUNDINGS.
Reductions (the contrast's mean over the pixels) take the random-walk form;
the blur's taps are a sequential sum of k products per axis (worst case).
"""

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.mcl_100ep import get_config
from mcl_jax.data import augment
from tests import tolerance

LUMA = np.asarray(augment.LUMA_WEIGHTS, np.float32)
F32 = np.float32
BLEND = 5  # roundings of f x + (1 - f) r
LUMA_SUM = 5  # three products, two sums
# rgb -> hsv: h to 8 roundings of values <= 1 ((max - x) / (max - min): 2
# and the difference's 1, their difference, + 2 or 4, / 6, + 1, + delta);
# hsv -> rgb multiplies h's error by 6 in f = 6 h - floor(6 h) (and rounds
# twice), then v (1 - s f) and its kin: 4. 6 x 8 + 2 + 4 = 54.
HUE_ROUNDINGS = 54


def _worst(n, scale=1.0, sides=1):
  return tolerance.tol(F32, n, scale, sides=sides, worst_case=True)


def _blur_tol(k):
  """Separable blur: per axis k products summed in order (2k roundings) on
  positive values <= 1, after the taps exp(-x^2 / 2 s^2) / sum (an exp, a
  k-term sum and a division per tap)."""
  return _worst(2 * 2 * k + tolerance.TRANSCENDENTAL + k + 1)


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
  tolerance.assert_close(got, np.clip(img * factor, 0, 1), atol=_worst(BLEND, factor),
                         what=f'brightness {factor}')


@pytest.mark.parametrize('factor', [0.6, 1.4])
def test_contrast(factor):
  for img in _random_images(1):
    got = augment.adjust_contrast(jnp.asarray(img), factor)
    want = _np_blend(img, _np_gray(img).mean(), factor)
    # The mean gray (luma sums, then a mean over the pixels: positive terms,
    # relative to the mean <= 1) enters with weight |1 - f|.
    mean_tol = _worst(LUMA_SUM) + tolerance.tol(F32, img.shape[0] * img.shape[1], 1.0)
    tolerance.assert_close(got, want, atol=_worst(BLEND, factor) + abs(1 - factor) * mean_tol,
                           what=f'contrast {factor}')


@pytest.mark.parametrize('factor', [0.0, 0.8, 1.2])
def test_saturation(factor):
  img = _random_images(2)
  got = augment.adjust_saturation(jnp.asarray(img), factor)
  tolerance.assert_close(got, _np_blend(img, _np_gray(img), factor),
                         atol=_worst(BLEND, max(factor, 1)) + abs(1 - factor) * _worst(LUMA_SUM),
                         what=f'saturation {factor}')


@pytest.mark.parametrize('delta', [-0.1, 0.03, 0.1, 0.5])
def test_hue_matches_colorsys(delta):
  img = _random_images(3, n=2)
  # Include grey pixels (s = 0) and pure primaries, the edge cases of HSV.
  img[0, 0, :4] = [[0.5, 0.5, 0.5], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
  got = augment.adjust_hue(jnp.asarray(img), delta)
  tolerance.assert_close(got, _np_hue(img, delta), atol=_worst(HUE_ROUNDINGS),
                         what=f'hue {delta}')


def test_hsv_round_trip_and_reference():
  img = _random_images(4, n=1)[0]
  hsv = np.asarray(augment.rgb_to_hsv(jnp.asarray(img)))
  want = np.asarray([colorsys.rgb_to_hsv(*p) for p in img.reshape(-1, 3)])
  # rgb -> hsv alone: a quotient, a difference, + 2 or 4, / 6, + 1 (h), s
  # and v: under 8 roundings; the round trip: all of HUE_ROUNDINGS.
  tolerance.assert_close(hsv.reshape(-1, 3), want, atol=_worst(8), what='rgb -> hsv')
  tolerance.assert_close(augment.hsv_to_rgb(hsv), img, atol=_worst(HUE_ROUNDINGS),
                         what='hsv -> rgb round trip')


def test_grayscale_equal_channels_and_luma():
  img = _random_images(5)
  got = np.asarray(augment.to_grayscale(jnp.asarray(img)))
  tolerance.assert_close(got, np.repeat(_np_gray(img), 3, -1), atol=_worst(LUMA_SUM),
                         what='grayscale')
  assert np.all(got[..., 0] == got[..., 1])
  assert np.all(got[..., 1] == got[..., 2])


def test_solarize_threshold():
  x = jnp.asarray([0.0, 127 / 255, 128 / 255, 1.0])
  # 127 / 255 and 128 / 255 rounded to float32, then 1 - x: two roundings.
  tolerance.assert_close(augment.solarize(x), [0.0, 127 / 255, 127 / 255, 0.0],
                         atol=_worst(2), what='solarize')


def test_blur_kernel_size():
  assert augment.blur_kernel_size(224) == 23  # BYOL / SimCLR
  assert augment.blur_kernel_size(32) == 3
  assert augment.blur_kernel_size(8) == 3
  assert augment.blur_kernel_size(96) % 2 == 1


def test_blur_matches_reference_and_lowers_high_frequencies():
  img = _random_images(6, n=1, size=32)[0]
  k = augment.blur_kernel_size(32, 0.2)
  got = np.asarray(augment.gaussian_blur(jnp.asarray(img), 1.5, k))
  tolerance.assert_close(got, _np_blur(img, 1.5, k), atol=_blur_tol(k), what=f'blur k={k}')

  def hf_energy(x):  # energy of the discrete Laplacian
    lap = (4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] -
           x[1:-1, 2:])
    return float(np.sum(lap ** 2))

  assert hf_energy(got) < 0.1 * hf_energy(img)
  # Normalised taps: constants stay constant; tiny sigma is ~identity.
  const = jnp.full((16, 16, 3), 0.3)
  tolerance.assert_close(augment.gaussian_blur(const, 2.0, 5), const, atol=_blur_tol(5) * 0.3,
                         what='blur of a constant')
  # sigma 0.1: the side taps are exp(-50) / sum ~ 2e-22, far below rounding.
  tolerance.assert_close(augment.gaussian_blur(jnp.asarray(img), 0.1, 5), img,
                         atol=_blur_tol(5), what='blur with sigma 0.1')


def _roundtrip_tol(aug_cfg, sides=1):
  """(x - mean) / std * std + mean on x <= 1: mean and std rounded to float32
  (2) and four operations, each relative to at most max(1, |x - mean| / std
  * std) = 1."""
  return _worst(6, 1.0, sides=sides)


def test_normalize_denormalize_round_trip(aug_cfg):
  img = _random_images(7)
  x = augment.normalize(jnp.asarray(img), aug_cfg.mean, aug_cfg.std)
  tolerance.assert_close(augment.denormalize(x, aug_cfg), img, atol=_roundtrip_tol(aug_cfg),
                         what='normalize -> denormalize')


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


def _pipeline_tol(aug_cfg, k, hw):
  """One crop through every op (float32 vs float64), normalised.

  x / 255 (2), three blends (the contrast's with its mean gray), the hue,
  the grayscale, the blur and solarize's 1 - x; each blend passes the
  error of what came before on with a gain |f| + |1 - f| (<= 1.8 for
  brightness and contrast factors <= 1.4, 1.4 for saturation <= 1.2): the
  sum of the errors times the product of the gains bounds the result; the
  normalisation divides it by the smallest std and adds its own roundings.
  """
  mean_tol = _worst(LUMA_SUM) + tolerance.tol(F32, hw[0] * hw[1], 1.0)
  errors = (_worst(2) + 3 * _worst(BLEND) + mean_tol + _worst(LUMA_SUM)
            + _worst(HUE_ROUNDINGS) + _worst(LUMA_SUM) + _blur_tol(k) + _worst(1))
  gain = 1.8 * 1.8 * 1.4
  return errors * gain / min(aug_cfg.std) + _worst(2, 1 / min(aug_cfg.std))


def test_augment_crops_matches_reference(aug_cfg, augmented):
  crops, _, out, d = augmented
  assert out.shape == crops.shape and out.dtype == np.float32
  k = augment.blur_kernel_size(16)
  for b in range(crops.shape[0]):
    for c in range(crops.shape[1]):
      dc = {name: v[b, c] for name, v in d.items()}
      want = _np_pipeline(crops[b, c], dc, aug_cfg, k)
      tolerance.assert_close(out[b, c], want, atol=_pipeline_tol(aug_cfg, k, crops.shape[2:4]),
                             what=f'augment pipeline, example {b} crop {c}')


def test_flags_use_the_same_key_derivation(aug_cfg, augmented):
  crops, key, _, d = augmented
  again = augment.sample_decisions(key, crops.shape[0], aug_cfg, num_crops=8)
  for name, v in again.items():
    np.testing.assert_array_equal(np.asarray(v), d[name])


def test_outputs_finite_normalised_and_gray_equal(aug_cfg, augmented):
  _, _, out, d = augmented
  assert np.isfinite(out).all()
  x01 = out * np.asarray(aug_cfg.std) + np.asarray(aug_cfg.mean)
  # Values were clipped to [0, 1] before the normalisation: back in [0, 1]
  # up to its round trip (and equal channels up to two round trips).
  rt = _roundtrip_tol(aug_cfg)
  tolerance.check(max(-x01.min(), x01.max() - 1, 0.0), rt, 'normalised outputs within [0, 1]')
  gray = x01[d['grayscale']]
  assert gray.size, 'seed should give at least one grayscale crop'
  tolerance.assert_close(gray[..., 0], gray[..., 1], atol=_roundtrip_tol(aug_cfg, 2),
                         what='grayscale crop channels 0, 1')
  tolerance.assert_close(gray[..., 1], gray[..., 2], atol=_roundtrip_tol(aug_cfg, 2),
                         what='grayscale crop channels 1, 2')
  preview = np.asarray(augment.denormalize(out, aug_cfg))
  assert preview.min() >= 0 and preview.max() <= 1


def test_augment_crops_rejects_wrong_crop_count(aug_cfg):
  with pytest.raises(ValueError):
    augment.augment_crops(np.zeros((2, 4, 8, 8, 3), np.uint8),
                          jax.random.key(0), aug_cfg, num_crops=8)
