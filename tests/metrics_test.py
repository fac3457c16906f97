"""Tests of jaxad.metrics against hand-computed cases."""

import numpy as np
from absl.testing import absltest

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


if __name__ == "__main__":
  absltest.main()
