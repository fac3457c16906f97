"""PPAD's learnable prompts and their forward (METHODS.md 3.3-3.4, 3.7).

Source: PPAD's `ppad_clip/ppad.py` (`PromptLearner` with a generic
context and the class token at the end, `ImageMaskLearner`, `CustomCLIP`,
`TextEncoder`) and `inference/test_*.py` (the region fusion).

* Text prompt of position `pos` and class `c`: the tokens of
  `"{pos} X X ... X {c}."` (16 X's) with the 16 X embeddings replaced by
  the shared context `ctx` [16, text_width].
* Image prompt: `mask_embedding` [1, G*G, vision_width] replaces the patch
  tokens outside the region (`token_mask` 0) before the class token and
  the positional embedding (`jaxad.models.clip` hook).
* Only 5 x 2 distinct prompts exist, so their text features are computed
  once per step (the original re-runs the text tower per sample, §3.10
  bug 4: the same maths) and once per evaluation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxad.methods.ppad import sas
from jaxad.models import clip_tokenizer

Array = jax.Array
POSITIONS = sas.POSITIONS  # left, right, upper, lower lung, "" (whole)
N_CTX = 16
# CheXzero's image statistics (PPAD v2 `Normalize`, every channel).
MEAN, STD = 0.39799, 0.32721


class Prompts(nnx.Module):
  """The only trained parameters: `ctx` [n_ctx, text_width] ~ N(0, 0.02^2)
  and `mask_embedding` [1, G*G, vision_width] ~ N(0, 0.02^2) x 10 (the
  original's init), float32 (the original's are fp16, §3.10 bug 2)."""

  def __init__(
    self, n_ctx: int, text_width: int, grid: int, vision_width: int, *, rngs
  ):
    self.ctx = nnx.Param(
      0.02 * jax.random.normal(rngs.params(), (n_ctx, text_width))
    )
    self.mask_embedding = nnx.Param(
      0.2 * jax.random.normal(rngs.params(), (1, grid * grid, vision_width))
    )


@functools.lru_cache(maxsize=8)
def prompt_tokens(
  positions: tuple[str, ...], classnames: tuple[str, ...], n_ctx: int = N_CTX
) -> tuple[np.ndarray, np.ndarray]:
  """Token ids of every (position, class) prompt and where `ctx` goes.

  Returns:
    ids: [P * C, 77] int32, row p * C + c = `"{pos} X..X {class}."`.
    slot: [P * C, 77] int32, j at the j-th X token (replaced by ctx[j]),
      -1 elsewhere.
  """
  tok = clip_tokenizer.default_tokenizer()
  texts, slots = [], []
  for pos in positions:
    start = 1 + len(tok.encode(pos))  # after <|startoftext|> and pos
    for c in classnames:
      texts.append(f"{pos} {'X ' * n_ctx}{c}.")
      slot = np.full(77, -1, np.int32)
      slot[start : start + n_ctx] = np.arange(n_ctx)
      slots.append(slot)
  return clip_tokenizer.tokenize(texts), np.stack(slots)


def text_features(clip, ctx: Array, ids: Array, slot: Array) -> Array:
  """[N, embed_dim] float32 text features with `ctx` [n_ctx, W] in place
  of the X tokens (`slot` >= 0) of prompts `ids` [N, 77]."""
  emb = clip.embed_tokens(ids)
  filled = jnp.where((slot >= 0)[..., None], ctx[jnp.maximum(slot, 0)], emb)
  return clip.encode_text_embeddings(filled, ids)


def normalize(x: Array) -> Array:
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def to_clip_input(images: Array) -> Array:
  """uint8 [B, S, S, 1 or 3] -> float32 [B, S, S, 3], CheXzero-normalised
  (ToTensor, then Normalize(0.39799, 0.32721) on every channel; grayscale
  is stacked to 3 channels, as the original's loader)."""
  x = images.astype(jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  return (x - MEAN) / STD


def region_logits(
  clip,
  mask_embedding: Array,
  token_masks: Array,
  text: Array,
  x: Array,
  regions: Array,
) -> Array:
  """The two logits of each image with its own region's prompts.

  Args:
    clip: a `jaxad.models.clip.CLIP`.
    mask_embedding: [1, G*G, vision_width].
    token_masks: [P, G*G] float, 1 inside each position's region.
    text: [P, C, embed_dim] L2-normalised text features.
    x: [B, R, R, 3] float normalised images.
    regions: [B] int, each image's position index.

  Returns:
    [B, C] float32: exp(logit_scale) * cos(image, text of its region).
  """
  z = normalize(clip.encode_image(x, mask_embedding, token_masks[regions]))
  scale = jnp.exp(clip.logit_scale[...])
  return scale * jnp.einsum("be,bce->bc", z, text[regions])


def fuse(probs: Array, threshold: float) -> Array:
  """[P, B] abnormal probabilities per region -> [B] scores: the max over
  regions if it is above `threshold` (0.8), else the mean (§3.7)."""
  top = probs.max(axis=0)
  return jnp.where(top > threshold, top, probs.mean(axis=0))
