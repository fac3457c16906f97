"""D²4FAD's losses and anomaly maps (METHODS.md 2.3, 2.6): array functions.

Sources: the original's `main.py` (`loss_fucntion`, the total loss) and
`test.py` (`cal_anomaly_map`, the Gaussian smoothing, the max score),
ttttqz/D24FAD @42425f1. Features are NHWC, one array per scale, ordered
(d1, d2, d3) = 256@32x32, 512@16x16, 1024@8x8 at 128 px.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
TSD_WEIGHT = 0.1  # L = L_SSD + 0.1 L_TSD (main.py)
COSINE_EPS = 1e-8  # torch.nn.CosineSimilarity / F.cosine_similarity default


def cosine_similarity(a: Array, b: Array, *, axis, eps=COSINE_EPS) -> Array:
  """torch's cosine_similarity: sum((a / max(|a|, eps)) (b / max(|b|, eps))).

  Args:
    a, b: arrays of one shape.
    axis: the axis (or axes) of the vectors.
    eps: lower bound of each norm.

  Returns:
    a and b's shape without `axis`.
  """

  def unit(x):
    # rsqrt(max(|x|^2, eps^2)) is 1 / max(|x|, eps) without the infinite
    # derivative of sqrt at 0.
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))

  return jnp.sum(unit(a) * unit(b), axis=axis)


def flat_cosine_distance(a: Array, b: Array) -> Array:
  """1 - cos(vec(a_i), vec(b_i)) per sample, over all of H*W*C (not per
  pixel): [B, H, W, C] x 2 -> [B]."""
  n = a.shape[0]
  return 1.0 - cosine_similarity(a.reshape(n, -1), b.reshape(n, -1), axis=-1)


def distillation_loss(a: Sequence[Array], b: Sequence[Array]) -> Array:
  """main.py `loss_fucntion`: sum over scales of the batch-mean flattened
  cosine distance. Per scale, a and b are [B, H, W, C]; returns a scalar."""
  return sum(
    jnp.mean(flat_cosine_distance(x, y)) for x, y in zip(a, b, strict=True)
  )


def tsd_loss(teacher: Sequence[Array], query: Sequence[Array]) -> Array:
  """Teacher-student distillation on the query: sum_s mean_b cosd(f_s, d_s).

  The teacher is frozen: its features are `stop_gradient`-ed (the original
  lets gradients reach it but never steps it; the same maths, cheaper).

  Args:
    teacher: (f1, f2, f3), [B, H, W, C] each: the teacher's layer1..3.
    query: (d1, d2, d3) of the query, same shapes.

  Returns:
    A float32 scalar.
  """
  return distillation_loss(jax.lax.stop_gradient(tuple(teacher)), query)


def ssd_loss(query: Sequence[Array], weighted: Sequence[Array]) -> Array:
  """Student self-distillation: sum_s mean_b cosd(d_s(query), s^_s).

  Args:
    query: (d1, d2, d3) of the query, [B, H, W, C] each.
    weighted: the L2W-weighted support features, same shapes.

  Returns:
    A float32 scalar.
  """
  return distillation_loss(query, weighted)


def total_loss(ssd: Array, tsd: Array, tsd_weight=TSD_WEIGHT) -> Array:
  """L = L_SSD + 0.1 L_TSD (main.py: `loss = loss1 + 0.1 * loss2`)."""
  return ssd + tsd_weight * tsd


def channel_cosine_distance(a: Array, b: Array) -> Array:
  """1 - F.cosine_similarity(a, b) over channels: [B, H, W, C] -> [B, H, W]."""
  return 1.0 - cosine_similarity(a, b, axis=-1)


@functools.cache
def _align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] linear-interpolation weights, align_corners=True.

  Output i samples input position i (n_in - 1) / (n_out - 1), so the corner
  pixels of input and output coincide (torch's F.interpolate(...,
  align_corners=True); jax.image.resize uses half-pixel centres instead).
  """
  m = np.zeros((n_out, n_in), np.float64)
  scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
  for i in range(n_out):
    src = i * scale
    lo = min(int(np.floor(src)), n_in - 1)
    hi = min(lo + 1, n_in - 1)
    frac = src - lo
    m[i, lo] += 1.0 - frac
    m[i, hi] += frac
  return m.astype(np.float32)


def resize_align_corners(maps: Array, size: int) -> Array:
  """Bilinear upsampling with align_corners=True: [B, h, w] -> [B, S, S].

  Two small matmuls with interpolation matrices, at float32 precision
  (`HIGHEST`: the map sums three of these and is compared to 1e-4).
  """
  ay = jnp.asarray(_align_corners_matrix(maps.shape[1], size))
  ax = jnp.asarray(_align_corners_matrix(maps.shape[2], size))
  return jnp.einsum(
    "sh,bhw,tw->bst",
    ay,
    maps,
    ax,
    precision=jax.lax.Precision.HIGHEST,
  )


def anomaly_map(
  query: Sequence[Array], weighted: Sequence[Array], size: int
) -> Array:
  """test.py `cal_anomaly_map(..., amap_mode='a')`: the unsmoothed map.

  M = sum_s Up_S(1 - cos_c(d_s(query), s^_s)), cos over channels per pixel,
  Up bilinear with align_corners=True; the scales are summed.

  Args:
    query: (d1, d2, d3) of the queries, [B, H_s, W_s, C_s].
    weighted: the weighted support features, same shapes.
    size: the image side S (128).

  Returns:
    [B, S, S] float32.
  """
  return sum(
    resize_align_corners(channel_cosine_distance(q, w), size)
    for q, w in zip(query, weighted, strict=True)
  )


@functools.cache
def _gaussian_matrix(n: int, sigma: float, truncate: float) -> np.ndarray:
  """[n, n] matrix of scipy.ndimage.gaussian_filter1d on a length-n axis.

  scipy's defaults: radius int(truncate * sigma + 0.5) (16 taps each side,
  a 33-tap kernel, for sigma 4), weights exp(-x^2 / (2 sigma^2)) normalised
  to sum 1, and mode "reflect", which repeats the edge sample
  (d c b a | a b c d | d c b a; numpy's "symmetric", not cv2's default).
  """
  r = int(truncate * float(sigma) + 0.5)
  x = np.arange(-r, r + 1, dtype=np.float64)
  w = np.exp(-0.5 * np.square(x / sigma))
  w /= w.sum()
  m = np.zeros((n, n), np.float64)
  for i in range(n):
    for t, wt in zip(range(-r, r + 1), w, strict=True):
      j = (i + t) % (2 * n)  # reflect with period 2n, any radius
      m[i, j if j < n else 2 * n - 1 - j] += wt
  return m.astype(np.float32)


def gaussian_smooth(
  maps: Array, *, sigma: float = 4.0, truncate: float = 4.0
) -> Array:
  """A per-image 2-D Gaussian blur, as scipy's gaussian_filter(map, sigma).

  DEVIATION (METHODS.md 2.10, bug 1): the original calls
  `gaussian_filter(anomaly_map, sigma=4)` on the whole [B, H, W] batch
  array, which also blurs across the batch axis (radius 16 > batch 16), so
  an image's map depends on its batch neighbours. Here every image is
  blurred on its own (what the golden vectors hold too).

  Args:
    maps: [B, H, W] float32.
    sigma: the standard deviation in pixels.
    truncate: the kernel radius in sigmas (scipy's default 4).

  Returns:
    [B, H, W] float32.
  """
  gy = jnp.asarray(_gaussian_matrix(maps.shape[1], sigma, truncate))
  gx = jnp.asarray(_gaussian_matrix(maps.shape[2], sigma, truncate))
  return jnp.einsum(
    "ih,bhw,jw->bij",
    gy,
    maps,
    gx,
    precision=jax.lax.Precision.HIGHEST,
  )


def image_score(smoothed: Array) -> Array:
  """The image score: the max of the smoothed map, [B, H, W] -> [B].

  The original also min-max normalises the scores over the whole test set,
  which does not change the AUROC and is left to the evaluation.
  """
  return jnp.max(smoothed, axis=(1, 2))
