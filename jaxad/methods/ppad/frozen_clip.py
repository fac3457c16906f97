"""PPAD's frozen CLIP and its prompt files: checkpoints, a seeded random
CLIP for offline runs, and released PPAD prompt checkpoints (METHODS.md
3.2, 3.10 bug 10)."""

import functools

import jax
import numpy as np
from absl import logging
from flax import nnx

from jaxad import weights
from jaxad.models import clip as clip_model
from jaxad.weights import clip as clip_weights

CHEXZERO = (
  "the CheXzero checkpoint best_64_0.0001_original_35000_0.864.pt "
  "(https://github.com/rajpurkarlab/CheXzero, README: model weights), or "
  "any CLIP state dict in OpenAI's key layout"
)


RANDOM = "random"


@functools.lru_cache(maxsize=2)
def load_clip(path: str, fp16_round: bool, arch: str, seed: int):
  """(CLIPConfig, params) of a checkpoint, or a seeded random CLIP of
  `arch` (`models.clip.ARCHITECTURES`) when path is "random"."""
  if path != RANDOM:
    return clip_weights.load(path, fp16_round=fp16_round)
  logging.warning(
    "PPAD: the frozen CLIP is RANDOMLY INITIALISED (%s, model.clip_weights="
    "random): not CheXzero, not the paper's setting, and its results are"
    " not PPAD's.",
    arch,
  )
  config = clip_model.ARCHITECTURES[arch]
  model = jax.jit(
    lambda: nnx.split(clip_model.CLIP(config, rngs=nnx.Rngs(seed)))[1]
  )()
  return config, jax.device_get(model.to_pure_dict())


def clip_graphdef(config, clip_config):
  abstract = nnx.eval_shape(
    lambda: clip_model.CLIP(
      clip_config,
      compute_dtype=config.model.compute_dtype,
      rngs=nnx.Rngs(0),
    )
  )
  return nnx.graphdef(abstract)


def read_prompts(path: str, ctx_shape, mask_shape) -> tuple[np.ndarray, ...]:
  """(ctx, mask_embedding) float32 of a released PPAD prompt checkpoint.

  Reads only `prompt_learner_ctx.ctx` and `image_mask_learner.
  mask_embedding` (the file also holds a full CLIP copy, §3.10 bug 10),
  with jaxad's restricted unpickler (no torch, no arbitrary code).

  Raises:
    ValueError: a key is absent or its shape is not the model's.
  """
  sd = weights.read_state_dict(path)
  out = []
  for key, shape in (
    ("prompt_learner_ctx.ctx", ctx_shape),
    ("image_mask_learner.mask_embedding", mask_shape),
  ):
    if key not in sd:
      raise ValueError(f"{path}: no {key} (a PPAD prompt checkpoint has it)")
    if tuple(sd[key].shape) != tuple(shape):
      raise ValueError(
        f"{path}: {key} has shape {sd[key].shape}; this CLIP needs {shape}"
      )
    out.append(np.asarray(sd[key], np.float32))
  return tuple(out)
