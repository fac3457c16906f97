"""DDAD's ASR-Net: refines discrepancy maps into anomaly probabilities.

METHODS.md 1.8: fully convolutional, 3x3 convs with bias, stride 1, pad 1:
Conv(C_in->128), BN, ReLU, Conv(128->128), BN, ReLU, Conv(128->2) logits.
Channel 1 of the softmax is "anomalous". About 0.15 M parameters.
`dtype` is the compute dtype; parameters, BatchNorm and logits are float32.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxad.models import layers

Array = jax.Array


class ASRNet(nnx.Module):
  """[B, H, W, C_in] maps -> [B, H, W, 2] logits (NHWC)."""

  def __init__(
    self,
    *,
    in_channels: int = 2,
    width: int = 128,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    conv = lambda i, o: layers.conv(
      i,
      o,
      kernel=3,
      stride=1,
      padding=1,
      use_bias=True,
      rngs=rngs,
      dtype=dtype,
    )
    self.dtype = dtype
    self.conv1 = conv(in_channels, width)
    self.bn1 = layers.BatchNorm(width)
    self.conv2 = conv(width, width)
    self.bn2 = layers.BatchNorm(width)
    self.conv3 = conv(width, 2)

  def __call__(self, maps: Array, *, train: bool) -> Array:
    h = maps.astype(self.dtype)
    h = jax.nn.relu(self.bn1(self.conv1(h), train=train))
    h = jax.nn.relu(self.bn2(self.conv2(h), train=train))
    return self.conv3(h).astype(jnp.float32)
