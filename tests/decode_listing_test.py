"""Tests of listing folders (listing.py, inputs.find_inputs): hidden files
ignored, unreadable files (broken links, no permission, 0 bytes) an error
naming them or a counted skip in W/skipped.txt, linked folders. Every input
is written by the test."""

import os
from unittest import mock

import ml_collections
import numpy as np
from absl.testing import absltest
from decode_test import S, TestCase, entry, save

from jaxad.data import builder, inputs, listing, manifest, oneclass


class ListingTest(TestCase):
  def setUp(self):
    super().setUp()
    self.folder = self.path("NORMAL")
    for f in ("a.png", "B.PNG"):
      save(os.path.join(self.folder, f), np.zeros((S, S), np.uint8))

  def test_hidden_files_and_folders_are_ignored(self):
    with open(os.path.join(self.folder, ".DS_Store"), "wb") as f:
      f.write(b"\0\0\0\1Bud1")
    with open(os.path.join(self.folder, "._a.png"), "wb") as f:
      f.write(b"\0\5\26\7 AppleDouble")  # not a PNG: must not be read
    save(
      os.path.join(self.folder, ".ipynb_checkpoints", "a.png"),
      np.zeros((S, S), np.uint8),
    )
    self.assertEqual(manifest.list_images(self.folder), ["B.PNG", "a.png"])
    names = [e.name for e in inputs.find_inputs(self.tmp)]
    self.assertEqual(names, ["NORMAL/B.PNG", "NORMAL/a.png"])
    self.assertEqual(inputs.count_other_files(self.tmp), 0)

  def test_broken_link_is_an_error_or_a_counted_skip(self):
    link = os.path.join(self.folder, "c.png")
    os.symlink(self.path("gone.png"), link)
    with self.assertRaisesRegex(
      manifest.DataError,
      r"Unreadable image file .*NORMAL/c.png: broken symbolic link to"
      r" .*gone.png; set data.skip_unreadable=true",
    ):
      manifest.list_images(self.folder)
    with manifest.skipping(True) as skipped:
      self.assertEqual(manifest.list_images(self.folder), ["B.PNG", "a.png"])
    self.assertEqual(
      skipped, [(link, f"broken symbolic link to {self.path('gone.png')}")]
    )
    with self.assertRaisesRegex(FileNotFoundError, "c.png.*broken symbolic"):
      manifest.file_stamp(link)
    # predict lists it, and its decode is the error row naming it.
    e = [e for e in inputs.find_inputs(self.folder) if e.name == "c.png"]
    self.assertLen(e, 1)
    pixels, error = inputs.decode(e[0], 8, 1)
    self.assertIsNone(pixels)
    self.assertRegex(error, "FileNotFoundError: .*c.png .*broken symbolic")

  def test_unreadable_and_empty_files(self):
    open(os.path.join(self.folder, "zero.png"), "wb").close()
    with self.assertRaisesRegex(manifest.DataError, "zero.png: empty file"):
      manifest.list_images(self.folder)
    os.remove(os.path.join(self.folder, "zero.png"))
    # Root can read anything: stand in for a file without read permission.
    real = os.access
    with mock.patch.object(
      listing.os,
      "access",
      lambda p, m: not p.endswith("a.png") and real(p, m),
    ):
      with self.assertRaisesRegex(manifest.DataError, "a.png: not readable"):
        manifest.list_images(self.folder)

  def test_apply_options_records_listing_skips(self):
    os.symlink(self.path("gone.png"), os.path.join(self.folder, "c.png"))
    data = ml_collections.ConfigDict(
      {"skip_unreadable": True, "intensity": "minmax", "channels": 3}
    )

    def layout():
      names = manifest.list_images(self.folder)
      normal = tuple(entry(os.path.join(self.folder, f)) for f in names)
      return manifest.Manifest(
        "x", 8, {"normal": normal, "unlabeled": (), "test": ()}, {}
      )

    m = manifest.apply_options(data, layout)
    self.assertEqual(
      (m.channels, m.intensity, m.skip_unreadable), (3, "minmax", True)
    )
    self.assertLen(m.parts["normal"], 2)
    self.assertEqual(
      [f for f, _ in m.skipped], [os.path.join(self.folder, "c.png")]
    )
    builder.report_skipped(m, self.path("W"))
    with open(self.path("W", "skipped.txt")) as f:
      self.assertRegex(f.read(), r"NORMAL/c.png\tbroken symbolic link")
    with self.assertRaisesRegex(manifest.DataError, "c.png: broken"):
      manifest.apply_options(ml_collections.ConfigDict(), layout)
    # No skip left: a stale list is removed.
    builder.report_skipped(
      manifest.apply_options(
        ml_collections.ConfigDict(), lambda: manifest.Manifest("y", 8, {}, {})
      ),
      self.path("W"),
    )
    self.assertFalse(os.path.exists(self.path("W", "skipped.txt")))

  def test_predict_follows_linked_folders_once(self):
    os.symlink(self.folder, self.path("linked"))
    os.symlink(self.tmp, os.path.join(self.folder, "loop"))
    names = [e.name for e in inputs.find_inputs(self.tmp)]
    self.assertEqual(names, ["NORMAL/B.PNG", "NORMAL/a.png"])
    names = [e.name for e in inputs.find_inputs(self.path("linked"))]
    self.assertEqual(names, ["B.PNG", "a.png"])


class FoldersLayoutTest(TestCase):
  """Through `oneclass.load`: what a user of the folders layout sees."""

  def test_broken_link_and_hidden_files_in_class_folders(self):
    root = self.path("cxr")
    value = iter(range(10, 250, 10))  # distinct images: no duplicates
    for split, c, n in (
      ("train", "NORMAL", 6),
      ("train", "PNEU", 4),
      ("test", "NORMAL", 2),
      ("test", "PNEU", 3),
    ):
      for i in range(n):
        save(
          f"{root}/{split}/{c}/{i}.png", np.full((S, S), next(value), np.uint8)
        )
    pneu = f"{root}/test/PNEU"
    with open(f"{pneu}/.DS_Store", "wb") as f:
      f.write(b"\0\0\0\1Bud1")
    with open(f"{pneu}/._0.png", "wb") as f:
      f.write(b"\0\5\26\7 AppleDouble")
    link = f"{pneu}/9.png"
    os.symlink(self.path("moved_away.png"), link)
    data = ml_collections.ConfigDict(
      dict(
        format="folders",
        root=root,
        image_size=8,
        normal_class="NORMAL",
        unlabeled_size=4,
        anomaly_rate=0.5,
        split_seed=0,
        cache_dir=self.path("cache"),
      )
    )
    # It used to be dropped without a word (3 of 4 abnormal tests scored).
    with self.assertRaisesRegex(
      manifest.DataError, "test/PNEU/9.png: broken symbolic link"
    ):
      oneclass.load(data, self.path("w1"))
    os.remove(link)
    ds = oneclass.load(data, self.path("w2"))
    self.assertEqual(ds.test_labels.tolist(), [0, 0, 1, 1, 1])
    self.assertEqual(
      ds.test_names[2:],
      ("test/PNEU/0.png", "test/PNEU/1.png", "test/PNEU/2.png"),
    )


if __name__ == "__main__":
  absltest.main()
