"""Backbone / FPN shapes and padding, and the whole model + loss on a tiny variant.

Tolerances (tests/tolerance.py): the torch cross-checks are two float32
computations of the same convolutions: the stem conv one reduction of
7*7*3 products, C2..C5 the chain of every conv's reduction (its fan-in)
and the eval-mode BatchNorms' roundings, relative to the output's largest
value. The dense-matmul conv path against XLA's convolution: one reduction
(the forward's fan-in, the input gradient's k*k*C_out, the kernel
gradient's batch x output pixels), relative to the largest value. Region
paths 'reshape' vs 'roi_align': the same model on the same regions, two
float32 programs, so the loss may differ by a reordering of the neck's,
predictors' and loss's reductions (relative to the loss).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mcl_100ep
from mcl_jax.nn import model as model_lib
from mcl_jax.pretext import montage, objective
from mcl_jax.nn.fpn import FPN
from mcl_jax.nn.resnet import ResNet
from tests import tolerance

F32 = np.float32
B, S = 32, 64
WEIGHTS = (1 / 2, 1 / 4, 1 / 8, 1 / 8)
TINY = dict(depth=18, width=8, stage_sizes=(1, 1, 1, 1), fpn_channels=16, neck_hidden=32,
            embed_dim=16, predictor_hidden=32)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------ parameter counts

@pytest.mark.parametrize('depth,expected', [
    (18, 11_176_512), (34, 21_284_672), (50, 23_508_032), (101, 42_500_160)])
def test_resnet_param_count_equals_torchvision_without_fc(depth, expected):
  shapes = jax.eval_shape(
      lambda k: ResNet(depth=depth).init(k, jnp.zeros((1, 64, 64, 3)), train=False),
      jax.random.key(0))
  assert _count(shapes['params']) == expected
  # Running statistics: one mean and one var per BN channel (= scale count).
  bn_channels = sum(int(np.prod(x.shape)) for p, x in
                    jax.tree_util.tree_leaves_with_path(shapes['params'])
                    if getattr(p[-1], 'key', None) == 'scale')
  assert _count(shapes['batch_stats']) == 2 * bn_channels


def test_fpn_param_count():
  chans = ResNet(depth=50).out_channels
  assert chans == (256, 512, 1024, 2048)
  feats = {f'C{l}': jax.ShapeDtypeStruct((1, 64 >> l, 64 >> l, c), jnp.float32)
           for l, c in zip(range(2, 6), chans)}
  shapes = jax.eval_shape(lambda k, f: FPN(256).init(k, f, train=False), jax.random.key(0),
                          feats)
  assert _count(shapes['params']) == 3_346_432
  out = jax.eval_shape(lambda k, f: FPN(256).init_with_output(k, f, train=False)[0],
                       jax.random.key(0), feats)
  assert {k: v.shape for k, v in out.items()} == {
      'P2': (1, 16, 16, 256), 'P3': (1, 8, 8, 256), 'P4': (1, 4, 4, 256), 'P5': (1, 2, 2, 256)}


# --------------------------------------------------------- torchvision padding

def _random_variables(net, x, rng):
  """Random variables of `net` from NumPy (shapes via eval_shape: no init compile).

  He-scaled kernels; BN scale / bias / running statistics random, so that
  eval-mode BN is not the identity.
  """
  shapes = jax.eval_shape(lambda k: net.init(k, x, train=False), jax.random.key(0))

  def f(path, x):
    name = path[-1].key
    if name == 'kernel':
      fan_in = int(np.prod(x.shape[:-1]))
      return jnp.asarray((rng.standard_normal(x.shape) * np.sqrt(2 / fan_in)).astype(np.float32))
    if name in ('scale', 'var'):
      return jnp.asarray(rng.uniform(0.5, 1.5, x.shape).astype(np.float32))
    assert name in ('bias', 'mean'), name
    return jnp.asarray((rng.standard_normal(x.shape) * 0.1).astype(np.float32))
  return jax.tree_util.tree_map_with_path(f, shapes)


def _torch_resnet(torch, variables, x, block, stages):
  """torchvision ResNet forward (eval BN) in torch on copied weights.

  Stem in torch modules (Conv2d 7x7 / 2 padding 3, BatchNorm2d, MaxPool2d
  3 / 2 padding 1), blocks with F.conv2d (3x3 padding 1, 1x1 padding 0).
  Returns the stem conv output and C2..C5, NHWC.
  """
  F = torch.nn.functional
  p, s = variables['params'], variables['batch_stats']
  t = lambda a: torch.tensor(np.asarray(a, np.float32))
  oihw = lambda k: t(np.transpose(np.asarray(k['kernel']), (3, 2, 0, 1)))
  conv = lambda h, k, stride, pad: F.conv2d(h, oihw(k), stride=stride, padding=pad)
  bn = lambda h, pp, ss: F.batch_norm(h, t(ss['mean']), t(ss['var']), t(pp['scale']),
                                      t(pp['bias']), training=False, eps=1e-5)
  nhwc = lambda h: np.transpose(h.numpy(), (0, 2, 3, 1))
  width = p['conv1']['kernel'].shape[-1]
  stem_conv = torch.nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
  stem_bn = torch.nn.BatchNorm2d(width, eps=1e-5).eval()
  stem_conv.weight.copy_(oihw(p['conv1']))
  stem_bn.weight.copy_(t(p['bn1']['scale']))
  stem_bn.bias.copy_(t(p['bn1']['bias']))
  stem_bn.running_mean.copy_(t(s['bn1']['mean']))
  stem_bn.running_var.copy_(t(s['bn1']['var']))
  h = stem_conv(t(np.transpose(x, (0, 3, 1, 2))))
  outs = {'stem_conv': nhwc(h)}
  h = torch.nn.MaxPool2d(3, stride=2, padding=1)(torch.relu(stem_bn(h)))
  for st, n in enumerate(stages):
    for b in range(n):
      name = f'layer{st + 1}_{b}'
      bp, bs = p[name], s[name]
      stride = 2 if (st > 0 and b == 0) else 1
      if block == 'basic':
        y = F.relu(bn(conv(h, bp['conv1'], stride, 1), bp['bn1'], bs['bn1']))
        y = bn(conv(y, bp['conv2'], 1, 1), bp['bn2'], bs['bn2'])
      else:
        y = F.relu(bn(conv(h, bp['conv1'], 1, 0), bp['bn1'], bs['bn1']))
        y = F.relu(bn(conv(y, bp['conv2'], stride, 1), bp['bn2'], bs['bn2']))
        y = bn(conv(y, bp['conv3'], 1, 0), bp['bn3'], bs['bn3'])
      sc = h
      if 'downsample_conv' in bp:
        sc = bn(conv(h, bp['downsample_conv'], stride, 0), bp['downsample_bn'],
                bs['downsample_bn'])
      h = F.relu(y + sc)
    outs[f'C{st + 2}'] = nhwc(h)
  return outs


@pytest.mark.parametrize('block,size', [('basic', 33), ('basic', 32), ('bottleneck', 32)])
def test_resnet_matches_torch_padding(block, size):
  """Symmetric PyTorch padding. Flax 'SAME' pads stride-2 layers asymmetrically on
  even sizes (total k - 2) and symmetrically on odd ones, so both are tested."""
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(size + (0 if block == 'basic' else 1))
  net = ResNet(depth=18 if block == 'basic' else 50, width=8, stage_sizes=(1, 1, 1, 1))
  x = rng.standard_normal((1, size, size, 3)).astype(np.float32)
  variables = _random_variables(net, jnp.asarray(x), rng)
  apply = jax.jit(lambda v, x: net.apply(v, x, False, capture_intermediates=True,
                                         mutable=['intermediates']))
  outs, inter = apply(variables, jnp.asarray(x))
  with torch.no_grad():
    ref = _torch_resnet(torch, variables, x, block, (1, 1, 1, 1))
  # The stem convolution alone: 7x7, stride 2, symmetric padding 3.
  stem = np.asarray(inter['intermediates']['conv1']['__call__'][0])
  half = (size + 1) // 2
  assert stem.shape == ref['stem_conv'].shape == (1, half, half, 8)
  err_stem = np.abs(stem - ref['stem_conv']).max()
  tolerance.check(err_stem, tolerance.tol(F32, 7 * 7 * 3, np.abs(ref['stem_conv']).max(),
                                          sides=2), f'ResNet ({block}) {size} px stem conv vs torch')
  # C2..C5 (max-pool padding 1, every strided conv), relative to the output scale:
  # every conv's fan-in, and four roundings per eval-mode BN and residual sum.
  kernels = [x for p, x in jax.tree_util.tree_leaves_with_path(variables['params'])
             if p[-1].key == 'kernel']
  chain = [int(np.prod(k.shape[:-1])) for k in kernels] + [4] * len(kernels)
  rel = 0.0
  for k in ('C2', 'C3', 'C4', 'C5'):
    got = np.asarray(outs[k])
    assert got.shape == ref[k].shape, k
    rel = max(rel, np.abs(got - ref[k]).max() / np.abs(ref[k]).max())
  tolerance.check(rel, tolerance.tol(F32, chain, 1.0, sides=2),
                  f'ResNet ({block}) {size} px C2..C5 vs torch, relative to max |ref|')
  sizes = {33: [9, 5, 3, 2], 32: [8, 4, 2, 1]}[size]
  assert [ref[k].shape[1] for k in ('C2', 'C3', 'C4', 'C5')] == sizes


@pytest.mark.parametrize('hw,k,stride,padding', [
    ((1, 1), 3, 1, 1), ((2, 2), 3, 1, 1), ((3, 2), 3, 1, 1), ((4, 4), 3, 2, 1),
    ((3, 3), 3, 2, 1), ((2, 2), 3, 2, 1), ((4, 4), 7, 2, 3), ((3, 3), 3, (1, 2), (0, 1)),
    ((8, 8), 3, 2, 1)])  # the last one has 4 x 4 outputs: XLA's convolution
def test_conv_dense_path_matches_xla_convolution(hw, k, stride, padding):
  """resnet.Conv's matmul path for <= 2x2 outputs equals lax's convolution,
  forward and both gradients (random inputs and kernels; tolerance relative
  to the largest value, module docstring)."""
  from mcl_jax.nn import resnet
  rng = np.random.default_rng(sum(hw) * 10 + k)
  pads = padding if isinstance(padding, tuple) else (padding, padding)
  strides = stride if isinstance(stride, tuple) else (stride, stride)
  conv = resnet.Conv(6, (k, k), strides, padding=tuple((p, p) for p in pads), use_bias=False)
  x = jnp.asarray(rng.standard_normal((3, *hw, 5)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((k, k, 5, 6)), jnp.float32)

  def ours(x, kernel):
    return conv.apply({'params': {'kernel': kernel}}, x)

  def ref(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, strides, tuple((p, p) for p in pads),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                        precision='highest')

  got, want = ours(x, kernel), ref(x, kernel)
  assert got.shape == want.shape
  dense = got.shape[1] * got.shape[2] <= resnet.DENSE_MAX_OUTPUT_PIXELS
  hlo = str(jax.make_jaxpr(ours)(x, kernel))
  assert ('conv_general_dilated' not in hlo) == dense
  cot = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
  g_got = jax.grad(lambda a, b: jnp.sum(ours(a, b) * cot), (0, 1))(x, kernel)
  g_want = jax.grad(lambda a, b: jnp.sum(ref(a, b) * cot), (0, 1))(x, kernel)
  errs = [float(jnp.abs(a - b).max() / jnp.abs(b).max())
          for a, b in zip((got, *g_got), (want, *g_want))]
  # Reductions: forward k*k*C_in, dx k*k*C_out (every window covering a
  # pixel), dk batch x output pixels; relative to the largest value.
  lengths = (k * k * 5, k * k * 6, 3 * want.shape[1] * want.shape[2])
  for what, err, n in zip(('forward', 'dx', 'dk'), errs, lengths):
    tolerance.check(err, tolerance.tol(F32, n, 1.0, sides=2),
                    f'Conv {hw} k{k} s{stride} p{padding} dense={dense} {what}, relative')


# ----------------------------------------------------------- whole model + loss
#
# Compiling the tiny model's loss dominates this file's runtime, so one jitted
# function computes the default loss with its gradients (online and target
# params) together with the forward losses of the other variants: XLA's CSE
# shares their common parts (montages, backbones), which roughly halves the
# compile time against separate jits.

VARIANTS = {
    'roi_all': dict(region_path='roi_align'),
    'reshape_used': dict(neck_regions='used'),
    'roi_used': dict(neck_regions='used', region_path='roi_align'),
}


def _layout():
  m = mcl_100ep.get_config().montage
  m.group_size = B
  return montage.make_layout(m, S)


def _loss(layout, params, bs, target_params, target_bs, crops, key, whole=False, **kw):
  net = model_lib.MCLNet(**{**TINY, **kw})
  return objective.self_supervised_batch_loss(
      net, params, bs, {'params': target_params, 'batch_stats': target_bs}, crops, key,
      layout, tau=1.0, level_weights=WEIGHTS, target_whole_crops_only=whole)


@pytest.fixture(scope='module')
def setup():
  layout = _layout()
  net = model_lib.MCLNet(**TINY)
  # rbg keys: the same Kaiming init, much cheaper to compile than threefry.
  variables = jax.jit(lambda k: model_lib.init_variables(net, layout, k, S))(
      jax.random.key(0, impl='rbg'))
  params, bs = variables['params'], variables['batch_stats']
  target = {'params': model_lib.encoder_subtree(params),
            'batch_stats': model_lib.encoder_subtree(bs)}
  rng = np.random.default_rng(0)
  crops = jnp.asarray(rng.standard_normal((B, 8, S, S, 3)).astype(np.float32))
  return layout, params, bs, target, crops, jax.random.key(42)


@pytest.fixture(scope='module')
def runs(setup):
  """{'default': ((loss, aux), (online grads, target grads)), variant: (loss, aux)}."""
  layout, params, bs, target, crops, key = setup

  @jax.jit
  def all_runs(params, bs, target_params, target_bs, crops, key):
    rest = (target_bs, crops, key)
    out = {'default': jax.value_and_grad(
        lambda p, tp: _loss(layout, p, bs, tp, *rest), argnums=(0, 1), has_aux=True)(
            params, target_params)}
    for name, kw in VARIANTS.items():
      out[name] = _loss(layout, params, bs, target_params, *rest, **kw)
    out['whole'] = _loss(layout, params, bs, target_params, *rest, whole=True)
    return out

  return all_runs(params, bs, target['params'], target['batch_stats'], crops, key)


def _tree_norm(tree):
  return np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree)))


def test_loss_and_grads_finite(setup, runs):
  _, params, bs, target, _, _ = setup
  (loss, (metrics, new_bs, new_tbs)), (g_online, g_target) = runs['default']
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
  # At init the loss is near 2 views x 2 tau x sum(w) x log(B) = 4 log 32.
  assert 0.8 * 4 * np.log(B) < float(loss) < 1.2 * 4 * np.log(B)
  # The same float32 sum, logged: at most one final rounding on each side.
  tolerance.check(abs(float(metrics['loss']) - float(loss)),
                  tolerance.tol(F32, 1, abs(float(loss)), sides=2, worst_case=True),
                  'logged loss vs loss')
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g_online))
  assert jax.tree.structure(g_online) == jax.tree.structure(params)
  norms = {k: float(_tree_norm(v)) for k, v in g_online.items()}
  assert all(n > 0 for n in norms.values()), norms  # every part is trained
  # The target is never trained: exactly zero gradient.
  assert jax.tree.structure(g_target) == jax.tree.structure(target['params'])
  assert all((np.asarray(x) == 0).all() for x in jax.tree.leaves(g_target))
  # BatchNorm statistics moved, online and target.
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(new_bs), jax.tree.leaves(bs)))
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(new_tbs), jax.tree.leaves(target['batch_stats'])))


def _region_paths_rtol():
  """Relative tolerance between the region paths: two float32 programs that
  may order the reductions after the cut differently. Per neck layer a conv
  (3*3*C) and BN statistics over a level's regions (at most every canvas's
  P2 cells: canvases x (S / 4)^2 values); the 2 x 2 mean, fc1, fc2 with BN; the
  predictor's fc1, BN and fc2; the loss's cosines (D twice), logsumexp over
  the B targets and mean over the tiles (at most B * 8 per level)."""
  c, h, d = TINY['fpn_channels'], TINY['neck_hidden'], TINY['embed_dim']
  rows = _layout().num_canvases * (S // 4)**2
  neck = [9 * c, rows] * 4 + [4, c, rows, h, rows]
  predictor = [d, rows, TINY['predictor_hidden']]
  loss = [d, d, B, B * 8]
  return tolerance.tol(F32, neck + predictor + loss, 1.0, sides=2)


def test_region_paths_give_the_same_loss(runs):
  ref_all = float(runs['default'][0][0])
  roi_all = float(runs['roi_all'][0])
  used, roi_used = float(runs['reshape_used'][0]), float(runs['roi_used'][0])
  rtol = _region_paths_rtol()
  tolerance.check(abs(roi_all - ref_all) / abs(ref_all), rtol,
                  "model loss reshape vs roi_align, 'all', relative")
  tolerance.check(abs(roi_used - used) / abs(used), rtol,
                  "model loss reshape vs roi_align, 'used', relative")
  print(f"'all' vs 'used' differ by {abs(used - ref_all):.2e} (expected)")
  # Per-level metrics agree too (relative to max(1, |value|): cosines can sit near 0).
  for a, b in (('default', 'roi_all'), ('reshape_used', 'roi_used')):
    ma = runs[a][0][1][0] if a == 'default' else runs[a][1][0]
    mb = runs[b][1][0]
    for k in ma:
      tolerance.check(abs(float(ma[k]) - float(mb[k])), rtol * max(1.0, abs(float(ma[k]))),
                      f'model metric {k}, {a} vs {b}')
  # 'all' and 'used' legitimately differ (the neck's BN statistics differ).
  assert used != ref_all


def test_target_whole_crops_only(setup, runs):
  _, _, _, target, _, _ = setup
  loss, (metrics, _, new_tbs) = runs['whole']
  assert np.isfinite(float(loss))
  assert jax.tree.structure(new_tbs) == jax.tree.structure(target['batch_stats'])
  # Same online network, a different target BN batch: a different loss.
  assert float(loss) != float(runs['default'][0][0])


def test_bf16_model(setup, runs):
  layout, params, bs, target, crops, key = setup
  fn = jax.jit(functools.partial(_loss, layout, dtype=jnp.bfloat16))
  loss, (metrics, new_bs, new_tbs) = fn(params, bs, target['params'], target['batch_stats'],
                                        crops, key)
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
  assert all(v.dtype == jnp.float32 for v in metrics.values())
  # Batch statistics stay float32.
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_bs))
  # The network really computes in bfloat16 (features), params stay float32.
  net = model_lib.MCLNet(**TINY, dtype=jnp.bfloat16)
  feats = jax.eval_shape(
      lambda p, b, x: net.apply({'params': p, 'batch_stats': b}, x,
                                method=model_lib.MCLNet.features),
      params, bs, jax.ShapeDtypeStruct((2, S, S, 3), jnp.float32))
  assert {v.dtype for v in feats.values()} == {jnp.dtype(jnp.bfloat16)}
  ref = float(runs['default'][0][0])
  rel = abs(float(loss) - ref) / ref
  tolerance.check(rel, _bf16_rtol(layout, params, runs['default'][1][0], ref),
                  'bf16 vs float32 model loss, relative')


def _bf16_rtol(layout, params, grads, loss):
  """Relative tolerance of the bf16 loss against the float32 one.

  Every layer rounds its input, its kernel and its output to bfloat16 (u =
  2^-8; BN statistics, the loss's softmax and the accumulations are float32).
  Per tile, the activations' roundings add along the chain as a random walk,
  and a relative error of the embeddings moves a tile's cross-entropy (about
  log B, its logits' gradient of l1 norm <= 2) by at most as much, relative;
  the loss averages the tiles' independent errors over both views' tiles.
  The kernels' roundings are common to every tile: they move the loss by
  sum(g * w * eps) over the weights, a random walk of size u ||g * w||.
  """
  kernels = [x for p, x in jax.tree_util.tree_leaves_with_path(params) if p[-1].key == 'kernel']
  tiles = 2 * sum(layout.num_tiles(i) for i in range(layout.num_levels))
  per_tile = tolerance.tol(jnp.bfloat16, 3 * len(kernels), 1.0)
  gw = np.sqrt(sum(float(np.sum(np.square(np.asarray(g, np.float64) * np.asarray(w))))
                   for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(params))))
  return per_tile / np.sqrt(tiles) + tolerance.tol(jnp.bfloat16, 1, gw / loss)
