"""Manifests: what goes into each split of a one-class dataset, before decoding.

Every on-disk layout (see `layouts.py`, `mask_layouts.py`) is turned into a
`Manifest`: for each part (`normal`, `unlabeled`, `test`) a tuple of `Entry`s
naming an image, its label, where its pixels come from and, for layouts with
pixel ground truth, its mask file. The single tfds builder (`builder.py`)
turns any manifest into array_record splits, so decoding, resizing and caching
are written once. The helpers layouts share (config values, the root, image
files of a folder, file stamps, the `data.*` decoding options) live here;
the file formats and intensity rules are `decode.py`'s.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from jaxad.data import decode as decode_lib
from jaxad.data import listing

PARTS = ("normal", "unlabeled", "test")
IMAGE_EXTENSIONS = decode_lib.IMAGE_EXTENSIONS
DataError = decode_lib.DataError
to_array = decode_lib.to_array  # the preprocessing, kept under its old name
# Listing helpers, where the layouts have always found them.
list_images = listing.list_images
file_stamp = listing.file_stamp
skipping = listing.skipping
SKIP_HINT = listing.SKIP_HINT

CHANNELS = (1, 3)  # grayscale (DDAD's preprocessing) or RGB

# A source is either the path of an image file or a function returning the
# raw pixels, [H, W] or [H, W, C] uint8 (used for npz-backed layouts).
Source = str | collections.abc.Callable[[], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Entry:
  """One image of a manifest.

  Attributes:
    name: name reported for the image (relative path, json name or index).
    label: 0 normal, 1 abnormal.
    source: image file path, or a function returning its raw pixels.
    stamp: fingerprint of the input (file size and mtime, or npz stamp and
      index; with a mask, the mask file's too); it enters the cache key so
      that changed inputs re-prepare.
    mask: the ground-truth mask file (non-zero = anomalous) in a manifest
      with masks; None there means an all-normal (zero) mask.
  """

  name: str
  label: int
  source: Source
  stamp: str
  mask: str | None = None


@dataclasses.dataclass(frozen=True)
class Manifest:
  """The three parts of a one-class dataset, plus what identifies it.

  Attributes:
    name: dataset name, e.g. "kermany_cxr_224" or "embedded/kermany_cxr64".
    image_size: side S of the stored [S, S, C] uint8 images.
    parts: `normal`, `unlabeled`, `test` -> tuple of entries, in the order
      they are read back (test: normals then abnormals).
    params: format, absolute root and split parameters (enter the cache key).
    has_masks: whether every image gets an [S, S] {0, 1} mask (entries
      without a mask file get zeros).
    channels: C, 1 (grayscale) or 3 (RGB).
    intensity: `data.intensity` (`decode.parse_intensity`).
    skip_unreadable: `data.skip_unreadable`: files that cannot be listed or
      decoded are left out and recorded rather than an error.
    skipped: (path, reason) of the files left out so far (listing; the
      builder adds those that failed to decode).
  """

  name: str
  image_size: int
  parts: dict[str, tuple[Entry, ...]]
  params: dict[str, Any]
  has_masks: bool = False
  channels: int = 1
  intensity: str = decode_lib.INTENSITY_DEFAULT
  skip_unreadable: bool = False
  skipped: tuple[tuple[str, str], ...] = ()

  def cache_key(self) -> str:
    """A hash of everything that determines the prepared arrays.

    Returns:
      16 hex digits over params, image size, decoding options and every
      entry's part, name, label and stamp.
    """
    key = {
      "params": self.params,
      "image_size": self.image_size,
      "entries": {
        part: [[e.name, e.label, e.stamp] for e in self.parts[part]]
        for part in PARTS
      },
    }
    # Only non-default values enter the key, so that the caches of the
    # image-level grayscale layouts keep the keys they had before masks.
    if self.has_masks:
      key["has_masks"] = True
    if self.channels != 1:
      key["channels"] = self.channels
    if self.intensity != decode_lib.INTENSITY_DEFAULT:
      key["intensity"] = self.intensity
    if self.skip_unreadable:  # a cache with files left out is another set
      key["skip_unreadable"] = True
    # Files decode differently since DECODER_VERSION 2 (npz arrays do not).
    if any(isinstance(e.source, str) for p in PARTS for e in self.parts[p]):
      key["decoder"] = decode_lib.DECODER_VERSION
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def get(data: Any, key: str, default: Any) -> Any:
  """`data.key`, or `default` where the config does not set it."""
  value = data.get(key, None) if hasattr(data, "get") else None
  return default if value is None else value


def root_dir(data: Any) -> str:
  """`data.root` as an absolute path that must exist."""
  root = get(data, "root", "")
  if not root:
    raise DataError(f"data.root is empty; the {data.format!r} layout needs it")
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.exists(root):
    raise FileNotFoundError(f"data.root not found: {root}")
  return root


def channels(data: Any) -> int:
  """`data.channels` (default 1), checked."""
  value = int(get(data, "channels", 1))
  if value not in CHANNELS:
    raise DataError(f"data.channels must be one of {CHANNELS}, got {value}")
  return value


def intensity(data: Any) -> str:
  """`data.intensity` (default "auto"), checked (`decode.parse_intensity`)."""
  value = str(get(data, "intensity", decode_lib.INTENSITY_DEFAULT)).strip()
  decode_lib.parse_intensity(value)
  return value


def skip_unreadable(data: Any) -> bool:
  """`data.skip_unreadable` (default False), which must be a bool."""
  value = get(data, "skip_unreadable", False)
  if not isinstance(value, bool | np.bool_):
    raise DataError(
      f"data.skip_unreadable must be true or false, got {value!r}"
    )
  return bool(value)


def apply_options(
  data: Any, layout: collections.abc.Callable[[], Manifest]
) -> Manifest:
  """Builds a layout's manifest under the `data.*` decoding options.

  Checks data.channels, data.intensity and data.skip_unreadable before any
  file is listed, then runs `layout()` with unreadable files recorded
  instead of raised when data.skip_unreadable is true (`skipping`).

  Args:
    data: the `data` config.
    layout: builds the manifest (e.g. `lambda: mvtec(data, workdir)`).

  Returns:
    The manifest with channels, intensity, skip_unreadable and the files
    its listing skipped.

  Raises:
    DataError: a bad option value (naming the key), or what `layout` raises.
  """
  options = {
    "channels": channels(data),
    "intensity": intensity(data),
    "skip_unreadable": skip_unreadable(data),
  }
  with skipping(options["skip_unreadable"]) as skipped:
    m = layout()
  return dataclasses.replace(
    m, **options, skipped=tuple(m.skipped) + tuple(skipped)
  )


def _pixels(entry: Entry) -> np.ndarray:
  """The raw [H, W] or [H, W, 3] uint8 pixels of a function source."""
  pixels = np.asarray(entry.source())
  if pixels.dtype != np.uint8 or not (
    pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] in (1, 3))
  ):
    raise DataError(
      f"Image {entry.name!r}: expected uint8 [H, W], [H, W, 1] or [H, W, 3],"
      f" got {pixels.dtype} {list(pixels.shape)}"
    )
  return (
    pixels[:, :, 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels
  )


def read(entry: Entry, intensity: str = "auto") -> Image.Image:
  """An entry's full-size 8-bit image (`decode.read_image` for files)."""
  if callable(entry.source):
    return decode_lib.array_image(_pixels(entry), intensity)
  return decode_lib.read_image(entry.source, intensity)


def decode(
  entry: Entry, size: int, channels: int = 1, intensity: str = "auto"
) -> np.ndarray:
  """Reads an entry's pixels and preprocesses them like the original code.

  Args:
    entry: the manifest entry.
    size: output side S.
    channels: C, 1 (grayscale) or 3 (RGB).
    intensity: `data.intensity` (see `decode.py`): 8-bit files are used as
      stored; other bit depths are mapped to 8 bits.

  Returns:
    [S, S, C] uint8.

  Raises:
    FileNotFoundError, DataError, ImportError: naming the file when it
      cannot be decoded (see `decode.py`).
  """
  return to_array(read(entry, intensity), size, channels)


def decode_example(
  entry: Entry,
  size: int,
  channels: int = 1,
  intensity: str = "auto",
  with_mask: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
  """`decode` and, `with_mask`, `decode_mask`, decoding the image once.

  Returns:
    ([S, S, C] uint8 image, [S, S] uint8 {0, 1} mask or None).
  """
  image = read(entry, intensity)
  mask = decode_mask(entry, size, image.size) if with_mask else None
  return to_array(image, size, channels), mask


def decode_mask(
  entry: Entry, size: int, image_size: tuple[int, int] | None = None
) -> np.ndarray:
  """An entry's ground-truth mask at the size of its stored image.

  The mask is binarised (`decode.read_mask`: non-zero, or a non-zero palette
  index, is anomalous) and resized like the image (squashed to S x S), with
  nearest-neighbour sampling so that it stays binary. A mask may have
  another resolution than its image, but not another aspect ratio (that
  would pair it with the wrong pixels).

  Args:
    entry: the manifest entry; `entry.mask` None gives zeros.
    size: output side S.
    image_size: the image's (width, height) as decoded; None: read from
      its file header.

  Returns:
    [S, S] uint8 in {0, 1}.

  Raises:
    DataError: naming the files for an undecodable mask, a mask of another
      aspect ratio than its image, a normal image with anomalous pixels or
      an abnormal image whose mask is empty.
  """
  if entry.mask is None:
    return np.zeros((size, size), np.uint8)
  full = decode_lib.read_mask(entry.mask)
  if image_size is not None:
    w, h = image_size
  elif callable(entry.source):
    h, w = _pixels(entry).shape[:2]
  else:
    w, h = decode_lib.image_size(entry.source)
  mh, mw = full.shape
  # Same aspect up to the rounding of a rescaled mask (half a pixel a side).
  if abs(mw * h - mh * w) > max(w, h, mw, mh):
    raise DataError(
      f"Mask {entry.mask} is {mw}x{mh} but its image {entry.source} is"
      f" {w}x{h}: their aspect ratios differ"
    )
  if entry.label == 0 and full.any():
    raise DataError(
      f"Normal image {entry.source} has a non-empty mask {entry.mask}"
      f" ({int(full.sum())} non-zero pixels)"
    )
  if entry.label == 1 and not full.any():
    raise DataError(
      f"Abnormal image {entry.source}: its mask {entry.mask} is empty (no"
      " non-zero pixel), so it marks no anomaly; fix the mask, move the image"
      f" to the normal class, or {SKIP_HINT}"
    )
  mask = Image.fromarray(full.astype(np.uint8)).resize(
    (size, size), Image.NEAREST
  )
  mask = np.asarray(mask, dtype=np.uint8)
  if entry.label == 1 and not mask.any():
    # Thin defects can fall between the nearest-neighbour samples.
    logging.warning(
      "Abnormal image %s: its mask %s has no pixel left at %dx%d",
      entry.source,
      entry.mask,
      size,
      size,
    )
  return mask
