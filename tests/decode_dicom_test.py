"""Tests of DICOM decoding (jaxad/data/dicom.py) on files the tests write
with pydicom: rescale slope/intercept, VOI window and LUT, MONOCHROME1,
colour, multi-frame refusal, and the error when pydicom is missing."""

import os
import shutil
import sys
import tempfile
from unittest import mock

import numpy as np
from absl.testing import absltest

from jaxad.data import decode, inputs, manifest

try:
  import pydicom
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.sequence import Sequence
  from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
  )
except ImportError:  # the `test` extra installs it
  pydicom = None

S = 8


def write_dicom(path, pixels, photometric="MONOCHROME2", bits=None, **tags):
  """Writes a single- or multi-frame DICOM file of `pixels` (uint8 or
  uint16; [H, W], [frames, H, W] or RGB [H, W, 3]), with pydicom 2.4 or 3."""
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
  ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds.SOPClassUID = SecondaryCaptureImageStorage
  ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
  colour = photometric != "MONOCHROME1" and photometric != "MONOCHROME2"
  if pixels.ndim == 3 and not colour:
    ds.NumberOfFrames = len(pixels)
  ds.Rows, ds.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
  ds.SamplesPerPixel = 3 if colour else 1
  if colour:
    ds.PlanarConfiguration = 0
  ds.PhotometricInterpretation = photometric
  ds.BitsAllocated = pixels.dtype.itemsize * 8
  ds.BitsStored = bits or ds.BitsAllocated
  ds.HighBit = ds.BitsStored - 1
  ds.PixelRepresentation = 0
  ds.PixelData = np.ascontiguousarray(pixels).tobytes()
  for key, value in tags.items():
    setattr(ds, key, value)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if int(pydicom.__version__.split(".")[0]) >= 3:
    ds.save_as(path, enforce_file_format=True)
  else:
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(path, write_like_original=False)
  return path


def decoded(path, intensity="auto", channels=1):
  e = manifest.Entry(os.path.basename(path), 0, path, "")
  out = manifest.decode(e, S, channels, intensity)
  return out[..., 0] if channels == 1 else out


@absltest.skipIf(pydicom is None, "pydicom is not installed (jaxad[dicom])")
class DicomTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.tmp)
    # 12-bit stored values 0..4095 in a ramp.
    self.stored = np.linspace(0, 4095, S * S).astype(np.uint16).reshape(S, S)

  def path(self, name):
    return os.path.join(self.tmp, name)

  def test_rescale_slope_intercept(self):
    # HU = 2 * stored - 4096: the window is in rescaled units.
    p = write_dicom(
      self.path("ct.dcm"),
      self.stored,
      bits=12,
      RescaleSlope=2,
      RescaleIntercept=-4096,
    )
    hu = self.stored * 2.0 - 4096
    want = np.clip(np.rint((hu + 1000) / 2000 * 255), 0, 255)
    np.testing.assert_array_equal(decoded(p, "window:-1000,1000"), want)
    # Without a window: per-image min-max over the rescaled values.
    want = np.rint((hu - hu.min()) / (hu.max() - hu.min()) * 255)
    np.testing.assert_array_equal(decoded(p), want)

  def test_voi_window_and_monochrome1(self):
    kw = dict(bits=12, WindowCenter=2048, WindowWidth=1025)
    p2 = write_dicom(self.path("w2.dcm"), self.stored, **kw)
    out = decoded(p2)
    # LINEAR window of PS3.3 C.11.2.1.2: c - 0.5 +- (w - 1) / 2 spans
    # 1535.5 .. 2559.5, mapped to 0..255.
    x = self.stored.astype(np.float64)
    want = np.clip((x - 1535.5) / 1024, 0, 1) * 255
    np.testing.assert_allclose(out, want, atol=1)
    self.assertEqual(out[0, 0], 0)
    self.assertEqual(out[-1, -1], 255)
    # "minmax" ignores the file's window; a window of the config wins.
    np.testing.assert_array_equal(
      decoded(p2, "minmax"), np.rint(x / 4095 * 255)
    )
    np.testing.assert_array_equal(
      decoded(p2, "window:0,4095"), np.rint(x / 4095 * 255)
    )
    p1 = write_dicom(self.path("w1.dcm"), self.stored, "MONOCHROME1", **kw)
    np.testing.assert_array_equal(decoded(p1), 255 - out)  # low is bright

  def test_voi_lut(self):
    # An 8-bit VOI LUT over stored values 0..4095 (LUTDescriptor: entries,
    # first value mapped, bits): the reverse ramp, so it visibly applies.
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    item["LUTDescriptor"].VR = "US"
    item.LUTData = (255 - np.arange(4096) // 16).astype(np.uint16).tolist()
    item["LUTData"].VR = "US"
    p = write_dicom(
      self.path("lut.dcm"),
      self.stored,
      bits=12,
      VOILUTSequence=Sequence([item]),
    )
    np.testing.assert_array_equal(decoded(p), 255 - self.stored // 16)

  def test_8bit_and_colour(self):
    u8 = np.arange(S * S, dtype=np.uint8).reshape(S, S) * 3
    p = write_dicom(self.path("u8.DCM"), u8, RescaleSlope=1, RescaleIntercept=0)
    np.testing.assert_array_equal(decoded(p), u8)  # as stored
    rgb = np.zeros((S, S, 3), np.uint8)
    rgb[..., 1] = 180
    p = write_dicom(self.path("rgb.dcm"), rgb, "RGB", 8)
    np.testing.assert_array_equal(decoded(p, channels=3)[0, 0], [0, 180, 0])

  def test_refused_and_bad_files(self):
    frames = np.zeros((3, S, S), np.uint8)
    p = write_dicom(self.path("cine.dcm"), frames)
    with self.assertRaisesRegex(
      manifest.DataError, "DICOM .*cine.dcm has 3 frames; only single-frame"
    ):
      decoded(p)
    p = self.path("fake.dcm")
    with open(p, "wb") as f:
      f.write(b"not a dicom file at all" * 10)
    with self.assertRaisesRegex(
      manifest.DataError, "Cannot decode image .*fake.dcm: not a DICOM"
    ):
      decoded(p)
    p = write_dicom(self.path("flat.dcm"), np.full((S, S), 7, np.uint16))
    with self.assertRaisesRegex(manifest.DataError, "flat.dcm: every pixel"):
      decoded(p)

  def test_listed_and_masks(self):
    write_dicom(self.path("d/a.dcm"), self.stored, bits=12)
    write_dicom(self.path("d/b.DCM"), self.stored, bits=12)
    self.assertEqual(manifest.list_images(self.path("d")), ["a.dcm", "b.DCM"])
    names = [e.name for e in inputs.find_inputs(self.path("d"))]
    self.assertEqual(names, ["a.dcm", "b.DCM"])
    mask = np.zeros((S, S), np.uint8)
    mask[2:4] = 1
    m = write_dicom(self.path("d/mask.dcm"), mask)
    e = manifest.Entry("a", 1, self.path("d/a.dcm"), "", m)
    np.testing.assert_array_equal(manifest.decode_mask(e, S), mask)

  def test_missing_pydicom_names_the_extra(self):
    p = write_dicom(self.path("x.dcm"), self.stored, bits=12)
    with mock.patch.dict(sys.modules, {"pydicom": None}):
      with self.assertRaisesRegex(ImportError, r"pip install 'jaxad\[dicom\]'"):
        decoded(p)
      # In predict: an error row, not a crash.
      e = manifest.Entry("x.dcm", 0, p, "")
      self.assertRegex(inputs.decode(e, S, 1)[1], r"ImportError: .*jaxad\[")
    self.assertEqual(decode.DICOM_EXTRA, "pip install 'jaxad[dicom]'")


if __name__ == "__main__":
  absltest.main()
