"""DDAD's ensembles (Cai et al., MedIA 2023, METHODS.md 1): maths and step.

Two ensembles of K reconstruction AEs: the NDM trains on known normals, the
UDM on known normals + the unlabeled pool. Every member of both is trained in
one jitted program: parameters carry a leading member axis, each member has
its own init and its own data order, and the training set sits on the device
where each member samples its batch (no host input per step).

Because the UDM set is larger, the UDM needs more steps for the same number of
epochs: the run has two phases, "ensembles" (both modules) and then
"udm_tail" (the UDM alone, for the steps the NDM does not need).

With `config.mesh.member` = n > 1, each module's K members are split over
the mesh's `member` axis (K / n per member group, `jaxad.sharding`): every
group trains and scores its own members, each member's batch split over
the group's `data` devices.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax
from flax import nnx

from jaxad import sharding
from jaxad.data import resident
from jaxad.methods import api, updates
from jaxad.models import autoencoder, layers

Array = jax.Array
MODULES = ("ndm", "udm")


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


def optimizer(config: mlc.ConfigDict) -> optax.GradientTransformation:
  """Adam of every member (no decay, no schedule), METHODS.md 1.6."""
  o = config.optim
  return optax.adam(o.lr, b1=o.b1, b2=o.b2)


def check_members(config: mlc.ConfigDict) -> None:
  """Raises ValueError unless config.mesh.member divides model.num_members."""
  sharding.check_members(
    config.model.num_members, config.mesh, "config.model.num_members"
  )


def init(config: mlc.ConfigDict) -> tuple[dict, dict, dict, nnx.GraphDef]:
  """K members per module, each with its own init key.

  Returns:
    ({module: params}, {module: batch_stats}, {module: opt_state},
    graphdef); every leaf has a leading member axis [K, ...], split over
    the mesh of `config.mesh` (`sharding.place_members`), which the loop's
    placement keeps.

  Raises:
    ValueError: K not divisible by config.mesh.member, or a mesh the
      devices do not allow.
  """
  check_members(config)
  mesh = sharding.make_mesh(config.mesh)
  graphdef = nnx.graphdef(
    nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
  )
  tx = optimizer(config)

  def init_member(key):
    module = build_model(config, nnx.Rngs(key))
    params, stats, _ = updates.init_net(module, None)
    return params, stats

  @jax.jit
  def init_module(keys):
    params, stats = jax.vmap(init_member)(keys)
    return params, stats, jax.vmap(tx.init)(params)

  root = jax.random.key(config.seed)
  params, stats, opt = {}, {}, {}
  for i, module in enumerate(MODULES):
    keys = jax.random.split(
      jax.random.fold_in(root, i), config.model.num_members
    )
    params[module], stats[module], opt[module] = sharding.place_members(
      init_module(keys), mesh
    )
  return params, stats, opt, graphdef


# ----------------------------------------------------------------- train step


def _member_update(params, stats, opt_state, x, *, graphdef, tx, loss_kw):
  def loss_fn(model):
    out, attention = model(x, train=True)
    return reconstruction_loss(out, x, attention, **loss_kw), None

  params, stats, opt_state, loss, _, gnorm = updates.update_net(
    graphdef, tx, params, stats, opt_state, loss_fn
  )
  return params, stats, opt_state, loss, gnorm


def _over_members(fn, strategy, *trees):
  """Applies fn to each member (leading axis) and stacks the results."""
  if strategy == "vmap":
    return jax.vmap(fn)(*trees)
  k = jax.tree.leaves(trees[0])[0].shape[0]
  outs = [fn(*jax.tree.map(lambda a, i=i: a[i], trees)) for i in range(k)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def train_step(
  state: api.TrainState,
  inputs: dict[str, Array],
  local_step: Array,
  *,
  modules: tuple[str, ...],
  num_images: dict[str, int],
  batch_size: int,
  tx: optax.GradientTransformation,
  loss_kw: dict,
  strategy: str,
) -> tuple[api.TrainState, dict[str, Array]]:
  """One optimizer step of every member of `modules`.

  Args:
    state: both ensembles.
    inputs: {"images": [N0 + NU, S, S, 1] uint8 resident training set (the
      NDM samples from the first N0, the known normals; the UDM from all),
      "data_keys": {module: [K] PRNG keys}, the per-member data orders}.
    local_step: unused: the UDM's tail phase continues the UDM's epochs, so
      both phases sample by the global step (each module's own step count).
    modules: the modules to update (static).
    num_images: images each module samples from (static).

  Returns:
    The new state and {"<module>_loss", "<module>_loss_max", "l2_grads"}.
  """
  del local_step
  params, stats, opt = (
    dict(state.params),
    dict(state.batch_stats),
    dict(state.opt_state),
  )
  metrics, grad_sq = {}, 0.0
  for module in modules:
    update = functools.partial(
      _member_update,
      graphdef=state.graphdefs[module],
      tx=tx,
      loss_kw=loss_kw,
    )

    # The members of this device's member group (all K without a member
    # axis); the step and the images are read by every member.
    def members(p, s, o, keys, step, images, module=module, update=update):
      def member(p, s, o, key):
        idx = resident.sample_indices(num_images[module], step, key, batch_size)
        x = api.shard_batch(resident.to_unit_range(images[idx]))
        return update(p, s, o, x)

      return _over_members(member, strategy, p, s, o, keys)

    params[module], stats[module], opt[module], loss, gnorm = (
      sharding.over_members(
        members,
        (
          params[module],
          stats[module],
          opt[module],
          inputs["data_keys"][module],
        ),
        (state.step, inputs["images"]),
      )
    )
    metrics[f"{module}_loss"] = jnp.mean(loss)
    metrics[f"{module}_loss_max"] = jnp.max(loss)
    grad_sq = grad_sq + jnp.sum(jnp.square(gnorm))
  metrics["l2_grads"] = jnp.sqrt(grad_sq)
  new_state = state.replace(params=params, batch_stats=stats, opt_state=opt)
  return new_state, metrics


def data_keys(config: mlc.ConfigDict) -> dict[str, Array]:
  """Per-member data-order keys, independent of the init keys."""
  root = jax.random.fold_in(jax.random.key(config.seed), 1000)
  return {
    m: jax.random.split(jax.random.fold_in(root, i), config.model.num_members)
    for i, m in enumerate(MODULES)
  }


def phases(
  config: mlc.ConfigDict, images, num: dict[str, int]
) -> list[api.Phase]:
  """Both ensembles, then the UDM's extra steps.

  Args:
    images: [N0 + NU, S, S, 1] uint8, the known normals first.
    num: {"ndm": N0, "udm": N0 + NU}.
  """
  check_members(config)
  b = config.train.batch_size
  steps = {m: config.epochs * (n // b) for m, n in num.items()}
  inputs = {"images": images, "data_keys": data_keys(config)}
  step = functools.partial(
    train_step,
    num_images=num,
    batch_size=b,
    tx=optimizer(config),
    loss_kw=dict(
      backbone=config.model.backbone,
      entropy_weight=config.model.entropy_weight,
    ),
    strategy=member_strategy(config),
  )
  common = dict(batch_size=b, batch_key="train.batch_size", inputs=inputs)
  k = config.model.num_members
  return [
    api.Phase(
      "ensembles",
      steps["ndm"],
      functools.partial(step, modules=MODULES),
      members=2 * k,
      **common,
    ),
    api.Phase(
      "udm_tail",
      steps["udm"] - steps["ndm"],
      functools.partial(step, modules=("udm",)),
      members=k,
      **common,
    ),
  ]


# -------------------------------------------------------------------- scoring


def _forward(model, module, x, strategy):
  def members(params, stats, x):
    def one(p, s):
      out, _ = nnx.merge(model.graphdefs[module], p, s)(x, train=False)
      return out

    return _over_members(one, strategy, params, stats)

  return sharding.over_members(
    members, (model.params[module], model.batch_stats[module]), (x,)
  )  # (K, B, H, W, C_out), split over the member axis


def ensemble_maps(
  model: api.Model, x: Array, *, config: mlc.ConfigDict
) -> dict[str, Array]:
  """rec/intra/inter maps [B, S, S] of x [B, S, S, 1] (frozen ensembles)."""
  strategy = member_strategy(config)
  return discrepancy_maps(
    _forward(model, "ndm", x, strategy),
    _forward(model, "udm", x, strategy),
    x,
    backbone=config.model.backbone,
  )
