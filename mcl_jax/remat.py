"""Rematerialisation whose recomputation waits for the backward pass.

`jax.checkpoint` keeps only a function's inputs and recomputes the rest in
the backward pass. It orders the recomputation after the output cotangent
with an optimization barrier, but XLA's CPU compiler removes optimization
barriers before it schedules, and its scheduler then hoists many
recomputations into the forward pass, where their outputs stay alive until
the backward pass reads them: the compiled memory barely drops.
`recompute_after_cotangent` adds a real data dependency instead: in the
backward pass the saved inputs are tied to the cotangent (x + 0 * ct[0]), so
no recomputation can start before its cotangent exists, and XLA cannot
merge the recomputation with the forward computation either. Values are
unchanged (adding zero; only a NaN or Inf in the cotangent would spread).

`remat` is the same for Flax modules and module functions, a drop-in for
`nn.remat`.
"""

from typing import Callable

import jax
import jax.numpy as jnp
from flax.core import lift
from flax.linen import transforms as nn_transforms

# The policy of every rematerialised part of the network: keep its inputs only.
POLICY = jax.checkpoint_policies.nothing_saveable


def _tie(tree, cotangent):
  """tree's floating leaves + 0 * (first element of every cotangent leaf)."""
  firsts = [c.reshape(-1)[0].astype(jnp.float32) for c in jax.tree.leaves(cotangent)
            if c.size and jnp.issubdtype(c.dtype, jnp.inexact)]
  if not firsts:
    return tree
  zero = sum(firsts) * 0.0
  return jax.tree.map(
      lambda x: x + zero.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact) else x, tree)


def recompute_after_cotangent(fn: Callable, policy=POLICY) -> Callable:
  """`jax.checkpoint(fn, policy=policy)` that recomputes only once the cotangent exists.

  Args:
    fn: a function of arrays (pytrees); all its floating outputs may receive
      cotangents (e.g. BatchNorm statistics get zero ones).
    policy: a `jax.checkpoint_policies` policy (what may be kept).

  Returns:
    fn with the same values; its VJP keeps what `policy` allows (its inputs
    for the default) and recomputes the rest in the backward pass.
  """
  remat = jax.checkpoint(fn, policy=policy, prevent_cse=False)  # the tie prevents CSE

  @jax.custom_vjp
  def f(*args):
    return fn(*args)

  def fwd(*args):
    return jax.vjp(remat, *args)

  def bwd(vjp, cotangent):
    return _tie(vjp, cotangent)(cotangent)

  f.defvjp(fwd, bwd)
  return f


def _lifted(fn, variables=True, rngs=True, static_argnums=(), policy=POLICY):
  """Flax core transform: `lift.checkpoint` with `recompute_after_cotangent`."""
  static = frozenset(static_argnums)

  def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args):
    dynamic = [a for i, a in enumerate(args) if i not in static]

    def pure(variable_groups, *dynamic):
      it = iter(dynamic)
      full = [a if i in static else next(it) for i, a in enumerate(args)]
      scope = scope_fn(variable_groups, rng_groups)
      y = fn(scope, *full)
      return y, repack_fn(scope)
    return recompute_after_cotangent(pure, policy)(variable_groups, *dynamic)

  return lift.pack(inner, (variables,), (variables,), (rngs,), name='remat')


def remat(target, static_argnums: tuple[int, ...] = (), policy=POLICY):
  """`nn.remat` for a Module class or a function of a module (argument 0).

  Args:
    target: a Module class (its __call__ is rematerialised) or a function
      `f(module, *args)` whose submodules name `module` as their parent.
    static_argnums: arguments that are Python values (e.g. `train`); as in
      `nn.remat`, the module itself is argument 0.
    policy: a `jax.checkpoint_policies` policy.
  """
  return nn_transforms.lift_transform(
      _lifted, target, static_argnums=tuple(i - 1 for i in static_argnums), policy=policy)
