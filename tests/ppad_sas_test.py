"""Tests of PPAD's SAS (jaxad/methods/ppad/sas.py, METHODS.md §3.5).

Region / token masks against the golden file (../shared/golden, README
"PPAD"; skipped with a reason when absent) and the 224-px table; the
rasteriser and the blob against a matplotlib re-implementation of the
original's `mask_generate`; the synthesis properties (structure preserving,
seeded, size and placement, rate, empty-blob guard).
"""

import unittest

import numpy as np
from absl.testing import absltest
from data_test import SHARED
from scipy import ndimage, spatial

from jaxad import weights
from jaxad.methods.ppad import sas

GOLDEN_IO = SHARED / "golden" / "ppad_tiny_random.io.safetensors"


def mpl_path():
  try:
    from matplotlib.path import Path
  except ImportError as e:  # matplotlib is a test extra
    raise unittest.SkipTest(f"matplotlib absent: {e}") from e
  return Path


def mpl_fill(path_cls, polygon, size):
  """The original's raster: Path(v).contains_points at (x=col, y=row)."""
  x, y = np.meshgrid(np.arange(size), np.arange(size))
  points = np.vstack((x.ravel(), y.ravel())).T
  return path_cls(polygon).contains_points(points).reshape(size, size)


def mpl_blob(rng, pw, ph):
  """`mask_generate` with matplotlib, drawing as `sas.blob` does."""
  path_cls, size = mpl_path(), max(pw, ph)
  pts = rng.integers(0, (pw, ph), size=(10, 2))
  hull = spatial.ConvexHull(pts)
  mask1 = mpl_fill(path_cls, hull.points[hull.vertices], size)
  mask2 = np.zeros((size, size), bool)
  noise = rng.normal(0, 8, size=(len(hull.simplices), 2, 1, 2))
  t = np.linspace(0, 1, 100)
  for e, (i, j) in enumerate(hull.simplices):
    p0, p1 = pts[i], pts[j]
    c1, c2 = (p0 + p1) / 2 + noise[e, 0, 0], (p0 + p1) / 2 + noise[e, 1, 0]
    line = (
      np.outer((1 - t) ** 3, p0)
      + np.outer(3 * (1 - t) ** 2 * t, c1)
      + np.outer(3 * (1 - t) * t**2, c2)
      + np.outer(t**3, p1)
    )
    mask2 |= mpl_fill(path_cls, line, size)
  return ndimage.binary_dilation(mask1 ^ mask2, np.ones((5, 5)))


class MasksTest(absltest.TestCase):
  def test_golden_64(self):
    if not GOLDEN_IO.is_file():
      raise unittest.SkipTest(
        f"{GOLDEN_IO} absent (shared data sits beside the checkout)"
      )
    golden = weights.read_safetensors(GOLDEN_IO)
    masks = sas.region_masks(64)
    self.assertEqual(masks.dtype, np.float32)
    np.testing.assert_array_equal(masks, golden["region_masks"])
    np.testing.assert_array_equal(
      sas.token_masks(masks, 16), golden["token_masks"]
    )

  def test_table_224(self):
    masks = sas.region_masks(224)
    self.assertEqual(masks.shape, (5, 224, 224))
    expect = np.zeros((5, 224, 224), np.float32)
    expect[0, :, 0:112] = 1
    expect[1, :, 112:] = 1
    expect[2, 0:120] = 1
    expect[3, 120:] = 1
    expect[4] = 1
    np.testing.assert_array_equal(masks, expect)
    tokens = sas.token_masks(masks, 32).reshape(5, 7, 7)
    # Upper and lower overlap in patch row 3 (pixels 96-127).
    np.testing.assert_array_equal(tokens[2].any(1), np.arange(7) <= 3)
    np.testing.assert_array_equal(tokens[3].any(1), np.arange(7) >= 3)
    np.testing.assert_array_equal(tokens[0][0], np.arange(7) <= 3)
    self.assertEqual(tokens[4].sum(), 49)
    with self.assertRaises(ValueError):
      sas.token_masks(masks, 30)


class BlobTest(absltest.TestCase):
  def test_fill_matches_matplotlib(self):
    path_cls, rng = mpl_path(), np.random.default_rng(0)
    for _ in range(60):
      size = int(rng.integers(5, 40))
      polygons = [
        rng.integers(-3, size + 3, size=(int(rng.integers(3, 9)), 2)),
        rng.normal(size / 2, size / 3, size=(40, 2)),
      ]
      for poly in polygons:
        np.testing.assert_array_equal(
          sas._fill(poly[None], size), mpl_fill(path_cls, poly, size)
        )

  def test_blob_matches_original_shape(self):
    for seed in range(6):
      pw, ph = (int(v) for v in np.random.default_rng(seed).integers(12, 60, 2))
      ours = sas.blob(np.random.default_rng(seed), pw, ph)
      np.testing.assert_array_equal(
        ours, mpl_blob(np.random.default_rng(seed), pw, ph)
      )
      self.assertEqual(ours.shape, (max(pw, ph),) * 2)
      self.assertEqual(ours.dtype, bool)
      self.assertTrue(ours.any())

  def test_degenerate_hull_is_empty(self):
    points = np.stack([np.arange(10), np.arange(10)], axis=1)  # collinear
    out = sas._blob_from(points, np.random.default_rng(0), 12)
    self.assertFalse(out.any())
    self.assertEqual(out.shape, (12, 12))


class SynthesizeTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.masks = sas.region_masks(64)
    self.image = np.random.default_rng(9).integers(0, 256, (64, 64), np.uint8)

  def test_structure_preserving(self):
    flat = np.full((64, 64), 120, np.uint8)
    for w, sign in ((-0.99, 1), (-0.999, 1), (2.0, -1), (3.0, -1)):
      out, mask = sas.synthesize(
        np.random.default_rng(3), flat, self.masks[4], w
      )
      self.assertTrue(mask.any())
      np.testing.assert_array_equal(out[~mask], 120)  # outside unchanged
      delta = out[mask].astype(int) - 120
      self.assertTrue(np.all(sign * delta >= 0), w)  # w<0 brightens
      self.assertGreater(np.max(sign * delta), 30, w)
    # Same draws (they do not depend on the image): the per-pixel map is
    # monotone, so a brighter image stays brighter everywhere.
    darker = self.image // 2
    for seed in range(5):
      a, ma = sas.synthesize(np.random.default_rng(seed), darker, self.masks[0])
      b, mb = sas.synthesize(
        np.random.default_rng(seed), self.image, self.masks[0]
      )
      np.testing.assert_array_equal(ma, mb)
      self.assertTrue(np.all(a <= b))

  def test_gamma_is_one_outside_and_on_rim(self):
    mask = np.zeros((20, 20), bool)
    mask[0:9, 3:12] = True  # touches the top border
    gamma = sas.gamma_map(mask, 3.0)
    np.testing.assert_array_equal(gamma[~mask], 1.0)
    self.assertEqual(gamma[4, 7], 4.0)  # the farthest pixel: 1 + w
    np.testing.assert_array_equal(gamma[8, 3:12], 1.0)  # bottom rim
    self.assertGreater(gamma[0, 7], 1.0)  # image border: not a rim
    np.testing.assert_array_equal(
      sas.apply_gamma(np.arange(256, dtype=np.uint8), np.ones(256)),
      np.arange(256),
    )

  def test_deterministic_by_seed(self):
    a = sas.synthesize(np.random.default_rng(7), self.image, self.masks[2])
    b = sas.synthesize(np.random.default_rng(7), self.image, self.masks[2])
    c = sas.synthesize(np.random.default_rng(8), self.image, self.masks[2])
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    self.assertFalse(np.array_equal(a[1], c[1]))

  def test_size_and_placement(self):
    rng = np.random.default_rng(0)
    for i in range(40):
      _, mask = sas.synthesize(rng, self.image, self.masks[i % 5])
      rows, cols = np.nonzero(mask)
      # S = max(pw, ph) in [round(0.2 W), round(0.8 W)) = [13, 51).
      self.assertLessEqual(rows.max() - rows.min() + 1, 50)
      self.assertLessEqual(cols.max() - cols.min() + 1, 50)
      self.assertGreaterEqual(max(np.ptp(rows), np.ptp(cols)) + 1, 5)
    for center in ((0, 0), (63, 63), (32, 5), (60, 1)):
      for size in (13, 50):
        r0, c0 = sas._window(center, size, (64, 64))
        self.assertTrue(0 <= r0 and r0 + size <= 64, (center, size))
        self.assertTrue(0 <= c0 and c0 + size <= 64, (center, size))
    self.assertEqual(sas._window((63, 0), 50, (64, 64)), (13, 0))  # dims-1
    self.assertEqual(sas._window((39, 32), 50, (64, 64)), (14, 7))  # ends at 64

  def test_blob_window_centre_lies_in_the_named_region(self):
    # The centre is drawn in the region's box; a blob spilling over a
    # border is shifted inside, which at 224 px (S < 179) never moves its
    # window's centre out of the region: each half is 112 px or more.
    masks = sas.region_masks(224)
    rng = np.random.default_rng(0)
    for r, mask in enumerate(masks):
      rows, cols = np.nonzero(mask)
      for _ in range(200):
        center = (
          int(rng.integers(rows.min(), rows.max())),
          int(rng.integers(cols.min(), cols.max())),
        )
        size = int(rng.integers(45, 179))
        r0, c0 = sas._window(center, size, (224, 224))
        mid = (r0 + size // 2, c0 + size // 2)
        self.assertEqual(mask[mid], 1, (sas.POSITIONS[r], center, size))

  def test_empty_blob_guard(self):
    empty = np.zeros((64, 64), bool)
    np.testing.assert_array_equal(sas.gamma_map(empty, -0.999), 1.0)
    out = sas.apply_gamma(self.image, sas.gamma_map(empty, -0.999))
    np.testing.assert_array_equal(out, self.image)  # not white

  def test_bad_inputs(self):
    with self.assertRaises(ValueError):
      sas.synthesize(
        np.random.default_rng(0), self.image.astype(float), self.masks[0]
      )
    with self.assertRaises(ValueError):
      sas.synthesize(np.random.default_rng(0), self.image, np.zeros((64, 64)))


class AugmentBatchTest(absltest.TestCase):
  def test_rate_and_determinism(self):
    rng = np.random.default_rng(1)
    images = rng.integers(20, 236, (300, 32, 32), np.uint8)
    regions = rng.integers(0, 5, 300)
    out, labels, blobs = sas.augment_batch(5, images, regions, probability=0.5)
    self.assertEqual(labels.dtype, np.int32)
    self.assertEqual((out.dtype, out.shape), (np.uint8, images.shape))
    self.assertAlmostEqual(labels.mean(), 0.5, delta=0.1)
    np.testing.assert_array_equal(labels, blobs.any(axis=(1, 2)))
    np.testing.assert_array_equal(out[labels == 0], images[labels == 0])
    changed = (out != images).any(axis=(1, 2))
    self.assertGreater(changed[labels == 1].mean(), 0.9)
    again = sas.augment_batch(np.random.default_rng(5), images, regions)
    np.testing.assert_array_equal(out, again[0])
    np.testing.assert_array_equal(labels, again[1])
    _, low, _ = sas.augment_batch(5, images, regions, probability=0.1)
    self.assertAlmostEqual(low.mean(), 0.1, delta=0.06)

  def test_bad_regions(self):
    with self.assertRaises(ValueError):
      sas.augment_batch(0, np.zeros((2, 32, 32), np.uint8), np.array([0, 5]))


if __name__ == "__main__":
  absltest.main()
