"""The calibration split of every loader (issue 14): seeded, disjoint
from what is trained on and from the test split, recorded in
W/split.json and stable on resume; for one-class layouts and for
D²4FAD's few-shot target (never a support). The threshold rule and
evaluation are in calibration_test.py.
"""

import json
import os

import ml_collections
import numpy as np
from absl.testing import absltest
from calibration_test import TempDirTestCase
from PIL import Image

from jaxad.data import fewshot, manifest, oneclass, splits
from jaxad.methods import api

# --------------------------------------------------------- one-class splits


def write_gray(path, value):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("L", (12, 12), int(value)).save(path)


def pixel_values(images):
  return sorted(images[:, 0, 0, 0].astype(int).tolist())


class OneClassSplitTest(TempDirTestCase):
  def setUp(self):
    super().setUp()
    # One pixel value per image, so that images can be told apart.
    groups = {
      "train/NORMAL": range(10, 40),
      "train/PNEU": range(200, 203),
      "test/NORMAL": range(100, 104),
      "test/PNEU": range(210, 213),
    }
    for folder, values in groups.items():
      for v in values:
        write_gray(self.path("data", folder, f"im{v:03d}.png"), v)

  def load(self, workdir, fraction=0.25, **kw):
    data = ml_collections.ConfigDict(
      dict(
        format="folders",
        root=self.path("data"),
        image_size=8,
        normal_class="NORMAL",
        unlabeled_size=6,
        anomaly_rate=0.5,
        split_seed=0,
        cache_dir=self.path("cache"),
      )
    )
    data.update(kw)
    return oneclass.load(data, self.path(workdir), fraction)

  def test_seeded_disjoint_recorded_and_stable(self):
    ds = self.load("a")
    # 30 train normals, 3 to the unlabeled pool: 27 known, 7 held out.
    self.assertEqual(ds.calibration.shape, (7, 8, 8, 1))
    self.assertEqual(ds.calibration.dtype, np.uint8)
    self.assertLen(ds.normal, 20)
    self.assertLen(ds.normal_names, 20)
    cal, trained = pixel_values(ds.calibration), pixel_values(ds.normal)
    pool, test = pixel_values(ds.unlabeled), pixel_values(ds.test)
    self.assertTrue(all(10 <= v < 40 for v in cal))
    self.assertEmpty(set(cal) & set(trained))
    self.assertEmpty(set(cal) & set(pool))
    self.assertEmpty(set(cal) & set(test))
    self.assertEmpty(set(ds.calibration_names) & set(ds.normal_names))
    self.assertEmpty(set(ds.calibration_names) & set(ds.test_names))
    for name, v in zip(ds.calibration_names, ds.calibration, strict=True):
      self.assertEqual(name, f"train/NORMAL/im{int(v[0, 0, 0]):03d}.png")
    split = self.split_json(self.path("a"))
    self.assertEqual(
      split["calibration"],
      {"fraction": 0.25, "seed": 0, "names": list(ds.calibration_names)},
    )
    self.assertEmpty(set(split["calibration"]["names"]) - set(split["normal"]))
    # Resumed: resolve still accepts the file, the same split comes out.
    again = self.load("a")
    self.assertEqual(again.calibration_names, ds.calibration_names)
    np.testing.assert_array_equal(again.normal, ds.normal)
    self.assertEqual(self.split_json(self.path("a")), split)
    # Seeded: the same in another workdir, other seeds draw others.
    self.assertEqual(self.load("b").calibration_names, ds.calibration_names)
    drawn = {
      self.load(f"s{s}", split_seed=s).calibration_names for s in range(3)
    }
    self.assertLen(drawn, 3)

  def test_a_changed_record_or_fraction_is_refused(self):
    self.load("a")
    with self.assertRaisesRegex(
      manifest.DataError, "calibration.*fraction: 0.25 in file, 0.5 now"
    ):
      self.load("a", fraction=0.5)
    split = self.split_json(self.path("a"))
    split["calibration"]["names"][0] = "train/NORMAL/other.png"
    splits.write_json(self.path("a", "split.json"), split)
    with self.assertRaisesRegex(manifest.DataError, "names: other images"):
      self.load("a")
    with self.assertRaisesRegex(manifest.DataError, "calibration_fraction"):
      self.load("c", fraction=1.0)
    self.assertFalse(os.path.exists(self.path("c")))  # refused first

  def test_fraction_zero_holds_out_nothing(self):
    ds = self.load("zero", fraction=0.0)
    self.assertEqual(ds.calibration.shape, (0, 8, 8, 1))
    self.assertLen(ds.normal, 27)
    self.assertNotIn("calibration", self.split_json(self.path("zero")))

  def test_record_created_beside_a_layout_without_split(self):
    # A layout that drew nothing wrote no split.json: the record makes one.
    workdir = self.path("new")
    record = {"fraction": 0.1, "seed": 3, "names": ["a"]}
    splits.record_calibration(workdir, record)
    self.assertEqual(self.split_json(workdir), {"calibration": record})
    splits.record_calibration(workdir, record)  # the same: accepted
    with self.assertRaisesRegex(manifest.DataError, "seed: 3 in file, 4"):
      splits.record_calibration(workdir, {**record, "seed": 4})

  def test_draw_sizes(self):
    draw = splits.draw_calibration
    self.assertEqual(draw(10, fraction=0.0, seed=0, what="x"), [])
    self.assertLen(draw(2, fraction=0.01, seed=0, what="x"), 1)  # >= 1
    self.assertLen(draw(10, fraction=0.99, seed=0, what="x"), 9)  # 1 left
    self.assertLen(draw(100, fraction=0.1, seed=0, what="x"), 10)
    with self.assertLogs(level="WARNING"):
      self.assertEqual(draw(1, fraction=0.5, seed=0, what="x"), [])
    a = draw(100, fraction=0.1, seed=0, what="x")
    self.assertEqual(a, sorted(set(a)))
    self.assertEqual(a, draw(100, fraction=0.1, seed=0, what="x"))
    self.assertNotEqual(a, draw(100, fraction=0.1, seed=1, what="x"))

  def test_ppad_calibration_normals_are_not_shots(self):
    from configs import ppad as ppad_config
    from jaxad.methods.ppad import METHOD

    def config(fraction):
      c = ppad_config.get_config("smoke")
      c.data.update(root=self.path("data"), image_size=8, shots=4)
      c.data.cache_dir = self.path("cache")
      c.eval.calibration_fraction = fraction
      return c

    ds = METHOD.load_data(config(0.25), self.path("a"))
    known = self.load("a", 0.0, unlabeled_size=0, anomaly_rate=0.0)
    with open(self.path("a", "shots.json")) as f:
      shots = json.load(f)["indices_into_known_normals"]
    np.testing.assert_array_equal(ds.shots, known.normal[shots])
    shot_names = {known.normal_names[i] for i in shots}
    record = self.split_json(self.path("a"))["calibration"]
    self.assertEqual(
      record, {"fraction": 0.25, "seed": 0, "names": list(ds.calibration_names)}
    )
    self.assertLen(ds.calibration, round(0.25 * (30 - 4)))
    self.assertEmpty(set(ds.calibration_names) & shot_names)
    self.assertEmpty(
      set(pixel_values(ds.calibration)) & set(pixel_values(ds.test))
    )
    index = {n: i for i, n in enumerate(known.normal_names)}
    np.testing.assert_array_equal(
      ds.calibration, known.normal[[index[n] for n in ds.calibration_names]]
    )
    self.assertIsInstance(ds, api.EvalData)
    # Resumed: the same split; the shots do not depend on it.
    again = METHOD.load_data(config(0.25), self.path("a"))
    self.assertEqual(again.calibration_names, ds.calibration_names)
    none = METHOD.load_data(config(0.0), self.path("b"))
    np.testing.assert_array_equal(none.shots, ds.shots)
    self.assertEqual(none.calibration.shape, (0, 8, 8, 1))
    synthetic = METHOD.synthetic_data(config(0.25), 8)
    self.assertEqual(synthetic.calibration.shape[1:], synthetic.test.shape[1:])
    self.assertNotEmpty(synthetic.calibration)

  def test_synthetic_data_has_calibration(self):
    data = ml_collections.ConfigDict(dict(image_size=8, channels=1))
    ds = oneclass.synthetic(data, 20)
    self.assertEqual(ds.calibration.shape, (2, 8, 8, 1))
    self.assertLen(ds.calibration_names, 2)
    self.assertIsInstance(ds, api.EvalData)


# ---------------------------------------------------------- few-shot target


def write_rgb(path, v):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", (10, 10), (v, 255 - v, v // 2)).save(path)


class FewShotCalibrationTest(TempDirTestCase):
  def setUp(self):
    super().setUp()
    groups = {
      "T/train/good": range(10, 30),
      "T/test/good": range(100, 102),
      "T/test/bad": range(110, 112),
      "S/train/good": range(40, 44),
      # A fixed support: copies of two of T's training normals.
      "med-kshot/T/train/shot2/good2": (10, 11),
    }
    for folder, values in groups.items():
      for v in values:
        write_rgb(self.path("d24", folder, f"im{v:03d}.png"), v)

  def load(self, workdir, fraction, **kw):
    data = ml_collections.ConfigDict(
      dict(
        root=self.path("d24"),
        target="T",
        shots=2,
        support="drawn",
        support_seed=0,
        image_size=8,
        cache_dir=self.path("cache"),
      )
    )
    data.update(kw)
    return fewshot.load(data, self.path(workdir), fraction)

  def test_calibration_is_never_a_support_nor_a_test_image(self):
    ds = self.load("a", 0.5)
    split = self.split_json(self.path("a"))
    record = split["calibration"]
    self.assertEqual((record["fraction"], record["seed"]), (0.5, 0))
    self.assertLen(record["names"], 10)
    self.assertEqual(
      ds.calibration_names,
      tuple(n for n in record["names"] if n not in ds.support_names),
    )
    cal = pixel_values(ds.calibration)
    self.assertLen(cal, len(ds.calibration_names))
    self.assertEmpty(set(cal) & set(pixel_values(ds.support)))
    self.assertEmpty(set(cal) & set(pixel_values(ds.test)))
    self.assertTrue(all(10 <= v < 30 for v in cal))
    self.assertIsInstance(ds, api.EvalData)
    # Re-scoring with other shots keeps the record, and avoids the supports.
    k4 = self.load("a", 0.5, shots=4)
    self.assertEqual(self.split_json(self.path("a"))["calibration"], record)
    self.assertEmpty(set(k4.calibration_names) & set(k4.support_names))
    self.assertEqual(set(split["support"]["T"]), {"2"})
    with self.assertRaisesRegex(manifest.DataError, "fraction: 0.5 in file"):
      self.load("a", 0.25)

  def test_fixed_support_copies_are_left_out(self):
    ds = self.load("f", 0.95, support="fixed")
    self.assertStartsWith(ds.support_from, "fixed")
    self.assertEqual(pixel_values(ds.support), [10, 11])
    record = self.split_json(self.path("f"))["calibration"]
    self.assertLen(record["names"], 19)  # at least one of 10, 11 drawn
    cal = pixel_values(ds.calibration)
    self.assertEmpty(set(cal) & {10, 11})
    self.assertLen(
      cal,
      19
      - len(
        {"train/good/im010.png", "train/good/im011.png"} & set(record["names"])
      ),
    )
    # The file it created still takes a drawn support (re-scoring).
    drawn = self.load("f", 0.95, support="drawn")
    self.assertStartsWith(drawn.support_from, "drawn")
    self.assertEqual(self.split_json(self.path("f"))["calibration"], record)

  def test_fraction_zero(self):
    ds = self.load("z", 0.0, support="fixed")
    self.assertEqual(ds.calibration.shape, (0, 8, 8, 3))
    self.assertFalse(os.path.exists(self.path("z", "split.json")))


if __name__ == "__main__":
  absltest.main()
