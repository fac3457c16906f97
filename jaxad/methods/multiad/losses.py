"""Multi-AD's losses and anomaly maps (METHODS.md 4.3, 4.4): array functions.

Features are NHWC: [B, H, W, C], one array per level, layer1..layer4.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
FUSIONS = ("product", "sum")


def l2_normalize(f: Array, *, eps: float = 1e-12) -> Array:
  """f / max(||f||_2, eps) over channels, as torch's F.normalize(dim=1).

  Args:
    f: [..., C] features.

  Returns:
    [..., C]; the gradient stays finite where a pixel's features are all 0.
  """
  # sqrt(max(sum, eps^2)) has the value of max(sqrt(sum), eps), without the
  # infinite derivative of sqrt at 0.
  sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
  return f * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def distillation_loss(
  teacher: Sequence[Array], student: Sequence[Array]
) -> Array:
  """The 4-level normalised-feature distillation loss, per image.

  L_KD = sum_l 1 / (2 H_l W_l) sum_{b,h,w} ||T^_l - S^_l||^2, with ^ the
  channel-wise L2 normalisation (STPM's form; PyTorch's MSELoss(sum) sums
  over the batch too, so the caller sums these over b).

  Args:
    teacher: per level, [B, H_l, W_l, C_l] teacher features.
    student: the same shapes, student features.

  Returns:
    [B] per-image losses.
  """
  total = 0.0
  for t, s in zip(teacher, student, strict=True):
    d = jnp.square(l2_normalize(t) - l2_normalize(s))  # (B, H, W, C)
    total = total + jnp.sum(d, axis=(1, 2, 3)) / (2 * t.shape[1] * t.shape[2])
  return total


def bce_with_logits(logits: Array, target: float) -> Array:
  """Binary cross-entropy of sigmoid(logits) against a constant target.

  Equal to torch's BCELoss(sigmoid(z), target) (up to its clamp of log at
  -100), in the stable log-sigmoid form.

  Args:
    logits: [B] discriminator logits.
    target: 1.0 ("real", teacher) or 0.0 ("fake", student).

  Returns:
    [B] losses; the original takes their mean.
  """
  return -(
    target * jax.nn.log_sigmoid(logits)
    + (1.0 - target) * jax.nn.log_sigmoid(-logits)
  )


def cosine_distance(t: Array, s: Array) -> Array:
  """1 - cos(t, s) over channels: [B, H, W, C] x 2 -> [B, H, W]."""
  return 1.0 - jnp.sum(l2_normalize(t) * l2_normalize(s), axis=-1)


def check_fusion(fusion: str) -> None:
  if fusion not in FUSIONS:
    raise ValueError(
      f"config.score.fusion must be one of {FUSIONS}, got {fusion!r}"
    )


def fuse(level_maps: Sequence[Array], size: int, *, fusion: str) -> Array:
  """Upsamples per-level maps to size x size and fuses them.

  Bilinear with half-pixel centres, as torch's interpolate(bilinear,
  align_corners=False). Med-AD's `amap_mode`: "product" multiplies the
  maps ("mul", its default), "sum" adds them. The learned 1x1 conv / BN /
  ReLU of Fig. 5 has no labels to train on and is left out ([INFERRED]).

  Args:
    level_maps: [B, H_l, W_l] maps.
    size: output side S.
    fusion: "product" or "sum".

  Returns:
    [B, S, S].
  """
  check_fusion(fusion)
  out = None
  for m in level_maps:
    up = jax.image.resize(m, (m.shape[0], size, size), "bilinear")
    if out is None:
      out = up
    else:
      out = out * up if fusion == "product" else out + up
  return out


def gaussian_kernel(sigma: float, kernel_size: int = 0) -> list[float]:
  """Normalised 1-D Gaussian weights (host floats, static).

  Args:
    sigma: standard deviation in pixels.
    kernel_size: odd width; 0 = scipy's gaussian_filter default (truncate
      at 4 sigma): 5 for sigma 0.5 (Med-AD's cv2 5x5), 33 for sigma 4.

  Returns:
    kernel_size weights summing to 1.
  """
  if sigma <= 0:
    raise ValueError(f"config.score.sigma must be > 0, got {sigma}")
  if kernel_size == 0:
    kernel_size = 2 * int(4.0 * sigma + 0.5) + 1
  if kernel_size < 1 or kernel_size % 2 == 0:
    raise ValueError(
      f"config.score.kernel_size must be odd (or 0), got {kernel_size}"
    )
  r = kernel_size // 2
  w = [math.exp(-(i * i) / (2.0 * sigma * sigma)) for i in range(-r, r + 1)]
  return [v / sum(w) for v in w]


def gaussian_smooth(maps: Array, *, sigma: float, kernel_size: int = 0):
  """Separable Gaussian blur of every map, borders reflected (cv2 default).

  Args:
    maps: [B, H, W].
    sigma, kernel_size: see `gaussian_kernel`.

  Returns:
    [B, H, W].
  """
  w = gaussian_kernel(sigma, kernel_size)
  r = len(w) // 2
  # cv2's BORDER_REFLECT_101 (dcb|abcd|cba) is numpy's "reflect".
  x = jnp.pad(maps, ((0, 0), (r, r), (r, r)), mode="reflect")
  h, wd = maps.shape[1:]
  x = sum(w[i] * x[:, i : i + h, :] for i in range(len(w)))
  return sum(w[i] * x[:, :, i : i + wd] for i in range(len(w)))


def anomaly_map(
  teacher: Sequence[Array],
  student: Sequence[Array],
  size: int,
  *,
  fusion: str,
  sigma: float,
  kernel_size: int = 0,
) -> Array:
  """Fused, smoothed multi-scale cosine-distance map (METHODS.md 4.4).

  Args:
    teacher, student: per level, [B, H_l, W_l, C_l] features.
    size: image side S.
    fusion, sigma, kernel_size: see `fuse` and `gaussian_kernel`.

  Returns:
    [B, S, S] anomaly map; the image score is its maximum.
  """
  levels = [
    cosine_distance(t, s) for t, s in zip(teacher, student, strict=True)
  ]
  return gaussian_smooth(
    fuse(levels, size, fusion=fusion), sigma=sigma, kernel_size=kernel_size
  )
