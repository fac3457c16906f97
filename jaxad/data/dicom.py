"""DICOM files -> 8-bit pixels, with pydicom (the optional `jaxad[dicom]`).

The rules are `decode.py`'s (its module docstring): the modality LUT or
rescale slope/intercept (`pydicom.pixels.apply_modality_lut`), then
`data.intensity` ("auto": the file's own VOI LUT / window through
`pydicom.pixels.apply_windowing` or its VOI LUT Sequence when it has one,
its output range mapped to 0..255; else per-image min-max;
"window:LOW,HIGH" in rescaled units), then
MONOCHROME1 inverted (255 - x). Multi-frame files are refused. Imported by
`decode.py` only when a DICOM file is read.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from jaxad.data.decode import (
  DICOM_EXTRA,
  DataError,
  Intensity,
  check_file,
  to_uint8,
)

COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")


def _pydicom():
  """The pydicom module, or an ImportError naming the extra."""
  try:
    import pydicom  # optional: only DICOM inputs need it
  except ImportError as e:
    raise ImportError(
      f"Reading DICOM files needs pydicom: {DICOM_EXTRA}"
    ) from e
  return pydicom


def _processing():
  """pydicom's LUT functions: `pydicom.pixels` (3.0+), else 2.x's
  `pydicom.pixel_data_handlers.util` (the same functions)."""
  try:
    from pydicom import pixels

    pixels.apply_modality_lut  # noqa: B018 - present from pydicom 3.0
    return pixels
  except (ImportError, AttributeError):
    from pydicom.pixel_data_handlers import util

    return util


def dcmread(path: str, header_only: bool = False) -> Any:
  """The parsed DICOM dataset at `path` (`header_only`: no pixel data).

  Raises:
    ImportError: pydicom is not installed (naming the extra).
    FileNotFoundError, DataError: naming the file.
  """
  pydicom = _pydicom()
  check_file(path, "image")
  try:
    return pydicom.dcmread(path, stop_before_pixels=header_only)
  except pydicom.errors.InvalidDicomError as e:
    raise DataError(f"Cannot decode image {path}: not a DICOM file: {e}") from e
  except (OSError, ValueError, EOFError, KeyError, TypeError) as e:
    raise DataError(
      f"Cannot decode image {path}: {type(e).__name__}: {e}"
    ) from e


def pixels(path: str, ds: Any) -> np.ndarray:
  """The stored pixels of a single-frame DICOM dataset ([H, W] or [H, W, 3];
  YBR colour converted to RGB by pydicom).

  Raises:
    DataError: several frames, no pixel data, or undecodable pixel data
      (e.g. a compressed transfer syntax without its pydicom plugin).
  """
  frames = int(ds.get("NumberOfFrames", 1) or 1)
  if frames > 1:
    raise DataError(
      f"DICOM {path} has {frames} frames; only single-frame images are read"
      " (save each frame or slice as its own file)"
    )
  if "PixelData" not in ds:
    raise DataError(f"DICOM {path} has no pixel data")
  try:
    return np.asarray(ds.pixel_array)
  except Exception as e:  # noqa: BLE001 - pydicom's handlers raise anything
    raise DataError(
      f"Cannot decode the pixel data of DICOM {path}: {type(e).__name__}: {e}"
    ) from e


def _voi_lut(ds: Any) -> Any:
  """The first VOI LUT Sequence item, if it is complete, else None."""
  items = ds.get("VOILUTSequence")
  if items and None not in (
    items[0].get("LUTDescriptor"),
    items[0].get("LUTData"),
  ):
    return items[0]
  return None


def has_voi(ds: Any) -> bool:
  """Whether the dataset has a VOI LUT or a window (center and width)."""
  window = None not in (ds.get("WindowCenter"), ds.get("WindowWidth"))
  return window or _voi_lut(ds) is not None


def _lut_table(item: Any, ds: Any) -> np.ndarray:
  """A VOI LUT item's table as int64 (LUTData: US values, or OW bytes in
  the dataset's byte order)."""
  data = item.LUTData
  if isinstance(data, bytes | bytearray):
    encoding = getattr(ds, "original_encoding", (None, True))
    order = "<" if encoding[1] in (None, True) else ">"
    return np.frombuffer(data, dtype=f"{order}u2").astype(np.int64)
  return np.asarray(data if isinstance(data, list) else [data], np.int64)


def apply_voi(values: np.ndarray, ds: Any) -> tuple[np.ndarray, float, float]:
  """The VOI LUT (preferred) or window of a dataset, and its output range.

  A VOI LUT Sequence is applied here (PS3.3 C.11.2.1.1: input values below
  the first mapped one take the first entry, above the last the last), as
  pydicom 3.0's `apply_voi` indexes 8-bit tables through a uint8 array, so
  inputs past 255 wrap; its range is the table's own min and max (some
  devices store fewer bits than the descriptor's third value says, so
  that value is not trusted). A window is `pydicom.pixels.apply_windowing`
  (PS3.3 C.11.2.1.2), its range (y_min, y_max) what it gives values far
  below and above the window.

  Returns:
    (VOI output as float64, low, high).
  """
  apply_windowing = _processing().apply_windowing
  item = _voi_lut(ds)
  if item is not None:
    entries, first = int(item.LUTDescriptor[0]) or 2**16, item.LUTDescriptor[1]
    first = int(first)
    if ds.get("PixelRepresentation", 0) == 1 and first >= 2**15:
      first -= 2**16  # signed pixels: the value is SS, read here as US
    table = _lut_table(item, ds)[:entries]
    index = np.clip(
      np.floor(values).astype(np.int64) - first, 0, len(table) - 1
    )
    return (
      table[index].astype(np.float64),
      float(table.min()),
      float(table.max()),
    )
  with np.errstate(over="ignore", under="ignore"):
    low, high = apply_windowing(np.array([-1e30, 1e30]), ds)
  return apply_windowing(values, ds), float(low), float(high)


def read(path: str, intensity: Intensity) -> Image.Image:
  """A DICOM image file as an 8-bit "L" or "RGB" PIL image.

  Args:
    path: the .dcm file.
    intensity: the parsed `data.intensity`.

  Raises:
    ImportError: pydicom is not installed (naming the extra).
    FileNotFoundError, DataError: naming the file (multi-frame, unsupported
      photometric interpretation, undecodable, unmappable).
  """
  ds = dcmread(path)
  stored = pixels(path, ds)
  photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
  if photometric in COLOUR:
    if photometric != "RGB" and int(_pydicom().__version__.split(".")[0]) < 3:
      raise DataError(
        f"DICOM {path}: {photometric} colour needs pydicom>=3 (which returns"
        " it as RGB); pip install -U pydicom"
      )
    if stored.dtype == np.uint8 and intensity.window is None:
      return Image.fromarray(stored, "RGB")
    return Image.fromarray(to_uint8(stored, path, intensity.window), "RGB")
  if photometric not in ("MONOCHROME1", "MONOCHROME2"):
    raise DataError(
      f"DICOM {path}: PhotometricInterpretation {photometric!r} is not"
      f" supported (MONOCHROME1, MONOCHROME2, {', '.join(COLOUR)})"
    )
  try:
    values = _processing().apply_modality_lut(stored, ds)
    if intensity.window is not None:
      out = to_uint8(values, path, intensity.window)
    elif intensity.mode == "auto" and has_voi(ds):
      voi, low, high = apply_voi(values, ds)
      out = to_uint8(voi, path, (low, high))
    elif stored.dtype == np.uint8 and np.array_equal(values, stored):
      out = stored  # 8-bit with an identity rescale: as stored
    else:
      out = to_uint8(values, path)
  except DataError:
    raise
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise DataError(
      f"Cannot apply the modality / VOI LUT of DICOM {path}:"
      f" {type(e).__name__}: {e}"
    ) from e
  if photometric == "MONOCHROME1":  # low values are bright: invert
    out = 255 - out
  return Image.fromarray(np.ascontiguousarray(out, np.uint8), "L")


def read_mask(path: str) -> np.ndarray:
  """A DICOM mask as [H, W] bool: any non-zero stored sample (no LUTs)."""
  stored = pixels(path, dcmread(path))
  return stored != 0 if stored.ndim == 2 else (stored != 0).any(-1)
