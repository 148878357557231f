"""What the backward pass keeps: BatchNorm, bf16 residuals, and `model.remat`.

Tolerances (tests/tolerance.py; both sides float32 programs, so two
orders of the same sums):
* `resnet.BatchNorm` vs `nn.BatchNorm` (random inputs and variables, train
  and eval mode, with and without the fused residual + ReLU): the
  statistics are reductions over the batch's N * H * W values (the variance
  as E[x^2] - E[x]^2, whose error is magnified by E[x^2] / var), then a few
  elementwise roundings; under bfloat16 the outputs and gradients are also
  rounded to bfloat16 (one rounding each side, plus the cotangent's).
  Gradients: the backward's two reductions over the same values, relative
  to each tensor's largest entry.
* Under bf16 the tiny config's loss keeps no float32 tensor of activation
  size: none in the backbone, FPN or neck but per-channel statistics; the
  float32 residuals
  (parameters aside: predictor outputs and the loss's softmax) are at most
  5 % of the bfloat16 ones (measured 1.7 %, before the fix 216 %) and the
  largest is at most 1/8 of the largest bfloat16 one (before: 1.8x).
* Every `model.remat` setting, and optim.accumulate='views', against the
  plain pass (float32): the same network recomputed, which XLA may fuse
  and so order differently; the tolerance is the random walk over the
  network's stages (`tolerance.network_chain`: each kernel's fan-in, each
  BatchNorm's rows) plus the loss's reductions, relative to the loss, to
  the gradient's norm and to each gradient tensor's largest entry; batch
  statistics relative to their own scale; smaller compiled temp memory.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test_tiny
from mcl_jax.nn import batch_norm, model as model_lib
from mcl_jax import config_validation
from mcl_jax.training import memory
from mcl_jax.pretext import montage, objective
from mcl_jax.nn import remat, resnet
from tests import tolerance

F32 = np.float32


# ---------------------------------------------------------------- BatchNorm --

def _bn_variables(rng, c):
  return ({'scale': jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
           'bias': jnp.asarray(rng.standard_normal(c), jnp.float32)},
          {'mean': jnp.asarray(rng.standard_normal(c), jnp.float32),
           'var': jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)})


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('train_mode', [True, False])
@pytest.mark.parametrize('fused', [False, True])
def test_batch_norm_matches_flax(dtype, train_mode, fused):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((6, 5, 5, 7)) * 3 + 1, dtype)
  residual = jnp.asarray(rng.standard_normal(x.shape), dtype)
  params, stats = _bn_variables(rng, 7)
  cot = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  ours = batch_norm.BatchNorm(use_running_average=not train_mode, dtype=dtype)
  ref = nn.BatchNorm(use_running_average=not train_mode, momentum=batch_norm.BN_MOMENTUM,
                     epsilon=batch_norm.BN_EPS, dtype=dtype)

  def run(module, is_ours, params, x, residual):
    v = {'params': params, 'batch_stats': stats}
    if is_ours:
      y, upd = module.apply(v, x, residual if fused else None, relu=fused,
                            mutable=['batch_stats'])
    else:
      y, upd = module.apply(v, x, mutable=['batch_stats'])
      y = nn.relu(y + residual) if fused else y
    return jnp.sum(y.astype(jnp.float32) * cot), (y, upd['batch_stats'])

  def both(params, x, residual):
    return [jax.value_and_grad(run, argnums=(2, 3, 4), has_aux=True)(m, o, params, x, residual)
            for m, o in ((ours, True), (ref, False))]

  (_, (y, bs)), grads = jax.jit(both)(params, x, residual)[0]
  (_, (y_ref, bs_ref)), grads_ref = jax.jit(both)(params, x, residual)[1]
  assert y.dtype == y_ref.dtype == dtype
  label = f'BatchNorm {jnp.dtype(dtype).name} train={train_mode} fused={fused}'
  xs = np.asarray(x, np.float64)
  n = xs.size // xs.shape[-1]
  axes = (0, 1, 2)
  mean, var = xs.mean(axes), xs.var(axes)
  x_hat = np.abs(xs - mean) / np.sqrt(var + batch_norm.BN_EPS)
  g = float(np.abs(params['scale']).max())
  y32 = np.asarray(y_ref, np.float32)
  if train_mode:  # the mean's error over std, the variance's (x E[x^2] / var) x x_hat / 2
    cond = float(np.max(np.sqrt(mean**2 + var) / np.sqrt(var)))
    stats_tol = tolerance.tol(F32, [n, n], g * (cond + cond**2 * x_hat.max() / 2), sides=2)
  else:
    stats_tol = 0.0
  # (x - mean) * (rsqrt(var + eps) * scale) + bias [+ residual, ReLU]: elementwise.
  y_tol = stats_tol + tolerance.tol(F32, 4 + tolerance.TRANSCENDENTAL + 2 * fused,
                                    np.abs(y32).max(), sides=2, worst_case=True)
  # bfloat16: each side rounds its output once (and the fused sum once more).
  y_rtol = 0.0 if dtype == jnp.float32 else tolerance.tol(dtype, 1 + fused, sides=2,
                                                          worst_case=True)
  tolerance.assert_close(y, y_ref, atol=y_tol, rtol=y_rtol, what=f'{label} output')
  for name, a, b in zip(('mean', 'var'), jax.tree.leaves(bs), jax.tree.leaves(bs_ref)):
    # The same statistic (E[x^2] relative to var for the variance) and the
    # momentum update's two roundings, relative to the statistic's scale.
    scale = float(np.max(np.abs(b))) * (cond**2 if name == 'var' and train_mode else 1.0)
    s_tol = tolerance.tol(F32, [n, 2], scale, sides=2) if train_mode else 0.0
    tolerance.assert_close(a, b, atol=s_tol, what=f'{label} running {name}')
  # Gradients: sum(g) and sum(g x_hat) over the n values and dx's elementwise
  # terms, relative to each tensor's largest entry; under bfloat16 the
  # cotangent and dx are rounded to bfloat16 (each side).
  grad_rtol = tolerance.tol(F32, [n, n, 4], cond if train_mode else 1.0, sides=2)
  if dtype != jnp.float32:
    grad_rtol += tolerance.tol(dtype, 2 + fused, sides=2, worst_case=True)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    if not fused and a.shape == residual.shape and not np.asarray(b, np.float32).any():
      continue  # the residual is unused without fusion
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    tolerance.check(np.abs(a - b).max(), grad_rtol * np.abs(b).max(),
                    f'{label} gradient {a.shape}')


def _reads_before_cotangent(fn, *args):
  """Primitives of fn's backward pass computed from saved values alone.

  XLA may schedule those anywhere after the forward pass (the CPU compiler
  hoists them into it and keeps their outputs alive): the backward pass
  should start from the cotangent.
  """
  out, vjp = jax.vjp(fn, *args)
  leaves, tree = jax.tree.flatten(vjp)
  ct = jax.tree.map(jnp.ones_like, out)
  jaxpr = jax.make_jaxpr(lambda l, c: jax.tree.unflatten(tree, l)(c))(leaves, ct).jaxpr
  saved = set(jaxpr.invars[:len(leaves)])
  after_ct = set(jaxpr.invars[len(leaves):])
  early = []
  for eqn in jaxpr.eqns:
    ins = [v for v in eqn.invars if isinstance(v, jax.extend.core.Var)]
    if any(v in after_ct for v in ins):
      after_ct.update(eqn.outvars)
    elif any(v in saved for v in ins):
      saved.update(eqn.outvars)
      early.append(eqn.primitive.name)
  return early


def _chain(w, x):
  for _ in range(3):
    x = jnp.tanh(x @ w) * jnp.sin(x)
  return jnp.sum(x**2)


def test_checkpoint_keeps_what_its_policy_allows_and_waits_for_the_cotangent():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((32, 32)) / 6, jnp.float32)
  recompute = remat.checkpoint(_chain, remat.RECOMPUTE)
  keep = remat.checkpoint(_chain, remat.KEEP)
  assert {r.part for r in memory.saved_residuals(recompute, w, x)} == {'argument'}
  # KEEP keeps what autodiff keeps for the gradients of every argument: the
  # custom VJP's forward pass cannot know which ones the caller needs, so it
  # also keeps what only dx needs (the first layer's cos(x), and its tanh
  # where JAX's own VJP for dw alone drops it, as jax 0.11 and later do).
  # Unused, those are dead code in the compiled program.
  both = lambda fn: lambda wx: fn(*wx)
  kept = lambda fn: sum(r.nbytes for r in memory.saved_residuals(both(fn), (w, x))
                        if r.part != 'argument')
  assert kept(keep) == kept(_chain)
  g_ref = jax.grad(_chain, (0, 1))(w, x)
  # The same three layers recomputed (possibly fused in another order): per
  # layer the 32-long matmul, tanh and sin, and the backward's matmuls (32
  # for dx, 16 rows for dw), then the sum of 16 x 32 squares; both sides
  # float32, relative to each gradient's largest entry.
  layer = [32, 2 * tolerance.TRANSCENDENTAL, 32, 16]
  rtol = tolerance.tol(F32, layer * 3 + [16 * 32], 1.0, sides=2)
  for fn, name in ((recompute, 'recompute'), (keep, 'keep')):
    for a, b in zip(jax.grad(fn, (0, 1))(w, x), g_ref):
      tolerance.assert_close(a, b, atol=rtol * float(jnp.abs(b).max()),
                             what=f'checkpoint {name} gradient')
    assert not _reads_before_cotangent(fn, w, x)


def test_batch_norm_and_max_pool_backward_wait_for_the_cotangent():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((4, 6, 6, 3)), jnp.bfloat16)
  scale, bias = jnp.ones((3,), jnp.float32), jnp.zeros((3,), jnp.float32)
  bn = lambda x, s, b: batch_norm.normalize(x, s, b, relu=True, dtype=jnp.bfloat16)[0]
  assert not _reads_before_cotangent(bn, x, scale, bias)
  assert not _reads_before_cotangent(resnet.max_pool, x)
  # The check itself: a backward pass that starts from its saved input.
  @jax.custom_vjp
  def square(x):
    return x * x
  square.defvjp(lambda x: (x * x, x), lambda x, g: (2.0 * x * g,))
  assert _reads_before_cotangent(square, x) == ['mul']


# ------------------------------------------------------------ bf16 residuals --

def _tiny(dtype='float32', remat_setting='none', levels=4):
  c = test_tiny.get_config()
  c.model.dtype, c.model.remat = dtype, remat_setting
  c.loss.level_weights = c.loss.level_weights[:levels]
  return c


def test_bf16_loss_keeps_no_float32_activations():
  c = _tiny('bfloat16')
  net, layout, size = model_lib.create_model(c), montage.layout_for(c), c.data.image_size
  var = jax.eval_shape(lambda k: model_lib.init_variables(net, layout, k, size),
                       jax.random.key(0))
  target = {k: model_lib.encoder_subtree(var[k]) for k in ('params', 'batch_stats')}
  crops = jax.ShapeDtypeStruct((16, 8, size, size, 3), jnp.float32)

  def loss(params, bs, target, crops):
    return objective.self_supervised_batch_loss(net, params, bs, target, crops, jax.random.key(0), layout,
                                 tau=c.loss.tau, level_weights=c.loss.level_weights)[0]
  kept = [r for r in memory.saved_residuals(loss, var['params'], var['batch_stats'], target,
                                            crops) if r.part != 'argument']
  f32 = [r for r in kept if r.dtype == 'float32']
  bf16 = [r for r in kept if r.dtype == 'bfloat16']
  total = memory.summarize(kept)['by_dtype']
  ratio = total.get('float32', 0) / total['bfloat16']
  print(f"bf16 loss residuals: {total['bfloat16'] / 2**20:.2f} MiB bf16, "
        f"{total.get('float32', 0) / 2**20:.3f} MiB f32 (ratio {ratio:.3f}, bound 0.05); "
        f"largest f32 {f32[0] if f32 else None}")
  # float32 only for per-channel statistics, and where the loss needs it: the
  # predictor outputs [tiles, D] that are L2-normalised, the softmax.
  network = [r for r in f32 if r.part in ('backbone', 'fpn', 'neck') and len(r.shape) > 1]
  assert not network, network[:3]
  assert ratio <= 0.05
  assert not f32 or f32[0].nbytes <= bf16[0].nbytes / 8


# -------------------------------------------------------------------- remat --

@pytest.fixture(scope='module')
def remat_runs():
  """Per model.remat setting: (loss, grads, batch stats, compiled temp bytes).

  One view of 64 px canvases (2 x 2 regions, so that the neck's convs are
  real convolutions) through MCLNet, the loss a random linear function of
  the predictor outputs; two levels keep the compile short.
  """
  c = _tiny(levels=2)
  c.data.image_size = size = 64
  c.montage.canvas_divisors = (1, 4)
  layout = montage.layout_for(c)
  rng = np.random.default_rng(0)
  canvases = jnp.asarray(rng.standard_normal((layout.num_canvases, size, size, 3)), jnp.float32)
  net = model_lib.create_model(c)
  var = jax.jit(lambda k: model_lib.init_variables(net, layout, k, size))(
      jax.random.key(0, impl='rbg'))
  out_shapes = jax.eval_shape(
      lambda v, x: net.apply(v, x, layout, mutable=['batch_stats'])[0], var, canvases)
  weights = [jnp.asarray(rng.standard_normal(s.shape), jnp.float32) for s in out_shapes]
  runs = {}
  for setting in model_lib.REMAT:
    c.model.remat = setting
    net = model_lib.create_model(c)

    def loss(params, bs, x, w, net=net):
      preds, upd = net.apply({'params': params, 'batch_stats': bs}, x, layout, train=True,
                             mutable=['batch_stats'])
      # (and ||preds * w||, the scale of the loss's rounding errors)
      pw = jnp.sqrt(sum(jnp.sum(jnp.square(p * wi)) for p, wi in zip(preds, w)))
      return sum(jnp.vdot(p, wi) for p, wi in zip(preds, w)), (upd['batch_stats'], pw)
    args = (var['params'], var['batch_stats'], canvases, weights)
    compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(*args).compile(
        compiler_options={'xla_backend_optimization_level': 0})
    (value, (bs, pw)), grads = compiled(*args)
    runs[setting] = (value, grads, bs, compiled.memory_analysis().temp_size_in_bytes)
  # Per stage of the network (forward, and the backward's as many again), two
  # float32 programs; BN rows at most the stem's: every canvas's (size / 2)^2.
  chain = tolerance.network_chain(var['params'], layout.num_canvases * (size // 2)**2)
  runs['tols'] = _recompute_tols(chain, float(pw), float(runs['none'][0]))
  return runs


def _recompute_tols(chain, pw, loss):
  """(loss, gradient, batch statistics) relative tolerances of a recomputed network.

  The loss sums the outputs' errors (relative to ||outputs * weights||);
  gradients pass the chain twice; statistics once."""
  fwd = tolerance.tol(F32, chain, 1.0, sides=2, walk=True)
  return fwd * pw / abs(loss), tolerance.tol(F32, 2 * chain, 1.0, sides=2, walk=True), fwd


@pytest.mark.parametrize('setting', [s for s in model_lib.REMAT if s != 'none'])
def test_remat_same_loss_and_gradients_less_memory(remat_runs, setting):
  value, grads, bs, temp = remat_runs[setting]
  value0, grads0, bs0, temp0 = remat_runs['none']
  loss_rtol, grad_rtol, stats_rtol = remat_runs['tols']
  leaves, leaves0 = jax.tree.leaves(grads), jax.tree.leaves(grads0)
  norm = np.sqrt(sum(float(jnp.sum(g**2)) for g in leaves0))
  rel_norm = np.sqrt(sum(float(jnp.sum((a - b)**2)) for a, b in zip(leaves, leaves0))) / norm
  # Tensors whose gradient is below the tolerance relative to the norm (a
  # bias ahead of a BN: zero up to rounding) have no relative error to speak of.
  rel_max = max(float(jnp.abs(a - b).max() / jnp.abs(b).max())
                for a, b in zip(leaves, leaves0) if jnp.abs(b).max() > grad_rtol * norm)
  rel_loss = abs(float(value) - float(value0)) / abs(float(value0))
  print(f'remat={setting!r} vs none: temp {temp / 2**20:.2f} MiB vs {temp0 / 2**20:.2f} MiB')
  label = f'remat={setting!r} vs none'
  tolerance.check(rel_loss, loss_rtol, f'{label}: loss, relative')
  tolerance.check(rel_norm, grad_rtol, f'{label}: gradient, relative to its norm')
  tolerance.check(rel_max, grad_rtol, f"{label}: gradient, relative to each tensor's largest")
  for a, b in zip(jax.tree.leaves(bs), jax.tree.leaves(bs0)):
    tolerance.assert_close(a, b, atol=stats_rtol * float(jnp.abs(b).max()),
                           what=f'{label}: batch statistics')
  assert temp < temp0


def test_remat_setting_is_validated():
  assert config_validation.REMAT_SETTINGS == tuple(model_lib.REMAT)
  with pytest.raises(config_validation.ConfigError, match='config.model.remat'):
    config_validation.validate(_tiny(remat_setting='everything'))
  net = model_lib.create_model(_tiny(remat_setting='everything'))
  layout = montage.layout_for(_tiny())
  with pytest.raises(ValueError, match='model.remat'):
    jax.eval_shape(lambda k: model_lib.init_variables(net, layout, k, 32), jax.random.key(0))


@pytest.mark.parametrize('shape,dtype,producer', [
    ((2, 9, 9, 3), jnp.float32, 'affine'), ((2, 8, 8, 3), jnp.float32, 'affine'),
    ((3, 16, 13, 5), jnp.bfloat16, 'affine'), ((24, 16, 16, 8), jnp.float32, 'bn')])
def test_max_pool_matches_flax(shape, dtype, producer):
  """resnet.max_pool vs nn.max_pool: equal forward; the same gradient, ties
  included (inputs on a 0.5 grid), up to the order in which overlapping
  windows add up (and the producer's backward; tests/tolerance.py).

  Under jit, after a producer that XLA fuses into the pooling: with the
  stem's BN + ReLU it rounds there differently from the copy the backward
  pass keeps (a backward that compared the forward output with that copy
  lost most of the gradient)."""
  rng = np.random.default_rng(sum(shape))
  x = rng.standard_normal(shape)
  x = jnp.asarray(np.round(x * 2) / 2 if producer == 'affine' else x, dtype)
  c = shape[-1]
  scale = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(c), jnp.float32)

  def produce(x):
    if producer == 'affine':
      return x * 1.1 + 0.3
    return batch_norm.normalize(x, scale, bias, relu=True, dtype=dtype)[0]

  def ours(x):
    return resnet.max_pool(produce(x))

  def ref(x):
    return nn.max_pool(produce(x), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  y, vjp = jax.jit(lambda x: jax.vjp(ours, x))(x)
  y_ref, vjp_ref = jax.jit(lambda x: jax.vjp(ref, x))(x)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
  g = jnp.asarray(rng.standard_normal(y.shape), dtype)
  (dx,), (dx_ref,) = jax.jit(lambda v, g: v(g))(vjp, g), jax.jit(lambda v, g: v(g))(vjp_ref, g)
  assert dx.dtype == dx_ref.dtype == dtype
  dx, dx_ref = np.asarray(dx, np.float32), np.asarray(dx_ref, np.float32)
  # An input pixel collects the cotangents of the (up to 4) overlapping 3x3 /
  # 2 windows whose maximum it is, in either order, and the BN producer's
  # backward adds its two reductions over the batch; both sides round dx
  # to the dtype once.
  n = shape[0] * shape[1] * shape[2]
  chain = [4] + ([n, n] if producer == 'bn' else [])
  tol = tolerance.tol(F32, chain, 1.0, sides=2)
  if dtype != jnp.float32:
    tol += tolerance.tol(dtype, 1, sides=2, worst_case=True)
  tolerance.assert_close(dx, dx_ref, rtol=tol, atol=tol * np.abs(dx_ref).max(),
                         what=f'max_pool {shape} {jnp.dtype(dtype).name} {producer} gradient')
  assert 'select_and_scatter' not in str(jax.make_jaxpr(vjp)(g))


# --------------------------------------------------------------- accumulate --

def test_view_by_view_equals_one_pass_with_less_memory():
  """optim.accumulate='views' vs 'none' on test_tiny (float32, train-mode BN):
  loss and metrics, gradients relative to their norm, BN statistics (online
  and target) equal up to reordering (tests/tolerance.py); smaller compiled
  temp."""
  c = _tiny()
  net, layout, size = model_lib.create_model(c), montage.layout_for(c), c.data.image_size
  var = jax.jit(lambda k: model_lib.init_variables(net, layout, k, size))(
      jax.random.key(0, impl='rbg'))
  target = {k: model_lib.encoder_subtree(var[k]) for k in ('params', 'batch_stats')}
  rng = np.random.default_rng(0)
  crops = jnp.asarray(rng.standard_normal((16, 8, size, size, 3)), jnp.float32)
  runs = {}
  for accumulate in ('none', 'views'):
    def loss(params, bs, target, crops, accumulate=accumulate):
      return objective.self_supervised_batch_loss(
          net, params, bs, target, crops, jax.random.key(3), layout, tau=c.loss.tau,
          level_weights=c.loss.level_weights, accumulate=accumulate)
    args = (var['params'], var['batch_stats'], target, crops)
    compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(*args).compile(
        compiler_options={'xla_backend_optimization_level': 0})
    runs[accumulate] = (compiled(*args), compiled.memory_analysis().temp_size_in_bytes)
  ((loss0, (m0, bs0, tbs0)), g0), temp0 = runs['none']
  ((loss1, (m1, bs1, tbs1)), g1), temp1 = runs['views']
  leaves0, leaves1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
  norm = np.sqrt(sum(float(jnp.sum(g**2)) for g in leaves0))
  rel = np.sqrt(sum(float(jnp.sum((a - b)**2)) for a, b in zip(leaves1, leaves0))) / norm
  print(f"accumulate='views' vs 'none': loss {float(loss1):.6f} vs {float(loss0):.6f}; "
        f"temp {temp1 / 2**20:.2f} vs {temp0 / 2**20:.2f} MiB")
  # The same network and loss, in two programs: the network's stages (BN rows
  # at most the stem's, every canvas of one view), then the loss's cosines
  # (D twice), logsumexp over the batch, mean over a level's tiles; the loss
  # and the metrics relative to their value (at least 1: cosines near 0).
  batch = crops.shape[0]
  chain = tolerance.network_chain(var['params'], layout.num_canvases * (size // 2)**2)
  chain += [c.model.embed_dim] * 2 + [batch, 8 * batch]
  rtol = tolerance.tol(F32, chain, 1.0, sides=2, walk=True)
  grad_rtol = tolerance.tol(F32, 2 * chain, 1.0, sides=2, walk=True)
  tolerance.check(abs(float(loss1) - float(loss0)), rtol * abs(float(loss0)),
                  "accumulate='views' vs 'none': loss")
  assert m1.keys() == m0.keys()
  for k in m0:
    tolerance.check(abs(float(m1[k]) - float(m0[k])), rtol * max(1.0, abs(float(m0[k]))),
                    f"accumulate='views' vs 'none': {k}")
  tolerance.check(rel, grad_rtol, "accumulate='views' vs 'none': gradient, relative to its norm")
  for a, b in zip(jax.tree.leaves((bs1, tbs1)), jax.tree.leaves((bs0, tbs0))):
    tolerance.assert_close(a, b, atol=rtol * float(jnp.abs(b).max()),
                           what="accumulate='views' vs 'none': batch statistics")
  assert temp1 < temp0


# ---------------------------------------------------------------- preflight --

def test_check_fits_names_batch_bytes_and_settings():
  """A compiled function against a faked device limit: one line naming the
  per-device batch, the bytes needed and available, and what would fit."""
  compiled = jax.jit(lambda x: jnp.tanh(x @ x.T) @ x).lower(
      jax.ShapeDtypeStruct((2048, 1024), jnp.float32)).compile()
  need = memory.compiled_bytes(compiled)
  c = _tiny()
  c.optim.global_batch = 64  # 8 per device on 8 devices, group 8
  assert memory.check_fits(compiled, c, 8, None) == need  # no device statistics: no check
  assert memory.check_fits(compiled, c, 8, need['total']) == need
  c.optim.global_batch = 256  # 32 per device
  with pytest.raises(memory.DoesNotFitError) as e:
    memory.check_fits(compiled, c, 8, need['total'] - need['temp'] // 2)
  msg = str(e.value)
  print(msg)
  assert '\n' not in msg and 'per-device batch 32 ' in msg
  assert f"{need['total'] / 2**30:.2f} GiB per device" in msg
  assert "model.remat='blocks+neck'" in msg and "optim.accumulate='views'" in msg
  assert 'per-device batch 16 (optim.global_batch=128,' in msg  # half the temporaries fit
  assert isinstance(e.value, config_validation.ConfigError)  # exit status 2, one line


def test_train_loop_stops_before_the_first_step_when_the_step_cannot_fit(
    tmp_path, monkeypatch):
  from mcl_jax.training import loop
  monkeypatch.setattr(memory, 'device_bytes_limit', lambda device: 2**20)  # 1 MiB
  c = _tiny(levels=1)  # one level and one neck conv: a short compile
  c.model.neck_convs = 1
  c.optim.global_batch = 8 * jax.device_count()
  with pytest.raises(memory.DoesNotFitError, match=r'per-device batch 8 .* the device has '
                     r'0\.00 GiB'):
    loop.train_and_evaluate(c, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()  # nothing was trained, nothing is left
