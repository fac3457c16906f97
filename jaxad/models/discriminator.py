"""Multi-AD's feature discriminator (METHODS.md 4.2, paper Fig. 3).

It tells the frozen teacher's last-stage features ("real") from the
student's ("fake"): four Conv3x3 -> BN -> LeakyReLU blocks at stride 1
(the map size is kept), dropout, flatten, one linear unit. The sigmoid of
Fig. 3 is left to the loss (`jaxad.methods.multiad.losses.bce_with_logits`),
which computes the same BCE in a numerically stable form.

Layers are PyTorch-initialised (`layers.conv`, `layers.linear`), the
flatten is in PyTorch's (C, H, W) order, and BN has PyTorch's statistics,
so a Med-AD-style PyTorch discriminator maps one to one.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxad.models import layers

Array = jax.Array


class Discriminator(nnx.Module):
  """Conv3x3-BN-LeakyReLU x len(channels) -> dropout -> flatten -> linear."""

  def __init__(
    self,
    in_channels: int,
    *,
    spatial: tuple[int, int],
    channels: tuple[int, ...] = (128, 256, 512, 1024),
    negative_slope: float = 0.2,
    dropout: float = 0.3,
    rngs: nnx.Rngs,
  ):
    """Builds the discriminator.

    Args:
      in_channels: channels of the features it reads (2048 for ResNet-50's
        layer4).
      spatial: (H, W) of those features (8x8 at 256x256 input); the linear
        layer reads channels[-1] * H * W values.
      channels: output channels of the conv blocks (Fig. 3: 128 to 1024).
      negative_slope: LeakyReLU slope ([INFERRED] 0.2).
      dropout: dropout rate before the linear layer ([INFERRED] 0.3).
      rngs: init keys.
    """
    convs, norms, c_in = [], [], in_channels
    for c in channels:
      convs.append(
        layers.conv(
          c_in, c, kernel=3, stride=1, padding=1, use_bias=True, rngs=rngs
        )
      )
      norms.append(layers.BatchNorm(c))
      c_in = c
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    self.fc = layers.linear(c_in * spatial[0] * spatial[1], 1, rngs=rngs)
    self.negative_slope = negative_slope
    self.dropout = dropout

  def __call__(
    self, x: Array, *, train: bool, key: Array | None = None
  ) -> Array:
    """Real-vs-fake logits.

    Args:
      x: [B, H, W, C_in] features.
      train: batch statistics and dropout if True, else the running
        averages and no dropout.
      key: PRNG key of the dropout mask (needed when train and dropout > 0).

    Returns:
      [B] logits; sigmoid(logit) is the probability of "real" (teacher).
    """
    for conv, norm in zip(self.convs, self.norms, strict=True):
      x = jax.nn.leaky_relu(norm(conv(x), train=train), self.negative_slope)
    if train and self.dropout > 0:
      if key is None:
        raise ValueError("Discriminator: dropout in training needs a key")
      keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0.0)
    # PyTorch's flatten order, (C, H, W).
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    return self.fc(x)[:, 0]
