"""DDAD-ASR: the anomaly-score refinement stage (METHODS.md 1.8).

After the ensembles, an ASR-Net learns to turn the discrepancy maps into a
per-pixel anomaly probability, self-supervised: known normals get synthetic
patch anomalies (on the device), the frozen NDM/UDM ensembles compute the
maps of the altered image inside the same jitted step (no gradient flows
into them), and a focal loss compares the refined map with the box mask.
R_dual takes [inter, intra], R_intra takes intra alone.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax
from flax import nnx

from jaxad import loop, optim, sharding
from jaxad.data import resident, synthesis
from jaxad.models import layers, refine

Array = jax.Array
INPUTS = {"dual": ("inter", "intra"), "intra": ("intra",)}


def score_name(config: mlc.ConfigDict) -> str:
  """ "r_dual" or "r_intra", the key of the refined score in eval.json."""
  if config.refine.inputs not in INPUTS:
    raise ValueError(
      f"config.refine.inputs must be one of {sorted(INPUTS)}, got "
      f"{config.refine.inputs!r}"
    )
  return f"r_{config.refine.inputs}"


def _asr_net(config: mlc.ConfigDict, rngs: nnx.Rngs) -> refine.ASRNet:
  return refine.ASRNet(
    in_channels=len(INPUTS[config.refine.inputs]),
    dtype=layers.compute_dtype(config.model.compute_dtype),
    rngs=rngs,
  )


def build(config: mlc.ConfigDict):
  """(graphdef, optimizer) of the ASR-Net.

  Adam with *coupled* L2 (PyTorch's Adam(weight_decay=...)): the decay is
  added to the gradient before the moment estimates.
  """
  r = config.refine
  model = nnx.eval_shape(lambda: _asr_net(config, nnx.Rngs(0)))
  tx = optim.adam_l2(r.lr, r.weight_decay, r.b1, r.b2)
  return nnx.graphdef(model), tx


def init(config: mlc.ConfigDict, key: Array, tx) -> tuple:
  """(params, batch_stats, opt_state) of a fresh ASR-Net."""
  net = _asr_net(config, nnx.Rngs(key))
  params = nnx.state(net, nnx.Param).to_pure_dict()
  return params, nnx.state(net, nnx.BatchStat).to_pure_dict(), tx.init(params)


def focal_loss(logits: Array, mask: Array, *, gamma: float = 2.0) -> Array:
  """DDAD-ASR's focal loss on softmax probabilities, per pixel.

  Args:
    logits: [B, H, W, 2]; channel 1 is "anomalous".
    mask: [B, H, W] in {0, 1}.
    gamma: focusing parameter (alpha is 1 for both classes).

  Returns:
    [B, H, W] losses; the original takes their mean.
  """
  probs = jax.nn.softmax(logits, axis=-1)
  onehot = jnp.stack([1.0 - mask, mask], axis=-1)
  smooth = jnp.clip(onehot, 1e-5, 1.0 - 1e-5)
  p_t = jnp.sum(smooth * probs, axis=-1) + 1e-5
  return -((1.0 - p_t) ** gamma) * jnp.log(p_t)


def net_inputs(maps: dict[str, Array], inputs: str) -> Array:
  """[B, H, W, C] ASR-Net input, channels in the original's order."""
  return jnp.stack([maps[name] for name in INPUTS[inputs]], axis=-1)


def anomaly_probability(graphdef, params, stats, maps, inputs) -> Array:
  """[B, H, W] refined map: P(anomalous) per pixel (eval-mode BN)."""
  logits = nnx.merge(graphdef, params, stats)(
    net_inputs(maps, inputs), train=False
  )
  return jax.nn.softmax(logits, axis=-1)[..., 1]


def refine_step(
  state,
  images: Array,
  *,
  maps_fn: Callable,
  start: int,
  num_normal: int,
  batch_size: int,
  inputs: str,
  data_key: Array,
  noise_key: Array,
  batch_sharding,
):
  """One ASR-Net update on synthetic anomalies of the known normals.

  Args:
    state: the DDAD state; its ensembles are frozen here.
    images: [N, S, S, 1] uint8 resident training set; the first
      `num_normal` are the known normals.
    maps_fn: (state, x [B, S, S, 1]) -> discrepancy maps {name: [B, S, S]}.
    start: global step at which this phase starts (static).

  Returns:
    The state with the ASR-Net updated, and {"asr_loss", "l2_grads"}.
  """
  step = state.step - start
  idx = resident.sample_indices(num_normal, step, data_key, batch_size)
  k_src, k_paste = jax.random.split(jax.random.fold_in(noise_key, step))
  src = synthesis.other_indices(k_src, idx, num_normal)
  x, mask = synthesis.paste_patches(
    k_paste,
    resident.to_unit_range(images[idx]),
    resident.to_unit_range(images[src]),
  )
  x = jax.lax.with_sharding_constraint(x, batch_sharding)
  maps = jax.lax.stop_gradient(maps_fn(state, x))  # frozen ensembles
  net_in = net_inputs(maps, inputs)

  def loss_fn(params):
    net = nnx.merge(state.refine_graphdef, params, state.batch_stats["asr"])
    loss = jnp.mean(focal_loss(net(net_in, train=True), mask))
    return loss, nnx.state(net, nnx.BatchStat).to_pure_dict()

  params = state.params["asr"]
  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt = state.refine_tx.update(grads, state.opt_state["asr"], params)
  new_state = state.replace(
    step=state.step + 1,
    params={**state.params, "asr": optax.apply_updates(params, updates)},
    batch_stats={**state.batch_stats, "asr": stats},
    opt_state={**state.opt_state, "asr": opt},
  )
  return new_state, {"asr_loss": loss, "l2_grads": optax.global_norm(grads)}


def phase(
  config: mlc.ConfigDict,
  images: Array,
  num_normal: int,
  start: int,
  maps_fn: Callable,
  mesh: jax.sharding.Mesh,
) -> loop.Phase:
  """The "refine" phase: `refine.epochs` epochs over the known normals."""
  r = config.refine
  sharding.check_batch(r.batch_size, mesh, "config.refine.batch_size")
  if num_normal < max(r.batch_size, 2):
    raise ValueError(
      f"{num_normal} known normals: too few for config.refine.batch_size="
      f"{r.batch_size}"
    )
  root = jax.random.fold_in(jax.random.key(config.seed), 2000)
  step = functools.partial(
    refine_step,
    maps_fn=maps_fn,
    start=start,
    num_normal=num_normal,
    batch_size=r.batch_size,
    inputs=r.inputs,
    data_key=jax.random.fold_in(root, 0),
    noise_key=jax.random.fold_in(root, 1),
    batch_sharding=sharding.batch_sharded(mesh),
  )
  k = config.train.steps_per_call
  single, multi = loop.jit_steps(
    step, steps_per_call=k, out_shardings=sharding.replicated(mesh)
  )
  return loop.Phase(
    "refine",
    r.epochs * (num_normal // r.batch_size),
    single,
    images,
    member_images_per_step=r.batch_size,
    images_per_step=r.batch_size,
    multi_step_fn=multi,
    steps_per_call=k,
  )
