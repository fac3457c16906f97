"""Checks every layout makes before any compute (issue 15, layout items):
hidden files and folders ignored, duplicates across splits refused.
`layouts_split_test.py` has the others (split.json, the real unlabeled
pool, no test split, one-class test splits) and uses the helpers here.

Every fixture is a few tiny PNGs the test writes itself; every image is
unique (seeded noise) unless a test copies it on purpose.
"""

import itertools
import json
import os
import shutil
import tempfile
from unittest import mock

import ml_collections
import numpy as np
from absl.testing import absltest, parameterized
from PIL import Image

from jaxad.data import (
  builder,
  fewshot,
  layouts,
  leakage,
  manifest,
  oneclass,
  splits,
)

_SEEDS = itertools.count(1)


def write_png(path, seed=None):
  """A 12x10 grayscale image of seeded noise (PNG, or as the extension
  says): unique unless seeds repeat."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(next(_SEEDS) if seed is None else seed)
  Image.fromarray(rng.integers(0, 256, (10, 12), np.uint8)).save(path)


def write_folders(root, counts=None):
  """ROOT/{train,test}/<class>/im<i>.png, every image unique."""
  counts = counts or {
    "train/NORMAL": 8,
    "train/PNEU": 3,
    "test/NORMAL": 2,
    "test/PNEU": 2,
  }
  for folder, n in counts.items():
    for i in range(n):
      write_png(os.path.join(root, folder, f"im{i}.png"))


def write_mtd(root, n_free):
  """MT_Free/Imgs/f<i>.jpg normals and one MT_Crack defect with its mask."""
  for i in range(n_free):
    write_png(f"{root}/MT_Free/Imgs/f{i}.jpg")
  write_png(f"{root}/MT_Crack/Imgs/c.jpg")
  mask = Image.new("L", (12, 10), 0)
  mask.paste(255, (0, 0, 6, 10))
  mask.save(f"{root}/MT_Crack/Imgs/c.png")


def config(**kw):
  base = dict(
    format="folders",
    root="",
    image_size=8,
    normal_class="NORMAL",
    unlabeled_size=4,
    anomaly_rate=0.5,
    split_seed=0,
    cache_dir="",
  )
  base.update(kw)
  return ml_collections.ConfigDict(base)


class LayoutTestCase(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.tmp)
    self.root = os.path.join(self.tmp, "data")
    self.workdir = os.path.join(self.tmp, "work")
    self.cache = os.path.join(self.tmp, "cache")

  def load(self, workdir=None, fraction=0.0, **kw):
    kw.setdefault("root", self.root)
    kw.setdefault("cache_dir", self.cache)
    return oneclass.load(config(**kw), workdir or self.workdir, fraction)

  def split_path(self, workdir=None):
    return os.path.join(workdir or self.workdir, splits.SPLIT_FILE)

  def split_json(self, workdir=None):
    with open(self.split_path(workdir)) as f:
      return json.load(f)

  def no_decoding(self):
    """Fails the test if any image is decoded (the check must come first)."""
    return mock.patch.object(
      builder, "prepare", side_effect=AssertionError("decoded")
    )


class HiddenTest(LayoutTestCase):
  def test_folders_ignore_hidden_classes_and_files(self):
    write_folders(self.root)
    for split in ("train", "test"):
      # A notebook's checkpoint folder beside the class folders, with an
      # image inside: no class, and never read.
      write_png(f"{self.root}/{split}/.ipynb_checkpoints/x.png")
      with open(f"{self.root}/{split}/NORMAL/._im0.png", "wb") as f:
        f.write(b"AppleDouble, not a png")  # decoding it would fail
      with open(f"{self.root}/{split}/.DS_Store", "wb") as f:
        f.write(b"\0")
    ds = self.load(unlabeled_size=0)
    self.assertLen(ds.normal, 8)
    self.assertEqual(ds.test_labels.tolist(), [0, 0, 1, 1])
    names = ds.test_names + ds.normal_names
    self.assertFalse([n for n in names if "/." in n], names)
    split = self.split_json()
    self.assertNotIn(".ipynb_checkpoints", json.dumps(split))

  def test_mvtec_mtd_and_npz_ignore_hidden_names(self):
    mv = os.path.join(self.tmp, "mvtec")
    write_png(f"{mv}/train/good/a.png")
    write_png(f"{mv}/train/good/b.png")
    write_png(f"{mv}/test/good/c.png")
    write_png(f"{mv}/test/crack/d.png")
    mask = Image.new("L", (12, 10), 0)
    mask.paste(255, (0, 0, 6, 10))
    os.makedirs(f"{mv}/ground_truth/crack")
    mask.save(f"{mv}/ground_truth/crack/d_mask.png")
    write_png(f"{mv}/test/.ipynb_checkpoints/e.png")  # no defect class
    m = layouts.build(config(format="mvtec", root=mv), self.workdir)
    self.assertEqual(
      [e.name for e in m.parts["test"]], ["test/good/c.png", "test/crack/d.png"]
    )
    mtd = os.path.join(self.tmp, "mtd")
    write_mtd(mtd, 5)
    with open(f"{mtd}/MT_Free/Imgs/._f0.jpg", "wb") as f:
      f.write(b"AppleDouble")
    m = layouts.build(config(format="mtd", root=mtd), self.workdir)
    names = [e.name for p in m.parts.values() for e in p]
    self.assertLen(names, 6)
    self.assertNotIn("MT_Free/Imgs/._f0.jpg", names)
    npz = os.path.join(self.tmp, "npz")
    os.makedirs(npz)
    rng = np.random.default_rng(0)
    np.savez(
      f"{npz}/tiny.npz",
      train_images=rng.integers(0, 256, (6, 8, 8), np.uint8),
      train_labels=np.array([0, 0, 0, 0, 1, 1])[:, None],
      test_images=rng.integers(0, 256, (2, 8, 8), np.uint8),
      test_labels=np.array([[0], [1]]),
    )
    with open(f"{npz}/._tiny.npz", "wb") as f:
      f.write(b"AppleDouble")
    m = layouts.build(
      config(format="medmnist", root=npz, unlabeled_size=0),
      os.path.join(self.tmp, "w2"),
    )
    self.assertEqual(m.params["root"], f"{npz}/tiny.npz")


class LeakageTest(LayoutTestCase):
  def entries(self, *paths):
    return [manifest.Entry(os.path.basename(p), 0, p, "") for p in paths]

  def test_find_by_inode_and_by_bytes(self):
    for name in ("a", "b", "c"):
      write_png(f"{self.tmp}/{name}.png")
    shutil.copy(f"{self.tmp}/a.png", f"{self.tmp}/a_copy.png")
    os.symlink(f"{self.tmp}/b.png", f"{self.tmp}/b_link.png")
    # Same size as c.png, other bytes: hashed (sizes collide), not a pair.
    write_png(f"{self.tmp}/d.png")
    self.assertEqual(
      os.path.getsize(f"{self.tmp}/c.png"), os.path.getsize(f"{self.tmp}/d.png")
    )
    groups = {
      "train": self.entries(*(f"{self.tmp}/{n}.png" for n in "abc")),
      "test": self.entries(
        *(f"{self.tmp}/{n}.png" for n in ("a_copy", "b_link", "d"))
      ),
    }
    found = leakage.find(groups)
    self.assertEqual(
      [(d.names, d.how) for d in found],
      [
        (("a.png", "a_copy.png"), "identical bytes"),
        (("b.png", "b_link.png"), "same file"),
      ],
    )
    self.assertEqual(found[0].groups, ("train", "test"))
    # In one group, a duplicate is no leak; unlisted pairs are not compared.
    self.assertEmpty(leakage.find({"all": groups["train"] + groups["test"]}))
    three = {**groups, "other": groups["test"]}
    self.assertLen(leakage.find(three, pairs=[("other", "train")]), 2)

  def test_npz_pixels(self):
    a = np.arange(16, dtype=np.uint8).reshape(4, 4)

    def entry(name, x):
      return manifest.Entry(name, 0, lambda: x, "")

    groups = {
      "train": [entry("t0", a), entry("t1", a + 1)],
      "test": [entry("s0", a.copy()), entry("s1", a.reshape(2, 8))],
    }
    (d,) = leakage.find(groups)  # the reshaped one differs by shape
    self.assertEqual((d.names, d.how), (("t0", "s0"), "identical pixels"))

  def test_folders_refused_before_decoding_and_before_split_json(self):
    write_folders(self.root)
    for i in range(7):  # 7 train normals copied into the test split
      shutil.copy(
        f"{self.root}/train/NORMAL/im{i}.png",
        f"{self.root}/test/NORMAL/copy{i}.png",
      )
    with (
      self.no_decoding(),
      self.assertRaisesRegex(
        manifest.DataError,
        r"data: 7 pair\(s\) of identical images in two splits .*known normal"
        r" 'train/NORMAL/im\d.png' and test 'test/NORMAL/copy\d.png'"
        r" \(identical bytes\).* and 2 more.*data.allow_duplicates=true",
      ),
    ):
      self.load(unlabeled_size=0)
    self.assertFalse(os.path.exists(self.split_path()))
    with self.assertLogs("absl", "WARNING") as logs:
      ds = self.load(unlabeled_size=0, allow_duplicates=True)
    self.assertIn("Kept: data.allow_duplicates=true", str(logs.output))
    self.assertLen(ds.test, 11)
    with self.assertRaisesRegex(
      manifest.DataError, "data.allow_duplicates must be true or false"
    ):
      self.load(unlabeled_size=0, allow_duplicates="yes")

  def test_unlabeled_pool_and_symlinked_test(self):
    write_folders(self.root)
    os.symlink(
      f"{self.root}/train/PNEU/im0.png", f"{self.root}/test/PNEU/link.png"
    )
    # The pool draws 2 of the 3 train abnormals; seed 1 draws im0.
    with self.assertRaisesRegex(
      manifest.DataError,
      r"unlabeled 'train/PNEU/im0.png' and test 'test/PNEU/link.png'"
      r" \(same file\)",
    ):
      self.load(unlabeled_size=4, split_seed=1)

  def test_calibration_normal_identical_to_a_trained_one(self):
    write_folders(self.root, {"train/NORMAL": 1, "train/PNEU": 1})
    write_folders(self.root, {"test/NORMAL": 1, "test/PNEU": 1})
    shutil.copy(
      f"{self.root}/train/NORMAL/im0.png", f"{self.root}/train/NORMAL/im1.png"
    )
    # 2 known normals, one held out: the twin of a trained image.
    with self.assertRaisesRegex(
      manifest.DataError, r"trained normal .* and calibration .*"
    ):
      self.load(fraction=0.5, unlabeled_size=0)
    self.assertFalse(os.path.exists(self.split_path()))

  def test_medmnist_pixels(self):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (6, 8, 8), np.uint8)
    test = rng.integers(0, 256, (2, 8, 8), np.uint8)
    test[0] = train[1]  # a train normal in the test split
    path = os.path.join(self.tmp, "m.npz")
    np.savez(
      path,
      train_images=train,
      train_labels=np.array([0, 0, 0, 0, 1, 1])[:, None],
      test_images=test,
      test_labels=np.array([[0], [1]]),
    )
    with self.assertRaisesRegex(
      manifest.DataError,
      r"known normal 'train/00001' and test 'test/00000' \(identical pixels\)",
    ):
      self.load(format="medmnist", root=path, unlabeled_size=0)

  def test_fewshot_source_image_in_the_target_test(self):
    d24 = os.path.join(self.tmp, "d24")
    for ds in ("S", "T"):
      for folder, n in (("train/good", 4), ("test/good", 2), ("test/bad", 2)):
        for i in range(n):
          write_png(f"{d24}/{ds}/{folder}/im{i}.png")
    shutil.copy(f"{d24}/T/test/bad/im0.png", f"{d24}/S/train/good/leak.png")
    data = ml_collections.ConfigDict(
      dict(root=d24, target="T", shots=2, image_size=8, cache_dir=self.cache)
    )
    with (
      self.no_decoding(),
      self.assertRaisesRegex(
        manifest.DataError,
        r"data.target='T': 1 pair\(s\).*source 'S' training normal"
        r" 'train/good/leak.png' and target 'T' test 'test/bad/im0.png'",
      ),
    ):
      fewshot.load(data, self.workdir)


if __name__ == "__main__":
  absltest.main()
