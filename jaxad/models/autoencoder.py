"""DDAD's reconstruction autoencoder and its variants (METHODS.md section 1.4).

One network serves three backbones:
* "ae": plain AE, 1 output channel;
* "aeu": AE-U, 2 output channels (mean, log-variance);
* "memae": a soft memory of `memory_slots` prototypes on the 16-d latent.

The layer order, shapes and initialisation match the PyTorch original; the
flatten between convolutions and linears uses PyTorch's (C, H, W) order so a
converted checkpoint maps one to one. About 4.49 M parameters at 64x64.

`dtype` is the compute dtype (float32, or bfloat16 on GPU/TPU): parameters,
BatchNorm statistics, the memory read-out and the output stay float32.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxad.models import layers

Array = jax.Array
BACKBONES = ("ae", "aeu", "memae")


class AutoEncoder(nnx.Module):
  """Conv encoder -> 16-d latent -> conv decoder. NHWC in and out."""

  def __init__(
    self,
    *,
    backbone: str = "ae",
    image_size: int = 64,
    in_channels: int = 1,
    latent_size: int = 16,
    width: float = 1.0,
    memory_slots: int = 25,
    upsample: str = "subpixel",
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if backbone not in BACKBONES:
      raise ValueError(
        f"model.backbone must be one of {BACKBONES}, got {backbone!r}"
      )
    if image_size % 16:
      raise ValueError(f"image_size must be a multiple of 16, got {image_size}")
    c1, c2, c3 = int(16 * width), int(32 * width), int(64 * width)
    self.fm = image_size // 16
    self.c3 = c3
    self.dtype = dtype
    out_channels = 2 if backbone == "aeu" else 1
    down = lambda i, o: layers.conv(
      i,
      o,
      kernel=4,
      stride=2,
      padding=1,
      use_bias=False,
      rngs=rngs,
      dtype=dtype,
    )
    self.enc_convs = nnx.List(
      [down(in_channels, c1), down(c1, c2), down(c2, c3), down(c3, c3)]
    )
    self.enc_bns = nnx.List([layers.BatchNorm(c) for c in (c1, c2, c3, c3)])
    flat = c3 * self.fm * self.fm
    self.enc_fc1 = layers.linear(flat, 2048, rngs=rngs, dtype=dtype)
    self.enc_bn = layers.BatchNorm(2048)
    self.enc_fc2 = layers.linear(2048, latent_size, rngs=rngs, dtype=dtype)
    init = layers.torch_uniform(latent_size)
    self.memory = (
      nnx.Param(init(rngs.params(), (memory_slots, latent_size)))
      if backbone == "memae"
      else None
    )
    self.dec_fc1 = layers.linear(latent_size, 2048, rngs=rngs, dtype=dtype)
    self.dec_bn = layers.BatchNorm(2048)
    self.dec_fc2 = layers.linear(2048, flat, rngs=rngs, dtype=dtype)
    up = lambda i, o: layers.UpConv2x(
      i, o, method=upsample, rngs=rngs, dtype=dtype
    )
    self.dec_convs = nnx.List(
      [up(c3, c3), up(c3, c2), up(c2, c1), up(c1, out_channels)]
    )
    self.dec_bns = nnx.List([layers.BatchNorm(c) for c in (c3, c2, c1)])

  def __call__(self, x: Array, *, train: bool) -> tuple[Array, Array | None]:
    """Reconstructs a batch.

    Args:
      x: [B, S, S, C_in] images in [-1, 1] (any float dtype).
      train: batch statistics (and running-average updates) if True, else the
        running averages.

    Returns:
      out: [B, S, S, C_out] float32; for "aeu" channel 0 is the mean, 1 the
        log-variance.
      attention: [B, memory_slots] memory weights for "memae", else None.
    """
    h = x.astype(self.dtype)
    for conv, bn in zip(self.enc_convs, self.enc_bns, strict=True):
      h = jax.nn.relu(bn(conv(h), train=train))
    b = h.shape[0]
    h = h.transpose(0, 3, 1, 2).reshape(b, -1)  # PyTorch (C, H, W) flatten
    h = jax.nn.relu(self.enc_bn(self.enc_fc1(h), train=train))
    z = self.enc_fc2(h).astype(jnp.float32)  # (B, latent)
    attention = None
    if self.memory is not None:
      memory = self.memory[...]  # (slots, latent)
      attention = jax.nn.softmax(z @ memory.T, axis=-1)  # (B, slots)
      z = attention @ memory
    h = jax.nn.relu(self.dec_bn(self.dec_fc1(z), train=train))
    h = self.dec_fc2(h).reshape(b, self.c3, self.fm, self.fm)
    h = h.transpose(0, 2, 3, 1)  # (B, fm, fm, C3)
    for i, up in enumerate(self.dec_convs):
      h = up(h)
      if i < len(self.dec_bns):
        h = jax.nn.relu(self.dec_bns[i](h, train=train))
    return h.astype(jnp.float32), attention


def count_params(params) -> int:
  """Number of scalars in a parameter tree."""
  return sum(int(jnp.size(p)) for p in jax.tree.leaves(params))
