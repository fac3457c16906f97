"""Tests of jaxad.data: every layout on tiny fixtures, bad data, the cache,
the grain pipeline, and (when ../shared is present) the real datasets."""

import json
import os
import pathlib
import shutil
import tempfile
from unittest import mock

import ml_collections
import numpy as np
from absl.testing import absltest, parameterized
from PIL import Image

from jaxad.data import (
  builder,
  layouts,
  manifest,
  npz_layouts,
  oneclass,
)

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
KERMANY = SHARED / "data" / "kermany_cxr_224"
PNEUMONIAMNIST = SHARED / "data" / "pneumoniamnist_balanced_28"


def write_image(path, value, fmt="PNG", mode="L"):
  """A constant 30x20 image: after grayscale + resize, every pixel is value."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  color = value if mode == "L" else (value,) * 3
  Image.new(mode, (30, 20), color).save(path, fmt)


def config(**kw):
  base = dict(
    format="folders",
    root="",
    image_size=8,
    normal_class="NORMAL",
    normal_label=0,
    unlabeled_size=5,
    anomaly_rate=0.6,
    split_seed=0,
    cache_dir="",
    # The fixtures' constant images repeat across folders; duplicates are
    # tested in layouts_check_test.py.
    allow_duplicates=True,
  )
  base.update(kw)
  return ml_collections.ConfigDict(base)


class DataTestCase(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.tmp)
    self.cache = os.path.join(self.tmp, "cache")
    self.workdir = os.path.join(self.tmp, "work")

  def load(self, workdir=None, **kw):
    kw.setdefault("cache_dir", self.cache)
    return oneclass.load(config(**kw), workdir or self.workdir)

  def assert_arrays(self, ds, n_normal, n_unlabeled, n_test, size=8):
    self.assertEqual(ds.normal.shape, (n_normal, size, size, 1))
    self.assertEqual(ds.unlabeled.shape, (n_unlabeled, size, size, 1))
    self.assertEqual(ds.test.shape, (n_test, size, size, 1))
    for a in (ds.normal, ds.unlabeled, ds.test):
      self.assertEqual(a.dtype, np.uint8)
    self.assertEqual(ds.unlabeled_labels.shape, (n_unlabeled,))
    self.assertEqual(ds.test_labels.shape, (n_test,))
    self.assertEqual(ds.test_labels.dtype, np.int32)
    self.assertEqual(ds.unlabeled_labels.dtype, np.int32)
    self.assertLen(ds.test_names, n_test)


def make_medad(root):
  """A Med-AD fixture; pixel value v identifies image f"{v}.png".

  Returns:
    The data.json dict (also written to root/data.json).
  """
  groups = {"k": range(10, 13), "u0": range(20, 24), "u1": range(30, 35)}
  groups |= {"t0": range(40, 42), "t1": range(50, 53)}
  names = {g: [f"{v}.png" for v in vs] for g, vs in groups.items()}
  for vs in groups.values():
    for v in vs:
      write_image(os.path.join(root, "images", f"{v}.png"), v)
  js = {
    "train": {
      "0": names["k"],
      "unlabeled": {"0": names["u0"], "1": names["u1"]},
    },
    "test": {"0": names["t0"], "1": names["t1"]},
  }
  with open(os.path.join(root, "data.json"), "w") as f:
    json.dump(js, f)
  return js


class MedadTest(DataTestCase):
  def setUp(self):
    super().setUp()
    self.root = os.path.join(self.tmp, "medad")
    self.js = make_medad(self.root)

  def write_json(self, js):
    with open(os.path.join(self.root, "data.json"), "w") as f:
      json.dump(js, f)

  def load(self, **kw):
    return super().load(format="medad", root=self.root, **kw)

  def test_loads_first_names_in_json_order(self):
    ds = self.load(unlabeled_size=5)  # 2 normal + int(5 * 0.6) = 3 abnormal
    self.assert_arrays(ds, 3, 5, 5)
    self.assertEqual(ds.name, "medad")
    np.testing.assert_array_equal(ds.normal[:, 0, 0, 0], [10, 11, 12])
    np.testing.assert_array_equal(
      ds.unlabeled[:, 3, 3, 0], [20, 21, 30, 31, 32]
    )
    np.testing.assert_array_equal(ds.unlabeled_labels, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ds.test[:, 0, 0, 0], [40, 41, 50, 51, 52])
    np.testing.assert_array_equal(ds.test_labels, [0, 0, 1, 1, 1])
    self.assertEqual(
      ds.test_names, ("40.png", "41.png", "50.png", "51.png", "52.png")
    )

  def test_empty_unlabeled_pool(self):
    ds = self.load(unlabeled_size=0)
    self.assert_arrays(ds, 3, 0, 5)

  def test_cache_is_reused_and_keyed(self):
    self.load()
    (prepared,) = os.listdir(self.cache)
    with mock.patch.object(manifest, "decode", side_effect=AssertionError):
      ds = self.load()  # would raise if anything were decoded again
    self.assert_arrays(ds, 3, 5, 5)
    self.assertEqual(os.listdir(self.cache), [prepared])
    self.load(image_size=16)
    self.assertLen(os.listdir(self.cache), 2)
    path = os.path.join(self.root, "images", "10.png")
    write_image(path, 99)
    os.utime(path, ns=(1, 1))  # a changed file re-prepares
    ds = self.load()
    self.assertLen(os.listdir(self.cache), 3)
    self.assertEqual(ds.normal[0, 0, 0, 0], 99)

  def test_missing_root(self):
    with self.assertRaisesRegex(FileNotFoundError, "nowhere"):
      super().load(format="medad", root=os.path.join(self.tmp, "nowhere"))

  def test_missing_json(self):
    os.remove(os.path.join(self.root, "data.json"))
    with self.assertRaisesRegex(FileNotFoundError, "data.json"):
      self.load()

  def test_invalid_json(self):
    with open(os.path.join(self.root, "data.json"), "w") as f:
      f.write("{not json")
    with self.assertRaisesRegex(manifest.DataError, "Invalid JSON.*data.json"):
      self.load()

  def test_missing_key(self):
    del self.js["train"]["unlabeled"]["1"]
    self.write_json(self.js)
    with self.assertRaisesRegex(
      manifest.DataError,
      r"data.json: missing key \['train'\]\['unlabeled'\]\['1'\]",
    ):
      self.load()

  def test_missing_image(self):
    os.remove(os.path.join(self.root, "images", "31.png"))
    with self.assertRaisesRegex(FileNotFoundError, r"31.png.*\['unlabeled'\]"):
      self.load()

  def test_corrupt_image(self):
    with open(os.path.join(self.root, "images", "41.png"), "wb") as f:
      f.write(b"not a png")
    with self.assertRaisesRegex(manifest.DataError, "Cannot decode.*41.png"):
      self.load()

  def test_unlabeled_size_too_large(self):
    # 0.4 * 20 = 8 normals needed, 4 listed.
    with self.assertRaisesRegex(manifest.DataError, r"\['0'\] has 4 names.*8"):
      self.load(unlabeled_size=20)


class FoldersTest(DataTestCase):
  def setUp(self):
    super().setUp()
    self.root = os.path.join(self.tmp, "cxr")
    counts = {"train/NORMAL": 10, "train/PNEU": 3, "train/VIRUS": 2}
    counts |= {"test/NORMAL": 2, "test/PNEU": 2, "test/VIRUS": 1}
    for folder, n in counts.items():
      for i in range(n):
        # Mixed formats and case-insensitive extensions.
        ext, fmt = [("png", "PNG"), ("JPEG", "JPEG"), ("jpg", "JPEG")][i % 3]
        path = os.path.join(self.root, folder, f"im{i:02d}.{ext}")
        write_image(path, 10 * i, fmt, mode="RGB" if i % 2 else "L")
    with open(os.path.join(self.root, "train/NORMAL/notes.txt"), "w") as f:
      f.write("not an image")

  def load(self, workdir=None, **kw):
    return super().load(workdir, format="folders", root=self.root, **kw)

  def split_json(self, workdir=None):
    with open(os.path.join(workdir or self.workdir, "split.json")) as f:
      return json.load(f)

  def test_counts_and_split_file(self):
    ds = self.load()  # 2 normal + 3 abnormal unlabeled -> 8 known normals
    self.assert_arrays(ds, 8, 5, 5)
    self.assertEqual(ds.name, "cxr")
    np.testing.assert_array_equal(ds.unlabeled_labels, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ds.test_labels, [0, 0, 1, 1, 1])
    self.assertEqual(ds.test_names[0], "test/NORMAL/im00.png")
    self.assertEqual(ds.test_names[2], "test/PNEU/im00.png")
    self.assertEqual(ds.test_names[4], "test/VIRUS/im00.png")
    split = self.split_json()
    self.assertEqual(split["params"]["split_seed"], 0)
    self.assertEqual(split["params"]["unlabeled_size"], 5)
    self.assertLen(split["normal"], 8)
    self.assertLen(split["unlabeled"]["0"], 2)
    self.assertLen(split["unlabeled"]["1"], 3)
    drawn = split["normal"] + split["unlabeled"]["0"]
    self.assertCountEqual(drawn, [f"train/NORMAL/{f}" for f in self.names()])

  def names(self):
    folder = os.path.join(self.root, "train/NORMAL")
    return [f for f in os.listdir(folder) if not f.endswith(".txt")]

  def test_draw_is_seeded(self):
    other = os.path.join(self.tmp, "work2")
    self.load()
    self.load(other)
    self.assertEqual(self.split_json(), self.split_json(other))
    normals = set()
    for seed in range(4):
      workdir = os.path.join(self.tmp, f"seed{seed}")
      self.load(workdir, split_seed=seed)
      normals.add(tuple(self.split_json(workdir)["normal"]))
    self.assertGreater(len(normals), 1)

  def test_split_file_is_reused(self):
    self.load()
    before = self.split_json()
    write_image(os.path.join(self.root, "train/NORMAL/new.png"), 7)
    ds = self.load()
    self.assertEqual(self.split_json(), before)
    self.assert_arrays(ds, 8, 5, 5)  # the new file joins no part

  def test_split_file_lists_a_missing_file(self):
    self.load()
    name = self.split_json()["normal"][0]
    os.remove(os.path.join(self.root, name))
    with self.assertRaisesRegex(FileNotFoundError, f"{name}.*split.json"):
      self.load()

  def test_split_file_parameter_mismatch(self):
    self.load()
    with self.assertRaisesRegex(
      manifest.DataError,
      "split.json was drawn with other.*unlabeled_size: 5 in file, 4",
    ):
      self.load(unlabeled_size=4)
    with self.assertRaisesRegex(manifest.DataError, "split_seed"):
      self.load(split_seed=1)

  def test_missing_normal_class(self):
    with self.assertRaisesRegex(
      manifest.DataError,
      r"train/HEALTHY not found; classes found: \['NORMAL', 'PNEU', 'VIRUS'\]",
    ):
      self.load(normal_class="HEALTHY")

  def test_empty_class_folder(self):
    os.makedirs(os.path.join(self.root, "test/EMPTY"))
    with self.assertRaisesRegex(
      manifest.DataError, "test/EMPTY has no image files"
    ):
      self.load()

  def test_no_abnormal_class(self):
    for c in ("PNEU", "VIRUS"):
      shutil.rmtree(os.path.join(self.root, "train", c))
    with self.assertRaisesRegex(
      manifest.DataError, "No abnormal class in .*train"
    ):
      self.load()

  def test_missing_split_folder(self):
    # ROOT/test is optional (tests/layouts_check_test.py); ROOT/train is not.
    shutil.rmtree(os.path.join(self.root, "train"))
    with self.assertRaisesRegex(FileNotFoundError, "cxr/train"):
      self.load()

  def test_unlabeled_size_too_large(self):
    with self.assertRaisesRegex(
      manifest.DataError, "needs 6 train abnormals, but there are only 5"
    ):
      self.load(unlabeled_size=10)
    with self.assertRaisesRegex(
      manifest.DataError, "needs 10 train normals.*only 10"
    ):
      self.load(
        os.path.join(self.tmp, "w2"), unlabeled_size=10, anomaly_rate=0.0
      )

  def test_corrupt_image(self):
    with open(os.path.join(self.root, "test/PNEU/im01.JPEG"), "wb") as f:
      f.write(b"\xff\xd8\xff garbage")
    with self.assertRaisesRegex(manifest.DataError, "test/PNEU/im01.JPEG"):
      self.load()


class MedmnistTest(DataTestCase):
  def write_npz(self, name="tiny.npz", rgb=False, **override):
    rng = np.random.default_rng(0)
    shape = (28, 28, 3) if rgb else (28, 28)
    arrays = {
      "train_images": rng.integers(0, 256, (20, *shape), np.uint8),
      "train_labels": (np.arange(20) % 3 == 0).astype(np.uint8)[:, None] * 2,
      "val_images": rng.integers(0, 256, (2, *shape), np.uint8),
      "val_labels": np.zeros((2, 1), np.uint8),
      "test_images": rng.integers(0, 256, (6, *shape), np.uint8),
      "test_labels": np.array([[2], [0], [2], [0], [0], [2]], np.uint8),
    }
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    folder = os.path.join(self.tmp, "mnist")
    os.makedirs(folder, exist_ok=True)
    np.savez(os.path.join(folder, name), **arrays)
    return folder

  @parameterized.parameters(False, True)
  def test_counts(self, rgb):
    root = self.write_npz(rgb=rgb)  # 13 normals, 7 abnormals (label 2)
    ds = self.load(format="medmnist", root=root, image_size=12)
    self.assert_arrays(ds, 11, 5, 6, size=12)
    self.assertEqual(ds.name, "tiny")
    np.testing.assert_array_equal(ds.test_labels, [0, 0, 0, 1, 1, 1])
    self.assertEqual(ds.test_names[:2], ("test/00001", "test/00003"))
    split = json.load(open(os.path.join(self.workdir, "split.json")))
    self.assertLen(split["normal"], 11)
    self.assertTrue(all(i % 3 for i in split["normal"]))
    self.assertTrue(all(i % 3 == 0 for i in split["unlabeled"]["1"]))

  def test_normal_label(self):
    root = self.write_npz()
    ds = self.load(
      format="medmnist", root=root, normal_label=2, unlabeled_size=2
    )
    self.assert_arrays(ds, 7 - 1, 2, 6)
    np.testing.assert_array_equal(ds.test_labels, [0, 0, 0, 1, 1, 1])

  def test_missing_key(self):
    root = self.write_npz(test_labels=None)
    with self.assertRaisesRegex(
      manifest.DataError, "missing key 'test_labels'.*expected integer"
    ):
      self.load(format="medmnist", root=root)

  def test_wrong_shape(self):
    root = self.write_npz(train_labels=np.zeros((20, 2), np.uint8))
    with self.assertRaisesRegex(
      manifest.DataError, r"'train_labels' must be integer \[20\] or \[20, 1\]"
    ):
      self.load(format="medmnist", root=root)
    root = self.write_npz(test_images=np.zeros((6, 28), np.uint8))
    with self.assertRaisesRegex(
      manifest.DataError, r"'test_images' must be uint8 \[N, H, W\]"
    ):
      self.load(format="medmnist", root=root)

  def test_folder_needs_exactly_one_npz(self):
    root = self.write_npz()
    self.write_npz("other.npz")
    with self.assertRaisesRegex(
      manifest.DataError, "exactly one .npz.*other.npz"
    ):
      self.load(format="medmnist", root=root)


class EmbeddedAndFormatTest(DataTestCase):
  def test_embedded(self):
    if not os.path.exists(npz_layouts.EMBEDDED_PATH):
      self.skipTest("embedded npz not built; run scripts/make_embedded.py")
    ds = self.load(format="embedded", root="ignored", image_size=64)
    self.assertEqual(ds.name, "embedded/kermany_cxr64")
    self.assert_arrays(ds, 500, 500, 624, size=64)
    self.assertEqual(int(ds.unlabeled_labels.sum()), 300)
    self.assertEqual(int((ds.test_labels == 0).sum()), 234)
    self.assertEqual(int(ds.test_labels.sum()), 390)
    self.assertEqual(ds.test_names[0], "test/NORMAL/IM-0001-0001.jpeg")

  def test_unknown_format(self):
    with self.assertRaisesRegex(
      manifest.DataError,
      r"'tfrecord'.*\['embedded', 'medad', 'folders', 'medmnist', 'mvtec',"
      r" 'bmad', 'mtd'\]",
    ):
      self.load(format="tfrecord")

  def test_cache_dir_default(self):
    with mock.patch.dict(os.environ, {"JAXAD_DATA_DIR": self.cache}):
      self.assertEqual(builder.default_cache_dir(""), self.cache)
    self.assertEqual(builder.default_cache_dir("/x/y"), "/x/y")
    self.assertEqual(
      layouts.FORMATS,
      ("embedded", "medad", "folders", "medmnist", "mvtec", "bmad", "mtd"),
    )


if __name__ == "__main__":
  absltest.main()
