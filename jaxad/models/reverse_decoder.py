"""The "reverse" ResNet decoder of RD4AD / D²4FAD (de-WRN-50-2), NHWC.

Source: the original D²4FAD code, `de_resnet.py` (RD4AD's, ttttqz/D24FAD
@42425f1), METHODS.md section 2.2. It mirrors stages 1-3 of a
(Wide-)ResNet-50 run backwards: each stage doubles the resolution and halves
the channels, and returns the three stage outputs aligned with the teacher's
layer1..layer3 features.

For a [B, 4, 4, 2048] input (the teacher's layer4 at 128 px), the de-WRN-50-2
gives d3 = layer1 [B, 8, 8, 1024], d2 = layer2 [B, 16, 16, 512] and
d1 = layer3 [B, 32, 32, 256], returned as (d1, d2, d3).

The module tree follows the original's names, so its state dict maps one to
one (`jaxad.weights.d24fad`): `layer1`..`layer3` (lists of blocks); block 0
of every stage is an `UpBottleneck` (`conv1`, `bn1`, `conv2` = the 2x2
stride-2 transposed conv, `bn2`, `conv3`, `bn3`, and the shortcut
`upsample` = (`deconv`, `bn`), torch's `upsample.0` / `upsample.1`); the
other blocks are torchvision bottlenecks (`jaxad.models.resnet.Bottleneck`).

Initialisation is the original's: kaiming-normal fan-out for the (1x1, 3x3)
convolutions, BN weight 1 and bias 0, and PyTorch's default for the
transposed convolutions (its init loop matches `nn.Conv2d`, which
`nn.ConvTranspose2d` is not).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxad.models import block_barrier, layers, resnet

Array = jax.Array

_PLANES = (256, 128, 64)  # the original's _make_layer planes, stage by stage
_EXPANSION = 4


class ConvTranspose2x2(nnx.Module):
  """`torch.nn.ConvTranspose2d(in, out, kernel_size=2, stride=2, bias=False)`.

  With kernel 2 and stride 2 the output windows do not overlap:
  y[2m + a, 2n + b, o] = sum_i x[m, n, i] w[i, o, a, b]. So the op is one
  matmul to 4 * out channels followed by a depth-to-space, exact and fast in
  both directions on every backend.

  Parameters: `kernel` [2, 2, in, out], `kernel[a, b, i, o] =
  torch_weight[i, o, a, b]` (PyTorch stores [in, out, kH, kW]).
  """

  def __init__(self, in_ch: int, out_ch: int, *, rngs: nnx.Rngs):
    # PyTorch's default init; a transposed conv's fan_in is computed from
    # weight dim 1 (= out) times the kernel area.
    init = layers.torch_uniform(out_ch * 4)
    self.kernel = nnx.Param(init(rngs.params(), (2, 2, in_ch, out_ch)))

  def __call__(self, x: Array) -> Array:
    """[B, H, W, in] -> [B, 2H, 2W, out]."""
    b, h, w, _ = x.shape
    y = jnp.einsum("bhwi,pqio->bhpwqo", x, self.kernel[...])
    return y.reshape(b, 2 * h, 2 * w, self.kernel.shape[-1])


class Upsample(nnx.Module):
  """The shortcut of an up-bottleneck: 2x2 stride-2 transposed conv + BN."""

  def __init__(self, in_ch: int, out_ch: int, *, rngs: nnx.Rngs):
    self.deconv = ConvTranspose2x2(in_ch, out_ch, rngs=rngs)
    self.bn = layers.BatchNorm(out_ch)

  def __call__(self, x: Array, *, train: bool) -> Array:
    return self.bn(self.deconv(x), train=train)


class UpBottleneck(nnx.Module):
  """de_resnet.py `Bottleneck` with stride 2 (the first block of a stage).

  conv1x1(in -> w); BN; ReLU; ConvTranspose 2x2/2 (w -> w); BN; ReLU;
  conv1x1(w -> 4 planes); BN; + upsample(x); ReLU. w = planes *
  width_per_group / 64.
  """

  def __init__(
    self, in_ch: int, planes: int, *, width_per_group: int, rngs: nnx.Rngs
  ):
    width = planes * width_per_group // 64
    out_ch = planes * _EXPANSION
    # resnet._conv: torchvision's bias-free conv, kaiming-normal fan-out.
    self.conv1 = resnet._conv(in_ch, width, kernel=1, rngs=rngs)
    self.bn1 = layers.BatchNorm(width)
    self.conv2 = ConvTranspose2x2(width, width, rngs=rngs)
    self.bn2 = layers.BatchNorm(width)
    self.conv3 = resnet._conv(width, out_ch, kernel=1, rngs=rngs)
    self.bn3 = layers.BatchNorm(out_ch)
    self.upsample = Upsample(in_ch, out_ch, rngs=rngs)

  def __call__(self, x: Array, *, train: bool) -> Array:
    """[B, H, W, in] -> [B, 2H, 2W, 4 planes]."""
    out = jax.nn.relu(self.bn1(self.conv1(x), train=train))
    out = jax.nn.relu(self.bn2(self.conv2(out), train=train))
    out = self.bn3(self.conv3(out), train=train)
    return block_barrier.keep(jax.nn.relu(out + self.upsample(x, train=train)))


class ReverseDecoder(nnx.Module):
  """de_resnet.py `ResNet(Bottleneck, num_blocks, width_per_group)`.

  The defaults build `de_wide_resnet50_2` (3, 4, 6 blocks, width 128 per
  group; 24.9 M parameters); `width_per_group=64` is `de_resnet50`. The
  golden tests use one block per stage.
  """

  def __init__(
    self,
    *,
    num_blocks: tuple[int, int, int] = (3, 4, 6),
    width_per_group: int = 128,
    in_channels: int = 2048,
    rngs: nnx.Rngs,
  ):
    """Builds the decoder.

    Args:
      num_blocks: blocks in stages 1..3 (each >= 1; block 0 upsamples).
      width_per_group: 128 for the Wide-ResNet mirror, 64 for ResNet-50.
      in_channels: channels of the input (the teacher's layer4).
      rngs: init keys.
    """
    num_blocks = tuple(num_blocks)
    if len(num_blocks) != 3 or min(num_blocks) < 1:
      raise ValueError(
        f"num_blocks must give >= 1 block for each of 3 stages, got "
        f"{num_blocks}"
      )
    self.num_blocks = num_blocks
    in_ch, channels = in_channels, []
    for s, (planes, n) in enumerate(zip(_PLANES, num_blocks, strict=True)):
      out_ch = planes * _EXPANSION
      stage = [
        UpBottleneck(in_ch, planes, width_per_group=width_per_group, rngs=rngs)
      ]
      for _ in range(1, n):
        stage.append(
          resnet.Bottleneck(
            out_ch,
            planes,
            stride=1,
            dilation=1,
            width_per_group=width_per_group,
            se="none",
            se_reduction=16,
            zero_init_residual=False,
            rngs=rngs,
          )
        )
      setattr(self, f"layer{s + 1}", nnx.List(stage))
      in_ch = out_ch
      channels.append(out_ch)
    # Channels of (d1, d2, d3), the order of the outputs.
    self.channels = tuple(reversed(channels))

  def __call__(self, x: Array, *, train: bool) -> tuple[Array, Array, Array]:
    """Decodes the teacher's deepest feature.

    Args:
      x: [B, h, w, in_channels] (float32; the teacher's layer4 e4).
      train: batch statistics (and running-average updates) if True, else
        the running averages.

    Returns:
      (d1 [B, 8h, 8w, 256], d2 [B, 4h, 4w, 512], d3 [B, 2h, 2w, 1024]) for
      the WRN-50-2 widths: the outputs of layer3, layer2, layer1, aligned
      with the teacher's (f1, f2, f3), as the original's forward returns
      [feature_c, feature_b, feature_a].
    """
    feats = []
    for s in (1, 2, 3):
      for block in getattr(self, f"layer{s}"):
        x = block(x, train=train)
      feats.append(x)
    return feats[2], feats[1], feats[0]


Model = ReverseDecoder
