"""Detection fine-tuning: the optimizer, the state, the run (python -m mcl_jax.finetune).

The optimizer is checked against independent references: the schedule
against a NumPy transcription of detectron2's WarmupMultiStepLR, a few
update steps against torch.optim.SGD. The run tests fine-tune
configs/detect_test_tiny.py on tiny digit scenes.
"""

import bisect
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mcl_jax.detection import optim
from tests import tolerance


# ------------------------------------------------------------------ optimizer --

def _optim_config(**kw):
  c = ml_collections.ConfigDict()
  c.optim = ml_collections.ConfigDict(dict(
      base_lr=0.02, momentum=0.9, weight_decay=1e-4, weight_decay_norm=0.0,
      warmup_iters=1000, warmup_factor=0.001, lr_steps=(60_000, 80_000), gamma=0.1,
      num_steps=90_000, global_batch=16))
  c.optim.update(kw)
  return c


def _warmup_multistep(step, base, warmup_iters, warmup_factor, milestones, gamma):
  """detectron2's WarmupMultiStepLR ('linear'), transcribed, in float64."""
  factor = 1.0
  if step < warmup_iters:
    alpha = step / warmup_iters
    factor = warmup_factor * (1 - alpha) + alpha
  return base * factor * gamma ** bisect.bisect_right(list(milestones), step)


@pytest.mark.parametrize('kw', [{}, {'warmup_iters': 0, 'lr_steps': (5, 7), 'base_lr': 0.5},
                                {'warmup_iters': 17, 'warmup_factor': 0.25, 'gamma': 0.5,
                                 'lr_steps': (17, 40, 41)}])
def test_schedule_is_warmup_multistep(kw):
  c = _optim_config(**kw)
  o = c.optim
  rng = np.random.default_rng(0)
  edges = [0, 1, o.warmup_iters - 1, o.warmup_iters, o.warmup_iters + 1]
  edges += [m + d for m in o.lr_steps for d in (-1, 0, 1)]
  steps = sorted({s for s in edges + list(rng.integers(0, o.num_steps, 500)) if s >= 0})
  got = np.asarray(jax.jit(jax.vmap(optim.lr_schedule(c)))(jnp.asarray(steps)))
  want = np.array([_warmup_multistep(s, o.base_lr, o.warmup_iters, o.warmup_factor,
                                     o.lr_steps, o.gamma) for s in steps])
  # float32: t and the milestones are exact; t / warmup, 1 - alpha, the
  # product, the sum, x base, and one product per milestone each round once.
  roundings = 5 + len(o.lr_steps) + 2  # + base and gamma stored in float32
  tolerance.assert_close(got, want, atol=0.0, rtol=tolerance.tol(
      np.float32, roundings, worst_case=True), what='lr vs WarmupMultiStepLR')


def _params(rng):
  """A parameter tree with convs, a dense layer and norms (Flax names)."""
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  return {'conv1': {'kernel': f(3, 3, 4, 8)},
          'bn1': {'scale': 1 + 0.1 * f(8), 'bias': f(8)},
          'head': {'conv': {'kernel': f(3, 3, 8, 8), 'bias': f(8)},
                   'norm': {'scale': 1 + 0.1 * f(8), 'bias': f(8)},
                   'fc': {'kernel': f(8, 5), 'bias': f(5)}}}


def test_decay_mask_is_every_leaf_but_norm_scales():
  params = _params(np.random.default_rng(0))
  mask = optim.decay_mask(params)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  want = {k: not k.endswith("['scale']") for k in flat}
  assert flat == want
  assert sum(flat.values()) == 7 and len(flat) == 9


def test_decay_mask_on_the_backbone_follows_its_norms():
  """On a real ResNet + FPN: no decay exactly where a module keeps BN statistics."""
  from mcl_jax.nn import fpn, resnet
  import flax.linen as nn

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x, train=False):
      feats = resnet.ResNet(stage_sizes=(1, 1, 1, 1), block='basic', width=8)(x, train=train)
      return fpn.FPN(channels=16)(feats, train=train)

  try:
    variables = jax.eval_shape(Net().init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  except TypeError as e:
    pytest.skip(f'ResNet/FPN signature: {e}')
  mask = optim.decay_mask(variables['params'])
  norm_modules = {jax.tree_util.keystr(p[:-1])
                  for p, _ in jax.tree_util.tree_leaves_with_path(variables['batch_stats'])}
  n_scales = 0
  for path, decayed in jax.tree_util.tree_leaves_with_path(mask):
    module, leaf = jax.tree_util.keystr(path[:-1]), path[-1].key
    is_scale = module in norm_modules and leaf == 'scale'
    n_scales += is_scale
    assert decayed == (not is_scale), (module, leaf)
  assert n_scales == len(norm_modules) > 0


def test_sgd_steps_match_torch():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(1)
  params = _params(rng)
  c = _optim_config(base_lr=0.1, warmup_iters=2, warmup_factor=0.5, lr_steps=(3,),
                    weight_decay=0.05, weight_decay_norm=0.01)
  tx = optim.create_optimizer(c)
  leaves, treedef = jax.tree.flatten(params)
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  tparams = [torch.nn.Parameter(torch.tensor(x, dtype=torch.float32)) for x in leaves]
  groups = [{'params': [p], 'weight_decay': 0.01 if n.endswith("['scale']") else 0.05}
            for p, n in zip(tparams, names)]
  topt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
  sched = torch.optim.lr_scheduler.LambdaLR(topt, lambda t: _warmup_multistep(
      t, 1.0, 2, 0.5, (3,), 0.1))
  state = tx.init(params)
  update = jax.jit(tx.update)
  steps = 5
  for _ in range(steps):
    grads = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
    updates, state = update(grads, state, params)
    params = jax.tree.map(lambda p, u: np.asarray(p + u), params, updates)
    for p, g in zip(tparams, jax.tree.leaves(grads)):
      p.grad = torch.tensor(g)
    topt.step()
    sched.step()
  scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(params))
  # Per step and side: + wd w (2 roundings), the momentum buffer (2), x lr
  # and the parameter update (2), and the lr itself (a few): each step's
  # error is carried into the next, so the bound grows with the steps.
  bound = tolerance.tol(np.float32, 10 * steps, scale, sides=2, worst_case=True)
  for name, got, want in zip(names, jax.tree.leaves(params), tparams):
    tolerance.assert_close(got, want.detach().numpy(), atol=bound,
                           what=f'{name} after {steps} SGD steps vs torch.optim.SGD')
