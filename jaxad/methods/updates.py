"""The one "loss -> gradients -> optimizer -> parameters" of jaxad, and
the helpers a method's `init_state` and step functions share.

A method calls these from its own step functions; the shared code never
does (it sees only `jaxad.methods.api`).
"""

from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx

from jaxad.methods.api import Array, TrainState


def init_net(module: nnx.Module, tx: optax.GradientTransformation | None):
  """(params, batch_stats, opt_state or None) of a freshly built module."""
  params = nnx.state(module, nnx.Param).to_pure_dict()
  stats = nnx.state(module, nnx.BatchStat).to_pure_dict()
  return params, stats, (tx.init(params) if tx is not None else None)


def step_keys(seed: int, salt: int) -> dict[str, Array]:
  """{"data_key", "noise_key"}: a phase's data-order and noise keys,
  fold_in(fold_in(key(seed), salt), 0 | 1); fold them with the step."""
  root = jax.random.fold_in(jax.random.key(seed), salt)
  return {
    "data_key": jax.random.fold_in(root, 0),
    "noise_key": jax.random.fold_in(root, 1),
  }


def minimize_step(
  loss_fn: Callable[[Any], tuple[Array, Any]],
  params,
  opt_state,
  tx: optax.GradientTransformation,
):
  """One optimizer step on `loss_fn(params) -> (scalar loss, aux)`.

  The one "loss -> gradients -> optimizer -> parameters" in jaxad; use
  `update_net`/`update` for a network whose forward is one module call.

  Returns:
    (params, opt_state, loss, aux, global gradient norm).
  """
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return params, opt_state, loss, aux, optax.global_norm(grads)


def update_net(
  graphdef,
  tx: optax.GradientTransformation,
  params,
  batch_stats,
  opt_state,
  loss_fn: Callable[[nnx.Module], tuple[Array, Any]],
):
  """loss -> gradients -> optimizer -> parameters (+ BatchNorm statistics).

  The one place a method's network is updated. `loss_fn(module)` receives
  the network merged with `params` and `batch_stats` (call it with
  train=True) and returns (scalar loss, aux); the statistics the forward
  pass updated become the new `batch_stats`.

  Returns:
    (params, batch_stats, opt_state, loss, aux, global gradient norm).
  """

  def wrapped(params):
    module = nnx.merge(graphdef, params, batch_stats)
    loss, aux = loss_fn(module)
    return loss, (aux, nnx.state(module, nnx.BatchStat).to_pure_dict())

  params, opt_state, loss, (aux, stats), gnorm = minimize_step(
    wrapped, params, opt_state, tx
  )
  return params, stats, opt_state, loss, aux, gnorm


def update(
  state: TrainState,
  name: str,
  tx: optax.GradientTransformation,
  loss_fn: Callable[[nnx.Module], tuple[Array, Any]],
):
  """`update_net` on network `name` of `state`.

  Returns:
    (state with the network updated, loss, aux, global gradient norm).
  """
  params, stats, opt, loss, aux, gnorm = update_net(
    state.graphdefs[name],
    tx,
    state.params[name],
    state.batch_stats[name],
    state.opt_state[name],
    loss_fn,
  )
  state = state.replace(
    params={**state.params, name: params},
    batch_stats={**state.batch_stats, name: stats},
    opt_state={**state.opt_state, name: opt},
  )
  return state, loss, aux, gnorm
