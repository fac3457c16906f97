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
from flax import nnx

from jaxad import optim
from jaxad.data import resident, synthesis
from jaxad.methods import api, updates
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


def optimizer(config: mlc.ConfigDict):
  """Adam with *coupled* L2 (PyTorch's Adam(weight_decay=...)): the decay is
  added to the gradient before the moment estimates."""
  r = config.refine
  return optim.adam_l2(r.lr, r.weight_decay, r.b1, r.b2)


def graphdef(config: mlc.ConfigDict) -> nnx.GraphDef:
  return nnx.graphdef(nnx.eval_shape(lambda: _asr_net(config, nnx.Rngs(0))))


def init(config: mlc.ConfigDict, key: Array) -> tuple:
  """(params, batch_stats, opt_state) of a fresh ASR-Net."""
  return updates.init_net(_asr_net(config, nnx.Rngs(key)), optimizer(config))


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


def anomaly_probability(net: nnx.Module, maps, inputs) -> Array:
  """[B, H, W] refined map: P(anomalous) per pixel (eval-mode BN)."""
  logits = net(net_inputs(maps, inputs), train=False)
  return jax.nn.softmax(logits, axis=-1)[..., 1]


def refine_step(
  state: api.TrainState,
  inputs: dict[str, Array],
  local_step: Array,
  *,
  maps_fn: Callable,
  num_normal: int,
  batch_size: int,
  inputs_kind: str,
  tx,
):
  """One ASR-Net update on synthetic anomalies of the known normals.

  Args:
    state: the DDAD state; its ensembles are frozen here.
    inputs: {"images": [N, S, S, 1] uint8 resident training set, the first
      `num_normal` the known normals; "data_key", "noise_key": PRNG keys}.
    local_step: the step within this phase (data order, noise).
    maps_fn: (model, x [B, S, S, 1]) -> discrepancy maps {name: [B, S, S]}.

  Returns:
    The state with the ASR-Net updated, and {"asr_loss", "l2_grads"}.
  """
  images = inputs["images"]
  idx = resident.sample_indices(
    num_normal, local_step, inputs["data_key"], batch_size
  )
  k_src, k_paste = jax.random.split(
    jax.random.fold_in(inputs["noise_key"], local_step)
  )
  src = synthesis.other_indices(k_src, idx, num_normal)
  x, mask = synthesis.paste_patches(
    k_paste,
    resident.to_unit_range(images[idx]),
    resident.to_unit_range(images[src]),
  )
  x = api.shard_batch(x)
  maps = jax.lax.stop_gradient(maps_fn(state.model(), x))  # frozen ensembles
  net_in = net_inputs(maps, inputs_kind)

  def loss_fn(net):
    return jnp.mean(focal_loss(net(net_in, train=True), mask)), None

  state, loss, _, gnorm = updates.update(state, "asr", tx, loss_fn)
  return state, {"asr_loss": loss, "l2_grads": gnorm}


def phase(
  config: mlc.ConfigDict, images, num_normal: int, maps_fn: Callable
) -> api.Phase:
  """The "refine" phase: `refine.epochs` epochs over the known normals."""
  r = config.refine
  # Two at least: each synthetic anomaly is pasted from another image.
  api.check_batches(
    num_normal,
    r.batch_size,
    what="refine: known normals",
    key="refine.batch_size",
    minimum=2,
  )
  step = functools.partial(
    refine_step,
    maps_fn=maps_fn,
    num_normal=num_normal,
    batch_size=r.batch_size,
    inputs_kind=r.inputs,
    tx=optimizer(config),
  )
  return api.Phase(
    "refine",
    r.epochs * (num_normal // r.batch_size),
    step,
    batch_size=r.batch_size,
    batch_key="refine.batch_size",
    inputs={"images": images, **updates.step_keys(config.seed, 2000)},
  )
