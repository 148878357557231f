"""Train-mode BatchNorm whose backward pass keeps only the input.

Autodiff of BatchNorm keeps float32 copies of activation size (x - mean,
the normalised x) for the backward pass, several per layer, and under bf16
those copies are twice the size of the activation itself. `normalize`
computes the same forward values and a closed-form backward pass
(PyTorch's: dx = rstd * scale * (g - mean(g) - x_hat * mean(g * x_hat)))
from what is kept anyway: the input x in the compute dtype, the output
(for the ReLU's mask; the next layer keeps it as its input) and
per-channel statistics. The backward's float32 terms are elementwise
functions of x and the cotangent, which XLA fuses into the reductions and
the dx computation instead of materialising them.

Statistics and normalisation run in float32, in the order of `nn.BatchNorm`
('flax': E[x^2] - E[x]^2 variance, x - mean times rsqrt(var + eps) * scale)
or of the reference neck's per-level BN ('grouped': E[(x - mean)^2], times
1 / sqrt(var + eps), then scale), so forward values are unchanged bit for bit.

Two modules use it: `BatchNorm` (the backbone's and the FPN's, `nn.BatchNorm`'s
names and statistics) and `GroupedBatchNorm` (the region neck's and the
predictors': statistics per group of rows, one group per montage level, as
the reference applies its neck once per level; docs/METHOD.md section 3).
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcl_jax.nn import remat

# PyTorch BatchNorm momentum 0.1 is Flax momentum 0.9; eps as in PyTorch.
BN_MOMENTUM = 0.9
BN_EPS = 1e-5


def _forward(x, scale, bias, residual, groups, style, relu, dtype):
  """Output, per-group means, variances and 1/std (float32)."""
  axes = tuple(range(x.ndim - 1))
  parts, means, variances, rstds, start = [], [], [], [], 0
  for size in groups:
    xg = x[start:start + size].astype(jnp.float32)
    start += size
    mean = xg.mean(axes)
    if style == 'flax':
      var = jnp.maximum(0.0, jnp.square(xg).mean(axes) - jnp.square(mean))
      rstd = jax.lax.rsqrt(var + BN_EPS)
      mul = rstd * scale if scale is not None else rstd
      y = (xg - mean) * mul
    else:
      var = jnp.square(xg - mean).mean(axes)
      rstd = jnp.reciprocal(jnp.sqrt(var + BN_EPS))
      y = (xg - mean) * rstd
    parts.append(y)
    means.append(mean)
    variances.append(var)
    rstds.append(rstd)
  y = jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
  if style == 'grouped' and scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  y = y.astype(dtype)
  if residual is not None:
    y = y + residual
  if relu:
    y = nn.relu(y)
  return y, tuple(means), tuple(variances), tuple(rstds)


_RELU = nn.relu  # the activation the fused backward is written for


@functools.lru_cache(maxsize=None)
def _normalize_fn(groups: tuple[int, ...], style: str, relu: bool, dtype: Any,
                  has_bias: bool, has_residual: bool):
  """The custom-VJP normalisation for one static configuration."""

  @jax.custom_vjp
  def f(x, scale, bias, residual):
    y, means, variances, _ = _forward(x, scale, bias, residual, groups, style, relu, dtype)
    return y, means, variances

  def fwd(x, scale, bias, residual):
    y, means, variances, rstds = _forward(x, scale, bias, residual, groups, style, relu, dtype)
    keep_y = y if relu else None  # the ReLU's mask is y > 0
    return (y, means, variances), (x, scale, keep_y, means, rstds)

  def bwd(res, cts):
    g, g_means, g_vars = cts
    # Nothing below may be computed before g exists (see remat.tie).
    x, scale, y, means, rstds = remat.tie(res, g)
    if relu:
      g = jnp.where(y > 0, g, jnp.zeros((), g.dtype))
    d_residual = g if has_residual else None
    axes = tuple(range(x.ndim - 1))
    per_row = x[0].size // x.shape[-1]
    dxs, d_scale, d_bias, start = [], 0.0, 0.0, 0
    for i, size in enumerate(groups):
      # Per group: two reductions and one elementwise pass over (g, x), all
      # reading the compute dtype; float32 only inside the fused loops.
      gg = g[start:start + size].astype(jnp.float32)
      centred = x[start:start + size].astype(jnp.float32) - means[i]
      start += size
      n = size * per_row
      sum_g, sum_gc = gg.sum(axes), (gg * centred).sum(axes)
      sum_gx = sum_gc * rstds[i]  # sum(g * x_hat)
      d_scale, d_bias = d_scale + sum_gx, d_bias + sum_g
      k = rstds[i] * scale if scale is not None else rstds[i]
      # dx = k (g - mean(g) - x_hat mean(g x_hat)), plus the statistics' own
      # cotangents (zero unless something differentiates them).
      offset = g_means[i] / n - k * sum_g / n
      slope = g_vars[i] * (2.0 / n) - k * rstds[i] * sum_gx / n
      dxs.append((k * gg + offset + slope * centred).astype(x.dtype))
    dx = jnp.concatenate(dxs, axis=0) if len(dxs) > 1 else dxs[0]
    return (dx, None if scale is None else d_scale, d_bias if has_bias else None, d_residual)

  f.defvjp(fwd, bwd)
  return f


def normalize(x, scale, bias, *, groups=None, style: str = 'flax', residual=None,
              relu: bool = False, dtype: Any = jnp.float32):
  """Train-mode BN of x [R, ..., C] with batch statistics per group of rows.

  Args:
    x: the input, in the compute dtype.
    scale, bias: [C] float32, or None (not applied).
    groups: rows per group (sum = R); None: one group.
    style: 'flax' (nn.BatchNorm's arithmetic) or 'grouped' (the neck's).
    residual: added after the normalisation (in dtype), before the ReLU.
    relu: apply a ReLU last.
    dtype: output dtype.

  Returns:
    (y, per-group means, per-group variances); statistics in float32.
  """
  groups = (x.shape[0],) if groups is None else tuple(groups)
  # The fused backward is ReLU's (the mask y > 0). Where flax.linen.relu has
  # been replaced (the PyTorch comparison swaps in a smooth activation), the
  # activation is applied outside the custom VJP, so that autodiff sees it.
  fuse = relu and nn.relu is _RELU
  fn = _normalize_fn(groups, style, fuse, jnp.dtype(dtype), bias is not None,
                     residual is not None)
  y, means, variances = fn(x, scale, bias, residual)
  if relu and not fuse:
    y = nn.relu(y)
  return y, means, variances


class BatchNorm(nn.Module):
  """`nn.BatchNorm` (same variables and forward values) that keeps only its input.

  Optionally fuses the residual sum and ReLU of a ResNet block, whose
  backward then needs nothing beyond the BN input and the block output.

  Attributes:
    use_running_average: eval mode.
    dtype: output dtype; statistics and normalisation run in float32.
    scale_init: initialiser of the scale (ones).
  """
  use_running_average: bool = False
  dtype: Any = jnp.float32
  scale_init: Any = nn.initializers.ones

  @nn.compact
  def __call__(self, x, residual=None, relu: bool = False):
    c = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    scale = self.param('scale', self.scale_init, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    if self.use_running_average:
      # nn.BatchNorm's order: (x - mean) * (rsqrt(var + eps) * scale) + bias.
      y = ((x - ra_mean.value) * (jax.lax.rsqrt(ra_var.value + BN_EPS) * scale)
           + bias).astype(self.dtype)
      if residual is not None:
        y = y + residual
      return nn.relu(y) if relu else y
    y, (mean,), (var,) = normalize(x, scale, bias, residual=residual, relu=relu,
                                   dtype=self.dtype)
    if not self.is_initializing():
      ra_mean.value = BN_MOMENTUM * ra_mean.value + (1 - BN_MOMENTUM) * mean
      ra_var.value = BN_MOMENTUM * ra_var.value + (1 - BN_MOMENTUM) * var
    return y


class GroupedBatchNorm(nn.Module):
  """BatchNorm whose batch statistics are computed per group of rows.

  Scale and bias are shared (one module, as in the reference, which calls
  the same layer per level). The running averages are updated once per
  group, in group order, exactly as the reference's successive calls update
  its buffers. Parameter and statistic names match `nn.BatchNorm`.
  """
  use_scale: bool = True
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, group_sizes: Sequence[int], train: bool = True, relu: bool = False):
    """Normalises x [R, ..., C]; sum(group_sizes) == R; optionally applies a ReLU."""
    c = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    if sum(group_sizes) != x.shape[0]:
      raise ValueError(f'group sizes {tuple(group_sizes)} do not cover {x.shape[0]} rows')
    scale = (self.param('scale', nn.initializers.ones, (c,), jnp.float32)
             if self.use_scale else None)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32) if self.use_bias else None
    if not train:
      y = (x.astype(jnp.float32) - ra_mean.value) / jnp.sqrt(ra_var.value + BN_EPS)
      y = _affine(y, scale, bias).astype(self.dtype)
      return nn.relu(y) if relu else y
    y, means, variances = normalize(
        x, scale, bias, groups=group_sizes, style='grouped', relu=relu, dtype=self.dtype)
    new_mean, new_var = ra_mean.value, ra_var.value
    for mean, var in zip(means, variances):
      new_mean = BN_MOMENTUM * new_mean + (1 - BN_MOMENTUM) * mean
      new_var = BN_MOMENTUM * new_var + (1 - BN_MOMENTUM) * var
    if not self.is_initializing():
      ra_mean.value, ra_var.value = new_mean, new_var
    return y


def _affine(y, scale, bias):
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y
