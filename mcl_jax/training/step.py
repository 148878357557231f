"""The sharded train step: crops -> augmentation -> batch loss -> update.

One `jax.jit` over a mesh with a 'data' axis: the batch is sharded, the state
replicated and donated. BatchNorm over the global jitted batch is already
synchronised across devices (SyncBN), and the loss's targets span the global
batch; only montage assembly runs per device (`jax.shard_map`). The state and
its update are state.py's, the batch loss `mcl_jax.pretext.objective`'s.
"""

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mcl_jax.data import augment, device_crops
from mcl_jax.nn import model as model_lib
from mcl_jax.pretext import montage, objective
from mcl_jax.training import optim
from mcl_jax.training import state as state_lib


def make_train_step(config, mesh, tx: optax.GradientTransformation, num_steps: int):
  """The jitted train step: (state, images, labels) -> (state, metrics).

  images: `device_crops.step_images(batch, config.data.crop_on)`, sharded
  over 'data': with crop_on='host' the uint8 crops [global_batch, num_crops,
  S, S, 3]; with 'device' the dict of padded buffers, valid sizes and crop
  windows, cut into those crops first thing in the step.
  labels: [global_batch] int (read by the supervised objective only).
  Per-step randomness (augmentation, montage) is fold_in(seed key, step), so
  a resumed run draws exactly what an uninterrupted one would.
  """
  loss_fn = objective.batch_loss_fn(config, model_lib.create_model(config),
                                    montage.layout_for(config), mesh)
  schedule = optim.lr_schedule(config, num_steps)
  base_key = jax.random.key(config.seed)

  def step_fn(state: state_lib.TrainState, images, labels):
    key = jax.random.fold_in(base_key, state.step)
    aug_key, montage_key = jax.random.split(key)
    crops_u8 = device_crops.crops_of(images, config.data)
    crops = augment.augment_crops(crops_u8, aug_key, config.augment, config.data.num_crops)
    (_, (metrics, batch_stats, target_bs)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params, state, crops, labels, montage_key)
    new_state, update_metrics = state_lib.apply_update(
        state, grads, batch_stats, target_bs, tx, num_steps, config.optim.ema_base_momentum)
    return new_state, dict(metrics, lr=schedule(state.step), **update_metrics)

  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P('data'))
  return jax.jit(step_fn, in_shardings=(replicated, sharded, sharded),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))
