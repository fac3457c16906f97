"""Tests of jaxad.data.fewshot (D²4FAD's leave-one-dataset-out data) on
tiny fixtures, and on ../shared/data when present (skipped otherwise)."""

import json
import os
import pathlib
import shutil
import tempfile

import ml_collections
import numpy as np
from absl.testing import absltest
from PIL import Image

from jaxad.data import d24fad_layout, fewshot, manifest
from jaxad.methods import api
from jaxad.methods.d24fad import episodes

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
ISIC = SHARED / "data" / "isic2017_256"
KERMANY = SHARED / "data" / "kermany_cxr_224"

# Folder -> the pixel values of its images (one image per value; value v
# decodes to the RGB colour (v, 255 - v, v // 2) at any size).
FIXTURE = {
  "A/train/good": range(10, 14),
  "A/train/Ungood": range(14, 15),  # not read: only train/good is
  "A/test/good": range(20, 22),
  "A/test/Ungood": range(22, 24),
  "A/test/.hidden": range(24, 25),
  "B/train/good": range(30, 33),
  "B/test/good": range(40, 41),
  "B/test/bad": range(41, 42),
  "C/train/good": range(50, 55),
  "C/test/good": range(60, 62),
  "C/test/Ungood": range(62, 63),
  "C/test/bad": range(63, 64),
  "med-kshot/C/train/shot2/good2": range(70, 72),
  "F/train/NORMAL": range(80, 84),
  "F/train/PNEU": range(84, 86),
  "F/test/NORMAL": range(86, 87),
  "F/test/PNEU": range(87, 89),
}


def write_image(path, v, size=(12, 10)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, (v, 255 - v, v // 2)).save(path)


def write_fixture(root, fixture):
  for folder, values in fixture.items():
    for v in values:
      write_image(os.path.join(root, folder, f"im{v:03d}.png"), v)


def values(images):
  """The value v of each decoded fixture image (checking its colour)."""
  v = images[:, 0, 0, 0].astype(int)
  np.testing.assert_array_equal(images[:, 3, 3, 1], 255 - v)
  return v.tolist()


class FewShotTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.root = os.path.join(cls.tmp, "d24")
    write_fixture(cls.root, FIXTURE)
    for hidden in ("A/train/good/.DS_Store", "A/train/good/notes.txt"):
      with open(os.path.join(cls.root, hidden), "w") as f:
        f.write("not an image")
    cls.cache = os.path.join(cls.tmp, "cache")  # prepared once per class

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp)
    super().tearDownClass()

  def setUp(self):
    super().setUp()
    self.workdir = tempfile.mkdtemp(dir=self.tmp)

  def config(self, **kw):
    r = self.root
    base = dict(
      sources=[
        dict(format="d24fad", root=f"{r}/A"),
        dict(format="d24fad", root=f"{r}/B"),
        dict(format="d24fad", root=f"{r}/C"),
        dict(format="folders", root=f"{r}/F", normal_class="NORMAL"),
      ],
      target="C",
      shots=2,
      support="auto",
      support_seed=0,
      image_size=8,
      cache_dir=self.cache,
    )
    base.update(kw)
    return ml_collections.ConfigDict(base)

  def load(self, workdir=None, **kw):
    return fewshot.load(self.config(**kw), workdir or self.workdir)

  def split_json(self):
    with open(os.path.join(self.workdir, "split.json")) as f:
      return json.load(f)

  def test_pools_test_and_fixed_support(self):
    ds = self.load()
    self.assertEqual(ds.name, "C")
    self.assertEqual(ds.source_names, ("A", "B", "F"))
    self.assertEqual(ds.pools.shape, (11, 8, 8, 3))
    self.assertEqual(ds.pools.dtype, np.uint8)
    # The .DS_Store / notes.txt files and A/train/Ungood are not read.
    self.assertEqual(
      values(ds.pools), [*range(10, 14), 30, 31, 32, 80, 81, 82, 83]
    )
    np.testing.assert_array_equal(ds.pool_source, [0] * 4 + [1] * 3 + [2] * 4)
    self.assertEqual(ds.pool_source.dtype, np.int32)
    # Target test: good first, then the others sorted ("Ungood" < "bad").
    self.assertEqual(values(ds.test), [60, 61, 62, 63])
    np.testing.assert_array_equal(ds.test_labels, [0, 0, 1, 1])
    self.assertEqual(ds.test_labels.dtype, np.int32)
    self.assertEqual(ds.test_names[2], "test/Ungood/im062.png")
    self.assertIsNone(ds.test_masks)
    # C has med-kshot/C/train/shot2/good2: the fixed support, not a draw.
    self.assertEqual(ds.support.shape, (2, 8, 8, 3))
    self.assertEqual(values(ds.support), [70, 71])
    self.assertEqual(ds.support_names[0], "C/train/shot2/good2/im070.png")
    self.assertStartsWith(ds.support_from, "fixed")
    self.assertFalse(os.path.exists(os.path.join(self.workdir, "split.json")))
    for field in api.EvalData.__annotations__:
      self.assertTrue(hasattr(ds, field), field)
    start, size = episodes.source_ranges(ds.pool_source)  # grouped, >= 2
    np.testing.assert_array_equal(size, [4, 3, 4])

  def test_excluded_sources_are_not_trained_on(self):
    ds = self.load(exclude_sources="A, F")
    self.assertEqual(ds.source_names, ("B",))
    self.assertEqual(values(ds.pools), [30, 31, 32])
    np.testing.assert_array_equal(ds.pool_source, [0, 0, 0])
    self.assertEqual(self.load(exclude_sources=["B"]).source_names, ("A", "F"))

  def test_label_rule_and_hidden_folders(self):
    ds = self.load(target="A")
    # Ungood is abnormal (the original would call it normal); the image in
    # test/.hidden is not read.
    self.assertEqual(values(ds.test), [20, 21, 22, 23])
    np.testing.assert_array_equal(ds.test_labels, [0, 0, 1, 1])
    self.assertEqual(ds.source_names, ("B", "C", "F"))
    data = ml_collections.ConfigDict(dict(root=f"{self.tmp}/G", image_size=8))
    write_fixture(self.tmp, {"G/train/good": [1], "G/test/Good": [2]})
    write_fixture(self.tmp, {"G/test/bad": [3]})
    with self.assertRaisesRegex(manifest.DataError, "G/test/Good.*exactly"):
      d24fad_layout.d24fad(data, self.workdir)

  def test_drawn_support_is_seeded_recorded_and_per_k(self):
    ds = self.load(target="A")
    train = [f"train/good/im{v:03d}.png" for v in range(10, 14)]
    self.assertStartsWith(ds.support_from, "drawn")
    self.assertLen(ds.support_names, 2)
    self.assertContainsSubset(ds.support_names, train)
    self.assertEqual(
      values(ds.support), [int(n[-7:-4]) for n in ds.support_names]
    )
    split = self.split_json()
    self.assertEqual(split["params"], {"format": "fewshot"})
    self.assertEqual(split["support"]["A"]["2"]["0"], list(ds.support_names))
    # The same K re-uses the record; another K or seed adds a draw.
    again = self.load(target="A")
    self.assertEqual(again.support_names, ds.support_names)
    k3 = self.load(target="A", shots=3)
    self.assertContainsSubset(ds.support_names, k3.support_names)  # nested
    self.load(target="A", support_seed=1)
    split = self.split_json()
    self.assertEqual(sorted(split["support"]["A"]), ["2", "3"])
    self.assertEqual(sorted(split["support"]["A"]["2"]), ["0", "1"])
    self.assertEqual(split["support"]["A"]["3"]["0"], list(k3.support_names))
    draws = {tuple(d24fad_layout.draw_support(train, 2, s)) for s in range(6)}
    self.assertGreater(len(draws), 1)

  def test_support_modes(self):
    # No shot3 folder for C: auto draws from C's training normals.
    ds = self.load(shots=3)
    self.assertContainsSubset(values(ds.support), range(50, 55))
    ds = self.load(support="drawn")
    self.assertContainsSubset(values(ds.support), range(50, 55))
    with self.assertRaisesRegex(FileNotFoundError, "C/train/shot3/good3"):
      self.load(shots=3, support="fixed")
    with self.assertRaisesRegex(FileNotFoundError, "support_root is unset"):
      self.load(target="F", support="fixed")
    # data.support_root overrides the target entry's.
    other = os.path.join(self.workdir, "kshot")
    write_fixture(other, {"C/train/shot2/good2": [75, 76]})
    ds = self.load(support_root=other, support="fixed")
    self.assertEqual(values(ds.support), [75, 76])

  def test_masks_category_name_and_duplicate_warning(self):
    w = self.workdir
    write_fixture(w, {"M/bottle/train/good": [1, 2], "M/bottle/test/good": [3]})
    write_fixture(w, {"M/bottle/test/crack": [4], "D/test/bad": [92]})
    mask = Image.new("L", (12, 10), 0)
    mask.paste(255, (0, 0, 6, 10))  # the left half is anomalous
    os.makedirs(f"{w}/M/bottle/ground_truth/crack")
    mask.save(f"{w}/M/bottle/ground_truth/crack/im004_mask.png")
    # D's training normals are byte copies of its test normals.
    write_fixture(w, {"D/train/good": [90, 91], "D/test/good": [90, 91]})
    sources = [
      *self.config().sources,
      dict(format="mvtec", root=f"{w}/M", category="bottle"),
      dict(format="d24fad", root=f"{w}/D"),
    ]
    ds = self.load(sources=sources, target="M-bottle")
    self.assertEqual(ds.source_names, ("A", "B", "C", "F", "D"))
    self.assertEqual(ds.test_masks.shape, (2, 8, 8))
    np.testing.assert_array_equal(ds.test_masks[1, :, :4], 1)
    np.testing.assert_array_equal(ds.test_masks[1, :, 4:], 0)
    with self.assertLogs("absl", "WARNING") as logs:
      self.load(sources=sources, target="D", allow_duplicates=True)
    self.assertIn("identical to test image test/good/im09", str(logs.output))
    # A fixed support image with a test image's pixels: refused before any
    # split record is written, unless duplicates are allowed.
    write_fixture(w, {"G/train/good": [60, 61], "G/test/good": [63]})
    write_fixture(
      w, {"G/test/bad": [64], "med-kshot/G/train/shot2/good2": [60]}
    )
    write_image(f"{w}/med-kshot/G/train/shot2/good2/copy.png", 64)
    leak = [*sources, dict(format="d24fad", root=f"{w}/G")]
    fresh = os.path.join(w, "fresh")
    with self.assertRaisesRegex(
      manifest.DataError,
      r"Support image G/train/shot2/good2/copy.png of G is identical to"
      r" test image test/bad/im064.*allow_duplicates=true",
    ):
      self.load(fresh, sources=leak, target="G")
    self.assertFalse(os.path.exists(os.path.join(fresh, "split.json")))
    with self.assertLogs("absl", "WARNING") as logs:
      self.load(fresh, sources=leak, target="G", allow_duplicates=True)
    self.assertIn("copy.png of G is identical", str(logs.output))
    # A source's test split is never decoded: a broken test file there
    # does not stop the run.
    write_fixture(w, {"E/train/good": [1, 2], "E/test/good": [3]})
    os.makedirs(f"{w}/E/test/bad")
    with open(f"{w}/E/test/bad/broken.png", "wb") as f:
      f.write(b"not a png")
    ds = self.load(sources=[*sources, dict(format="d24fad", root=f"{w}/E")])
    self.assertEqual(ds.source_names, ("A", "B", "F", "M-bottle", "D", "E"))

  def test_string_entries_and_d24fad_root(self):
    ds = self.load(
      root=self.root,
      sources=[f"format=folders,root={self.root}/F,normal_class=NORMAL"],
      target="F",
    )
    self.assertEqual(ds.source_names, ("A", "B", "C"))
    self.assertEqual(len(ds.pools), 12)
    self.assertEqual(values(ds.test), [86, 87, 88])
    np.testing.assert_array_equal(ds.test_labels, [0, 1, 1])
    self.assertContainsSubset(values(ds.support), range(80, 84))
    self.assertEqual(
      self.split_json()["support"]["F"]["2"]["0"],
      [f"train/NORMAL/im{v:03d}.png" for v in values(ds.support)],
    )
    # The folders layout's own (trivial) split is kept per dataset.
    self.assertTrue(os.path.isfile(f"{self.workdir}/sources/F/split.json"))

  def assert_refused(self, error, regex, **kw):
    cache = os.path.join(self.workdir, "cache")
    with self.assertRaisesRegex(error, regex):
      self.load(cache_dir=cache, **kw)
    self.assertFalse(os.path.exists(cache))  # refused before decoding

  def test_config_errors(self):
    err = manifest.DataError
    sources = self.config().sources
    self.assert_refused(err, r"target='X'.*\['A', 'B', 'C', 'F'\]", target="X")
    dup = [*sources, dict(format="d24fad", root=f"{self.tmp}/x/C")]
    self.assert_refused(err, "'C'.*listed twice", sources=dup)
    same = [*sources, dict(format="d24fad", root=sources[2]["root"], name="Z")]
    self.assert_refused(err, "'Z'.*listed twice.*'C'", sources=same)
    typo = [*sources[:3], dict(format="folders", root="f", normal_clas="N")]
    self.assert_refused(err, r"sources\[3\].*'normal_clas'", sources=typo)
    self.assert_refused(
      err, r"sources\[0\].*format 'png'", sources=[dict(format="png", root="r")]
    )
    self.assert_refused(
      err, r"sources\[0\].*'x' is not key=value", sources=["x"]
    )
    self.assert_refused(err, "only the target", sources=sources[2:3])
    self.assert_refused(err, "shots must be >= 1", shots=0)
    self.assert_refused(err, "exclude_sources names 'Q'", exclude_sources="Q")
    self.assert_refused(err, "exclude_sources names 'C'", exclude_sources="C")
    self.assert_refused(err, "No source dataset left", exclude_sources="A,B,F")
    self.assert_refused(err, "support='any'", support="any")
    self.assert_refused(
      FileNotFoundError,
      "data.support_root not found: .*/no-kshot",
      support_root=f"{self.tmp}/no-kshot",
    )
    typo = [*sources[:3], dict(sources[3], support_root=f"{self.tmp}/nope")]
    self.assert_refused(
      FileNotFoundError,
      r"data.sources\[3\].support_root not found",
      sources=typo,
    )
    self.assert_refused(
      err, "'B'.*3 training normals.*shots=4", target="B", shots=4
    )

  def test_data_errors(self):
    err = manifest.DataError
    write_fixture(self.workdir, {"one/train/good": [1], "one/test/good": [2]})
    write_fixture(self.workdir, {"X/train/good": [1, 2], "X/test/good": [3]})
    write_fixture(self.workdir, {"X/test/bad": [4]})
    write_fixture(self.workdir, {"med-kshot/X/train/shot2/good2": [5]})
    sources = self.config().sources
    one = [*sources, dict(format="d24fad", root=f"{self.workdir}/one")]
    self.assert_refused(err, "Source 'one'.*1 training normals", sources=one)
    x = [*sources, dict(format="d24fad", root=f"{self.workdir}/X")]
    self.assert_refused(
      err, "good2 holds 1 images, data.shots=2", sources=x, target="X"
    )
    missing = [
      *sources,
      dict(format="d24fad", root=f"{self.workdir}/med-kshot"),
    ]
    self.assert_refused(
      FileNotFoundError, "med-kshot/train/good", sources=missing
    )
    nowhere = [*sources, dict(format="folders", root=f"{self.tmp}/nowhere")]
    self.assert_refused(
      FileNotFoundError,
      r"data\.sources\[4\]\.root not found: .*/nowhere \(entry 'nowhere'\)",
      sources=nowhere,
    )
    # A record naming an image that is no training normal of the target.
    path = os.path.join(self.workdir, "split.json")
    record = {
      "params": {"format": "fewshot"},
      "support": {"A": {"2": {"0": ["test/good/im020.png", "x"]}}},
    }
    with open(path, "w") as f:
      json.dump(record, f)
    self.assert_refused(err, r"split.json.*'test/good/im020.png'", target="A")
    with open(path, "w") as f:
      json.dump({"params": {"format": "folders"}, "normal": []}, f)
    self.assert_refused(err, "split.json holds another kind", target="A")

  def test_real_sets(self):
    for path in (ISIC, KERMANY):
      if not path.is_dir():
        self.skipTest(f"{path} absent (shared data sits beside the checkout)")
    ds = self.load(
      sources=[
        f"format=folders,root={ISIC},normal_class=nevus",
        f"format=folders,root={KERMANY},normal_class=NORMAL",
      ],
      target="isic2017_256",
      shots=4,
      image_size=32,
      cache_dir=os.path.join(self.workdir, "cache"),
    )
    self.assertEqual(ds.source_names, ("kermany_cxr_224",))
    self.assertEqual(ds.pools.shape, (1341, 32, 32, 3))
    np.testing.assert_array_equal(ds.pool_source, np.zeros(1341))
    self.assertEqual(ds.test.shape, (388 + 117 + 90, 32, 32, 3))
    self.assertEqual(int((ds.test_labels == 0).sum()), 388)
    self.assertEqual(ds.support.shape, (4, 32, 32, 3))
    for n in ds.support_names:
      self.assertStartsWith(n, "train/nevus/")


if __name__ == "__main__":
  absltest.main()
