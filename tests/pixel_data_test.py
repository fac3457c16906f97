"""Tests of the layouts with pixel masks (mvtec, bmad, mtd) on tiny fixtures,
of data.channels, of the pixel metrics in eval.json, and (when ../shared is
present) of the real Magnetic Tile Defects folder."""

import dataclasses
import glob
import json
import os
import shutil

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl.testing import absltest
from data_test import SHARED, DataTestCase, write_image
from PIL import Image

from jaxad import evaluate, metrics, sharding
from jaxad.data import manifest
from jaxad.methods import api

MTD = SHARED / "data" / "magnetic_tile_defects"
MTD_DEFECTS = {
  "Blowhole": 115,
  "Break": 85,
  "Crack": 57,
  "Fray": 32,
  "Uneven": 103,
}


def write_mask(path, size=(30, 20), columns=15):
  """A mask of `size` (w, h), white in its first `columns` columns.

  Stored at the 8x8 of the tests (nearest sampling of a 30-wide image reads
  columns 1, 5, 9, 13, 16, ...), a 15-column mask of a 30x20 image is 1 in
  columns 0-3 and 0 in 4-7.
  """
  os.makedirs(os.path.dirname(path), exist_ok=True)
  mask = np.zeros(size[::-1], np.uint8)
  mask[:, :columns] = 255
  Image.fromarray(mask).save(path)


LEFT_HALF = np.zeros((8, 8), np.uint8)
LEFT_HALF[:, :4] = 1


class MvtecTest(DataTestCase):
  def setUp(self):
    super().setUp()
    self.root = os.path.join(self.tmp, "mvtec")
    base = os.path.join(self.root, "bottle")
    for i in range(4):
      write_image(f"{base}/train/good/{i:03d}.png", 10 + i)
    for i in range(2):
      write_image(f"{base}/test/good/{i:03d}.png", 20 + i)
    for defect, v in (("broken", 30), ("crack", 40)):
      for i in range(2):
        write_image(f"{base}/test/{defect}/{i:03d}.png", v + i)
        write_mask(f"{base}/ground_truth/{defect}/{i:03d}_mask.png")
    self.base = base

  def load(self, **kw):
    kw.setdefault("category", "bottle")
    return super().load(format="mvtec", root=self.root, **kw)

  def test_counts_order_and_masks(self):
    ds = self.load()
    self.assert_arrays(ds, 4, 0, 6)
    self.assertEqual(ds.name, "mvtec/bottle")
    np.testing.assert_array_equal(ds.normal[:, 0, 0, 0], [10, 11, 12, 13])
    np.testing.assert_array_equal(ds.test[:, 0, 0, 0], [20, 21, 30, 31, 40, 41])
    np.testing.assert_array_equal(ds.test_labels, [0, 0, 1, 1, 1, 1])
    self.assertEqual(
      ds.test_names[1:3], ("test/good/001.png", "test/broken/000.png")
    )
    self.assertEqual(ds.test_masks.shape, (6, 8, 8))
    self.assertEqual(ds.test_masks.dtype, np.uint8)
    np.testing.assert_array_equal(ds.test_masks[:2], 0)
    for mask in ds.test_masks[2:]:
      np.testing.assert_array_equal(mask, LEFT_HALF)

  def test_root_is_the_category_without_data_category(self):
    ds = super().load(format="mvtec", root=self.base)
    self.assertEqual(ds.name, "bottle")
    self.assert_arrays(ds, 4, 0, 6)

  def test_mask_of_another_resolution_same_aspect(self):
    write_mask(
      f"{self.base}/ground_truth/crack/001_mask.png", (60, 40), columns=30
    )
    ds = self.load()
    np.testing.assert_array_equal(ds.test_masks[5], LEFT_HALF)

  def test_mask_of_another_aspect(self):
    write_mask(f"{self.base}/ground_truth/crack/001_mask.png", (30, 30))
    with self.assertRaisesRegex(
      manifest.DataError,
      "crack/001_mask.png is 30x30 but its image .*crack/001.png is 30x20",
    ):
      self.load()

  def test_missing_mask(self):
    os.remove(f"{self.base}/ground_truth/broken/001_mask.png")
    with self.assertRaisesRegex(
      manifest.DataError,
      "No mask for abnormal image .*test/broken/001.png: expected"
      " .*ground_truth/broken/001_mask.png",
    ):
      self.load()

  def test_corrupt_mask(self):
    with open(f"{self.base}/ground_truth/broken/000_mask.png", "wb") as f:
      f.write(b"not a png")
    with self.assertRaisesRegex(
      manifest.DataError, "Cannot decode mask .*broken/000_mask.png"
    ):
      self.load()

  def test_missing_good_or_category(self):
    with self.assertRaisesRegex(
      FileNotFoundError, r"mvtec/bottel .*'bottel'.*found in .*\['bottle'\]"
    ):
      self.load(category="bottel")
    with self.assertRaisesRegex(
      FileNotFoundError, "mvtec/train/good .*ROOT/CAT/train/good/"
    ):
      self.load(category="")
    shutil.rmtree(f"{self.base}/test/good")
    with self.assertRaisesRegex(
      manifest.DataError, r"'good' and at least one.*\['broken', 'crack'\]"
    ):
      self.load()

  def test_channels(self):
    # A colour image: R, G, B = 200, 100, 50.
    Image.new("RGB", (30, 20), (200, 100, 50)).save(
      f"{self.base}/train/good/000.png"
    )
    rgb = self.load(channels=3)
    self.assertEqual(rgb.normal.shape, (4, 8, 8, 3))
    self.assertEqual(rgb.test.shape, (6, 8, 8, 3))
    np.testing.assert_array_equal(rgb.normal[0, 0, 0], [200, 100, 50])
    # Gray images are replicated over the three channels.
    np.testing.assert_array_equal(rgb.normal[1, 0, 0], [11, 11, 11])
    gray = self.load()
    # PIL's L = (299 R + 587 G + 114 B) / 1000 = 124.4.
    self.assertEqual(gray.normal[0, 0, 0, 0], 124)
    self.assertLen(os.listdir(self.cache), 2)  # channels enter the cache key
    with self.assertRaisesRegex(manifest.DataError, r"channels must be .*2"):
      self.load(channels=2)


class BmadTest(DataTestCase):
  def setUp(self):
    super().setUp()
    self.root = os.path.join(self.tmp, "Brain")
    for i in range(3):
      write_image(f"{self.root}/train/good/img/{i}.png", 10 + i)
    for split in ("test", "valid"):
      for i in range(2):
        write_image(f"{self.root}/{split}/good/img/{i}.png", 20 + i)
        write_image(f"{self.root}/{split}/Ungood/img/{i}.png", 30 + i)
        write_mask(f"{self.root}/{split}/Ungood/label/{i}.png")

  def load(self, **kw):
    return super().load(format="bmad", root=self.root, **kw)

  def test_counts_and_masks(self):
    ds = self.load()  # valid/ is not read
    self.assert_arrays(ds, 3, 0, 4)
    self.assertEqual(ds.name, "Brain")
    np.testing.assert_array_equal(ds.test[:, 0, 0, 0], [20, 21, 30, 31])
    np.testing.assert_array_equal(ds.test_labels, [0, 0, 1, 1])
    self.assertEqual(ds.test_names[2], "test/Ungood/img/0.png")
    np.testing.assert_array_equal(ds.test_masks[:2], 0)
    np.testing.assert_array_equal(ds.test_masks[2:], [LEFT_HALF] * 2)

  def test_normal_labels(self):
    # Empty normal labels are read (and are zeros); a non-empty one is an
    # error, since the image is in good/.
    write_mask(f"{self.root}/test/good/label/0.png", columns=0)
    ds = self.load()
    np.testing.assert_array_equal(ds.test_masks[:2], 0)
    write_mask(f"{self.root}/test/good/label/1.png", columns=2)
    with self.assertRaisesRegex(
      manifest.DataError,
      "Normal image .*test/good/img/1.png has a non-empty mask"
      " .*test/good/label/1.png",
    ):
      self.load()

  def test_missing_label(self):
    os.remove(f"{self.root}/test/Ungood/label/1.png")
    with self.assertRaisesRegex(
      manifest.DataError,
      "No mask for abnormal image .*Ungood/img/1.png: expected"
      " .*Ungood/label/1.png",
    ):
      self.load()

  def test_missing_folder(self):
    shutil.rmtree(f"{self.root}/test/Ungood")
    with self.assertRaisesRegex(
      FileNotFoundError, "test/Ungood/img .*the bmad layout is ROOT/train"
    ):
      self.load()


class MtdTest(DataTestCase):
  def setUp(self):
    super().setUp()
    self.root = os.path.join(self.tmp, "mtd")
    for i in range(10):
      write_image(f"{self.root}/MT_Free/Imgs/f{i}.jpg", 50, "JPEG")
      if i % 2:  # the masks of normals are optional
        write_mask(f"{self.root}/MT_Free/Imgs/f{i}.png", columns=0)
    for defect, n in (("Crack", 2), ("Blowhole", 1)):
      for i in range(n):
        write_image(f"{self.root}/MT_{defect}/Imgs/{defect}{i}.jpg", 99, "JPEG")
        write_mask(f"{self.root}/MT_{defect}/Imgs/{defect}{i}.png")

  def load(self, workdir=None, **kw):
    return super().load(workdir, format="mtd", root=self.root, **kw)

  def split_json(self, workdir=None):
    with open(os.path.join(workdir or self.workdir, "split.json")) as f:
      return json.load(f)

  def test_counts_split_and_masks(self):
    ds = self.load()
    self.assert_arrays(ds, 8, 0, 5)  # round(0.2 * 10) = 2 test normals
    self.assertEqual(ds.name, "mtd")
    np.testing.assert_array_equal(ds.test_labels, [0, 0, 1, 1, 1])
    self.assertEqual(
      ds.test_names[2:],
      (
        "MT_Blowhole/Imgs/Blowhole0.jpg",
        "MT_Crack/Imgs/Crack0.jpg",
        "MT_Crack/Imgs/Crack1.jpg",
      ),
    )
    np.testing.assert_array_equal(ds.test_masks[:2], 0)
    np.testing.assert_array_equal(ds.test_masks[2:], [LEFT_HALF] * 3)
    split = self.split_json()
    self.assertEqual(split["params"]["test_normal_fraction"], 0.2)
    self.assertEqual(split["params"]["split_seed"], 0)
    self.assertEqual(list(ds.test_names[:2]), split["test"]["0"])
    self.assertCountEqual(
      split["normal"] + split["test"]["0"],
      [f"MT_Free/Imgs/f{i}.jpg" for i in range(10)],
    )
    ds = self.load(os.path.join(self.tmp, "w3"), test_normal_fraction=0.34)
    self.assert_arrays(ds, 7, 0, 6)

  def test_draw_is_seeded(self):
    self.load()
    self.load(os.path.join(self.tmp, "again"))
    self.assertEqual(
      self.split_json(), self.split_json(os.path.join(self.tmp, "again"))
    )
    drawn = set()
    for seed in range(4):
      workdir = os.path.join(self.tmp, f"seed{seed}")
      self.load(workdir, split_seed=seed)
      drawn.add(tuple(self.split_json(workdir)["test"]["0"]))
    self.assertGreater(len(drawn), 1)

  def test_split_file_parameter_mismatch(self):
    self.load()
    with self.assertRaisesRegex(
      manifest.DataError, "test_normal_fraction: 0.2 in file, 0.3"
    ):
      self.load(test_normal_fraction=0.3)

  def test_bad_fraction(self):
    for fraction in (0.0, 0.01, 1.0):
      with self.assertRaisesRegex(
        manifest.DataError, f"test_normal_fraction={fraction} of 10 normals"
      ):
        self.load(
          os.path.join(self.tmp, f"w{fraction}"),
          test_normal_fraction=fraction,
        )

  def test_missing_defect_mask(self):
    os.remove(f"{self.root}/MT_Crack/Imgs/Crack1.png")
    with self.assertRaisesRegex(
      manifest.DataError,
      "No mask for abnormal image .*MT_Crack/Imgs/Crack1.jpg: expected"
      " .*MT_Crack/Imgs/Crack1.png",
    ):
      self.load()

  def test_split_file_lists_a_missing_file(self):
    self.load()
    name = self.split_json()["test"]["1"][0]
    os.remove(os.path.join(self.root, name))
    with self.assertRaisesRegex(FileNotFoundError, f"{name}.*split.json"):
      self.load()

  def test_no_defect_folder(self):
    for d in ("MT_Crack", "MT_Blowhole"):
      shutil.rmtree(os.path.join(self.root, d))
    with self.assertRaisesRegex(manifest.DataError, "No MT_<Defect> folder"):
      self.load()


class FakeMethod(api.Defaults):
  """Maps = the test image itself (at `stride`), score = its maximum."""

  def __init__(self, stride=1):
    self.stride = stride

  def scores(self, config):
    return (api.Score("pix", "the image itself; image score: max"),)

  def score(self, config, model, context, images):
    del config, model, context
    maps = images[:, :: self.stride, :: self.stride, 0].astype(jnp.float32)
    return {"scores": {"pix": maps.max(axis=(1, 2))}, "maps": {"pix": maps}}


class EvaluatePixelMetricsTest(DataTestCase):
  def setUp(self):
    super().setUp()
    # Bright defects in the left half of their image; dark normals.
    root = os.path.join(self.tmp, "mtd")
    for i in range(5):
      write_image(f"{root}/MT_Free/Imgs/f{i}.jpg", 40 + i, "JPEG")
    for i in range(2):
      image = np.full((20, 30), 60, np.uint8)
      image[:, : 10 + 2 * i] = 200
      write_mask(f"{root}/MT_Crack/Imgs/c{i}.png")
      Image.fromarray(image).save(f"{root}/MT_Crack/Imgs/c{i}.jpg", quality=95)
    self.data = self.load(format="mtd", root=root, test_normal_fraction=0.4)
    self.config = ml_collections.ConfigDict(
      {
        "eval": {
          "batch_size": 8,
          "calibration_fraction": 0.0,
          "target_specificity": 0.95,
        }
      }
    )
    self.mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1}))

  def evaluate(self, data, stride=1):
    return evaluate.evaluate(
      self.config, self.tmp, FakeMethod(stride), None, data, self.mesh
    )

  def test_eval_json_gets_pixel_metrics(self):
    result = self.evaluate(self.data)
    with open(os.path.join(self.tmp, "eval.json")) as f:
      self.assertEqual(json.load(f), result)
    scores = result["scores"]["pix"]
    self.assertEqual(set(scores), {"auroc", "ap", "pixel_auroc", "aupro"})
    maps = self.data.test[..., 0].astype(np.float32)
    expected = metrics.pixel_metrics(maps, self.data.test_masks)
    self.assertAlmostEqual(scores["pixel_auroc"], expected["pixel_auroc"])
    self.assertAlmostEqual(scores["aupro"], expected["aupro"])
    self.assertGreater(scores["aupro"], 0.5)  # the defects are bright
    self.assertIn("AUPRO", evaluate.format_table(result))

  def test_coarser_maps_are_resized_to_the_masks(self):
    scores = self.evaluate(self.data, stride=2)["scores"]["pix"]
    coarse = self.data.test[:, ::2, ::2, 0].astype(np.float32)
    expected = metrics.pixel_metrics(
      evaluate.resize_maps(coarse, (8, 8)), self.data.test_masks
    )
    self.assertAlmostEqual(scores["aupro"], expected["aupro"])

  def test_image_level_data_keeps_the_schema(self):
    data = dataclasses.replace(self.data, test_masks=None)
    self.assertEqual(set(self.evaluate(data)["scores"]["pix"]), {"auroc", "ap"})

  def test_resize_maps_is_bilinear(self):
    # Half-pixel centres: output x = 0.25, 0.75, ... in input pixel units
    # minus 0.5 -> weights of the 2 inputs 1/0, 0.75/0.25, 0.25/0.75, 0/1.
    maps = np.array([[[0.0, 4.0], [8.0, 12.0]]])
    out = evaluate.resize_maps(maps, (4, 4))
    np.testing.assert_allclose(out[0, 0], [0, 1, 3, 4])
    np.testing.assert_allclose(out[0, :, 0], [0, 2, 6, 8])
    self.assertIs(evaluate.resize_maps(maps, (2, 2)), maps)


class RealMtdTest(DataTestCase):
  def test_magnetic_tile_defects(self):
    if not MTD.is_dir():
      self.skipTest(f"{MTD} absent (shared data sits beside the checkout)")
    # Four MT_Uneven defect images have an empty mask: an error, unless
    # skipped (and listed in W/skipped.txt).
    empty_source = {
      os.path.relpath(p, MTD)[: -len(".png")] + ".jpg"
      for p in glob.glob(str(MTD / "MT_*" / "Imgs" / "*.png"))
      if "MT_Free" not in p and not np.asarray(Image.open(p)).any()
    }
    self.assertLen(empty_source, 4)
    with self.assertRaisesRegex(manifest.DataError, "MT_Uneven.*is empty"):
      self.load(format="mtd", root=str(MTD), image_size=32)
    # 256 keeps every defect (at 64, NEAREST misses two thin MT_Uneven
    # ones); a quick decode of ~1300 small images.
    ds = self.load(
      format="mtd", root=str(MTD), image_size=256, skip_unreadable=True
    )
    with open(os.path.join(self.workdir, "skipped.txt")) as f:
      skipped = {os.path.relpath(line.split("\t")[0], MTD) for line in f}
    self.assertEqual(skipped, empty_source)
    num_test_normal = round(0.2 * 952)
    num_defect = sum(MTD_DEFECTS.values()) - len(empty_source)
    self.assert_arrays(
      ds, 952 - num_test_normal, 0, num_test_normal + num_defect, size=256
    )
    self.assertEqual(int(ds.test_labels.sum()), num_defect)
    for defect, n in MTD_DEFECTS.items():
      names = [x for x in ds.test_names if x.startswith(f"MT_{defect}/")]
      self.assertLen(names, n - (4 if defect == "Uneven" else 0))
    normal = ds.test_labels == 0
    np.testing.assert_array_equal(ds.test_masks[normal], 0)
    # Every kept defect mask survives the resize.
    self.assertTrue(ds.test_masks[~normal].any(axis=(1, 2)).all())


if __name__ == "__main__":
  absltest.main()
