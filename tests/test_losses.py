"""The multi-level loss (docs/METHOD.md section 4) against a NumPy computation.

Tolerances (tests/tolerance.py), per logged value, absolute: the cosines
are two reductions over D (the L2 norm, then the dot product of unit
vectors); the cross-entropy divides them by tau and takes a logsumexp over
the M targets (a sum of positive terms, an exp and a log); each level's
values are means over the tiles (or tiles x targets), each summed over the
two views, and the total sums the levels. float32 against float64; the
permutation check compares two float32 orders of the same sums (both sides).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax.pretext import losses
from tests import tolerance

F32 = np.float32
WEIGHTS = (1 / 2, 1 / 4, 1 / 8, 1 / 8)
M, D = 12, 8  # global batch (targets), embedding size
TILES = (12, 12, 12, 24)


def _np_normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _np_level(pred, targets, labels, tau, w):
  p, t = _np_normalize(pred), _np_normalize(targets)
  logits = p @ t.T
  z = logits / tau
  zmax = z.max(1, keepdims=True)
  lse = np.log(np.exp(z - zmax).sum(1)) + zmax[:, 0]
  ce = (lse - z[np.arange(len(labels)), labels]).mean()
  pos = logits[np.arange(len(labels)), labels].mean()
  n_t, n_m = logits.shape
  neg = (logits.sum() - pos * n_t) / (n_t * n_m - n_t)
  return ce * 2 * tau * w, pos, neg


def np_mcl_loss(pq, pk, lq, lk, tq, tk, tau, weights):
  total, metrics = 0.0, {}
  for i, w in enumerate(weights):
    a = _np_level(pq[i], tk, lq[i], tau, w)  # view-q tiles vs view-k targets
    b = _np_level(pk[i], tq, lk[i], tau, w)
    total += a[0] + b[0]
    metrics[f'loss_level{i}'] = a[0] + b[0]
    metrics[f'pos_cos_level{i}'] = (a[1] + b[1]) / 2
    metrics[f'neg_cos_level{i}'] = (a[2] + b[2]) / 2
  metrics['loss'] = total
  return total, metrics


def _inputs(seed):
  rng = np.random.default_rng(seed)
  tq = rng.standard_normal((M, D)).astype(np.float32)
  tk = rng.standard_normal((M, D)).astype(np.float32)
  lq = [rng.integers(0, M, t).astype(np.int32) for t in TILES]
  lk = [rng.integers(0, M, t).astype(np.int32) for t in TILES]
  # Predictions correlated with their targets (non-trivial positives),
  # with random norms (normalisation matters).
  pq = [(tk[l] + rng.standard_normal((len(l), D)) * 0.7) * rng.uniform(0.2, 5, (len(l), 1))
        for l in lq]
  pk = [(tq[l] + rng.standard_normal((len(l), D)) * 0.7) * rng.uniform(0.2, 5, (len(l), 1))
        for l in lk]
  pq = [p.astype(np.float32) for p in pq]
  pk = [p.astype(np.float32) for p in pk]
  return pq, pk, lq, lk, tq * 3.0, tk * 0.5


_loss = jax.jit(losses.mcl_loss, static_argnums=(6, 7))


def _run(pq, pk, lq, lk, tq, tk, tau, dtype=jnp.float32):
  cast = lambda xs: [jnp.asarray(x, dtype) for x in xs]
  return _loss(cast(pq), cast(pk), [jnp.asarray(l) for l in lq], [jnp.asarray(l) for l in lk],
               jnp.asarray(tq, dtype), jnp.asarray(tk, dtype), tau, WEIGHTS)


def _tols(tau, sides=1):
  """Absolute tolerance of every logged value (see the module docstring)."""
  t = lambda *a, **k: tolerance.tol(F32, *a, **k, sides=sides)
  cos = t([D, D], 1.0)  # |cosine| <= 1
  ce_scale = 2 / tau + np.log(M)  # |logsumexp| and |CE| per tile at most this
  ce = (cos / tau + t(M, 1.0)  # z = cos / tau; the sum of exp(z - max), relative to itself
        + t(2 * tolerance.TRANSCENDENTAL, ce_scale, worst_case=True))  # exp, log
  out, total = {}, 0.0
  for i, (w, tiles) in enumerate(zip(WEIGHTS, TILES)):
    per_view = 2 * tau * w * (ce + t(tiles, ce_scale))  # mean over the tiles
    out[f'loss_level{i}'] = 2 * per_view  # the two views' sum
    out[f'pos_cos_level{i}'] = cos + t(tiles, 1.0)
    out[f'neg_cos_level{i}'] = cos + t(tiles * M, 1.0)
    total += out[f'loss_level{i}']
  out['loss'] = total
  return out


def _check_metrics(got, want, tols, label):
  assert set(got) == set(want)
  for k in want:
    tolerance.check(abs(float(got[k]) - float(want[k])), tols[k], f'{label} {k}')


@pytest.mark.parametrize('tau', [1.0, 0.2])
def test_mcl_loss_matches_numpy(tau):
  args = _inputs(int(tau * 10))
  total, metrics = _run(*args, tau)
  want_total, want = np_mcl_loss(*args, tau, WEIGHTS)
  tols = _tols(tau)
  tolerance.check(abs(float(total) - want_total), tols['loss'], f'mcl_loss tau={tau} total')
  _check_metrics(metrics, want, tols, f'mcl_loss tau={tau}')
  # Sanity of the reference itself: positives are more similar than negatives.
  for i in range(4):
    assert want[f'pos_cos_level{i}'] > want[f'neg_cos_level{i}'] + 0.1


def test_mcl_loss_permutation_invariance():
  pq, pk, lq, lk, tq, tk = _inputs(5)
  rng = np.random.default_rng(6)
  perm = rng.permutation(M)  # new target row j holds old row perm[j]
  inv = np.argsort(perm)  # old label l now sits at row inv[l]
  tiles = [rng.permutation(t) for t in TILES]
  pq2 = [p[s] for p, s in zip(pq, tiles)]
  lq2 = [inv[l][s].astype(np.int32) for l, s in zip(lq, tiles)]
  tiles = [rng.permutation(t) for t in TILES]
  pk2 = [p[s] for p, s in zip(pk, tiles)]
  lk2 = [inv[l][s].astype(np.int32) for l, s in zip(lk, tiles)]
  tq2, tk2 = tq[perm], tk[perm]
  a_total, a = _run(pq, pk, lq, lk, tq, tk, 0.2)
  b_total, b = _run(pq2, pk2, lq2, lk2, tq2, tk2, 0.2)
  _check_metrics(b, a, _tols(0.2, sides=2), 'mcl_loss permuted')
  # And the check is sensitive: permuting the targets without remapping the
  # labels changes the loss.
  c_total, _ = _run(pq, pk, lq, lk, tq2, tk2, 0.2)
  assert abs(float(c_total) - float(a_total)) > 1e-2 * abs(float(a_total))


def test_mcl_loss_bf16_inputs_give_float32():
  args = list(_inputs(7))
  total, metrics = _run(*args, 1.0, dtype=jnp.bfloat16)
  assert total.dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in metrics.values())
  assert np.isfinite(float(total))
  # The loss of bf16 inputs is the float32 loss of the bf16-rounded values:
  # logits are computed after casting to float32 (a bf16 matmul would be off
  # by ~1e-2 relative).
  rounded = lambda xs: [np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
                        for x in xs]
  pq, pk, lq, lk, tq, tk = args
  want_total, want = np_mcl_loss(rounded(pq), rounded(pk), lq, lk, rounded([tq])[0],
                                 rounded([tk])[0], 1.0, WEIGHTS)
  _check_metrics(metrics, want, _tols(1.0), 'mcl_loss bf16 inputs vs rounded float64')
  # One level (infonce): loss and the logit means (pos / neg) are float32.
  out = jax.eval_shape(lambda p, t, l: losses.infonce(p, t, l, 1.0, 0.5),
                       jnp.zeros((3, D), jnp.bfloat16), jnp.zeros((M, D), jnp.bfloat16),
                       jnp.zeros((3,), jnp.int32))
  assert all(o.dtype == jnp.float32 for o in out)


def test_mcl_loss_rejects_wrong_weight_count():
  pq, pk, lq, lk, tq, tk = _inputs(8)
  with pytest.raises(ValueError):
    losses.mcl_loss(pq, pk, lq, lk, tq, tk, 1.0, WEIGHTS[:3])
