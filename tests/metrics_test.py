"""Tests of jaxad.metrics against hand-computed cases and slow references."""

import numpy as np
from absl.testing import absltest, parameterized
from scipy import ndimage
from sklearn import metrics as skm

from jaxad import metrics


class ImageMetricsTest(absltest.TestCase):
  def test_perfect_and_inverted_ranking(self):
    labels = np.array([0, 0, 1, 1])
    self.assertEqual(
      metrics.image_metrics(np.array([0.1, 0.2, 0.8, 0.9]), labels),
      {"auroc": 1.0, "ap": 1.0},
    )
    self.assertEqual(
      metrics.image_metrics(np.array([0.9, 0.8, 0.2, 0.1]), labels)["auroc"],
      0.0,
    )

  def test_hand_computed_case(self):
    # Pairs (abnormal, normal): (0.4 > 0.1) yes, (0.4 > 0.5) no,
    # (0.8 > both) yes yes -> AUROC 3/4. Ranked: 0.8(1) 0.5(0) 0.4(1) 0.1(0):
    # AP = (1/1 + 2/3) / 2.
    out = metrics.image_metrics(
      np.array([0.1, 0.5, 0.4, 0.8]), np.array([0, 0, 1, 1])
    )
    self.assertAlmostEqual(out["auroc"], 0.75)
    self.assertAlmostEqual(out["ap"], (1 + 2 / 3) / 2)

  def test_ties_count_half(self):
    out = metrics.image_metrics(np.array([0.5, 0.5]), np.array([0, 1]))
    self.assertAlmostEqual(out["auroc"], 0.5)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "both normal"):
      metrics.image_metrics(np.array([0.1, 0.2]), np.array([1, 1]))
    with self.assertRaisesRegex(ValueError, "not finite"):
      metrics.image_metrics(np.array([np.nan, 0.2]), np.array([0, 1]))
    with self.assertRaisesRegex(ValueError, "matching"):
      metrics.image_metrics(np.array([0.1, 0.2, 0.3]), np.array([0, 1]))


def row(*values):
  """A [1, 1, W] stack: one image of one pixel row."""
  return np.array(values, np.float64)[None, None, :]


def brute_force_aupro(maps, masks, max_fpr):
  """AUPRO by definition: a loop over thresholds, images and regions."""
  regions = []  # (image, boolean region) per 8-connected component
  for i, mask in enumerate(masks):
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    regions += [(i, labels == r) for r in range(1, n + 1)]
  normal = masks == 0
  points = [(0.0, 0.0)]
  for t in np.unique(maps)[::-1]:  # thresholds, high to low
    predicted = maps >= t
    fpr = predicted[normal].mean()
    pro = np.mean([predicted[i][r].mean() for i, r in regions])
    points.append((fpr, pro))
  area = 0.0
  for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
    if x0 >= max_fpr:
      break
    if x1 > max_fpr:  # cut the segment at max_fpr
      y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
      x1 = max_fpr
    area += (x1 - x0) * (y0 + y1) / 2
  return area / max_fpr


class DecisionMetricsTest(absltest.TestCase):
  def test_hand_computed_case(self):
    # Abnormal when strictly above 0.5: decisions 0, 1, 0, 1, 1.
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.6])
    labels = np.array([0, 0, 1, 1, 1])
    got = metrics.decision_metrics(scores, labels, 0.5)
    self.assertEqual(got["decision_threshold"], 0.5)
    self.assertAlmostEqual(got["accuracy"], 3 / 5)
    self.assertAlmostEqual(got["sensitivity"], 2 / 3)
    self.assertAlmostEqual(got["specificity"], 1 / 2)
    # precision 2/3, recall 2/3
    self.assertAlmostEqual(got["f1"], 2 / 3)

  def test_one_class_gives_nan_recall(self):
    got = metrics.decision_metrics(np.array([0.2, 0.8]), np.array([0, 0]), 0.5)
    self.assertTrue(np.isnan(got["sensitivity"]))
    self.assertEqual(got["specificity"], 0.5)

  def test_shape_mismatch(self):
    with self.assertRaisesRegex(ValueError, "matching"):
      metrics.decision_metrics(np.zeros(3), np.zeros(2), 0.5)


class PixelMetricsTest(parameterized.TestCase):
  def test_one_region(self):
    # Region = pixels 0, 1 (scores 0.9, 0.3); normals 0.5, 0.2, 0.1.
    # Curve (FPR, PRO): (0, 0) (0, 1/2) (1/3, 1/2) (1/3, 1) (2/3, 1) (1, 1).
    maps, masks = row(0.9, 0.3, 0.5, 0.2, 0.1), row(1, 1, 0, 0, 0)
    self.assertAlmostEqual(metrics.aupro(maps, masks), 0.5)
    # Up to 0.5: 1/2 * 1/3 + 1 * (1/2 - 1/3) = 1/3, divided by 0.5.
    self.assertAlmostEqual(metrics.aupro(maps, masks, max_fpr=0.5), 2 / 3)
    # Pairs (anomalous > normal): 0.9 beats 3, 0.3 beats 2 -> 5/6.
    self.assertAlmostEqual(metrics.pixel_auroc(maps, masks), 5 / 6)

  def test_interpolates_at_max_fpr(self):
    # Region scores 0.9, 0.5; normals 0.5, 0.1, 0.1. Curve: (0, 0)
    # (0, 1/2) (1/3, 1) (1, 1); PRO(0.3) = 1/2 + 1/2 * 0.3 / (1/3) = 0.95.
    maps, masks = row(0.9, 0.5, 0.5, 0.1, 0.1), row(1, 1, 0, 0, 0)
    expected = 0.3 * (0.5 + 0.95) / 2 / 0.3
    self.assertAlmostEqual(metrics.aupro(maps, masks), expected)
    # 0.9 beats 3 normals; 0.5 beats two and ties one (half): 5.5 / 6.
    self.assertAlmostEqual(metrics.pixel_auroc(maps, masks), 5.5 / 6)

  def test_mean_over_regions_not_pixels(self):
    # Regions {0} (found first) and {2, 3, 4}; normals 0.1, 0.3, 0.4. Up to
    # FPR 1/3 only region {0} is found: PRO = (1 + 0) / 2 = 1/2, whereas the
    # fraction of anomalous pixels found would be 1/4.
    maps = row(0.9, 0.1, 0.2, 0.2, 0.2, 0.3, 0.4)
    masks = row(1, 0, 1, 1, 1, 0, 0)
    self.assertAlmostEqual(metrics.aupro(maps, masks), 0.5)

  def test_regions_are_8_connected(self):
    # The diagonal joins (0, 0) to (1, 1), (1, 2): one region of 3 pixels,
    # of which only (0, 0) beats the normals (0.5) -> PRO 1/3 until FPR 1.
    # With 4-connectivity it would be {(0, 0)} and {(1, 1), (1, 2)}: 1/2.
    masks = np.array([[[1, 0, 0], [0, 1, 1], [0, 0, 0]]])
    maps = np.where(masks == 1, 0.1, 0.5)
    maps[0, 0, 0] = 0.9
    self.assertAlmostEqual(metrics.aupro(maps, masks), 1 / 3)

  def test_regions_do_not_join_across_images(self):
    # The same pixel set in two images: two regions, one found -> 1/2.
    masks = np.ones((2, 1, 1), np.uint8)
    masks = np.concatenate([masks, np.zeros((2, 1, 1), np.uint8)], axis=2)
    maps = np.array([[[0.9, 0.5]], [[0.1, 0.5]]])
    self.assertAlmostEqual(metrics.aupro(maps, masks), 0.5)

  def test_perfect_and_inverted_maps(self):
    masks = np.zeros((2, 6, 6), np.uint8)
    masks[0, 1:3, 1:4] = masks[1, 4:, 4:] = 1
    self.assertEqual(metrics.aupro(masks.astype(float), masks), 1.0)
    self.assertEqual(metrics.pixel_auroc(masks.astype(float), masks), 1.0)
    self.assertEqual(metrics.aupro(-masks.astype(float), masks), 0.0)
    self.assertEqual(metrics.pixel_auroc(-masks.astype(float), masks), 0.0)

  @parameterized.parameters(0.3, 0.05, 1.0)
  def test_matches_brute_force_on_random_maps(self, max_fpr):
    rng = np.random.default_rng(0)
    masks = (rng.random((4, 7, 9)) < 0.25).astype(np.uint8)
    # Quantised scores make many ties, between and within the classes.
    maps = np.round(rng.random(masks.shape) + 0.4 * masks, 1)
    expected = brute_force_aupro(maps, masks, max_fpr)
    got = metrics.aupro(maps, masks, max_fpr=max_fpr)
    self.assertAlmostEqual(got, expected, places=10)
    self.assertNotIn(got, (0.0, 1.0))
    auroc = skm.roc_auc_score(masks.ravel(), maps.ravel())
    self.assertAlmostEqual(metrics.pixel_auroc(maps, masks), auroc)
    self.assertEqual(
      metrics.pixel_metrics(maps, masks, max_fpr=max_fpr),
      {"pixel_auroc": metrics.pixel_auroc(maps, masks), "aupro": got},
    )

  def test_invariant_to_monotone_maps_and_image_order(self):
    rng = np.random.default_rng(1)
    masks = (rng.random((5, 8, 8)) < 0.2).astype(np.uint8)
    maps = rng.random(masks.shape) + masks
    out = metrics.pixel_metrics(maps, masks)
    self.assertEqual(metrics.pixel_metrics(np.exp(3 * maps), masks), out)
    order = rng.permutation(5)
    shuffled = metrics.pixel_metrics(maps[order], masks[order])
    for k, v in out.items():
      self.assertAlmostEqual(shuffled[k], v)

  def test_errors(self):
    maps, masks = np.zeros((2, 4, 4)), np.zeros((2, 4, 4), np.uint8)
    masks[0, 0, 0] = 1
    for fn in (metrics.aupro, metrics.pixel_auroc, metrics.pixel_metrics):
      with self.assertRaisesRegex(ValueError, r"matching \[N, H, W\]"):
        fn(maps[:, :2], masks)
      with self.assertRaisesRegex(ValueError, r"matching \[N, H, W\]"):
        fn(maps[0], masks[0])
      bad = maps.copy()
      bad[1, 2, 3] = np.nan
      with self.assertRaisesRegex(ValueError, "1 map values are not finite"):
        fn(bad, masks)
      with self.assertRaisesRegex(ValueError, "no anomalous pixels"):
        fn(maps, np.zeros_like(masks))
      with self.assertRaisesRegex(ValueError, "no normal pixels"):
        fn(maps, np.ones_like(masks))
      with self.assertRaisesRegex(ValueError, r"only 0 .* found \[0, 255\]"):
        fn(maps, masks * 255)
    with self.assertRaisesRegex(ValueError, "max_fpr must be in"):
      metrics.aupro(maps, masks, max_fpr=0.0)


if __name__ == "__main__":
  absltest.main()
