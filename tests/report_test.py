"""Tests of the report's example selection (the files are checked in
train_test)."""

import numpy as np
from absl.testing import absltest

from jaxad import report


class PickExamplesTest(absltest.TestCase):
  def test_highest_and_lowest_of_each_class(self):
    score = np.array([0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7])
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    picked = report.pick_examples(score, labels, k=1)
    self.assertEqual(
      picked,
      [
        ("normal, highest", 1),
        ("normal, lowest", 0),
        ("abnormal, highest", 4),
        ("abnormal, lowest", 5),
      ],
    )

  def test_refined_scores_are_shown_last(self):
    self.assertEqual(
      report.ordered(["inter", "intra", "r_dual", "rec", "other"]),
      ["rec", "intra", "inter", "r_dual", "other"],
    )


if __name__ == "__main__":
  absltest.main()
