"""COCO evaluation during and after fine-tuning: predict, gather, score once, report.

Every process predicts its own shard of the validation split
(`inputs.eval_batches`) on its local devices: `predict` is jitted over a mesh
of this process's devices (one compile per canvas shape), its outputs come
to the host and become COCO result entries in original image coordinates
(`coco_eval.detections_to_coco`). With several processes each one writes its
entries to WORKDIR/eval/step_<N>.<process>.json and process 0, after a
barrier, reads them all; pycocotools then scores them once on process 0,
which prints the table and writes WORKDIR/coco_eval.json.
"""

import json
import logging as std_logging

from absl import logging
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mcl_jax import paths

SCORES_FILE = 'coco_eval.json'


class _LogFileOnly(std_logging.Filter):
  """Marks INFO records as library output: the log file keeps them, the console leaves them out."""

  def filter(self, record):
    if record.levelno < std_logging.WARNING:
      record.library = True  # read by mcl_jax.cli's console filter
    return True


# COCOeval's own printout (about 30 lines per evaluation, logged by
# coco_eval.evaluate) belongs in train.log; the console shows the table.
std_logging.getLogger('mcl_jax.detection.coco_eval').addFilter(_LogFileOnly())


def local_mesh() -> jax.sharding.Mesh:
  """A 'data' mesh over this process's devices (evaluation needs no other process)."""
  devices = jax.local_devices()
  return jax.make_mesh((len(devices),), ('data',), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def local_variables(state, mesh: jax.sharding.Mesh) -> dict:
  """The state's (replicated) variables, replicated over `mesh` of local devices."""
  replicated = NamedSharding(mesh, P())
  local = lambda x: jax.device_put(x.addressable_data(0) if isinstance(x, jax.Array) else x,
                                   replicated)
  return jax.tree.map(local, {'params': state.params, 'batch_stats': state.batch_stats})


def make_predict(model, mesh: jax.sharding.Mesh):
  """jit(variables, images, image_hw) -> the model's padded detections, batch sharded."""
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))

  def predict(variables, images, image_hw):
    return model.apply(variables, images, image_hw, method='predict')

  return jax.jit(predict, in_shardings=(replicated, sharded, sharded),
                 out_shardings=sharded)


def predict_split(config, model, variables_or_state, split) -> list:
  """COCO result entries of this process's shard of `split`."""
  from mcl_jax.detection import coco_eval, inputs  # pylint: disable=import-outside-toplevel
  mesh = local_mesh()
  variables = (local_variables(variables_or_state, mesh)
               if hasattr(variables_or_state, 'params') else variables_or_state)
  predict = make_predict(model, mesh)
  per_process = int(config.eval_per_device_batch) * mesh.devices.size
  results = []
  for batch in inputs.eval_batches(split, config, jax.process_index(), jax.process_count(),
                                   per_process):
    out = jax.device_get(predict(variables, batch['images'], batch['image_hw']))
    results += coco_eval.detections_to_coco({k: np.asarray(v) for k, v in out.items()},
                                            batch, split.category_ids)
  return results


def gather(results: list, workdir: str, step: int) -> list | None:
  """Every process's entries on process 0 (None elsewhere), through files in the workdir."""
  if jax.process_count() == 1:
    return results
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  folder = paths.join(workdir, 'eval')
  name = lambda p: paths.join(folder, f'step_{step}.{p}.json')
  paths.makedirs(folder)
  paths.write_atomic(name(jax.process_index()), json.dumps(results))
  multihost_utils.sync_global_devices(f'mcl_jax_detection_eval_{step}')
  if jax.process_index() != 0:
    return None
  out = []
  for p in range(jax.process_count()):
    out += json.loads(paths.read_text(name(p)))
  for p in range(jax.process_count()):
    paths.remove(name(p), missing_ok=True)
  return out


def score(results: list, split) -> dict:
  from mcl_jax.detection import coco_eval  # pylint: disable=import-outside-toplevel
  return coco_eval.evaluate(split.coco, results, area_ranges=split.area_ranges)


def report(config, scores: dict, step: int, name: str | None = None):
  """Logs the COCO table of one model."""
  from mcl_jax.detection import coco_eval  # pylint: disable=import-outside-toplevel
  label = name or f'step {step}'
  logging.info('COCO AP on %s (%s) at step %d:\n%s', config.data.val_split,
               config.data.source, step, coco_eval.format_table({label: scores}))


def save_scores(workdir: str, step: int, split_name: str, scores: dict):
  """WORKDIR/coco_eval.json: the newest scores and every evaluated step's (process 0)."""
  path = paths.join(workdir, SCORES_FILE)
  history = {}
  if paths.exists(path):
    try:
      history = json.loads(paths.read_text(path)).get('history', {})
    except ValueError:
      history = {}
  history[str(step)] = scores
  paths.write_atomic(path, json.dumps({'step': step, 'split': split_name, 'scores': scores,
                                       'history': history}, indent=2, sort_keys=True))


def saved_scores(workdir: str, step: int) -> dict | None:
  """The scores coco_eval.json holds for `step`, or None."""
  path = paths.join(workdir, SCORES_FILE)
  if not paths.exists(path):
    return None
  try:
    return json.loads(paths.read_text(path)).get('history', {}).get(str(step))
  except ValueError:
    return None


def evaluate_and_report(config, model, state, split, workdir: str, step: int) -> dict | None:
  """Predicts on every process, scores on process 0, prints, saves. Returns the scores (process 0)."""
  logging.info('Evaluating on %s (%d images)...', split.split, len(split.image_ids))
  results = gather(predict_split(config, model, state, split), workdir, step)
  if results is None:
    return None
  scores = score(results, split)
  report(config, scores, step)
  save_scores(workdir, step, split.split, scores)
  return scores
