"""Tolerances derived from the dtype and the size of the operation.

Every numerical comparison in the suite states its tolerance through `tol`,
from what the compared computation does, never from what one CPU printed:
XLA's CPU kernels sum in an order that depends on the CPU, the thread count,
the device count and the compiler flags, so a tolerance has to hold for any
order the arithmetic allows.

The model (Higham, "Accuracy and Stability of Numerical Algorithms", ch. 3-4;
Higham & Mary, "A New Approach to Probabilistic Rounding Error Analysis",
SIAM J. Sci. Comput. 2019):

* `u`, the unit roundoff of the dtype: half the spacing of the numbers
  around 1 (2^-24 in float32, 2^-8 in bfloat16, 2^-53 in float64); one
  correctly rounded operation errs by at most u relative. Integer dtypes
  (uint8 pixels) have u = 0.5, absolute: rounding to the integer grid.
* A reduction of length n (a dot product, a conv output of K*K*C products,
  a mean over n rows) makes n - 1 roundings. Their errors are, to first
  order, independent and of mean zero, so they add as a random walk: the
  error's standard deviation is about u * sqrt(n) * scale, where `scale` is
  the magnitude of the partial sums. For terms of random sign that is the
  RMS of the result (a conv output, a normalised activation); for terms of
  one sign (a mean of positive values) it is the result itself. XLA's
  blocked and pairwise summation only lowers it, so sqrt(n) is the
  conservative order. The worst case, gamma_n * scale (Higham's gamma_n =
  n u / (1 - n u); for integers n * 0.5, absolute), is
  the form for short chains of elementwise operations and wherever the
  errors need not be random (`worst_case=True`); it is a bound, so it takes
  no safety factor.
* The random-walk estimate is one standard deviation, and a test asserts on
  the largest error over up to ~1e5 outputs: the largest of 1e5 normal
  draws stays below 5 sigma (sqrt(2 ln 1e5) = 4.8). SAFETY = 8 covers that
  with a factor below 2 for what the model leaves out (correlated operands,
  a reduction that XLA splits into one more stage). It is deliberately no
  larger: a tolerance 10x above the rounding would hide a real error of
  that size.
* XLA's exp, log, tanh, rsqrt are not correctly rounded but within about
  one ulp (2u) of it; each counts as TRANSCENDENTAL = 4 roundings (2 ulp),
  in the worst-case form.
* A chain of operations (a conv, then BatchNorm's statistics over N rows,
  then the next conv) passes each stage's error on with a gain of about 1
  relative to the next stage's scale when every stage is normalised (BN
  restores unit scale), so the stages' estimates add: n may be a sequence
  of reduction lengths, one per stage, and the tolerance is the sum. This
  is the sum of sqrt(n_i) (the stages' errors with the worst signs), the
  safe form for a short chain (a layer, a head). Through a whole network
  (tens of layers, each with a BatchNorm over thousands of rows) the
  stages' roundings are independent and that sum grows linearly with the
  depth while the error grows as its square root: `walk=True` takes the
  chain as one random walk, sqrt(sum n_i). `network_chain` lists a
  network's stages from its parameters.
* `sides`: how many of the two compared values carry rounding error: 1
  against a float64 (or exact) reference, 2 when both are float32 results
  (two orders of the same sum, sharded vs unsharded, remat vs none, JAX vs
  PyTorch): the two errors add in the worst case.

`assert_close` and `check` assert and also record each comparison's
measured error against its tolerance: set MCL_TOL_REPORT to a file and
every comparison appends one JSON line (the test, what was compared, the
error, the tolerance), which scripts/float_paths.py turns into margins per
test family.
"""

import json
import math
import os
from typing import Sequence

import numpy as np

SAFETY = 8.0
TRANSCENDENTAL = 4


def unit_roundoff(dtype) -> float:
  """u of a float dtype (eps / 2); 0.5 (absolute) for an integer dtype."""
  dtype = np.dtype(dtype)
  if np.issubdtype(dtype, np.integer):
    return 0.5
  if dtype.name == 'bfloat16':  # NumPy's finfo does not know ml_dtypes' bfloat16
    return 2.0**-8
  return float(np.finfo(dtype).eps) / 2


def gamma(m: float, dtype=np.float32) -> float:
  """Higham's gamma_m = m u / (1 - m u): the relative bound of m roundings.

  For an integer dtype, m roundings to the grid: m / 2, absolute."""
  u = unit_roundoff(dtype)
  if np.issubdtype(np.dtype(dtype), np.integer):
    return m * u
  return m * u / (1 - m * u)


def tol(dtype, n: int | Sequence[int] = 1, scale: float = 1.0, *, sides: int = 1,
        worst_case: bool = False, walk: bool = False) -> float:
  """The tolerance of a computation in `dtype` against a reference.

  Args:
    dtype: the dtype the compared computation rounds in.
    n: the reduction length, or one length per stage of a chain (see the
      module docstring); for worst_case, the number of roundings.
    scale: the magnitude the error is relative to: the partial sums' (a
      result's RMS for terms of random sign), 1 for normalised values.
    sides: 1 against an exact or float64 reference, 2 when both compared
      values are rounded in `dtype`.
    worst_case: gamma_{sum(n)} * scale (a bound) instead of the random-walk
      estimate SAFETY * u * sum(sqrt(n)) * scale.
    walk: a long chain of independent stages, SAFETY * u * sqrt(sum(n)) * scale.

  Returns:
    The absolute tolerance.
  """
  lengths = [n] if np.ndim(n) == 0 else list(n)
  assert lengths and all(k >= 1 for k in lengths), n
  u = unit_roundoff(dtype)
  if worst_case:
    per_side = gamma(sum(lengths), dtype)
  elif walk:
    per_side = SAFETY * u * math.sqrt(sum(lengths))
  else:
    per_side = SAFETY * u * sum(math.sqrt(k) for k in lengths)
  return sides * per_side * float(scale)


def network_chain(params, bn_rows: int, elementwise: int = 4) -> list[int]:
  """The stages of a network, from its parameter tree: per kernel its fan-in
  (all but the last axis), per BatchNorm (a `scale` leaf) a reduction over
  at most `bn_rows` values, and `elementwise` roundings per layer (BN's
  normalisation, bias, residual sum). Every branch counts, so this bounds
  the longest path from above."""
  import jax  # pylint: disable=g-import-not-at-top
  chain = []
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    name = getattr(path[-1], 'key', None)
    if name == 'kernel':
      chain += [int(np.prod(x.shape[:-1])), elementwise]
    elif name == 'scale':
      chain.append(bn_rows)
  return chain


def record(what: str, err: float, bound: float):
  path = os.environ.get('MCL_TOL_REPORT')
  if not path:
    return
  test = os.environ.get('PYTEST_CURRENT_TEST', '?').rsplit(' (', 1)[0]
  line = json.dumps({'test': test, 'what': what, 'err': float(err), 'tol': float(bound)})
  with open(path, 'a') as f:  # one short line per write: appends from parallel workers stay whole
    f.write(line + '\n')


def check(err: float, bound: float, what: str) -> float:
  """Asserts err <= bound; prints and records the margin. Returns err."""
  err, bound = float(err), float(bound)
  print(f'{what}: error {err:.2e} (tol {bound:.2e}, {err / bound if bound else 0:.2f} of it)')
  record(what, err, bound)
  assert err <= bound, f'{what}: error {err:.3e} > tol {bound:.3e}'
  return err


def assert_close(got, want, atol: float, rtol: float = 0.0, what: str = 'values'):
  """Elementwise |got - want| <= atol + rtol * |want| (np.testing.assert_allclose's rule).

  Records the worst element's error against its own bound.
  """
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  if not got.size:
    return
  bound = atol + rtol * np.abs(want)
  err = np.abs(got - want)
  err = np.where(np.isnan(got) | np.isnan(want), np.inf, err)
  ratio = err / np.where(bound > 0, bound, np.finfo(np.float64).tiny)
  i = np.unravel_index(np.argmax(ratio), ratio.shape)
  where = f' at {tuple(int(k) for k in i)}: got {got[i]!r}, want {want[i]!r}' if err[i] > bound[
      i] else ''
  print(f'{what}: worst error {err[i]:.2e} (tol {bound[i]:.2e}, {ratio[i]:.2f} of it)')
  record(what, float(err[i]), float(bound[i]))
  assert err[i] <= bound[i], f'{what}: error {err[i]:.3e} > tol {bound[i]:.3e}{where}'
