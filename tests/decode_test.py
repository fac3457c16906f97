"""Tests of jaxad.data's decoding (decode.py, the builder's skips): bit
depths and sample formats, data.intensity, EXIF orientation, masks, files
that fail to decode. Every input is written by the test; DICOM is in
decode_dicom_test.py, listing folders in decode_listing_test.py."""

import os
import shutil
import tempfile
from unittest import mock

import ml_collections
import numpy as np
from absl.testing import absltest
from PIL import Image

from jaxad.data import builder, decode, manifest

S = 16  # image side: decode at the stored size, so no resampling blurs


def save(path, pixels, **kw):
  """Writes `pixels` with PIL (format by extension); returns the path."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(pixels).save(path, **kw)
  return path


def entry(path, label=0, mask=None, name=None):
  return manifest.Entry(name or os.path.basename(path), label, path, "", mask)


def decoded(path, intensity="auto", channels=1, size=S):
  """[S, S] (channels=1) or [S, S, 3] uint8 of an image file."""
  out = manifest.decode(entry(path), size, channels, intensity)
  return out[..., 0] if channels == 1 else out


class TestCase(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.tmp)

  def path(self, *parts):
    return os.path.join(self.tmp, *parts)


class IntensityTest(TestCase):
  def test_16bit_png_is_mapped_not_clipped(self):
    for top in (4095, 65535):
      values = np.linspace(0, top, S * S).astype(np.uint16).reshape(S, S)
      p = save(self.path(f"xray{top}.png"), values)
      self.assertEqual(Image.open(p).mode, "I;16")
      out = decoded(p)
      # convert("L") used to clip: 92% of a 0-4095 ramp became 255.
      np.testing.assert_array_equal(
        out, np.rint(values / top * 255).astype(np.uint8)
      )
      order = np.argsort(values, axis=None, kind="stable")
      self.assertTrue((np.diff(out.ravel()[order].astype(int)) >= 0).all())
      self.assertLess((out == 255).mean(), 0.01)

  def test_int16_and_float_tiffs(self):
    ramp = np.arange(S * S).reshape(S, S)
    p = save(self.path("ct.tif"), (ramp - 128).astype(np.int16))
    np.testing.assert_array_equal(
      decoded(p), np.rint(ramp / ramp.max() * 255).astype(np.uint8)
    )
    for scale in (1.0, 1000.0):  # [0, 1] and larger
      f = (ramp / ramp.max() * scale).astype(np.float32)
      f[0, :3] = np.nan
      f[1, 0] = np.inf
      p = save(self.path(f"f{scale:g}.tif"), f)
      out = decoded(p)
      np.testing.assert_array_equal(out[0, :3], 0)  # NaN -> the low end
      self.assertEqual(out[1, 0], 255)  # +inf: clipped to the top
      finite, x = np.isfinite(f), f.astype(np.float64)
      low, high = x[finite].min(), x[finite].max()
      want = np.rint((x - low) / (high - low) * 255)
      np.testing.assert_array_equal(out[finite], want[finite])

  def test_unmappable_images_name_the_file(self):
    p = save(self.path("flat.png"), np.full((S, S), 1000, np.uint16))
    with self.assertRaisesRegex(
      manifest.DataError, r"flat.png: every pixel is 1000.*window:LOW,HIGH"
    ):
      decoded(p)
    # A window maps a constant image all the same.
    np.testing.assert_array_equal(decoded(p, "window:0,4000"), 64)
    p = save(self.path("nan.tif"), np.full((S, S), np.nan, np.float32))
    with self.assertRaisesRegex(manifest.DataError, "nan.tif: .*no finite"):
      decoded(p, "window:0,1")

  def test_window(self):
    values = np.linspace(0, 4095, S * S).astype(np.uint16).reshape(S, S)
    p = save(self.path("w.png"), values)
    want = np.clip(np.rint((values - 1000.0) / 2000 * 255), 0, 255)
    np.testing.assert_array_equal(decoded(p, "window:1000,3000"), want)
    # A window applies to 8-bit images too (and to npz arrays).
    u8 = np.arange(S * S, dtype=np.uint8).reshape(S, S)
    p = save(self.path("u8.png"), u8)
    want = np.clip(np.rint((u8 - 100.0) / 100 * 255), 0, 255)
    np.testing.assert_array_equal(decoded(p, "window:100,200"), want)
    e = manifest.Entry("a[0]", 0, lambda: u8, "")
    np.testing.assert_array_equal(
      manifest.decode(e, S, 1, "window:100,200")[..., 0], want
    )

  def test_8bit_images_are_used_exactly_as_before(self):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for p in (
      save(self.path("g.png"), gray),
      save(self.path("c.jpg"), rgb),
      save(self.path("c.bmp"), rgb),
      save(self.path("p.png"), rgb, optimize=False),
    ):
      for c in (1, 3):
        with Image.open(p) as im:
          old = np.asarray(
            im.convert("L" if c == 1 else "RGB").resize((8, 8), Image.BILINEAR)
          )
        out = manifest.decode(entry(p), 8, c)
        np.testing.assert_array_equal(out.reshape(old.shape), old)

  def test_channels(self):
    values = np.linspace(0, 4095, S * S).astype(np.uint16).reshape(S, S)
    out = decoded(save(self.path("g16.png"), values), channels=3)
    self.assertEqual(out.shape, (S, S, 3))
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    rgb = np.zeros((S, S, 3), np.uint8)
    rgb[..., 0] = 200
    out = decoded(save(self.path("red.png"), rgb), channels=3)
    np.testing.assert_array_equal(out[0, 0], [200, 0, 0])  # RGB stays RGB

  def test_intensity_values(self):
    self.assertEqual(decode.parse_intensity("auto").mode, "auto")
    w = decode.parse_intensity("window:-1000, 400")
    self.assertEqual((w.mode, w.low, w.high), ("window", -1000.0, 400.0))
    for bad in (
      "window:5,1",
      "window:a,b",
      "window:1",
      "linear",
      "window:0,inf",
    ):
      with self.assertRaisesRegex(manifest.DataError, "data.intensity="):
        decode.parse_intensity(bad)
    data = ml_collections.ConfigDict({"intensity": "window:1"})
    with self.assertRaisesRegex(manifest.DataError, "'window:1'; expected"):
      manifest.intensity(data)
    self.assertEqual(manifest.intensity(ml_collections.ConfigDict()), "auto")
    with self.assertRaisesRegex(manifest.DataError, "skip_unreadable"):
      manifest.skip_unreadable(
        ml_collections.ConfigDict({"skip_unreadable": 1})
      )


class OrientationAndMaskTest(TestCase):
  def test_exif_rotated_jpeg_lines_up_with_its_mask(self):
    stored = np.zeros((20, 30), np.uint8)
    stored[:, :10] = 255  # the first columns as stored ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... are the top rows as displayed (90 deg CW)
    img = save(self.path("rot.jpg"), stored, exif=exif, quality=95)
    shown = np.zeros((30, 20), np.uint8)
    shown[:10] = 255  # the mask is drawn on the displayed image
    m = save(self.path("rot_mask.png"), shown)
    e = entry(img, label=1, mask=m)
    self.assertEqual(decode.image_size(img), (20, 30))
    image, mask = manifest.decode_example(e, 10, 1, "auto", True)
    np.testing.assert_array_equal(image[..., 0] > 127, mask == 1)
    self.assertEqual(mask.sum(), 3 * 10)  # rows 0-9 of 30, at 10 rows
    # decode_mask alone reads the image's orientation from its header.
    np.testing.assert_array_equal(manifest.decode_mask(e, 10), mask)

  def test_any_nonzero_mask_pixel_is_anomalous(self):
    img = save(self.path("img.png"), np.zeros((S, S), np.uint8))
    want = np.zeros((S, S), np.uint8)
    want[4:8, 2:6] = 1
    palette = Image.fromarray(want, "P")
    # labelme-style: index 1 is a near-black colour (its luminance is 0),
    # index 0 white; the index decides.
    palette.putpalette([255, 255, 255, 1, 0, 0] + [0] * 762)
    rgba = np.zeros((S, S, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere, but transparent ...
    rgba[..., 3] = want * 255  # ... except in the anomaly
    masks = {
      "01.png": Image.fromarray(want),
      "0255.png": Image.fromarray(want * 255),
      "palette.png": palette,
      "rgba.png": Image.fromarray(rgba),
      "16bit.png": Image.fromarray(want.astype(np.uint16) * 3),
      "bilevel.png": Image.fromarray(want * 255).convert("1"),
    }
    for name, mask in masks.items():
      mask.save(self.path(name))
      e = entry(img, label=1, mask=self.path(name))
      np.testing.assert_array_equal(
        manifest.decode_mask(e, S), want, err_msg=name
      )

  def test_mask_errors(self):
    img = save(self.path("img.png"), np.zeros((S, S), np.uint8))
    empty = save(self.path("empty.png"), np.zeros((S, S), np.uint8))
    with self.assertRaisesRegex(
      manifest.DataError,
      r"Abnormal image .*img.png: its mask .*empty.png is empty.*"
      r"data.skip_unreadable=true",
    ):
      manifest.decode_mask(entry(img, 1, empty), S)
    np.testing.assert_array_equal(
      manifest.decode_mask(entry(img, 0, empty), S), 0
    )
    one = save(self.path("one.png"), np.eye(S, dtype=np.uint8))
    with self.assertRaisesRegex(
      manifest.DataError, "Normal image .*img.png has a non-empty mask"
    ):
      manifest.decode_mask(entry(img, 0, one), S)


def tiny_manifest(entries, **kw):
  """A manifest with the given test entries and two known normals."""
  folder = os.path.dirname(entries[0].source)
  normals = tuple(
    entry(save(os.path.join(folder, f"n{i}.png"), np.full((S, S), 9, np.uint8)))
    for i in range(2)
  )
  parts = {"normal": normals, "unlabeled": (), "test": tuple(entries)}
  return manifest.Manifest("tiny", 8, parts, {"root": folder}, **kw)


class PreparationTest(TestCase):
  def prepare(self, m):
    return builder.prepare(m, self.path("cache"), self.path("W"))

  def test_empty_defect_mask_fails_preparation(self):
    bad = save(self.path("d", "bad.png"), np.full((S, S), 50, np.uint8))
    good = save(self.path("d", "good.png"), np.full((S, S), 60, np.uint8))
    empty = save(self.path("d", "bad_mask.png"), np.zeros((S, S), np.uint8))
    mask = save(self.path("d", "good_mask.png"), np.eye(S, dtype=np.uint8))
    tests = [entry(good, 1, mask), entry(bad, 1, empty)]
    with self.assertRaisesRegex(manifest.DataError, "bad.png: its mask"):
      self.prepare(tiny_manifest(tests, has_masks=True))
    b = self.prepare(tiny_manifest(tests, has_masks=True, skip_unreadable=True))
    test = builder.read_split(b, "test")
    self.assertEqual(test["name"], ("good.png",))
    self.assertEqual(int(test["image"][0, 0, 0, 0]), 60)
    self.assertEqual([e.name for e in b.manifest.parts["test"]], ["good.png"])
    with open(self.path("W", "skipped.txt")) as f:
      lines = f.read().splitlines()
    self.assertLen(lines, 1)
    self.assertRegex(lines[0], r"^/.*d/bad.png\tDataError: .*is empty")

  def test_undecodable_files(self):
    ok = save(self.path("d", "ok.png"), np.full((S, S), 70, np.uint8))
    corrupt = self.path("d", "corrupt.png")
    with open(corrupt, "wb") as f:
      f.write(b"\x89PNG garbage")
    flat = save(self.path("d", "flat.tif"), np.full((S, S), 5.0, np.float32))
    tests = [entry(corrupt), entry(ok), entry(flat)]
    with self.assertRaisesRegex(
      manifest.DataError, r"Cannot decode image .*corrupt.png.*skip_unreadable"
    ):
      self.prepare(tiny_manifest(tests))
    m = tiny_manifest(tests, skip_unreadable=True)
    with self.assertLogs(level="WARNING") as logs:
      b = self.prepare(m)
    self.assertRegex(logs.output[-1], "skipped 2 unreadable file.*skipped.txt")
    self.assertEqual(builder.read_split(b, "test")["name"], ("ok.png",))
    with open(self.path("W", "skipped.txt")) as f:
      self.assertEqual(
        [line.split("\t")[0] for line in f.read().splitlines()],
        [corrupt, flat],
      )
    # The cache, re-used, knows its skipped files.
    os.remove(self.path("W", "skipped.txt"))
    again = self.prepare(m)
    self.assertEqual(again.data_dir, b.data_dir)
    self.assertEqual(again.manifest, b.manifest)
    self.assertTrue(os.path.exists(self.path("W", "skipped.txt")))
    # Every test image skipped: an error, not an empty split.
    with self.assertRaisesRegex(manifest.DataError, "every one of the 2 test"):
      self.prepare(
        tiny_manifest([entry(corrupt), entry(flat)], skip_unreadable=True)
      )

  def test_cache_prepared_before_skips_were_recorded(self):
    p = save(self.path("d", "a.png"), np.full((S, S), 3, np.uint8))
    b = self.prepare(tiny_manifest([entry(p)]))
    os.remove(os.path.join(b.data_dir, "metadata.json"))  # an older cache
    again = self.prepare(tiny_manifest([entry(p)]))
    self.assertEqual(again.skipped, [])
    self.assertEqual(builder.read_split(again, "test")["name"], ("a.png",))

  def test_cache_key(self):
    p = save(self.path("k.png"), np.zeros((S, S), np.uint8))
    base = tiny_manifest([entry(p)])
    keys = {
      base.cache_key(),
      tiny_manifest([entry(p)], intensity="window:0,1").cache_key(),
      tiny_manifest([entry(p)], skip_unreadable=True).cache_key(),
    }
    self.assertLen(keys, 3)
    # A new decoder re-prepares file sources; array sources (npz) keep
    # their keys, since the decoder's changes do not touch them.
    arrays = manifest.Manifest(
      "a",
      8,
      {
        "normal": (manifest.Entry("0", 0, lambda: 0, "s"),),
        "unlabeled": (),
        "test": (),
      },
      {},
    )
    file_key, array_key = base.cache_key(), arrays.cache_key()
    with mock.patch.object(decode, "DECODER_VERSION", 99):
      self.assertNotEqual(base.cache_key(), file_key)
      self.assertEqual(arrays.cache_key(), array_key)


if __name__ == "__main__":
  absltest.main()
