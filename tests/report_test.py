"""Tests of the report: example selection, and a method without maps (the
files of a method with maps are checked by the conformance test)."""

import os
import tempfile
import types

import ml_collections as mlc
import numpy as np
from absl.testing import absltest

from jaxad import report
from jaxad.methods import api


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


class WriteTest(absltest.TestCase):
  def test_a_method_without_maps_gets_curves_and_its_descriptions(self):
    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 1, 1, 1])
    data = types.SimpleNamespace(
      test=rng.integers(0, 256, (5, 8, 8, 3), np.uint8),
      test_labels=labels,
      test_names=tuple(f"im{i}" for i in range(5)),
    )
    scores = {"zero_shot": rng.uniform(size=5)}
    infos = (api.Score("zero_shot", "text-image similarity; <no map>"),)
    result = {
      "dataset": "d",
      "num_normal": 2,
      "num_abnormal": 3,
      "scores": {"zero_shot": {"auroc": 0.5, "ap": 0.6}},
    }
    workdir = tempfile.mkdtemp()
    out = report.write(
      workdir, result, data, scores, {}, infos, mlc.ConfigDict({"a": 1})
    )
    self.assertCountEqual(
      os.listdir(out), ["roc.png", "histograms.png", "index.html"]
    )
    with open(os.path.join(out, "index.html")) as f:
      page = f.read()
    self.assertIn("text-image similarity; &lt;no map&gt;", page)
    self.assertIn("no pixel maps", page)


if __name__ == "__main__":
  absltest.main()
