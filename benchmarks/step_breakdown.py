"""The train step taken apart: each part jitted and timed beside the real step.

Used by `python -m benchmarks.train_step --breakdown`. Every part calls the
library's own functions (`augment.augment_crops`, `objective.view_canvases`,
`model.cut_regions`, `objective.target_bank`, `objective.online_predictions`,
`losses.mcl_loss`, `state.apply_update`), so the parts measure what the step
runs.
"""

import re
import statistics
import time

from benchmarks.compiled_stats import flops


def breakdown(config, mesh, state, crops_u8, labels, step, args) -> dict:
  """Each part of the step jitted on its own, timed in rounds with the real step.

  Every round runs the full step once and then each part once, so each
  part's % of the step compares times taken under the same machine load
  (medians over --breakdown-reps rounds, after one warm-up round).
  """
  import jax
  import jax.numpy as jnp
  from mcl_jax.data import augment
  from mcl_jax.pretext import losses, montage, objective
  from mcl_jax.nn import model as model_lib
  from mcl_jax.training import state as state_lib
  from mcl_jax.training import optim
  net = model_lib.create_model(config)
  layout = montage.layout_for(config)
  num_steps = config.optim.num_steps
  tx = optim.create_optimizer(config, num_steps)
  levels = tuple(range(layout.num_levels))
  k = config.model.region_size or layout.image_size // 32
  key = jax.random.key(7)
  # The parts read a copy: `state` itself keeps being donated to the step.
  st = jax.tree.map(jnp.copy, state)
  parts = {}  # name -> (compiled, args)
  info = {}

  def add(name, fn, *a):
    t = time.perf_counter()
    c = jax.jit(fn).lower(*a).compile()
    info[name] = {'compile_s': time.perf_counter() - t, 'flops': flops(c)}
    print(f'  compiled part {name} in {info[name]["compile_s"]:.1f} s', flush=True)
    parts[name] = (c, a)
    return c(*a)

  # 1. Augmentation (uint8 crops -> normalised float crops).
  crops = add('augmentation',
              lambda c, k: augment.augment_crops(c, k, config.augment, config.data.num_crops),
              crops_u8, key)

  # 2. Montage assembly of both views + region extraction: the online cut
  # (all levels) with its backward (the regions' cotangent scattered back onto
  # the FPN maps) and the target's level-0 cut, on FPN-shaped maps.
  fshape = jax.eval_shape(
      lambda c: net.apply({'params': st.params, 'batch_stats': st.batch_stats}, c,
                          train=True, method=model_lib.MCLNet.features, mutable=['batch_stats']),
      jax.ShapeDtypeStruct((crops.shape[0] // layout.group_size * layout.num_canvases,
                            layout.image_size, layout.image_size, 3), jnp.float32))[0]
  pshape = {n: v for n, v in fshape.items() if n.startswith('P')}
  feats = [{n: jax.random.normal(jax.random.fold_in(key, 10 * v + i), s.shape, s.dtype)
            for i, (n, s) in enumerate(sorted(pshape.items()))} for v in (0, 1)]
  mode, path = config.model.neck_regions, config.model.region_path

  def montage_regions(crops, key, feats):
    res = []
    for view in (0, 1):
      canv, lab = objective.view_canvases(crops, view, layout, key, mesh,
                                          config.montage.downsample)
      cut = lambda f: model_lib.cut_regions(f, layout, levels, mode, path, k)[0]
      regions, vjp = jax.vjp(cut, feats[view])
      (dfeats,) = vjp(regions)
      target_regions = model_lib.cut_regions(feats[view], layout, (0,), mode, path, k)[0]
      res.append((canv, lab, regions.sum(), target_regions.sum(),
                  sum(x.sum() for x in dfeats.values())))
    return res
  views = add('montage_and_regions', montage_regions, crops, key, feats)
  canvases = [v[0] for v in views]
  labels_ = [v[1] for v in views]

  # 3. Target forward (both views).
  tvars = {'params': st.target_params, 'batch_stats': st.target_batch_stats}

  def target_fwd(tvars, canvases):
    return objective.target_bank(net, tvars, canvases, layout,
                                 config.model.target_whole_crops_only)
  targets, _ = add('target_forward', target_fwd, tvars, canvases)

  # 4. Online forward + backward, with the loss (targets given).
  def online(params, batch_stats, canvases, labels, targets):
    def lf(p):
      preds, bs = objective.online_predictions(net, p, batch_stats, canvases, layout)
      loss, _ = losses.mcl_loss(preds[0], preds[1], labels[0], labels[1], targets[0],
                                targets[1], config.loss.tau, config.loss.level_weights)
      return loss, bs
    return jax.value_and_grad(lf, has_aux=True)(params)
  (_, _), grads = add('online_forward_backward', online, st.params, st.batch_stats,
                      canvases, labels_, targets)

  # 5. Optimizer (clip + LARS) + EMA of the target: the step's own update.
  def opt_ema(st, grads):
    return state_lib.apply_update(st, grads, st.batch_stats, st.target_batch_stats, tx,
                                  num_steps, config.optim.ema_base_momentum)
  add('optimizer_ema', opt_ema, st, grads)

  # Rounds: the real step, then every part.
  step_times, times = [], {n: [] for n in parts}
  for r in range(args.breakdown_reps + 1):
    t = time.perf_counter()
    state, metrics = step(state, crops_u8, labels)
    jax.block_until_ready((state, metrics))
    if r:
      step_times.append(time.perf_counter() - t)
    for n, (c, a) in parts.items():
      t = time.perf_counter()
      jax.block_until_ready(c(*a))
      if r:
        times[n].append(time.perf_counter() - t)
    if r:
      print(f'  round {r}: step {step_times[-1]:.3f} s, '
            + ', '.join(f'{n} {v[-1]:.3f} s' for n, v in times.items()), flush=True)
  step_s = statistics.median(step_times)
  out = {}
  for n in parts:
    med = statistics.median(times[n])
    out[n] = {'s': med, 'times_s': times[n], **info[n], 'pct_of_step': 100 * med / step_s}
  total_parts = sum(v['s'] for v in out.values())
  for v in out.values():
    v['pct_of_parts'] = 100 * v['s'] / total_parts

  # The neck runs once per view over all levels' regions: its 4 convs and 2
  # Dense layers are the only convolution / dot ops over R rows (R = every
  # level's regions) in the online forward; a per-level neck would have none.
  r_total = jax.eval_shape(
      lambda f: model_lib.cut_regions(f, layout, levels, mode, path, k)[0], pshape).shape[0]
  hlo = jax.jit(lambda p, bs, c: net.apply({'params': p, 'batch_stats': bs}, c, layout,
                                           train=True, mutable=['batch_stats'])).lower(
      st.params, st.batch_stats, canvases[0]).as_text()
  ops = [l for l in hlo.splitlines()
         if re.search(r'stablehlo\.(convolution|dot_general)', l)]
  neck_ops = [l for l in ops if re.search(rf': \(tensor<{r_total}x', l)]
  expected = config.model.neck_convs + 2
  return {
      'parts': out, 'sum_of_parts_s': total_parts, 'step_s': step_s,
      'step_times_s': step_times, 'rounds': args.breakdown_reps,
      'neck_regions_per_view': r_total,
      'neck_matmul_ops_over_all_regions': len(neck_ops),
      'neck_matmul_ops_expected': expected,
      'neck_runs_once_over_all_levels': len(neck_ops) == expected,
  }
