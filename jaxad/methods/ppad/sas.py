"""PPAD's Structure-preserving Anomaly Synthesis (SAS), on the host (NumPy).

Source: PPAD `ppad_clip/datasets/mask_generate_anomaly.py`
(`generate_anomaly_mask`, `mask_generate`, `compute_sdf`, `gamma_correction`)
and `pseudo_zhang.py` (region masks, weights, probability); METHODS.md §3.5.
A random irregular blob is placed in a lung region and the image is
gamma-corrected inside it with a per-pixel gamma that grows from 1 on the
blob's rim to 1 + w at its centre, w ~ {-0.999, -0.99, 2, 3}: a monotone
per-pixel map, so the intensity ordering (structure) is kept.

Seeded with a `np.random.Generator`; the draw order is fixed (same seed, same
output) but differs from the original's global `np.random` / `random` calls.
Deviations from the original (each also said where it happens):
- Perlin noise is not computed: the original computes it and ignores it
  (METHODS §3.10 bug 6); its per-pixel Python loops are replaced by a
  vectorised scanline fill with matplotlib's `contains_point` convention.
- An empty blob (only a degenerate convex hull, all points collinear, which
  the original crashes on) leaves the image unchanged with an empty mask,
  instead of the original's gamma 0 everywhere, a white image (bug 7).
- skimage's `find_boundaries(mode="inner")` and cv2's `dilate` are
  reproduced with scipy.ndimage (same results); nothing here needs torch,
  cv2, skimage or matplotlib.
"""

import numpy as np
from scipy import ndimage, spatial

WEIGHTS = (-0.999, -0.99, 2.0, 3.0)  # w: negative brightens, positive darkens
POSITIONS = ("left lung", "right lung", "upper lung", "lower lung", "")
NUM_POINTS = 10  # random points whose convex hull seeds the blob
CONTROL_STD = 8.0  # std of the Bezier control points around an edge middle
BEZIER_SAMPLES = 100
_CROSS = ndimage.generate_binary_structure(2, 1)


def region_masks(size: int) -> np.ndarray:
  """The five position regions (left, right, upper, lower, whole).

  The original's 224-px masks (`pseudo_zhang.py`: columns 0-111 / 112-223,
  rows 0-119 / 120-223) scaled to `size` with Python `round`: left = columns
  [0, round(112 s/224)), upper = rows [0, round(120 s/224)). At 64: left
  columns 0-31, upper rows 0-33 (../shared/golden ppad_tiny_random). Image
  left / right, no radiological flip.

  Returns:
    [5, size, size] float32, 1 inside the region, 0 outside.
  """
  if size < 2:
    raise ValueError(f"size={size} must be >= 2")
  half, upper = round(112 * size / 224), round(120 * size / 224)
  masks = np.zeros((5, size, size), np.float32)
  masks[0, :, :half] = 1
  masks[1, :, half:] = 1
  masks[2, :upper] = 1
  masks[3, upper:] = 1
  masks[4] = 1
  return masks


def token_masks(masks: np.ndarray, patch: int) -> np.ndarray:
  """Per-patch-token masks: ceil(avg_pool_patch(mask)), flattened row-major.

  A token is in the region if any of its pixels is (upper and lower overlap
  in one token row unless the boundary falls on a patch edge).

  Args:
    masks: [R, S, S] region masks (0/1), S divisible by `patch`.

  Returns:
    [R, (S/patch)**2] float32 of 0/1.
  """
  masks = np.asarray(masks, np.float32)
  r, h, w = masks.shape
  if h % patch or w % patch:
    raise ValueError(f"mask size {h}x{w} is not divisible by patch={patch}")
  g_h, g_w = h // patch, w // patch
  pooled = masks.reshape(r, g_h, patch, g_w, patch).mean(axis=(2, 4))
  return np.ceil(pooled).reshape(r, g_h * g_w).astype(np.float32)


def _fill(polygons: np.ndarray, size: int) -> np.ndarray:
  """Union of implicitly closed polygons rasterised on a size x size grid.

  Exactly matplotlib's `Path(v).contains_points` (radius 0) at pixel (row i,
  column j) tested as point (x=j, y=i): the even-odd crossing test of
  `point_in_path_impl`, where an edge v0->v1 with y0 < y <= y1 counts for
  x <= X*, with y1 < y <= y0 for x < X* (X*: the edge at height y). Solved
  per row (scanline) instead of per pixel; exact for integer vertices.

  Args:
    polygons: [P, V, 2] float (x, y) vertices, V >= 3.

  Returns:
    [size, size] bool.
  """
  v0 = np.asarray(polygons, np.float64)
  v1 = np.roll(v0, -1, axis=1)  # edge k: v0[k] -> v0[k + 1], then closing
  x0, y0, x1, y1 = (
    a[..., None] for a in (v0[..., 0], v0[..., 1], v1[..., 0], v1[..., 1])
  )
  y = np.arange(size, dtype=np.float64)
  up = (y0 < y) & (y1 >= y)  # [P, V, size]
  down = (y1 < y) & (y0 >= y)
  with np.errstate(divide="ignore", invalid="ignore"):
    x_star = x1 + (y1 - y) * (x0 - x1) / (y1 - y0)
  # An edge crosses the +x ray of columns x <= last.
  last = np.where(up, np.floor(x_star), np.ceil(x_star) - 1)
  crosses = up | down
  first_not = np.clip(np.where(crosses, last + 1, 0), 0, size).astype(np.int64)
  p = v0.shape[0]
  rows = np.arange(p * size).reshape(p, 1, size)  # (polygon, row) index
  flat = (rows * (size + 1) + first_not).ravel()
  ends = np.bincount(
    flat, weights=crosses.ravel(), minlength=p * size * (size + 1)
  ).reshape(p, size, size + 1)
  count = crosses.sum(axis=1)[..., None] - np.cumsum(ends, axis=-1)[..., :size]
  return (count.astype(np.int64) & 1).astype(bool).any(axis=0)


def _blob_from(points: np.ndarray, rng: np.random.Generator, size: int):
  """`blob` for given (x, y) integer points; draws the Bezier controls.

  Returns [size, size] bool; all False when the hull is degenerate (the
  original raises `QhullError` there).
  """
  try:
    hull = spatial.ConvexHull(points)
  except spatial.QhullError:
    return np.zeros((size, size), bool)
  mask1 = _fill(hull.points[hull.vertices][None], size)
  p0 = points[hull.simplices[:, 0]].astype(np.float64)[:, None]  # [E, 1, 2]
  p1 = points[hull.simplices[:, 1]].astype(np.float64)[:, None]
  noise = rng.normal(0.0, CONTROL_STD, size=(len(hull.simplices), 2, 1, 2))
  c1, c2 = (p0 + p1) / 2 + noise[:, 0], (p0 + p1) / 2 + noise[:, 1]
  t = np.linspace(0, 1, BEZIER_SAMPLES)[:, None]  # as the original's np.outer
  curves = (
    (1 - t) ** 3 * p0
    + 3 * (1 - t) ** 2 * t * c1
    + 3 * (1 - t) * t**2 * c2
    + t**3 * p1
  )  # [E, 100, 2], each closed by its chord p1 -> p0
  mask2 = _fill(curves, size)
  return ndimage.binary_dilation(mask1 ^ mask2, structure=np.ones((5, 5)))


def blob(rng: np.random.Generator, pw: int, ph: int) -> np.ndarray:
  """The original's `mask_generate((pw, ph), 10)`: an irregular blob.

  10 integer points x ~ U{0..pw-1} (column), y ~ U{0..ph-1} (row); mask1 =
  their filled convex hull; each hull edge gets a cubic Bezier (control
  points (p0+p1)/2 + N(0, 8^2), 100 samples) whose polyline, closed by the
  chord, is filled; mask2 = union of those; blob = dilate_5x5(mask1 xor
  mask2). The Perlin field of the original is skipped (unused).

  Returns:
    [S, S] bool, S = max(pw, ph).
  """
  if pw < 1 or ph < 1:
    raise ValueError(f"blob size pw={pw}, ph={ph} must be >= 1")
  points = rng.integers(0, (pw, ph), size=(NUM_POINTS, 2))
  return _blob_from(points, rng, max(pw, ph))


def _window(center: tuple[int, int], size: int, dims: tuple[int, int]):
  """Top-left corner of the size x size paste window, as the original.

  Centred at `center` (start = c - size//2); shifted inside a border it
  spills over. Over the far border the original uses dims-1 as the end, so
  the window ends at dims-1 (the last row/column stays free); a window
  ending exactly at dims is kept.
  """
  corner = []
  for c, d in zip(center, dims, strict=True):
    lo = c - size // 2
    lo = max(lo, 0)
    if lo + size > d:
      lo = d - 1 - size
    if lo < 0:
      raise ValueError(f"blob size {size} does not fit in {dims}")
    corner.append(lo)
  return tuple(corner)


def gamma_map(mask: np.ndarray, weight: float) -> np.ndarray:
  """The original's `compute_sdf`: gamma = 1 + d / max(d) * weight.

  d is the Euclidean distance transform of `mask` (image borders are not
  background); gamma is 1 outside and on the inner boundary (foreground
  pixels with a 4-neighbour background; image borders count as foreground,
  as skimage's reflect mode). An empty mask gives gamma = 1 everywhere (the
  original returns 0s, a white image: METHODS §3.10 bug 7).

  Returns:
    [H, W] float64.
  """
  mask = np.asarray(mask, bool)
  if not mask.any():
    return np.ones(mask.shape)
  dist = ndimage.distance_transform_edt(mask)
  gamma = 1 + dist / dist.max() * weight
  inner = mask & ~ndimage.binary_erosion(mask, _CROSS, border_value=1)
  gamma[inner] = 1.0
  return gamma


def apply_gamma(image: np.ndarray, gamma: np.ndarray) -> np.ndarray:
  """clip(255 (x/255)^gamma, 0, 255) truncated to uint8, per pixel.

  As the original's torch maths: x/255 in float32, the power in float64.
  gamma = 1 maps every uint8 value to itself exactly.
  """
  x = (np.asarray(image, np.uint8).astype(np.float32) / np.float32(255)).astype(
    np.float64
  )
  return np.clip(x**gamma * 255, 0, 255).astype(np.uint8)


def synthesize(
  rng: np.random.Generator,
  image: np.ndarray,
  region_mask: np.ndarray,
  weight: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """SAS on one grayscale image (`generate_anomaly_mask`).

  Draws w ~ WEIGHTS (unless `weight` is given), the blob centre row ~
  U[top, bottom) and column ~ U[left, right) in the bounding box of the
  region (numpy `randint`, high exclusive, as the original), pw, ph ~
  U[round(0.2 W), round(0.8 W)) (45..178 at W = 224), then pastes
  blob(pw, ph) (see `_window`) and gamma-corrects inside it.

  Args:
    rng: the generator.
    image: [H, W] uint8 (the original's channel 0; its 3 channels are equal).
    region_mask: [h, w] 0/1 region; only its bounding box is used, so a 224
      mask on a 256 image reproduces the original's VinDr placement (bug 3).
    weight: a fixed w (tests); None draws it.

  Returns:
    (image', blob_mask): [H, W] uint8 and [H, W] bool.

  Raises:
    ValueError: image not 2-d uint8, or the region box is under 2 px high or
      wide (numpy's randint(top, bottom) needs bottom > top).
  """
  image = np.asarray(image)
  if image.ndim != 2 or image.dtype != np.uint8:
    raise ValueError(
      f"image must be [H, W] uint8, got {image.shape} {image.dtype}"
    )
  rows, cols = np.nonzero(np.asarray(region_mask) == 1)
  if rows.size == 0:
    raise ValueError("the region mask is empty")
  w = float(rng.choice(WEIGHTS)) if weight is None else float(weight)
  center = (
    int(rng.integers(rows.min(), rows.max())),
    int(rng.integers(cols.min(), cols.max())),
  )
  h_img, w_img = image.shape
  pw, ph = (
    int(v) for v in rng.integers(round(0.2 * w_img), round(0.8 * w_img), 2)
  )
  shape = blob(rng, pw, ph)
  size = shape.shape[0]
  r0, c0 = _window(center, size, (h_img, w_img))
  mask = np.zeros(image.shape, bool)
  mask[r0 : r0 + size, c0 : c0 + size] = shape
  if not mask.any():  # bug 7 guard: unchanged, not white
    return image.copy(), mask
  return apply_gamma(image, gamma_map(mask, w)), mask


def augment_batch(
  seed: int | np.random.Generator,
  images: np.ndarray,
  regions: np.ndarray,
  probability: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """PPAD's training augmentation: SAS in each image's region with prob. p.

  The original applies SAS when `random.random() >= prob` (prob=0.5), i.e.
  with probability 1 - prob; here `probability` is the chance of applying it
  (the same at 0.5). Draws: one uniform per image up front, then the SAS
  draws image by image.

  Args:
    seed: an int seed or a Generator (advanced in place).
    images: [N, H, W] uint8, H == W (the region masks are square).
    regions: [N] ints in [0, 5), indices into POSITIONS / `region_masks`.

  Returns:
    (images', labels, blob_masks): [N, H, W] uint8, [N] int32 (1 = synthetic
    abnormal, i.e. SAS applied with a non-empty blob), [N, H, W] bool.
  """
  rng = np.random.default_rng(seed)
  images = np.asarray(images)
  regions = np.asarray(regions)
  if images.ndim != 3 or images.shape[1] != images.shape[2]:
    raise ValueError(f"images must be [N, H, H], got {images.shape}")
  if regions.shape != images.shape[:1] or np.any(
    (regions < 0) | (regions >= 5)
  ):
    raise ValueError(f"regions must be [N] ints in [0, 5), got {regions}")
  masks = region_masks(images.shape[1])
  apply = rng.random(len(images)) < probability
  out, blobs = images.copy(), np.zeros(images.shape, bool)
  for i in np.flatnonzero(apply):
    out[i], blobs[i] = synthesize(rng, images[i], masks[regions[i]])
  labels = blobs.any(axis=(1, 2)).astype(np.int32)
  return out, labels, blobs
