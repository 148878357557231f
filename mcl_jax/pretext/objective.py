"""The batch losses: montages of a batch of crops through the networks to a loss.

Owns what runs between the augmented crops and the loss value: assembling each
view's canvases (`view_canvases`), the target bank (`target_bank`,
`target_embeddings`), the online predictions (`online_predictions`), the
self-supervised and the supervised batch losses, and `batch_loss_fn`, which
picks one from the config for the train step. The maths of the losses
themselves is losses.py's; the network is nn/model.py's.
"""

import dataclasses
from typing import Callable, Sequence

import jax

from mcl_jax.pretext import losses, montage
from mcl_jax.nn import remat as remat_lib
from mcl_jax.nn.model import MCLNet
from mcl_jax.nn.montage_layout import Layout


def view_canvases(crops, view: int, layout: Layout, key, mesh, method: str):
  """Assembles one view's canvases: level i uses crop i (q) or 4 + i (k)."""
  half = crops.shape[1] // 2
  per_level = [crops[:, view * half + i] for i in range(layout.num_levels)]
  return montage.sharded_assemble(per_level, jax.random.fold_in(key, view), layout,
                                  mesh, method)


def target_embeddings(model: MCLNet, target_vars, canvases, layout: Layout,
                      whole_crops_only: bool = False):
  """Target level-0 embeddings [G * B, D] and the target's updated batch_stats.

  With `whole_crops_only` (beyond the reference) the target encodes only the
  level-0 canvases, which is all the loss reads; its BatchNorm batch
  statistics then span fewer images than in the reference.
  """
  if whole_crops_only:
    nc, b = layout.num_canvases, layout.group_size
    g = canvases.shape[0] // nc
    canvases = canvases.reshape(g, nc, *canvases.shape[1:])[:, :b]
    canvases = canvases.reshape(g * b, *canvases.shape[2:])
    layout = dataclasses.replace(layout, blocks=layout.blocks[:1])
  (emb,), state = model.apply(target_vars, canvases, layout, train=True, levels=(0,),
                              method=MCLNet.embed, mutable=['batch_stats'])
  return jax.lax.stop_gradient(emb), state['batch_stats']


def target_bank(model: MCLNet, target_vars, canvases: Sequence, layout: Layout,
                whole_crops_only: bool = False):
  """Per view, the target's level-0 embeddings; its BN statistics threaded through the views.

  Returns:
    ([targets of each view], the target's updated batch_stats).
  """
  targets, batch_stats = [], target_vars['batch_stats']
  for c in canvases:
    t, batch_stats = target_embeddings(
        model, {'params': target_vars['params'], 'batch_stats': batch_stats}, c, layout,
        whole_crops_only)
    targets.append(t)
  return targets, batch_stats


def online_predictions(model: MCLNet, params, batch_stats, canvases: Sequence,
                       layout: Layout):
  """Per view, the online network's per-level predictions; BN statistics threaded in order.

  Returns:
    ([per-level predictions of each view], the online updated batch_stats).
  """
  preds = []
  for c in canvases:
    p, state = model.apply({'params': params, 'batch_stats': batch_stats}, c, layout,
                           train=True, mutable=['batch_stats'])
    batch_stats = state['batch_stats']
    preds.append(p)
  return preds, batch_stats


def view_by_view(view_loss: Callable, params, batch_stats, inputs: Sequence):
  """sum_v view_loss(params, batch_stats_v, inputs[v]), differentiated one view at a time.

  The loss of a batch is a sum of per-view terms (each view's predictions
  meet the other view's stop-gradient targets), so its gradient is the sum
  of the per-view gradients. Computing each view's forward and backward
  pass before the next view's forward pass (its inputs are tied to the
  previous gradient, see remat.tie) keeps one view's activations instead of
  two. Loss, gradient and BatchNorm statistics are those of the one-pass
  computation (summation order aside).

  Args:
    view_loss: (params, batch_stats, inputs_v) -> (loss_v, (aux_v, new batch_stats)).
    params: differentiated.
    batch_stats: the online BN statistics, threaded through the views in order.
    inputs: per view, what its forward pass reads besides params (not
      differentiated): it is tied to the previous views' gradient.

  Returns:
    (loss, (per-view aux, final batch_stats)), differentiable in params.
  """

  def run(params, with_grads: bool):
    bs, total, auxs, grads = batch_stats, 0.0, [], None
    for x in inputs:
      if grads is not None:
        x = remat_lib.tie(x, grads)  # this view waits for the previous one's backward
      if with_grads:
        (loss, (aux, bs)), g = jax.value_and_grad(view_loss, has_aux=True)(params, bs, x)
        grads = g if grads is None else jax.tree.map(lambda a, b: a + b, grads, g)
      else:
        loss, (aux, bs) = view_loss(params, bs, x)
      total = total + loss
      auxs.append(aux)
    return (total, (auxs, bs)), grads

  @jax.custom_vjp
  def f(params):
    return run(params, False)[0]

  def fwd(params):
    return run(params, True)

  def bwd(grads, cotangent):
    ct_loss = cotangent[0]
    return (jax.tree.map(lambda g: (g * ct_loss).astype(g.dtype), grads),)

  f.defvjp(fwd, bwd)
  return f(params)


def self_supervised_batch_loss(model: MCLNet, params, batch_stats, target_vars, crops, key,
                layout: Layout, *, tau: float, level_weights: Sequence[float],
                mesh=None, downsample: str = 'nearest',
                target_whole_crops_only: bool = False, accumulate: str = 'none'):
  """The MCL loss of one batch (two views, all levels, the global target bank).

  Args:
    model: the MCLNet.
    params, batch_stats: online variables (gradients flow to `params` only).
    target_vars: {'params', 'batch_stats'} of the target (no predictors).
    crops: [B_global, 8, S, S, 3] augmented, normalised crops; crops 0-3 are
      view q, 4-7 view k; montage level i uses crop i and crop 4 + i.
    key: PRNG key of this step (montage permutations).
    layout: the montage Layout of one group.
    tau, level_weights: loss settings.
    mesh: a mesh with a 'data' axis to assemble montages per device, or None.
    downsample: montage downsampling ('nearest' or 'antialias').
    target_whole_crops_only: see `target_embeddings`.
    accumulate: 'none', or 'views': the target bank of both views first, then
      each view's online forward and backward pass in turn (`view_by_view`;
      the same loss and gradient with one view's activations in memory).

  Returns:
    (loss, (metrics, new online batch_stats, new target batch_stats)).
  """
  if accumulate == 'views':
    return _self_supervised_view_by_view(
        model, params, batch_stats, target_vars, crops, key, layout, tau=tau,
        level_weights=level_weights, mesh=mesh, downsample=downsample,
        target_whole_crops_only=target_whole_crops_only)
  if accumulate != 'none':
    raise ValueError(f"optim.accumulate={accumulate!r}: must be 'none' or 'views'")
  canvases, labels = zip(*(view_canvases(crops, view, layout, key, mesh, downsample)
                            for view in (0, 1)))
  targets, target_bs = target_bank(model, target_vars, canvases, layout,
                                   target_whole_crops_only)
  preds, batch_stats = online_predictions(model, params, batch_stats, canvases, layout)
  loss, metrics = losses.mcl_loss(preds[0], preds[1], labels[0], labels[1],
                                  targets[0], targets[1], tau, level_weights)
  return loss, (metrics, batch_stats, target_bs)


def _self_supervised_view_by_view(model: MCLNet, params, batch_stats, target_vars, crops, key,
                                  layout: Layout, *, tau, level_weights, mesh, downsample,
                                  target_whole_crops_only):
  """`self_supervised_batch_loss` with accumulate='views'."""
  canvases, labels = zip(*(view_canvases(crops, view, layout, key, mesh, downsample)
                            for view in (0, 1)))
  targets, target_bs = target_bank(model, target_vars, canvases, layout,
                                   target_whole_crops_only)
  targets = [losses.l2_normalize(t) for t in targets]

  def view_loss(params, batch_stats, inputs):
    canvases_v, labels_v, targets_other = inputs
    preds, state = model.apply({'params': params, 'batch_stats': batch_stats},
                               canvases_v, layout, train=True, mutable=['batch_stats'])
    terms = [losses.infonce(preds[i], targets_other, labels_v[i], tau, w)
             for i, w in enumerate(level_weights)]
    return sum(t[0] for t in terms), (terms, state['batch_stats'])

  inputs = [(canvases[v], labels[v], targets[1 - v]) for v in (0, 1)]
  loss, ((terms_q, terms_k), batch_stats) = view_by_view(view_loss, params, batch_stats,
                                                         inputs)
  metrics = {}
  for i, ((lq, pq, nq), (lk, pk, nk)) in enumerate(zip(terms_q, terms_k)):
    metrics[f'loss_level{i}'] = lq + lk
    metrics[f'pos_cos_level{i}'] = (pq + pk) / 2
    metrics[f'neg_cos_level{i}'] = (nq + nk) / 2
  metrics['loss'] = loss
  return loss, (metrics, batch_stats, target_bs)


def supervised_batch_loss(model: MCLNet, params, batch_stats, crops, classes, key,
                       layout: Layout, *, level_weights: Sequence[float],
                       label_smoothing: float = 0.0, mesh=None,
                       downsample: str = 'nearest'):
  """Supervised MCL (docs/METHOD.md section 7): tiles classified into their source's class.

  Same montages, backbone, FPN and neck as `self_supervised_batch_loss`; a classifier per
  level (or one shared) replaces predictors and target network. Summed over
  levels and both views.

  Args:
    classes: [B_global] int class of each image (>= 0).
    Others as in `self_supervised_batch_loss`.

  Returns:
    (loss, (metrics, new online batch_stats, {})).
  """
  total, metrics = 0.0, {}
  for view in (0, 1):
    canvases, tiles = view_canvases(crops, view, layout, key, mesh, downsample)
    logits, state = model.apply({'params': params, 'batch_stats': batch_stats}, canvases,
                                layout, train=True, method=MCLNet.classify,
                                mutable=['batch_stats'])
    batch_stats = state['batch_stats']
    loss, m = losses.supervised_loss(logits, [classes[t] for t in tiles], level_weights,
                                     label_smoothing)
    total = total + loss
    for k, v in m.items():
      metrics[k] = metrics.get(k, 0.0) + (v if k.startswith('loss') else v / 2)
  metrics['loss'] = total
  return total, (metrics, batch_stats, {})


def batch_loss_fn(config, model: MCLNet, layout: Layout, mesh=None):
  """The config's batch loss as loss_fn(params, state, crops, labels, key).

  `state` supplies the online batch_stats and the target (a TrainState, or
  anything with those fields); `labels` are read by the supervised objective
  only. Returns (loss, (metrics, new online batch_stats, new target
  batch_stats)); differentiate it with respect to `params`.
  """
  l, downsample = config.loss, config.montage.downsample

  if config.objective == 'supervised':
    def loss_fn(params, state, crops, labels, key):
      return supervised_batch_loss(
          model, params, state.batch_stats, crops, labels, key, layout,
          level_weights=l.level_weights, label_smoothing=l.label_smoothing, mesh=mesh,
          downsample=downsample)
  else:
    def loss_fn(params, state, crops, labels, key):
      del labels  # self-supervised
      return self_supervised_batch_loss(
          model, params, state.batch_stats,
          {'params': state.target_params, 'batch_stats': state.target_batch_stats},
          crops, key, layout, tau=l.tau, level_weights=l.level_weights, mesh=mesh,
          downsample=downsample,
          target_whole_crops_only=config.model.target_whole_crops_only,
          accumulate=config.optim.accumulate)
  return loss_fn
