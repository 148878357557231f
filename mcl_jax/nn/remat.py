"""Backward passes that start only once their cotangent exists (and optional recomputation).

XLA's scheduler may run any part of the backward pass that depends on
forward values alone as early as it likes. The CPU compiler does: it
transposes saved activations for the weight gradients, normalises them
again for BatchNorm's gradient and, under `jax.checkpoint`, recomputes whole
blocks during the forward pass (it removes the optimization barriers that
`jax.checkpoint` relies on before it schedules), and keeps every such
float32 copy alive until the backward pass reads it. That is most of the
compiled memory of the step, and it hides what rematerialisation saves.

`checkpoint(fn, policy)` gives the backward pass of fn a real data
dependency on its cotangent: what the VJP kept is tied to it (x + 0 * ct[0])
before use. With `KEEP` it keeps what autodiff keeps (nothing is computed
twice); with `RECOMPUTE` only the inputs, and the rest is recomputed in the
backward pass (rematerialisation; the tie also stops XLA from merging the
recomputation with the forward computation). Values are unchanged (adding
zero; only a NaN or Inf in the cotangent would spread).

`remat` is the same for Flax modules and module functions, a drop-in for
`nn.remat`.
"""

from typing import Callable

import jax
import jax.numpy as jnp
from flax.core import lift
from flax.linen import transforms as nn_transforms

# Named `jax.checkpoint_policies`: keep what autodiff keeps, or the inputs only.
KEEP = jax.checkpoint_policies.everything_saveable
RECOMPUTE = jax.checkpoint_policies.nothing_saveable


def tie(tree, cotangent):
  """tree's floating leaves + 0 * (first element of every cotangent leaf).

  Anything computed from the result waits for the cotangent.
  """
  firsts = [c.reshape(-1)[0].astype(jnp.float32) for c in jax.tree.leaves(cotangent)
            if c.size and jnp.issubdtype(c.dtype, jnp.inexact)]
  if not firsts:
    return tree
  zero = sum(firsts) * 0.0
  return jax.tree.map(
      lambda x: x + zero.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact) else x, tree)


def checkpoint(fn: Callable, policy=RECOMPUTE) -> Callable:
  """`jax.checkpoint(fn, policy=policy)` whose backward pass waits for the cotangent.

  Args:
    fn: a function of arrays (pytrees); all its floating outputs may receive
      cotangents (e.g. BatchNorm statistics get zero ones).
    policy: a `jax.checkpoint_policies` policy (what may be kept): KEEP,
      RECOMPUTE or another.

  Returns:
    fn with the same values; its VJP keeps what `policy` allows and
    recomputes the rest in the backward pass.
  """
  wrapped = jax.checkpoint(fn, policy=policy, prevent_cse=False)  # the tie prevents CSE

  @jax.custom_vjp
  def f(*args):
    return fn(*args)

  def fwd(*args):
    return jax.vjp(wrapped, *args)

  def bwd(vjp, cotangent):
    return tie(vjp, cotangent)(cotangent)

  f.defvjp(fwd, bwd)
  return f


def _lifted(fn, variables=True, rngs=True, static_argnums=(), policy=RECOMPUTE):
  """Flax core transform: `lift.checkpoint` with `checkpoint`."""
  static = frozenset(static_argnums)

  def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args):
    dynamic = [a for i, a in enumerate(args) if i not in static]

    def pure(variable_groups, *dynamic):
      it = iter(dynamic)
      full = [a if i in static else next(it) for i, a in enumerate(args)]
      scope = scope_fn(variable_groups, rng_groups)
      y = fn(scope, *full)
      return y, repack_fn(scope)
    return checkpoint(pure, policy)(variable_groups, *dynamic)

  return lift.pack(inner, (variables,), (variables,), (rngs,), name='remat')


def remat(target, static_argnums: tuple[int, ...] = (), policy=RECOMPUTE):
  """`checkpoint` for a Module class or a function of a module (argument 0).

  Args:
    target: a Module class (its __call__ is rematerialised) or a function
      `f(module, *args)` whose submodules name `module` as their parent.
    static_argnums: arguments that are Python values (e.g. `train`); as in
      `nn.remat`, the module itself is argument 0.
    policy: a `jax.checkpoint_policies` policy: RECOMPUTE (as `nn.remat`),
      KEEP (no recomputation: only the backward pass's ordering) or another.
  """
  return nn_transforms.lift_transform(
      _lifted, target, static_argnums=tuple(i - 1 for i in static_argnums), policy=policy)
