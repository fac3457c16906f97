"""Tests of jaxad.data's grain pipeline and of the real datasets in
../shared (skipped with a reason when absent)."""

import os

import numpy as np
from absl.testing import absltest
from data_test import (
  KERMANY,
  PNEUMONIAMNIST,
  DataTestCase,
  config,
  make_medad,
)

from jaxad.data import pipeline


class PipelineTest(DataTestCase):
  def test_fake_source_batches(self):
    src = pipeline.FakeSource(10, 4, anomaly_every=5)
    batches = list(
      pipeline.grain_batches(src, batch_size=4, seed=0, num_epochs=1)
    )
    self.assertLen(batches, 2)  # 10 // 4 with drop_remainder
    self.assertEqual(batches[0]["image"].shape, (4, 4, 4, 1))
    self.assertEqual(batches[0]["image"].dtype, np.uint8)
    self.assertEqual(batches[0]["label"].shape, (4,))

  def test_shuffle_and_processes(self):
    src = pipeline.FakeSource(12, 2)
    seen = []
    for p in range(3):
      it = pipeline.grain_batches(
        src,
        batch_size=2,
        seed=1,
        num_epochs=1,
        process_index=p,
        process_count=3,
      )
      seen.append(np.concatenate([b["index"] for b in it]))
    self.assertCountEqual(np.concatenate(seen).tolist(), list(range(12)))
    plain = pipeline.grain_batches(
      src, batch_size=12, seed=0, shuffle=False, num_epochs=1
    )
    np.testing.assert_array_equal(next(iter(plain))["index"], np.arange(12))
    forever = iter(pipeline.grain_batches(src, batch_size=5, seed=0))
    epochs = np.concatenate(
      [next(forever)["index"] for _ in range(24)]
    )  # 10 epochs
    self.assertEqual(np.bincount(epochs).tolist(), [10] * 12)
    with self.assertRaisesRegex(ValueError, "too few"):
      pipeline.grain_batches(src, batch_size=20, seed=0, num_epochs=1)

  def test_data_source_of_a_prepared_split(self):
    root = os.path.join(self.tmp, "medad")
    make_medad(root)
    data = config(
      format="medad", root=root, unlabeled_size=0, cache_dir=self.cache
    )
    test = pipeline.data_source(data, self.workdir, "test")
    self.assertLen(test, 5)
    self.assertLen(pipeline.data_source(data, self.workdir, "unlabeled"), 0)
    batch = next(
      iter(
        pipeline.grain_batches(
          test, batch_size=5, seed=0, shuffle=False, num_epochs=1
        )
      )
    )
    np.testing.assert_array_equal(batch["label"], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(
      batch["image"][:, 0, 0, 0], [40, 41, 50, 51, 52]
    )


class RealDataTest(DataTestCase):
  def test_kermany_folders(self):
    if not KERMANY.is_dir():
      self.skipTest(f"{KERMANY} absent (shared data sits beside the checkout)")
    ds = self.load(
      format="folders", root=str(KERMANY), image_size=16, unlabeled_size=10
    )
    self.assert_arrays(ds, 1341 - 4, 10, 624, size=16)
    self.assertEqual(int((ds.test_labels == 0).sum()), 234)
    self.assertEqual(int(ds.test_labels.sum()), 390)
    self.assertEqual(int(ds.unlabeled_labels.sum()), 6)

  def test_pneumoniamnist(self):
    path = PNEUMONIAMNIST / "pneumoniamnist.npz"
    if not path.is_file():
      self.skipTest(f"{path} absent (shared data sits beside the checkout)")
    ds = self.load(
      format="medmnist", root=str(path), image_size=28, unlabeled_size=100
    )
    self.assert_arrays(ds, 1214 - 40, 100, 468, size=28)
    self.assertEqual(int(ds.test_labels.sum()), 234)
    raw = np.load(path)["test_images"][
      np.flatnonzero(np.load(path)["test_labels"][:, 0] == 0)
    ]
    np.testing.assert_array_equal(
      ds.test[:234, :, :, 0], raw
    )  # same size: no-op resize


if __name__ == "__main__":
  absltest.main()
