"""The JAX MCL loss against an independent PyTorch implementation (mcl_jax/testing/torch_reference.py).

Weights are random variables in the JAX init's shapes (BatchNorm scales,
biases and running statistics randomised too) copied into PyTorch, with a
target encoder perturbed away from the online one; both sides see the same
augmented crops assembled into the same canvases with the same tile labels
(`objective.view_canvases`), in float32 with train-mode BatchNorm.
Tolerances (tests/tolerance.py): two float32 implementations of the same
network and loss, so their sums may run in any order: the random walk over
the network's stages (each kernel's fan-in, each BatchNorm's rows, at most
every canvas's (size / 2)^2 stem pixels) and the loss's (cosines over D,
logsumexp over the batch, means over the tiles); the loss and each
per-level metric relative to their value (cosines: to max(|value|, 0.01),
since a mean negative cosine can sit near 0); online gradients, which pass
the chain twice, relative to each tensor's largest entry (floored at 1e-4
of the largest gradient).

The losses are compared with the reference's ReLU. The gradients are compared
with softplus swapped in for ReLU on both sides (`nn.relu` in Flax,
`torch_reference.activation`): ReLU's derivative jumps at 0, and a
pre-activation within float32 noise of 0 (3e-6 was seen) lands on opposite
sides in JAX and PyTorch, which moved single gradient entries by up to 30%
while the losses agreed to 1e-7, depending on the seed.

Two configs: test_tiny (32 px: every region is 1 x 1) and the same network at
64 px (2 x 2 regions, so the neck's 3x3 convs see a zero-padded border),
both with neck_regions='all' (the reference) and two montage groups. At
these sizes JAX computes every conv with a <= 2 x 2 output (the neck's
regions, layer3/4, P4/P5) as dense matmuls (`resnet.Conv`); PyTorch runs
real convolutions, so this also checks that path against `conv2d`.
"""

import re

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from mcl_jax.testing import torch_reference as tr  # noqa: E402
from configs import test_tiny  # noqa: E402
from mcl_jax.nn import model as model_lib  # noqa: E402
from mcl_jax.pretext import montage, objective  # noqa: E402
from tests import tolerance  # noqa: E402

# Softplus gradients measured <= 3.9e-5 over 32 px seeds 0-1 and 64 px seeds
# 0-5; with ReLU the gradient check failed at 64 px seed 2 (0.11,
# layer4.0.conv1), a kink hit, not rounding (module docstring).


def _tols(config, layout, params, image_size):
  """(loss and metrics, gradients) relative tolerances (module docstring)."""
  canvases = config.optim.global_batch // config.montage.group_size * layout.num_canvases
  chain = tolerance.network_chain(params, canvases * (image_size // 2)**2)
  b = config.optim.global_batch
  chain += [config.model.embed_dim] * 2 + [b, b * 8]
  return (tolerance.tol(np.float32, chain, 1.0, sides=2, walk=True),
          tolerance.tol(np.float32, 2 * chain, 1.0, sides=2, walk=True))


def _random_variables(net, layout, image_size, rng):
  """Random variables in the init's shapes, without compiling the init.

  Kernels: Kaiming-like normals (predictor Dense 0.01 as its init); BN
  scales U(0.7, 1.3), biases and running means 0.1 N(0, 1), running
  variances U(0.5, 2); Dense biases 0.1 N(0, 1).
  """
  shapes = jax.eval_shape(lambda k: model_lib.init_variables(net, layout, k, image_size),
                          jax.random.key(0))

  def f(path, x):
    names = [str(getattr(k, 'key', k)) for k in path]
    name, shape = names[-1], x.shape
    if name == 'kernel':
      fan_in = int(np.prod(shape[:-1]))
      std = 0.01 if names[1].startswith('predictors') and len(shape) == 2 else np.sqrt(2 / fan_in)
      a = std * rng.standard_normal(shape)
    elif name == 'scale':
      a = rng.uniform(0.7, 1.3, shape)
    elif name == 'var':
      a = rng.uniform(0.5, 2.0, shape)
    else:  # bias, mean
      a = 0.1 * rng.standard_normal(shape)
    return jnp.asarray(a.astype(np.float32))
  return jax.tree_util.tree_map_with_path(f, shapes)


def _perturb(tree, rng, noise):
  """The target: the online encoder's variables x (1 + noise N(0, 1))."""
  return jax.tree.map(
      lambda x: jnp.asarray(np.asarray(x) * (1 + noise * rng.standard_normal(x.shape))
                            .astype(np.float32)), tree)


def _compare(image_size, seed, grads):
  """JAX against PyTorch: losses and metrics, and the online gradients if `grads`."""
  config = test_tiny.get_config()
  config.data.image_size = image_size
  config.optim.global_batch = 2 * config.montage.group_size  # two montage groups
  config.model.dtype = 'float32'
  config.model.neck_regions = 'all'
  layout = montage.layout_for(config)
  net = model_lib.create_model(config)
  rng = np.random.default_rng(seed)

  variables = _random_variables(net, layout, image_size, rng)
  params, batch_stats = variables['params'], variables['batch_stats']
  target_vars = {'params': _perturb(model_lib.encoder_subtree(params), rng, 0.05),
                 'batch_stats': _perturb(model_lib.encoder_subtree(batch_stats), rng, 0.05)}

  b, s = config.optim.global_batch, image_size
  crops = jnp.asarray(rng.standard_normal((b, 8, s, s, 3)).astype(np.float32))
  key = jax.random.key(seed + 100)
  kw = dict(tau=config.loss.tau, level_weights=tuple(config.loss.level_weights),
            downsample=config.montage.downsample)

  def jax_side(params, batch_stats, target_vars, crops, key):
    """Loss, metrics, gradients, and the canvases + labels the loss used."""
    loss_fn = lambda p: objective.self_supervised_batch_loss(
        net, p, batch_stats, target_vars, crops, key, layout, **kw)
    if grads:
      out = jax.value_and_grad(loss_fn, has_aux=True)(params)
    else:
      out = loss_fn(params), None
    views = [objective.view_canvases(crops, v, layout, key, None, config.montage.downsample)
             for v in (0, 1)]
    return out, views

  # One compile per test; LLVM optimisation off halves the compile time on
  # this (shared, 2-core) CPU and changes no HLO-level numerics.
  args = (params, batch_stats, target_vars, crops, key)
  compiled = jax.jit(jax_side).lower(*args).compile(
      compiler_options={'xla_backend_optimization_level': 0})
  ((jloss, (jmetrics, _, _)), jgrads), views = compiled(*args)
  # The same canvases and tile labels, fed to PyTorch.
  canvases = [torch.from_numpy(np.asarray(c).transpose(0, 3, 1, 2).copy()) for c, _ in views]
  labels = [[torch.from_numpy(np.asarray(l).astype(np.int64)) for l in lab] for _, lab in views]

  torch.manual_seed(0)
  model = tr.MCLTorch.from_config(config)
  tr.load_from_flax(model, params, batch_stats, target_vars['params'],
                    target_vars['batch_stats'])
  model.train()
  with torch.set_grad_enabled(grads):
    tloss, tmetrics = tr.loss_from_canvases(model, canvases, labels,
                                            tr.GridLayout.from_jax(layout), config.loss.tau,
                                            config.loss.level_weights, 'all')

  jm = {k: float(v) for k, v in jax.device_get(jmetrics).items()}
  tm = {k: float(v) for k, v in tmetrics.items()}
  assert set(tm) == set(jm)
  rel, grad_rel = _tols(config, layout, params, image_size)
  print(f'\n{s} px, seed {seed}: JAX loss {float(jloss):.6f}, torch {tloss.item():.6f}')
  for k in sorted(jm):
    floor = 1e-2 if 'cos' in k else 1e-6
    tolerance.check(abs(tm[k] - jm[k]) / max(abs(jm[k]), floor), rel,
                    f'{s} px seed {seed}: torch vs JAX {k}, relative')
  tolerance.check(abs(tloss.item() - float(jloss)) / abs(float(jloss)), rel,
                  f'{s} px seed {seed}: torch vs JAX loss, relative')
  if not grads:
    return float(jloss), None

  tloss.backward()
  jg = tr.flax_grads_to_torch_names(jgrads)
  # Gradients: max |torch - JAX| relative to the tensor's largest JAX entry,
  # floored at 1e-4 of the largest gradient anywhere. A Linear bias right
  # before a BatchNorm (neck fc1 / fc2, predictor fc1) has an exactly-zero
  # gradient (the BN subtracts it again), as has, on 1 x 1 regions, the FPN
  # output BN bias ahead of the neck's first conv + BN: both sides give
  # float noise there, so the Linear ones are skipped and the floor covers
  # the rest.
  floor = 1e-4 * max(float(np.max(np.abs(g))) for g in jg.values())
  gdev = {}
  for name, p in model.named_parameters():
    if p.grad is None or re.search(r'(neck\.fc[12]|predictors\.\d\.fc1)\.bias$', name):
      continue
    ref = jg[name]
    gdev[name] = float(np.max(np.abs(p.grad.numpy() - ref)) / max(np.max(np.abs(ref)), floor))
  assert len(gdev) == len(jg) - 2 - len(config.loss.level_weights)
  worst = max(gdev, key=gdev.get)
  print(f'max grad dev {gdev[worst]:.1e} ({worst}); next',
        sorted(gdev.items(), key=lambda kv: -kv[1])[1:4])
  tolerance.check(gdev[worst], grad_rel,
                  f'{s} px seed {seed}: torch vs JAX gradient {worst}, relative to its largest')
  return float(jloss), gdev[worst]


def smooth_activation(monkeypatch):
  """Softplus for ReLU in the JAX network (Flax's nn.relu) and in the oracle."""
  monkeypatch.setattr(flax.linen, 'relu', jax.nn.softplus)
  monkeypatch.setattr(tr, 'activation', torch.nn.functional.softplus)


# 64 px seed 2 is a case where ReLU's gradients differ by 11% between the two
# sides (a pre-activation at float32 noise from 0) while the losses agree.
CASES = [(32, 0), (64, 2)]


@pytest.mark.parametrize('image_size,seed', CASES)
def test_losses_match_with_relu(image_size, seed):
  """32 px: test_tiny, 1 x 1 regions; 64 px: 2 x 2 regions. Two groups, neck_regions='all'."""
  _compare(image_size, seed, grads=False)


@pytest.mark.parametrize('image_size,seed', CASES)
def test_losses_and_gradients_match_with_softplus(image_size, seed, monkeypatch):
  """The same configs with softplus: the gradients are continuous in the pre-activations."""
  smooth_activation(monkeypatch)
  _compare(image_size, seed, grads=True)
