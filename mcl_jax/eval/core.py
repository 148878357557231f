"""What every evaluation of a set of variables shares: frozen features, baseline, table.

Each probe (`probes`: kNN and linear on pooled C5; `dense_probe`: per-pixel
on FPN maps; the detection evaluation) runs the same frame:

* `variable_subset`: the part of {'params', 'batch_stats'} the probe reads
  (the backbone, with the FPN for P maps), with one clear error if absent;
* `forward`: uint8 images normalised with `config.augment.mean/std` on
  device and one network method applied in eval mode, jitted once per
  (model, method, arguments);
* `map_batches`: any per-example function over arrays in fixed-size
  batches, the last one zero-padded, so that one compilation serves them all;
* `random_variables`: a random init of the same model, the untrained
  baseline every table shows beside the trained variables;
* `comparison_table`: that table, random init above the trained row.
"""

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

VARIABLE_COLLECTIONS = ('params', 'batch_stats')
RANDOM_PREFIX = 'random_'


def variable_subset(variables, parts: Sequence[str], error: type[Exception], what: str):
  """{'params': {part: ...}, 'batch_stats': {part: ...}} of `parts`, or `error`.

  Args:
    variables: {'params', 'batch_stats'} of an MCLNet (or its target encoder).
    parts: the top-level subtrees the probe reads, e.g. ('backbone', 'fpn').
    error: the exception class raised when a collection or part is missing.
    what: who needs them, for the message ('evaluation', 'the dense probe').
  """
  try:
    return {c: {p: variables[c][p] for p in parts} for c in VARIABLE_COLLECTIONS}
  except (KeyError, TypeError) as e:
    subtrees = ' and '.join(repr(p) for p in parts)
    raise error(f'{what} needs variables with params/batch_stats of {subtrees} '
                f'subtree{"s" if len(parts) > 1 else ""}; missing {e}') from None


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _forward(model, method: Callable, args: tuple, variables, images, mean, std):
  x = (images.astype(jnp.float32) / 255.0 - mean) / std
  return model.apply(variables, x, *args, method=method)


def forward(model, method: Callable, args: tuple, aug_cfg) -> Callable:
  """fn(variables, uint8 images) -> `method(model, normalised images, *args)`, jitted.

  `method` and `args` are static (one compilation per model, method,
  arguments and batch shape); mean / std are `aug_cfg`'s, in [0, 1] units.
  """
  mean = jnp.asarray(aug_cfg.mean, jnp.float32)
  std = jnp.asarray(aug_cfg.std, jnp.float32)
  return lambda variables, images: _forward(model, method, args, variables, images, mean, std)


def data_sharding(batch_size: int):
  """(batch, replicated) shardings over the local devices, or (None, None).

  None where there is one device or the batch does not split evenly.
  """
  devices = jax.local_devices()
  if len(devices) < 2 or batch_size % len(devices):
    return None, None
  mesh = jax.sharding.Mesh(np.asarray(devices), ('data',))
  P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name
  return (jax.sharding.NamedSharding(mesh, P('data')),
          jax.sharding.NamedSharding(mesh, P()))


def map_batches(fn: Callable, inputs: Sequence[np.ndarray], batch_size: int,
                sharding=None):
  """fn over the first axis of `inputs` in batches of `batch_size`, outputs concatenated.

  The last batch is zero-padded to `batch_size` and its padding cut from
  the outputs, so `fn` sees one shape (a jitted `fn` compiles once). With
  `sharding`, each batch is placed by it first.

  Args:
    fn: fn(*batches) -> an array or a pytree of arrays with the batch first.
    inputs: arrays of the same length N.
    batch_size: clipped to [1, N].
    sharding: optional jax.sharding of each input batch.

  Returns:
    fn's output structure, each leaf NumPy [N, ...].
  """
  n = len(inputs[0])
  batch_size = max(1, min(batch_size, n))
  outs = []
  for start in range(0, n, batch_size):
    chunk = [np.asarray(x[start:start + batch_size]) for x in inputs]
    real = len(chunk[0])
    if real < batch_size:
      chunk = [np.concatenate([c, np.zeros((batch_size - real,) + c.shape[1:], c.dtype)])
               for c in chunk]
    if sharding is not None:
      chunk = [jax.device_put(c, sharding) for c in chunk]
    outs.append(jax.tree.map(lambda y, real=real: np.asarray(y)[:real], fn(*chunk)))
  return jax.tree.map(lambda *ys: np.concatenate(ys), *outs)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _init(model, method: Callable, args: tuple, image_size: int, key):
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return model.init(key, x, *args, method=method)


def random_variables(model, method: Callable, args: tuple = (), image_size: int = 32,
                     seed: int = 0):
  """A random init of the variables `method` reads (the untrained baseline).

  Same initialisers as training, drawn with the 'rbg' PRNG: its initialiser
  compiles several times faster than threefry's on CPU, and the baseline only
  needs to be a random draw, not the run's own starting point.
  """
  return _init(model, method, tuple(args), int(image_size), jax.random.key(seed, impl='rbg'))


def with_random_baseline(result: dict[str, Any], random_result: dict[str, Any]) -> dict:
  """`result` with the random init's scores added as 'random_<name>' (in place)."""
  result.update({f'{RANDOM_PREFIX}{k}': v for k, v in random_result.items()})
  return result


def comparison_table(header: Sequence[str], columns: Sequence[tuple[str, str]],
                     result: dict[str, Any], trained_label: str = 'trained') -> str:
  """The trained-vs-random table: header lines, then a row per model.

  Args:
    header: the lines above the column headings (data, protocol).
    columns: (result key, heading) per score column; a column is as wide as
      its heading, at least 9 characters; scores have 4 decimals.
    result: the scores, with 'random_<key>' ones when a random init was run
      (then its row comes first).
    trained_label: the trained row's name.
  """
  rows = []
  if RANDOM_PREFIX + columns[0][0] in result:
    rows.append(('random init', [result[RANDOM_PREFIX + k] for k, _ in columns]))
  rows.append((trained_label, [result[k] for k, _ in columns]))
  name_width = max(12, *(len(r[0]) for r in rows))
  widths = [max(9, len(h)) for _, h in columns]
  lines = list(header)
  lines.append(f"{'model':<{name_width}}  "
               + '  '.join(f'{h:>{w}}' for (_, h), w in zip(columns, widths)))
  lines += [f'{name:<{name_width}}  ' + '  '.join(f'{v:>{w}.4f}' for v, w in zip(vals, widths))
            for name, vals in rows]
  return '\n'.join(lines)
