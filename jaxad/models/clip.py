"""OpenAI CLIP (ViT image tower + causal text tower) in Flax NNX, NHWC.

Source: OpenAI's `clip/model.py` (`VisionTransformer`, `Transformer`,
`ResidualAttentionBlock`, `LayerNorm`, `QuickGELU`, `CLIP.encode_image`,
`CLIP.encode_text`, `build_model`), as vendored by PPAD (METHODS.md 3.2).
Only the ViT image tower exists here (no ModifiedResNet).

* Image: conv1 (patch p, stride p, no bias) -> G*G tokens [B, G*G, width];
  [optional PPAD patch prompt, below]; class token; + positional embedding;
  ln_pre; pre-LN blocks (heads = width / 64); ln_post of the class token;
  @ proj -> [B, embed_dim].
* Text: token embedding + positional embedding; pre-LN blocks with a causal
  mask (heads = transformer_heads); ln_final; the feature at the EOT token
  (the argmax of the ids); @ text_projection -> [N, embed_dim].
* Blocks: x + attn(ln_1(x)); x + c_proj(QuickGELU(c_fc(ln_2(x)))), QuickGELU
  = x * sigmoid(1.702 x); LayerNorm eps 1e-5.

PPAD hooks (METHODS.md 3.3):
* `encode_image(images, patch_prompt=P, token_mask=m)`: the patch tokens t
  become m * t + (1 - m) * P after the patch conv, BEFORE the class token
  and the positional embedding are added.
* `encode_text_embeddings(embeddings, token_ids)`: the text tower from token
  embeddings (e.g. `embed_tokens(ids)` with the context rows replaced); the
  positional embedding is added inside, the EOT position is read from ids.

Precision: `compute_dtype` ("float32" or "bfloat16") is the dtype of every
matmul and the conv (parameters stay float32). LayerNorm, the attention
softmax and the residual stream are float32 whatever the compute dtype (the
original runs everything in fp16 except LayerNorm: a deliberate deviation);
features and logits are returned as float32.

API (all methods trace under `jax.jit`; `nnx.split` / `nnx.merge` to pass
the frozen weights as arrays):

  config = CLIPConfig(...)  # or weights.clip.config_from_state_dict(sd)
  model = CLIP(config, compute_dtype="bfloat16", rngs=nnx.Rngs(0))
  model = from_params(config, params, compute_dtype="float32")  # converted
  model.encode_image(images_nhwc, patch_prompt=None, token_mask=None)
  model.embed_tokens(token_ids)                   # [N, L, width]
  model.encode_text_embeddings(embeddings, token_ids)
  model.encode_text(token_ids)
  model.logits(image_features, text_features)     # [B, N]
  model(images_nhwc, token_ids)                   # (per image, per text)

Parameter tree (mirrors the torch names; `jaxad.weights.clip` converts):
`visual/{conv1/kernel, class_embedding, positional_embedding, ln_pre,
transformer/resblocks/i, ln_post, proj}`, `token_embedding/embedding`,
`positional_embedding`, `transformer/resblocks/i`, `ln_final`,
`text_projection`, `logit_scale`; a block holds `attn/{q,k,v,out}_proj`,
`ln_1`, `mlp/{c_fc, c_proj}`, `ln_2` (Linear `kernel` [in, out], `bias`;
LayerNorm `scale`, `bias`). Initialisation is not OpenAI's: the towers are
meant to be loaded from a checkpoint.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxad.models import layers

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """OpenAI `CLIP.__init__`'s arguments (ViT image tower only)."""

  embed_dim: int
  image_resolution: int
  vision_layers: int
  vision_width: int
  vision_patch_size: int
  context_length: int
  vocab_size: int
  transformer_width: int
  transformer_heads: int
  transformer_layers: int

  @property
  def vision_heads(self) -> int:
    return self.vision_width // 64

  @property
  def grid_size(self) -> int:
    return self.image_resolution // self.vision_patch_size


# OpenAI's released ViT CLIPs (`clip.available_models()`), for random
# initialisation at a known size (benchmarks, offline runs).
ARCHITECTURES = {
  "ViT-B/32": CLIPConfig(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
  "ViT-B/16": CLIPConfig(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
  "ViT-L/14": CLIPConfig(768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12),
}


def _dtype(compute_dtype):
  if isinstance(compute_dtype, str):
    return layers.compute_dtype(compute_dtype, "compute_dtype")
  if jnp.dtype(compute_dtype) not in (jnp.float32, jnp.bfloat16):
    raise ValueError(
      f"compute_dtype must be float32 or bfloat16, got {compute_dtype}"
    )
  return jnp.dtype(compute_dtype).type


class LayerNorm(nnx.Module):
  """`torch.nn.LayerNorm(width)` computed in float32 (OpenAI's subclass);
  two-pass variance, eps 1e-5; returns float32."""

  def __init__(self, width: int):
    self.scale = nnx.Param(jnp.ones((width,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((width,), jnp.float32))

  def __call__(self, x: Array) -> Array:
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + 1e-5)
    return y * self.scale[...] + self.bias[...]


class Attention(nnx.Module):
  """`torch.nn.MultiheadAttention(width, heads)` (batch first), with the
  packed in_proj split into q/k/v; softmax in float32."""

  def __init__(self, width: int, heads: int, *, dtype, rngs: nnx.Rngs):
    if width % heads:
      raise ValueError(f"width {width} is not divisible by {heads} heads")
    self.heads, self.dtype = heads, dtype
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
      setattr(self, name, layers.linear(width, width, rngs=rngs, dtype=dtype))

  def __call__(self, x: Array, mask: Array | None) -> Array:
    """x [B, L, width]; mask [L, L] bool (True = may attend) or None."""
    b, n, w = x.shape
    d = w // self.heads

    def split(t):
      return t.reshape(b, n, self.heads, d)

    q, k, v = (split(f(x)) for f in (self.q_proj, self.k_proj, self.v_proj))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    logits = logits * (1.0 / math.sqrt(d))
    if mask is not None:
      logits = jnp.where(mask, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, w)
    return self.out_proj(out)


class Mlp(nnx.Module):
  """c_fc (width -> 4 width), QuickGELU, c_proj (4 width -> width)."""

  def __init__(self, width: int, *, dtype, rngs: nnx.Rngs):
    self.c_fc = layers.linear(width, 4 * width, rngs=rngs, dtype=dtype)
    self.c_proj = layers.linear(4 * width, width, rngs=rngs, dtype=dtype)

  def __call__(self, x: Array) -> Array:
    h = self.c_fc(x)
    return self.c_proj(h * jax.nn.sigmoid(1.702 * h))


class ResidualAttentionBlock(nnx.Module):
  """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); x float32."""

  def __init__(self, width: int, heads: int, *, dtype, rngs: nnx.Rngs):
    self.attn = Attention(width, heads, dtype=dtype, rngs=rngs)
    self.ln_1 = LayerNorm(width)
    self.mlp = Mlp(width, dtype=dtype, rngs=rngs)
    self.ln_2 = LayerNorm(width)

  def __call__(self, x: Array, mask: Array | None) -> Array:
    x = x + self.attn(self.ln_1(x), mask).astype(jnp.float32)
    return x + self.mlp(self.ln_2(x)).astype(jnp.float32)


class Transformer(nnx.Module):
  """`depth` residual attention blocks (`resblocks`)."""

  def __init__(self, width, depth, heads, *, dtype, rngs: nnx.Rngs):
    self.resblocks = nnx.List(
      [
        ResidualAttentionBlock(width, heads, dtype=dtype, rngs=rngs)
        for _ in range(depth)
      ]
    )

  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    for block in self.resblocks:
      x = block(x, mask)
    return x


def _matmul(x: Array, w: Array, dtype) -> Array:
  return jnp.dot(x.astype(dtype), w.astype(dtype)).astype(jnp.float32)


def _normal(rngs: nnx.Rngs, shape, std: float) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))


class VisionTransformer(nnx.Module):
  """OpenAI's `VisionTransformer` with the PPAD patch-prompt hook."""

  def __init__(self, config: CLIPConfig, *, dtype, rngs: nnx.Rngs):
    w, p, g = config.vision_width, config.vision_patch_size, config.grid_size
    self.dtype, self.grid = dtype, g
    self.conv1 = layers.conv(
      3,
      w,
      kernel=p,
      stride=p,
      padding=0,
      use_bias=False,
      rngs=rngs,
      dtype=dtype,
    )
    self.class_embedding = _normal(rngs, (w,), w**-0.5)
    self.positional_embedding = _normal(rngs, (g * g + 1, w), w**-0.5)
    self.ln_pre = LayerNorm(w)
    self.transformer = Transformer(
      w, config.vision_layers, config.vision_heads, dtype=dtype, rngs=rngs
    )
    self.ln_post = LayerNorm(w)
    self.proj = _normal(rngs, (w, config.embed_dim), w**-0.5)

  def patch_tokens(self, images: Array) -> Array:
    """[B, R, R, 3] -> conv1's tokens [B, G*G, width] float32, row-major
    over the G x G grid (torch's `flatten(2)` order)."""
    r = self.grid * self.conv1.kernel_size[0]
    if images.ndim != 4 or images.shape[1:] != (r, r, 3):
      raise ValueError(f"images must be [B, {r}, {r}, 3], got {images.shape}")
    t = self.conv1(images)
    return t.reshape(t.shape[0], -1, t.shape[-1]).astype(jnp.float32)

  def encode_tokens(self, tokens: Array) -> Array:
    """Patch tokens [B, G*G, width] -> features [B, embed_dim] float32:
    class token, + positional embedding, ln_pre, blocks, ln_post, @ proj."""
    b, _, w = tokens.shape
    cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, w))
    x = jnp.concatenate([cls, tokens.astype(jnp.float32)], axis=1)
    x = self.ln_pre(x + self.positional_embedding[...])
    x = self.transformer(x)
    return _matmul(self.ln_post(x[:, 0]), self.proj[...], self.dtype)

  def __call__(self, images, patch_prompt=None, token_mask=None) -> Array:
    """See `CLIP.encode_image`."""
    tokens = self.patch_tokens(images)
    if (patch_prompt is None) != (token_mask is None):
      raise ValueError("patch_prompt and token_mask go together")
    if patch_prompt is not None:
      n, w = tokens.shape[1:]
      m = jnp.asarray(token_mask, jnp.float32)
      prompt = jnp.asarray(patch_prompt, jnp.float32)
      if (
        m.ndim != 2 or m.shape[1] != n or m.shape[0] not in (1, tokens.shape[0])
      ):
        raise ValueError(f"token_mask must be [B or 1, {n}], got {m.shape}")
      if prompt.ndim != 3 or prompt.shape[1:] != (n, w):
        raise ValueError(
          f"patch_prompt must be [1 or B, {n}, {w}], got {prompt.shape}"
        )
      m = m[:, :, None]
      tokens = m * tokens + (1.0 - m) * prompt
    return self.encode_tokens(tokens)


class CLIP(nnx.Module):
  """OpenAI's `CLIP` (ViT image tower); see the module docstring."""

  def __init__(
    self,
    config: CLIPConfig,
    *,
    compute_dtype: str | jnp.dtype = "float32",
    rngs: nnx.Rngs,
  ):
    dtype = _dtype(compute_dtype)
    w = config.transformer_width
    self.config, self.dtype = config, dtype
    self.visual = VisionTransformer(config, dtype=dtype, rngs=rngs)
    self.token_embedding = nnx.Embed(
      config.vocab_size, w, param_dtype=jnp.float32, rngs=rngs
    )
    self.positional_embedding = _normal(rngs, (config.context_length, w), 0.01)
    self.transformer = Transformer(
      w,
      config.transformer_layers,
      config.transformer_heads,
      dtype=dtype,
      rngs=rngs,
    )
    self.ln_final = LayerNorm(w)
    self.text_projection = _normal(rngs, (w, config.embed_dim), w**-0.5)
    self.logit_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), jnp.float32))

  def encode_image(self, images, patch_prompt=None, token_mask=None) -> Array:
    """Image features (OpenAI `CLIP.encode_image`), with PPAD's hook.

    Args:
      images: [B, R, R, 3] float (NHWC; R = config.image_resolution), already
        normalised.
      patch_prompt: optional [1 or B, G*G, vision_width] float, replacement
        tokens (PPAD's `mask_embedding`; differentiable).
      token_mask: optional [1 or B, G*G] float, 1 keeps a patch token, 0
        replaces it: t <- m t + (1 - m) P, before the class token and the
        positional embedding. Given with patch_prompt or not at all.

    Returns:
      [B, embed_dim] float32, not normalised.

    Raises:
      ValueError: (at trace time) wrong image, prompt or mask shapes, or only
        one of patch_prompt / token_mask.
    """
    return self.visual(images, patch_prompt, token_mask)

  def embed_tokens(self, token_ids: Array) -> Array:
    """Token embeddings [N, L, transformer_width] float32 of ids [N, L]
    (no positional embedding), for replacing context rows (PPAD's ctx)."""
    return self.token_embedding(jnp.asarray(token_ids)).astype(jnp.float32)

  def encode_text_embeddings(
    self, embeddings: Array, token_ids: Array
  ) -> Array:
    """Text features from token embeddings (PPAD's `TextEncoder`).

    Args:
      embeddings: [N, L, transformer_width] float, token embeddings without
        the positional one; L <= context_length (the mask is causal, so
        padding after the EOT token may be cut off without changing the
        result).
      token_ids: [N, L] int, whose argmax per row is the EOT position.

    Returns:
      [N, embed_dim] float32: ln_final at the EOT token @ text_projection.

    Raises:
      ValueError: L > context_length or mismatched shapes (trace time).
    """
    token_ids = jnp.asarray(token_ids)
    n, length, w = embeddings.shape
    if length > self.config.context_length or token_ids.shape != (n, length):
      raise ValueError(
        f"embeddings {embeddings.shape} / token_ids {token_ids.shape}: need "
        f"[N, L, {w}] / [N, L] with L <= {self.config.context_length}"
      )
    pos = self.positional_embedding[...][:length]
    x = embeddings.astype(jnp.float32) + pos
    causal = jnp.tril(jnp.ones((length, length), bool))
    x = self.ln_final(self.transformer(x, causal))
    eot = jnp.argmax(token_ids, axis=-1)
    x = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    return _matmul(x, self.text_projection[...], self.dtype)

  def encode_text(self, token_ids: Array) -> Array:
    """Text features [N, embed_dim] float32 of token ids [N, L] int (OpenAI
    `CLIP.encode_text`; ids from `clip_tokenizer.tokenize`)."""
    return self.encode_text_embeddings(self.embed_tokens(token_ids), token_ids)

  def logits(self, image_features: Array, text_features: Array) -> Array:
    """exp(logit_scale) * cos(image i, text j): [B, N] float32 (OpenAI
    `CLIP.forward`'s logits_per_image; features L2-normalised, no eps)."""
    i = image_features.astype(jnp.float32)
    t = text_features.astype(jnp.float32)
    i = i / jnp.linalg.norm(i, axis=-1, keepdims=True)
    t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
    return jnp.exp(self.logit_scale[...]) * (i @ t.T)

  def __call__(self, images: Array, token_ids: Array) -> tuple[Array, Array]:
    """(logits_per_image [B, N], logits_per_text [N, B]), OpenAI's forward."""
    li = self.logits(self.encode_image(images), self.encode_text(token_ids))
    return li, li.T


def from_params(
  config: CLIPConfig, params, *, compute_dtype: str | jnp.dtype = "float32"
) -> CLIP:
  """A `CLIP` holding `params` (a pure dict, e.g. from
  `jaxad.weights.clip.load`), built without random initialisation."""
  abstract = nnx.eval_shape(
    lambda: CLIP(config, compute_dtype=compute_dtype, rngs=nnx.Rngs(0))
  )
  return nnx.merge(nnx.graphdef(abstract), params)
