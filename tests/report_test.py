"""Tests of the report: example selection, the clipped colour scales, the
threshold line, identical images flagged, and a method without maps (the
files of a method with maps are also checked by the conformance test)."""

import os
import tempfile
import types

import ml_collections as mlc
import numpy as np
from absl.testing import absltest

from jaxad import map_colours, report
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


class ColourScaleTest(absltest.TestCase):
  def test_one_huge_outlier_does_not_squash_the_rest(self):
    maps = np.linspace(0, 1, 4 * 16 * 16, dtype=np.float32).reshape(4, 16, 16)
    maps[2, 3, 4] = 1e6
    s = map_colours.colour_scale(maps)
    lo, hi = np.percentile(maps, map_colours.MAP_PERCENTILES)
    self.assertAlmostEqual(s.lo, lo, places=5)
    self.assertAlmostEqual(s.hi, hi, places=4)
    self.assertLess(s.hi, 1.0)  # min..max would be 0..1e6
    self.assertEqual(s.extend, "both")
    self.assertIn("p0.5..p99.5 of the test maps", s.basis)
    self.assertIn("p0.5..p99.5", map_colours.scale_label("rec", s))

  def test_a_constant_map_falls_back_to_min_max_and_says_so(self):
    maps = np.zeros((2, 16, 16), np.float16)  # p99.5 = p0.5 = 0
    maps[0, 0, 0] = 1
    s = map_colours.colour_scale(maps)
    self.assertEqual((s.lo, s.hi, s.extend), (0.0, 1.0, "neither"))
    self.assertIn("min..max", s.basis)

  def test_bad_input_is_refused(self):
    with self.assertRaisesRegex(ValueError, "percentiles"):
      map_colours.colour_scale(np.ones((1, 2, 2)), (99, 1))
    with self.assertRaisesRegex(ValueError, "no finite value"):
      map_colours.colour_scale(np.full((1, 2, 2), np.nan))


class DuplicateNotesTest(absltest.TestCase):
  def test_identical_pixels_and_repeated_rows_are_flagged(self):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 6, 6, 1), np.uint8)
    images[3] = images[1]  # another file, same pixels
    notes = report.duplicate_notes(images, [0, 1, 3, 4, 4])
    self.assertEqual(
      notes,
      [
        "",
        "(identical to #3)",
        "(identical to #2)",
        "(same image as #5)",
        "(same image as #4)",
      ],
    )


def _fake_run(maps=True, calibrated=True, n=12, size=8):
  """A fake evaluation: images (two pixel-identical), scores, maps with an
  outlier, eval.json with a calibrated threshold for "b" only."""
  rng = np.random.default_rng(0)
  labels = np.array([0] * (n // 2) + [1] * (n - n // 2))
  images = rng.integers(0, 256, (n, size, size, 1), np.uint8)
  scores = {"a": rng.uniform(size=n), "b": rng.uniform(size=n) + labels}
  images[int(np.argmax(np.where(labels == 0, scores["b"], -1)))] = images[
    int(np.argmin(np.where(labels == 1, scores["b"], 9)))
  ]  # the top normal and the bottom abnormal: identical pixels
  m = {k: rng.uniform(size=(n, size, size)).astype(np.float32) for k in "ab"}
  m["b"][0, 0, 0] = 1e4
  result = {
    "dataset": "d",
    "num_normal": int(np.sum(labels == 0)),
    "num_abnormal": int(np.sum(labels == 1)),
    "scores": {k: {"auroc": 0.5, "ap": 0.5} for k in "ab"},
  }
  if calibrated:
    result["scores"]["b"]["calibrated"] = {
      "threshold": 1.25,
      "target_specificity": 0.95,
      "num_calibration": 7,
      "calibration_specificity": 1.0,
      "sensitivity": 0.5,
      "specificity": 0.9,
    }
  data = types.SimpleNamespace(
    test=images,
    test_labels=labels,
    test_names=tuple(f"dir/im{i}.png" for i in range(n)),
  )
  return data, scores, (m if maps else {}), result


class FiguresTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.plt = report._pyplot()

  def test_histograms_draw_the_calibrated_threshold_where_there_is_one(self):
    data, scores, _, result = _fake_run()
    fig = report.histogram_figure(
      self.plt, ["a", "b"], scores, data.test_labels, result
    )
    a, b = fig.axes[:2]
    self.assertEqual([ln.get_label() for ln in a.get_lines()], [])
    (line,) = b.get_lines()
    self.assertEqual(line.get_label(), "threshold 1.25")
    self.assertEqual(list(line.get_xdata()), [1.25, 1.25])
    self.assertIn(
      "threshold 1.25", [t.get_text() for t in b.get_legend().get_texts()]
    )
    self.assertEqual(b.get_xlabel(), "anomaly score")
    self.assertEqual(b.get_ylabel(), "images")
    self.assertIn("7 calibration normals", fig.get_suptitle())
    self.plt.close(fig)

  def test_grid_clips_colours_flags_twins_and_keeps_text_readable(self):
    data, scores, maps, _ = _fake_run()
    fig, scales, notes = report.grid_figure(
      self.plt,
      ["a", "b"],
      data.test,
      maps,
      scores,
      data.test_labels,
      data.test_names,
    )
    fig.canvas.draw()  # lays out: every text at its saved size
    lo, hi = np.percentile(maps["b"], map_colours.MAP_PERCENTILES)
    self.assertAlmostEqual(scales["b"].hi, hi, places=5)
    self.assertLess(scales["b"].hi, 1.0)  # not the 1e4 outlier
    # The overlays are drawn on those limits (column 2: the "b" maps).
    images = [ax.images[-1] for ax in fig.axes if len(ax.images) == 2]
    clims = {im.get_clim() for im in images[1::2]}
    self.assertEqual(clims, {(scales["b"].lo, scales["b"].hi)})
    # Rows: 2 high + 2 low normals, then abnormals; the top normal (#1)
    # and the bottom abnormal (#7) have the same pixels.
    self.assertEqual(notes[0], "(identical to #7)")
    self.assertEqual(notes[6], "(identical to #1)")
    self.assertEqual(notes.count(""), 6)
    titles = [ax.get_title() for ax in fig.axes]
    self.assertTrue(
      any("#7 abnormal, lowest" in t and "to #1" in t for t in titles)
    )
    bars = [ax for ax in fig.axes if "p0.5..p99.5" in ax.get_xlabel()]
    self.assertLen(bars, 2)
    sizes = [
      t.get_fontsize()
      for t in fig.findobj(lambda o: hasattr(o, "get_fontsize"))
      if getattr(t, "get_text", lambda: "")()
    ]
    self.assertNotEmpty(sizes)
    self.assertGreaterEqual(min(sizes), 8)
    self.plt.close(fig)

  def test_write_states_the_scales_and_threshold_in_the_page(self):
    data, scores, maps, result = _fake_run()
    infos = (api.Score("a", "first"), api.Score("b", "second"))
    workdir = tempfile.mkdtemp()
    out = report.write(
      workdir, result, data, scores, maps, infos, mlc.ConfigDict({"a": 1})
    )
    self.assertCountEqual(
      os.listdir(out), ["roc.png", "histograms.png", "grid.png", "index.html"]
    )
    with open(os.path.join(out, "index.html")) as f:
      page = f.read()
    self.assertIn("0.5th to 99.5th percentile", page)
    self.assertIn("7 calibration normals", page)
    self.assertIn("<td>1.25</td>", page)
    self.assertIn("2 of the 8 rows", page)
    # Re-written without maps: the earlier grid does not stay behind.
    report.write(
      workdir, result, data, scores, {}, infos, mlc.ConfigDict({"a": 1})
    )
    self.assertNotIn("grid.png", os.listdir(out))


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
