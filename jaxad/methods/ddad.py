"""DDAD: dual-distribution discrepancy (Cai et al., MedIA 2023), METHODS.md 1.

Two ensembles of K reconstruction AEs: the NDM trains on known normals, the
UDM on known normals + the unlabeled pool. Every member of both is trained in
one jitted program: parameters carry a leading member axis, each member has
its own init and its own data order, and the training set sits on the device
where each member samples its batch (no host input per step).

Because the UDM set is larger, the UDM needs more steps for the same number of
epochs: the run has two phases, "ensembles" (both modules) and then
"udm_tail" (the UDM alone, for the steps the NDM does not need).
"""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from flax import nnx

from jaxad import loop, sharding
from jaxad.data import oneclass, resident
from jaxad.methods import ddad_refine
from jaxad.models import autoencoder, layers

Array = jax.Array
MODULES = ("ndm", "udm")


@flax.struct.dataclass
class TrainState:
  """Both ensembles. Every leaf of params/batch_stats/opt_state is [K, ...]."""

  step: Array
  params: dict[str, Any]  # {"ndm": tree, "udm": tree}
  batch_stats: dict[str, Any]
  opt_state: dict[str, Any]
  graphdef: Any = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  # The ASR-Net (params/batch_stats/opt_state["asr"], no member axis) when
  # config.refine.enabled, else None.
  refine_graphdef: Any = flax.struct.field(pytree_node=False, default=None)
  refine_tx: Any = flax.struct.field(pytree_node=False, default=None)


# --------------------------------------------------------------------- losses


def reconstruction_loss(
  out: Array,
  x: Array,
  attention: Array | None,
  *,
  backbone: str,
  entropy_weight: float,
) -> Array:
  """Training loss of one member, METHODS.md 1.5.

  Args:
    out: [B, H, W, C_out] network output (AE-U: mean, log-variance).
    x: [B, H, W, 1] input.
    attention: [B, slots] memory weights (MemAE) or None.
    backbone: "ae" | "aeu" | "memae".
    entropy_weight: MemAE's entropy weight (0.0002 in the paper).

  Returns:
    Scalar loss.
  """
  if backbone == "aeu":
    mean, logvar = out[..., :1], out[..., 1:]
    return jnp.mean(jnp.exp(-logvar) * jnp.square(mean - x)) + jnp.mean(logvar)
  loss = jnp.mean(jnp.square(out - x))
  if backbone == "memae":
    entropy = -jnp.sum(attention * jnp.log(attention + 1e-12), axis=-1)  # (B,)
    loss = loss + entropy_weight * jnp.mean(entropy)
  return loss


def discrepancy_maps(
  ndm_out: Array,
  udm_out: Array,
  x: Array,
  *,
  backbone: str,
) -> dict[str, Array]:
  """Unrefined anomaly maps, METHODS.md 1.7 (higher = more anomalous).

  Args:
    ndm_out: [K, B, H, W, C_out] NDM outputs (eval-mode BN).
    udm_out: [K, B, H, W, C_out] UDM outputs.
    x: [B, H, W, 1] inputs.
    backbone: for "aeu", maps are normalised by the NDM's mean variance.

  Returns:
    {"rec", "intra", "inter"}: [B, H, W] each.
  """
  ndm_mean = ndm_out[..., 0]  # (K, B, H, W)
  mu_b = jnp.mean(ndm_mean, axis=0)
  mu_a = jnp.mean(udm_out[..., 0], axis=0)
  if backbone == "aeu":
    var_bar = jnp.mean(jnp.exp(ndm_out[..., 1]), axis=0)  # NDM only (1.12.4)
  else:
    var_bar = jnp.ones_like(mu_b)
  # Unbiased variance over members (denominator K-1), as the original code.
  var_k = jnp.var(ndm_mean, axis=0, ddof=1)
  return {
    "rec": jnp.square(x[..., 0] - mu_b) / var_bar,
    "intra": jnp.sqrt(var_k / var_bar),
    "inter": jnp.abs(mu_a - mu_b) / jnp.sqrt(var_bar),
  }


# ---------------------------------------------------------------------- setup


def build_model(config: mlc.ConfigDict, rngs: nnx.Rngs):
  m = config.model
  return autoencoder.AutoEncoder(
    backbone=m.backbone,
    image_size=config.data.image_size,
    latent_size=m.latent_size,
    width=m.width,
    memory_slots=m.memory_slots,
    upsample=m.upsample,
    dtype=layers.compute_dtype(m.compute_dtype),
    rngs=rngs,
  )


def member_strategy(config: mlc.ConfigDict) -> str:
  """'unroll' on XLA CPU (vmap's grouped convs are ~15x slower there), else
  'vmap'; PERFORMANCE.md."""
  strategy = config.train.member_strategy
  if strategy == "auto":
    return "unroll" if jax.default_backend() == "cpu" else "vmap"
  if strategy not in ("unroll", "vmap"):
    raise ValueError(
      "config.train.member_strategy must be auto, unroll or "
      f"vmap, got {strategy!r}"
    )
  return strategy


def init_state(
  config: mlc.ConfigDict,
  mesh: jax.sharding.Mesh,
) -> TrainState:
  """K members per module, each with its own init key; replicated."""
  graphdef = nnx.graphdef(
    nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
  )
  o = config.optim
  tx = optax.adam(o.lr, b1=o.b1, b2=o.b2)

  def init_member(key):
    model = build_model(config, nnx.Rngs(key))
    return (
      nnx.state(model, nnx.Param).to_pure_dict(),
      nnx.state(model, nnx.BatchStat).to_pure_dict(),
    )

  def init_module(keys):
    params, stats = jax.vmap(init_member)(keys)
    return params, stats, jax.vmap(tx.init)(params)

  init = jax.jit(init_module, out_shardings=sharding.replicated(mesh))
  root = jax.random.key(config.seed)
  params, stats, opt = {}, {}, {}
  for i, module in enumerate(MODULES):
    keys = jax.random.split(
      jax.random.fold_in(root, i), config.model.num_members
    )
    params[module], stats[module], opt[module] = init(keys)
  refine_graphdef = refine_tx = None
  if config.refine.enabled:
    refine_graphdef, refine_tx = ddad_refine.build(config)
    params["asr"], stats["asr"], opt["asr"] = jax.jit(
      functools.partial(ddad_refine.init, config, tx=refine_tx),
      out_shardings=sharding.replicated(mesh),
    )(jax.random.fold_in(root, len(MODULES)))
  step = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))
  return TrainState(
    step=step,
    params=params,
    batch_stats=stats,
    opt_state=opt,
    graphdef=graphdef,
    tx=tx,
    refine_graphdef=refine_graphdef,
    refine_tx=refine_tx,
  )


# ----------------------------------------------------------------- train step


def _member_update(
  params, stats, opt_state, x, *, graphdef, tx, backbone, entropy_weight
):
  def loss_fn(params):
    model = nnx.merge(graphdef, params, stats)
    out, attention = model(x, train=True)
    loss = reconstruction_loss(
      out, x, attention, backbone=backbone, entropy_weight=entropy_weight
    )
    return loss, nnx.state(model, nnx.BatchStat).to_pure_dict()

  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return params, stats, opt_state, loss, optax.global_norm(grads)


def _over_members(fn, strategy, *trees):
  """Applies fn to each member (leading axis) and stacks the results."""
  if strategy == "vmap":
    return jax.vmap(fn)(*trees)
  k = jax.tree.leaves(trees[0])[0].shape[0]
  outs = [fn(*jax.tree.map(lambda a, i=i: a[i], trees)) for i in range(k)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def train_step(
  state: TrainState,
  images: Array,
  *,
  modules: tuple[str, ...],
  num_images: dict[str, int],
  data_keys: dict[str, Array],
  batch_size: int,
  backbone: str,
  entropy_weight: float,
  strategy: str,
  batch_sharding,
) -> tuple[TrainState, dict[str, Array]]:
  """One optimizer step of every member of `modules`.

  Args:
    state: both ensembles.
    images: [N0 + NU, S, S, 1] uint8 resident training set; the NDM samples
      from the first N0 (known normals), the UDM from all.
    modules: the modules to update (static).
    num_images: images each module samples from (static).
    data_keys: {module: [K] PRNG keys}: per-member data order.

  Returns:
    The new state and {"<module>_loss", "<module>_loss_max", "l2_grads"}.
  """
  params, stats, opt = (
    dict(state.params),
    dict(state.batch_stats),
    dict(state.opt_state),
  )
  metrics, grad_sq = {}, 0.0
  update = functools.partial(
    _member_update,
    graphdef=state.graphdef,
    tx=state.tx,
    backbone=backbone,
    entropy_weight=entropy_weight,
  )

  for module in modules:

    def member(p, s, o, key, module=module):
      idx = resident.sample_indices(
        num_images[module], state.step, key, batch_size
      )
      x = resident.to_unit_range(images[idx])  # (B, S, S, 1)
      x = jax.lax.with_sharding_constraint(x, batch_sharding)
      return update(p, s, o, x)

    params[module], stats[module], opt[module], loss, gnorm = _over_members(
      member,
      strategy,
      params[module],
      stats[module],
      opt[module],
      data_keys[module],
    )
    metrics[f"{module}_loss"] = jnp.mean(loss)
    metrics[f"{module}_loss_max"] = jnp.max(loss)
    grad_sq = grad_sq + jnp.sum(jnp.square(gnorm))
  metrics["l2_grads"] = jnp.sqrt(grad_sq)
  new_state = state.replace(
    step=state.step + 1, params=params, batch_stats=stats, opt_state=opt
  )
  return new_state, metrics


def data_keys(config: mlc.ConfigDict) -> dict[str, Array]:
  """Per-member data-order keys, independent of the init keys."""
  root = jax.random.fold_in(jax.random.key(config.seed), 1000)
  return {
    m: jax.random.split(jax.random.fold_in(root, i), config.model.num_members)
    for i, m in enumerate(MODULES)
  }


def phases(
  config: mlc.ConfigDict,
  data: oneclass.OneClassData,
  mesh: jax.sharding.Mesh,
) -> list[loop.Phase]:
  """The training phases: both ensembles, then the UDM's extra steps."""
  b = config.train.batch_size
  sharding.check_batch(b, mesh, "config.train.batch_size")
  num = {"ndm": len(data.normal), "udm": len(data.normal) + len(data.unlabeled)}
  if num["ndm"] < b:
    raise ValueError(
      f"{data.name}: {num['ndm']} known-normal images, fewer "
      f"than one batch (config.train.batch_size={b})"
    )
  steps = {m: config.epochs * (n // b) for m, n in num.items()}
  images = jax.device_put(
    np.concatenate([data.normal, data.unlabeled]), sharding.replicated(mesh)
  )
  k = config.model.num_members
  common = dict(
    num_images=num,
    data_keys=data_keys(config),
    batch_size=b,
    backbone=config.model.backbone,
    entropy_weight=config.model.entropy_weight,
    strategy=member_strategy(config),
    batch_sharding=sharding.batch_sharded(mesh),
  )

  def jitted(modules):
    # Replicated outputs: the state stays replicated, and metrics can be
    # fetched on every host.
    return loop.jit_steps(
      functools.partial(train_step, modules=modules, **common),
      steps_per_call=config.train.steps_per_call,
      out_shardings=sharding.replicated(mesh),
    )

  k_call = config.train.steps_per_call
  single, multi = jitted(MODULES)
  tail_single, tail_multi = jitted(("udm",))
  phases = [
    loop.Phase(
      "ensembles",
      steps["ndm"],
      single,
      images,
      member_images_per_step=2 * k * b,
      images_per_step=b,
      multi_step_fn=multi,
      steps_per_call=k_call,
    ),
    loop.Phase(
      "udm_tail",
      steps["udm"] - steps["ndm"],
      tail_single,
      images,
      member_images_per_step=k * b,
      images_per_step=b,
      multi_step_fn=tail_multi,
      steps_per_call=k_call,
    ),
  ]
  if config.refine.enabled:
    maps_fn = functools.partial(ensemble_maps, config=config)
    phases.append(
      ddad_refine.phase(config, images, num["ndm"], steps["udm"], maps_fn, mesh)
    )
  return phases


# -------------------------------------------------------------------- scoring


def _forward(state, module, x, strategy):
  def one(p, s):
    out, _ = nnx.merge(state.graphdef, p, s)(x, train=False)
    return out

  return _over_members(
    one, strategy, state.params[module], state.batch_stats[module]
  )  # (K, B, H, W, C_out)


def ensemble_maps(
  state: TrainState, x: Array, *, config: mlc.ConfigDict
) -> dict[str, Array]:
  """rec/intra/inter maps [B, S, S] of x [B, S, S, 1] (frozen ensembles)."""
  strategy = member_strategy(config)
  return discrepancy_maps(
    _forward(state, "ndm", x, strategy),
    _forward(state, "udm", x, strategy),
    x,
    backbone=config.model.backbone,
  )


def score_fn(
  state: TrainState,
  images: Array,
  *,
  config: mlc.ConfigDict,
) -> dict[str, dict[str, Array]]:
  """Scores a batch with the frozen ensembles (eval-mode BN).

  Args:
    images: [B, S, S, 1] uint8.

  Returns:
    {"scores": {name: [B]}, "maps": {name: [B, S, S]}}, names rec, intra,
    inter (+ r_dual or r_intra with the refinement stage); image score =
    spatial mean of the map.
  """
  maps = ensemble_maps(state, resident.to_unit_range(images), config=config)
  if config.refine.enabled:
    maps[ddad_refine.score_name(config)] = ddad_refine.anomaly_probability(
      state.refine_graphdef,
      state.params["asr"],
      state.batch_stats["asr"],
      maps,
      config.refine.inputs,
    )
  return {
    "scores": {k: jnp.mean(v, axis=(1, 2)) for k, v in maps.items()},
    "maps": maps,
  }
