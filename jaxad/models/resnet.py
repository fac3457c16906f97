"""ResNet / Wide-ResNet encoders in torchvision's exact layout (NHWC).

The module tree mirrors torchvision's `ResNet` (v1.5: the stride sits on the
3x3 conv of a bottleneck), so a torchvision state dict maps one to one
(`jaxad.weights.torchvision`): `conv1`, `bn1`, `layer1`..`layer4` (lists of
blocks with `conv1..3`, `bn1..3` and an optional `downsample` of `conv`, `bn`).
Padding is explicit and symmetric, as PyTorch's, never "SAME" (which pads
stride-2 layers asymmetrically), and the stem max-pool pads with -inf.

Beyond torchvision, for Multi-AD (METHODS.md section 4.2):
* `num_blocks`: blocks per stage (the golden tests use one per stage);
* `stages`: how many of layer1..layer4 to build (teachers tap layer1..3);
* `se`: squeeze-and-excitation in every block, either "pre_add" (SE-ResNet:
  after the last BN, before the residual add) or "post_add" (after the add
  and its ReLU); `se_stem` adds one on the max-pooled stem;
* `dilation`: a dilation per stage for all its 3x3 convs, stride kept
  (Multi-AD's Fig. 2); `replace_stride_with_dilation` is torchvision's
  option of the same name (the stride is traded for dilation).

Initialisation is torchvision's (kaiming-normal fan-out convs, BN weight 1 and
bias 0); SE linears use PyTorch's default.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxad.models import block_barrier, cpu_conv, layers

Array = jax.Array

# variant -> (block, blocks per stage, width_per_group); torchvision's table.
VARIANTS = {
  "resnet18": ("basic", (2, 2, 2, 2), 64),
  "resnet34": ("basic", (3, 4, 6, 3), 64),
  "resnet50": ("bottleneck", (3, 4, 6, 3), 64),
  "resnet101": ("bottleneck", (3, 4, 23, 3), 64),
  "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 128),
  "wide_resnet101_2": ("bottleneck", (3, 4, 23, 3), 128),
}
SE_MODES = ("none", "pre_add", "post_add")
FEATURES = ("stem", "layer1", "layer2", "layer3", "layer4")
_PLANES = (64, 128, 256, 512)
_EXPANSION = {"basic": 1, "bottleneck": 4}

# torch.nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu"): an
# untruncated normal with std sqrt(2 / (k * k * out_channels)).
_kaiming_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(
  in_ch: int,
  out_ch: int,
  *,
  kernel: int,
  stride: int = 1,
  dilation: int = 1,
  rngs: nnx.Rngs,
) -> nnx.Conv:
  """`torch.nn.Conv2d(bias=False, padding=dilation * (kernel - 1) // 2)`.

  On the CPU backend its weight gradient is computed as matmuls
  (`cpu_conv.auto`: the same convolution and parameters, README
  "Convolutions on CPU").
  """
  pad = dilation * (kernel - 1) // 2
  return nnx.Conv(
    in_ch,
    out_ch,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    kernel_dilation=(dilation, dilation),
    use_bias=False,
    kernel_init=_kaiming_fan_out,
    conv_general_dilated=cpu_conv.auto,
    rngs=rngs,
  )


def max_pool_3s2p1(x: Array) -> Array:
  """`torch.nn.MaxPool2d(3, stride=2, padding=1)` on [B, H, W, C].

  Torch pads with -inf, so a border window takes the max of its real pixels
  only (zero padding would clip negative activations to 0).
  """
  return jax.lax.reduce_window(
    x,
    -jnp.inf,
    jax.lax.max,
    (1, 3, 3, 1),
    (1, 2, 2, 1),
    ((0, 0), (1, 1), (1, 1), (0, 0)),
  )


class SqueezeExcite(nnx.Module):
  """SE (Hu et al.): GAP -> FC(C, C/r) -> ReLU -> FC(C/r, C) -> sigmoid."""

  def __init__(self, channels: int, *, reduction: int, rngs: nnx.Rngs):
    hidden = max(channels // reduction, 1)
    self.fc1 = layers.linear(channels, hidden, rngs=rngs)
    self.fc2 = layers.linear(hidden, channels, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    s = jnp.mean(x, axis=(1, 2))  # (B, C)
    s = jax.nn.sigmoid(self.fc2(jax.nn.relu(self.fc1(s))))
    return x * s[:, None, None, :]


class Downsample(nnx.Module):
  """The shortcut projection: 1x1 conv (strided) + BN."""

  def __init__(self, in_ch: int, out_ch: int, *, stride: int, rngs: nnx.Rngs):
    self.conv = _conv(in_ch, out_ch, kernel=1, stride=stride, rngs=rngs)
    self.bn = layers.BatchNorm(out_ch)

  def __call__(self, x: Array, *, train: bool) -> Array:
    return self.bn(self.conv(x), train=train)


class _Block(nnx.Module):
  """Shared tail of both blocks: SE placement, shortcut, add, ReLU."""

  def _finish(self, out: Array, x: Array, *, train: bool) -> Array:
    if self.se is not None and self.se_mode == "pre_add":
      out = self.se(out)
    shortcut = x if self.downsample is None else self.downsample(x, train=train)
    out = jax.nn.relu(out + shortcut)
    if self.se is not None and self.se_mode == "post_add":
      out = self.se(out)
    # Stored once, not re-computed by every consumer on CPU (block_barrier).
    return block_barrier.keep(out)

  def _init_tail(self, in_ch, out_ch, *, stride, se, se_reduction, rngs):
    self.se_mode = se
    self.se = (
      None
      if se == "none"
      else SqueezeExcite(out_ch, reduction=se_reduction, rngs=rngs)
    )
    self.downsample = (
      Downsample(in_ch, out_ch, stride=stride, rngs=rngs)
      if stride != 1 or in_ch != out_ch
      else None
    )


class BasicBlock(_Block):
  """torchvision's BasicBlock: 3x3 (strided) -> 3x3, expansion 1."""

  def __init__(
    self,
    in_ch: int,
    planes: int,
    *,
    stride: int,
    dilation: int,
    width_per_group: int,
    se: str,
    se_reduction: int,
    zero_init_residual: bool,
    rngs: nnx.Rngs,
  ):
    if dilation != 1 or width_per_group != 64:
      # As torchvision, which raises for both in BasicBlock.
      raise ValueError(
        "basic blocks (resnet18/34) support only dilation 1 and "
        f"width_per_group 64, got {dilation} and {width_per_group}"
      )
    self.conv1 = _conv(in_ch, planes, kernel=3, stride=stride, rngs=rngs)
    self.bn1 = layers.BatchNorm(planes)
    self.conv2 = _conv(planes, planes, kernel=3, rngs=rngs)
    self.bn2 = layers.BatchNorm(planes)
    if zero_init_residual:
      self.bn2.scale[...] = jnp.zeros_like(self.bn2.scale[...])
    self._init_tail(
      in_ch,
      planes,
      stride=stride,
      se=se,
      se_reduction=se_reduction,
      rngs=rngs,
    )

  def __call__(self, x: Array, *, train: bool) -> Array:
    out = jax.nn.relu(self.bn1(self.conv1(x), train=train))
    out = self.bn2(self.conv2(out), train=train)
    return self._finish(out, x, train=train)


class Bottleneck(_Block):
  """torchvision's Bottleneck (v1.5): 1x1 -> 3x3 (strided) -> 1x1 (x4)."""

  def __init__(
    self,
    in_ch: int,
    planes: int,
    *,
    stride: int,
    dilation: int,
    width_per_group: int,
    se: str,
    se_reduction: int,
    zero_init_residual: bool,
    rngs: nnx.Rngs,
  ):
    width = planes * width_per_group // 64
    out_ch = planes * _EXPANSION["bottleneck"]
    self.conv1 = _conv(in_ch, width, kernel=1, rngs=rngs)
    self.bn1 = layers.BatchNorm(width)
    self.conv2 = _conv(
      width, width, kernel=3, stride=stride, dilation=dilation, rngs=rngs
    )
    self.bn2 = layers.BatchNorm(width)
    self.conv3 = _conv(width, out_ch, kernel=1, rngs=rngs)
    self.bn3 = layers.BatchNorm(out_ch)
    if zero_init_residual:
      self.bn3.scale[...] = jnp.zeros_like(self.bn3.scale[...])
    self._init_tail(
      in_ch,
      out_ch,
      stride=stride,
      se=se,
      se_reduction=se_reduction,
      rngs=rngs,
    )

  def __call__(self, x: Array, *, train: bool) -> Array:
    out = jax.nn.relu(self.bn1(self.conv1(x), train=train))
    out = jax.nn.relu(self.bn2(self.conv2(out), train=train))
    out = self.bn3(self.conv3(out), train=train)
    return self._finish(out, x, train=train)


def stage_dilations(
  num_blocks: tuple[int, ...],
  *,
  dilation: tuple[int, ...] = (1, 1, 1, 1),
  replace_stride_with_dilation: tuple[bool, bool, bool] = (False,) * 3,
) -> list[list[tuple[int, int]]]:
  """(stride, dilation) of every block's 3x3 conv, stage by stage.

  torchvision's `_make_layer`: a stage whose stride is replaced multiplies
  the running dilation by 2, but its *first* block still uses the previous
  dilation. An explicit per-stage `dilation` instead keeps the strides and
  dilates every 3x3 conv of that stage.
  """
  out, running = [], 1
  for s, n in enumerate(num_blocks):
    stride, previous = (1 if s == 0 else 2), running
    if s > 0 and replace_stride_with_dilation[s - 1]:
      running, stride = running * stride, 1
    if dilation[s] != 1:
      out.append([(stride, dilation[s])] + [(1, dilation[s])] * (n - 1))
    else:
      out.append([(stride, previous)] + [(1, running)] * (n - 1))
  return out


class ResNet(nnx.Module):
  """A torchvision ResNet encoder without its classifier; NHWC features."""

  def __init__(
    self,
    variant: str = "resnet50",
    *,
    num_blocks: tuple[int, ...] | None = None,
    stages: int = 4,
    in_channels: int = 3,
    se: str = "none",
    se_reduction: int = 16,
    se_stem: bool = False,
    dilation: tuple[int, ...] = (1, 1, 1, 1),
    replace_stride_with_dilation: tuple[bool, bool, bool] = (False,) * 3,
    zero_init_residual: bool = False,
    rngs: nnx.Rngs,
  ):
    """Builds the encoder.

    Args:
      variant: a key of `VARIANTS` ("resnet50", "wide_resnet50_2", ...).
      num_blocks: blocks per stage, overriding the variant's (4 entries, or
        `stages` entries).
      stages: how many of layer1..layer4 to build (1 to 4).
      in_channels: input channels (3 for ImageNet checkpoints).
      se: squeeze-and-excitation placement in every block, one of
        `SE_MODES`.
      se_reduction: SE reduction ratio r (hidden width C // r).
      se_stem: an SE block on the max-pooled stem (64 channels).
      dilation: per-stage dilation of every 3x3 conv, strides kept.
      replace_stride_with_dilation: torchvision's flags for layer2..4.
      zero_init_residual: zero the last BN scale of every block.
      rngs: init keys.
    """
    if variant not in VARIANTS:
      raise ValueError(
        f"variant must be one of {list(VARIANTS)}, got {variant!r}"
      )
    if se not in SE_MODES:
      raise ValueError(f"se must be one of {SE_MODES}, got {se!r}")
    if not 1 <= stages <= 4:
      raise ValueError(f"stages must be 1 to 4, got {stages}")
    block, default_blocks, width_per_group = VARIANTS[variant]
    num_blocks = tuple(default_blocks if num_blocks is None else num_blocks)
    if len(num_blocks) not in (stages, 4) or min(num_blocks[:stages]) < 1:
      raise ValueError(
        f"num_blocks must give >= 1 block for each of the {stages} stages "
        f"(or all 4), got {num_blocks}"
      )
    dilation, replace = tuple(dilation), tuple(replace_stride_with_dilation)
    if len(dilation) != 4 or len(replace) != 3:
      raise ValueError(
        "dilation needs 4 entries and replace_stride_with_dilation 3, got "
        f"{dilation} and {replace}"
      )
    if any(d != 1 for d in dilation) and any(replace):
      raise ValueError(
        "use either dilation (strides kept) or replace_stride_with_dilation "
        "(torchvision), not both"
      )
    if block == "basic" and (any(d != 1 for d in dilation) or any(replace)):
      # As torchvision, whose BasicBlock raises for dilation > 1.
      raise ValueError(f"basic blocks ({variant}) support only dilation 1")
    self.variant = variant
    self.stages = stages
    self.conv1 = _conv(in_channels, 64, kernel=7, stride=2, rngs=rngs)
    self.bn1 = layers.BatchNorm(64)
    self.se_stem = (
      SqueezeExcite(64, reduction=se_reduction, rngs=rngs) if se_stem else None
    )
    block_cls = BasicBlock if block == "basic" else Bottleneck
    plan = stage_dilations(
      num_blocks[:stages],
      dilation=dilation,
      replace_stride_with_dilation=replace,
    )
    in_ch, channels = 64, [64]
    for s, blocks in enumerate(plan):
      stage = []
      for stride, d in blocks:
        stage.append(
          block_cls(
            in_ch,
            _PLANES[s],
            stride=stride,
            dilation=d,
            width_per_group=width_per_group,
            se=se,
            se_reduction=se_reduction,
            zero_init_residual=zero_init_residual,
            rngs=rngs,
          )
        )
        in_ch = _PLANES[s] * _EXPANSION[block]
      setattr(self, f"layer{s + 1}", nnx.List(stage))
      channels.append(in_ch)
    self.channels = tuple(channels)  # per entry of `FEATURES`

  def __call__(self, x: Array, *, train: bool) -> dict[str, Array]:
    """Encodes a batch.

    Args:
      x: [B, H, W, C_in] normalised images.
      train: batch statistics (and running-average updates) if True, else
        the running averages.

    Returns:
      "stem": [B, H/4, W/4, 64] after the max-pool (and stem SE), and
      "layer1".."layer{stages}": [B, H/s, W/s, C] with s = 4, 8, 16, 32
      (less where strides are replaced by dilation) and C from
      `self.channels`.
    """
    h = jax.nn.relu(self.bn1(self.conv1(x), train=train))
    h = max_pool_3s2p1(h)
    if self.se_stem is not None:
      h = self.se_stem(h)
    feats = {"stem": h}
    for s in range(1, self.stages + 1):
      for block in getattr(self, f"layer{s}"):
        h = block(h, train=train)
      feats[f"layer{s}"] = h
    return feats


Model = ResNet
