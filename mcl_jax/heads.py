"""Region neck and per-level predictors, with per-group BatchNorm statistics.

The reference applies its neck (`DetConvGpNonLinearHead`) once per FPN level,
so every BatchNorm in the neck normalises each level's regions with that
level's own batch statistics (MCL_SPEC.md section 3). Here the neck runs once
over the regions of all levels (one batched conv per layer) and
`GroupedBatchNorm` keeps the per-level statistics: rows are split into
statically sized groups, each normalised with its own mean and variance.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcl_jax import batch_norm
from mcl_jax import remat as remat_lib
from mcl_jax.resnet import BN_EPS, BN_MOMENTUM, Conv, conv_init

# Reference neck Linear layers: kaiming_init(mode='fan_in', relu), bias 0.
neck_dense_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
# Reference predictor Linear layers: normal_init(std=0.01), bias 0.
predictor_dense_init = nn.initializers.normal(0.01)


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
    y, means, variances = batch_norm.normalize(
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


class RegionNeck(nn.Module):
  """The reference `DetConvGpNonLinearHead`: convs on each region, pool, MLP.

  Each region is its own image of region_size x region_size, so the 3x3
  convs zero-pad at the region border, as in the reference.

  Attributes:
    remat: recompute each conv + BN + ReLU layer in the backward pass,
      keeping only its input (one layer's activations at a time instead of
      the whole stack's; the BN statistics span all regions, so a layer is
      the smallest unit).
  """
  channels: int = 256
  num_convs: int = 4
  hidden: int = 2048
  out_dim: int = 256
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, regions, group_sizes: Sequence[int], train: bool = True):
    """Maps regions [R, k, k, C] to embeddings [R, out_dim] (float32)."""

    def layer(k):
      def run(mdl, x):
        # Regions of <= 2 x 2 (canvases of <= 64 px) take Conv's dense-matmul path.
        x = Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                 dtype=self.dtype, param_dtype=jnp.float32, kernel_init=conv_init,
                 name=f'conv{k}', parent=mdl)(x)
        return GroupedBatchNorm(dtype=self.dtype, name=f'bn{k}', parent=mdl)(
            x, group_sizes, train, relu=True)
      # Each layer's backward pass waits for its cotangent (see remat.py).
      return remat_lib.remat(run, policy=remat_lib.RECOMPUTE if self.remat else remat_lib.KEEP)

    x = regions
    for k in range(1, self.num_convs + 1):
      x = layer(k)(self, x)

    def head(mdl, x):
      x = x.astype(jnp.float32).mean(axis=(1, 2)).astype(self.dtype)
      x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=neck_dense_init, name='fc1', parent=mdl)(x)
      x = GroupedBatchNorm(dtype=self.dtype, name='fc1_bn', parent=mdl)(
          x, group_sizes, train, relu=True)
      x = nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=neck_dense_init, name='fc2', parent=mdl)(x)
      return GroupedBatchNorm(use_scale=False, use_bias=False, dtype=jnp.float32,
                              name='fc2_bn', parent=mdl)(x, group_sizes, train)
    return remat_lib.remat(head, policy=remat_lib.KEEP)(self, x)


class Predictor(nn.Module):
  """Linear -> BN -> ReLU -> Linear (the reference `NonLinearNeckV2`)."""
  hidden: int = 2048
  out_dim: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, group_sizes: Sequence[int], train: bool = True):
    x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=predictor_dense_init, name='fc1')(x)
    x = GroupedBatchNorm(dtype=self.dtype, name='fc1_bn')(x, group_sizes, train, relu=True)
    x = nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=predictor_dense_init, name='fc2')(x)
    return x.astype(jnp.float32)
