"""Checks every layout makes before any compute (issue 15, layout items),
continued from `layouts_check_test.py`: split.json written only once the
data has passed every check, a real unlabeled pool (`data.unlabeled_dir`),
a `folders` root without a test split, and a test split with one class
refused at load.
"""

import json
import os
import shutil

import numpy as np
from absl.testing import absltest, parameterized
from layouts_check_test import (
  LayoutTestCase,
  config,
  write_folders,
  write_mtd,
  write_png,
)

from jaxad.data import layouts, manifest, splits, unlabeled_pool


class SplitFileTest(LayoutTestCase):
  @parameterized.parameters("folders", "mtd")
  def test_written_only_after_decoding_then_drawn_afresh(self, fmt):
    if fmt == "folders":
      write_folders(self.root)
      bad = f"{self.root}/train/NORMAL/im3.png"
    else:
      write_mtd(self.root, 6)
      bad = f"{self.root}/MT_Free/Imgs/f3.jpg"
    with open(bad, "wb") as f:
      f.write(b"\x89PNG\r\n\x1a\n truncated")
    with self.assertRaisesRegex(manifest.DataError, os.path.basename(bad)):
      self.load(format=fmt, fraction=0.25)
    self.assertFalse(os.path.exists(self.split_path()))
    # The user fixes the data (drops the file): the re-run draws afresh,
    # where it used to fail on split.json's listing of the file.
    os.remove(bad)
    ds = self.load(format=fmt, fraction=0.25)
    split = self.split_json()
    self.assertNotIn(
      os.path.relpath(bad, self.root), json.dumps(split["normal"])
    )
    self.assertEqual(
      split["calibration"]["names"], list(ds.calibration_names)
    )  # one write holds the layout's split and the calibration record
    self.assertIn("params", split)

  def test_build_without_a_queue_writes_after_its_checks(self):
    write_folders(self.root)
    shutil.copy(
      f"{self.root}/train/NORMAL/im0.png", f"{self.root}/test/PNEU/dup.png"
    )
    with self.assertRaises(manifest.DataError):
      layouts.build(config(root=self.root, unlabeled_size=0), self.workdir)
    self.assertFalse(os.path.exists(self.split_path()))
    os.remove(f"{self.root}/test/PNEU/dup.png")
    pending = splits.Pending()
    layouts.build(config(root=self.root), self.workdir, pending)
    self.assertFalse(os.path.exists(self.split_path()))  # queued only
    pending.write()
    self.assertLen(self.split_json()["normal"], 6)

  def test_reused_split_names_new_and_missing_files(self):
    write_folders(self.root)
    self.load()
    write_png(f"{self.root}/test/PNEU/new.png")
    with self.assertLogs("absl", "WARNING") as logs:
      self.load()
    self.assertIn("1 image(s) of", str(logs.output))
    self.assertIn("test/PNEU/new.png", str(logs.output))
    name = self.split_json()["normal"][0]
    os.remove(os.path.join(self.root, name))
    with self.assertRaisesRegex(
      FileNotFoundError, f"{name}.*split.json.*the data changed since"
    ):
      self.load()


class UnlabeledDirTest(LayoutTestCase):
  def setUp(self):
    super().setUp()
    write_folders(self.root, {"train/NORMAL": 6, "test/NORMAL": 2})
    write_folders(self.root, {"test/PNEU": 2})
    self.pool = os.path.join(self.tmp, "pool")
    for i in range(5):
      write_png(f"{self.pool}/u{i}.png")
    write_png(f"{self.pool}/.ipynb_checkpoints/u0.png")  # hidden: ignored

  def test_folders_pool_is_the_folder_as_is(self):
    # No train abnormal class: a real pool needs none.
    with self.assertLogs("absl", "INFO") as logs:
      ds = self.load(unlabeled_dir=self.pool, fraction=0.2)
    self.assertLen(ds.unlabeled, 5)
    self.assertLen(ds.normal, 5)  # 6 train normals, 1 calibration
    np.testing.assert_array_equal(ds.unlabeled_labels, [-1] * 5)
    self.assertEqual(unlabeled_pool.UNKNOWN, -1)
    self.assertIn("5 unlabeled (classes unknown)", str(logs.output))
    self.assertNotIn("abnormal), 2 test", str(logs.output).split("unknown")[0])
    split = self.split_json()
    self.assertEqual(
      split["unlabeled"], {"unknown": [f"unlabeled/u{i}.png" for i in range(5)]}
    )
    self.assertEqual(split["params"]["unlabeled_dir"], self.pool)
    self.assertNotIn("anomaly_rate", split["params"])
    # anomaly_rate and unlabeled_size are not used: another value resumes.
    again = self.load(
      unlabeled_dir=self.pool, fraction=0.2, anomaly_rate=0.9, unlabeled_size=1
    )
    np.testing.assert_array_equal(again.unlabeled, ds.unlabeled)

  def test_medad_and_medmnist(self):
    medad = os.path.join(self.tmp, "medad")
    for n in ("k0", "k1", "t0", "t1"):
      write_png(f"{medad}/images/{n}.png")
    js = {
      "train": {"0": ["k0.png", "k1.png"]},
      "test": {"0": ["t0.png"], "1": ["t1.png"]},
    }
    with open(f"{medad}/data.json", "w") as f:
      json.dump(js, f)  # no train['unlabeled']: the folder replaces it
    ds = self.load(format="medad", root=medad, unlabeled_dir=self.pool)
    self.assertEqual(ds.unlabeled_labels.tolist(), [-1] * 5)
    self.assertLen(ds.normal, 2)
    rng = np.random.default_rng(0)
    path = os.path.join(self.tmp, "m.npz")
    np.savez(
      path,
      train_images=rng.integers(0, 256, (4, 8, 8), np.uint8),
      train_labels=np.zeros((4, 1), np.uint8),  # normals only
      test_images=rng.integers(0, 256, (2, 8, 8), np.uint8),
      test_labels=np.array([[0], [1]]),
    )
    ds = self.load(
      os.path.join(self.tmp, "w2"),
      format="medmnist",
      root=path,
      unlabeled_dir=self.pool,
    )
    self.assertEqual((len(ds.normal), len(ds.unlabeled)), (4, 5))

  def test_refusals(self):
    with self.assertRaisesRegex(
      manifest.DataError, "data.unlabeled_dir is set, but data.format='mtd'"
    ):
      self.load(format="mtd", unlabeled_dir=self.pool)
    with self.assertRaisesRegex(
      FileNotFoundError, r"data.unlabeled_dir='.*nowhere': folder not found"
    ):
      self.load(unlabeled_dir=os.path.join(self.tmp, "nowhere"))
    write_png(f"{self.pool}/sub/x.png")
    with self.assertRaisesRegex(
      manifest.DataError, r"holds folders \['sub'\]: an unlabeled pool has no"
    ):
      self.load(unlabeled_dir=self.pool)

  def test_pool_image_in_the_test_split(self):
    shutil.copy(f"{self.pool}/u2.png", f"{self.root}/test/PNEU/u2.png")
    with self.assertRaisesRegex(
      manifest.DataError,
      r"unlabeled 'unlabeled/u2.png' and test 'test/PNEU/u2.png'",
    ):
      self.load(unlabeled_dir=self.pool)


class NoTestTest(LayoutTestCase):
  def test_folders_without_test_split_prepares(self):
    write_folders(self.root, {"train/NORMAL": 6, "train/PNEU": 2})
    with self.assertLogs("absl", "WARNING") as logs:
      ds = self.load(fraction=0.2, unlabeled_size=2)
    self.assertIn("No test folder", str(logs.output))
    self.assertEqual(ds.test.shape, (0, 8, 8, 1))
    self.assertEqual(ds.test_labels.shape, (0,))
    self.assertEqual(ds.test_names, ())
    self.assertLen(ds.normal, 4)  # 6 - 1 pool normal - 1 calibration
    self.assertLen(ds.calibration, 1)
    self.assertEqual(self.split_json()["test"], {"0": [], "1": []})

  def test_a_test_folder_added_later_is_listed_and_recorded(self):
    write_folders(self.root, {"train/NORMAL": 6, "train/PNEU": 2})
    self.load(unlabeled_size=2)
    write_folders(self.root, {"test/NORMAL": 1, "test/PNEU": 2})
    ds = self.load(unlabeled_size=2)  # e.g. jaxad.evaluate, later
    self.assertEqual(ds.test_labels.tolist(), [0, 1, 1])
    self.assertEqual(
      self.split_json()["test"],
      {
        "0": ["test/NORMAL/im0.png"],
        "1": ["test/PNEU/im0.png", "test/PNEU/im1.png"],
      },
    )

  def test_a_test_split_with_one_class_is_refused(self):
    write_folders(self.root, {"train/NORMAL": 4, "train/PNEU": 2})
    m = layouts.build(config(root=self.root, unlabeled_size=0), self.workdir)
    only_normals = m.parts["test"] + tuple(
      manifest.Entry(e.name, 0, e.source, e.stamp) for e in m.parts["normal"]
    )
    with self.assertRaisesRegex(
      manifest.DataError, "test split holds 4 normal and 0 abnormal images"
    ):
      layouts.check_test(
        manifest.Manifest("x", 8, {**m.parts, "test": only_normals}, {})
      )

  def test_training_without_test_split_saves_and_skips_evaluation(self):
    from configs import ddad as ddad_config
    from jaxad import train

    counts = {"train/NORMAL": 24, "train/PNEU": 4}
    write_folders(self.root, counts)
    c = ddad_config.get_config("smoke")
    c.data.update(
      format="folders",
      root=self.root,
      unlabeled_size=4,
      anomaly_rate=0.5,
      cache_dir=self.cache,
    )
    c.refine.enabled = False
    c.train.update(batch_size=8, checkpoint_every=2)
    c.eval.update(batch_size=8, calibration_fraction=0.0)
    c.mesh.data = 1
    with self.assertLogs("absl", "INFO") as logs:
      result = train.run(c, self.workdir)
    self.assertEqual(result, {})
    self.assertIn("no test images", str(logs.output).lower())
    self.assertFalse(os.path.exists(os.path.join(self.workdir, "eval.json")))
    self.assertNotEmpty(os.listdir(os.path.join(self.workdir, "checkpoints")))


class MedadTestSplitTest(LayoutTestCase):
  def write(self, test):
    for n in ["k0.png", "k1.png", "u0.png", "u1.png", *test["0"], *test["1"]]:
      write_png(f"{self.root}/images/{n}")
    js = {
      "train": {
        "0": ["k0.png", "k1.png"],
        "unlabeled": {"0": ["u0.png"], "1": ["u1.png"]},
      },
      "test": test,
    }
    with open(f"{self.root}/data.json", "w") as f:
      json.dump(js, f)

  def test_one_class_is_refused_at_load(self):
    self.write({"0": ["t0.png", "t1.png"], "1": []})
    with (
      self.no_decoding(),
      self.assertRaisesRegex(
        manifest.DataError,
        r"data/data.json: the test split needs normal and abnormal images,"
        r" but test\['0'\] lists 2 and test\['1'\] 0",
      ),
    ):
      self.load(format="medad", unlabeled_size=2)

  def test_no_test_at_all_trains(self):
    self.write({"0": [], "1": []})
    ds = self.load(format="medad", unlabeled_size=2)
    sizes = (len(ds.normal), len(ds.unlabeled), len(ds.test))
    self.assertEqual(sizes, (2, 2, 0))
    np.testing.assert_array_equal(ds.unlabeled_labels, [0, 1])


if __name__ == "__main__":
  absltest.main()
