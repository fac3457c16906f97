"""Manifests: what goes into each split of a one-class dataset, before decoding.

Every on-disk layout (see `layouts.py`, `mask_layouts.py`) is turned into a
`Manifest`: for each part (`normal`, `unlabeled`, `test`) a tuple of `Entry`s
naming an image, its label, where its pixels come from and, for layouts with
pixel ground truth, its mask file. The single tfds builder (`builder.py`)
turns any manifest into array_record splits, so decoding, resizing and caching
are written once. The helpers layouts share (config values, the root, image
files of a folder, file stamps) live here too.
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

PARTS = ("normal", "unlabeled", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

CHANNELS = (1, 3)  # grayscale (DDAD's preprocessing) or RGB
# Mask pixels above this are anomalous (masks are stored 0 / 255, and some,
# like MTD's, are anti-aliased).
MASK_THRESHOLD = 127

# A source is either the path of an image file or a function returning the
# raw pixels, [H, W] or [H, W, C] uint8 (used for npz-backed layouts).
Source = str | collections.abc.Callable[[], np.ndarray]


class DataError(ValueError):
  """Bad or inconsistent input data; the message names the file or key."""


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
    mask: the ground-truth mask file (white = anomalous) in a manifest with
      masks; None there means an all-normal (zero) mask.
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
  """

  name: str
  image_size: int
  parts: dict[str, tuple[Entry, ...]]
  params: dict[str, Any]
  has_masks: bool = False
  channels: int = 1

  def cache_key(self) -> str:
    """A hash of everything that determines the prepared arrays.

    Returns:
      16 hex digits over params, image size and every entry's part, name,
      label and stamp.
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


def list_images(folder: str) -> list[str]:
  """Sorted image file names in a folder; it must hold at least one."""
  files, other = [], []
  for f in sorted(os.listdir(folder)):
    if f.startswith(".") or not os.path.isfile(os.path.join(folder, f)):
      continue
    if f.lower().endswith(IMAGE_EXTENSIONS):
      files.append(f)
    else:
      other.append(f)
  if other:
    logging.warning(
      "Skipping %d non-image files in %s (e.g. %s)",
      len(other),
      folder,
      other[0],
    )
  if not files:
    raise DataError(
      f"Class folder {folder} has no image files"
      f" ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)})"
    )
  return files


def file_stamp(path: str, what: str = "") -> str:
  """Size and modification time of a file, for cache keys.

  Args:
    path: file to stat.
    what: where the file was listed (e.g. a data.json key), for the error.

  Returns:
    "size:mtime_ns".

  Raises:
    FileNotFoundError: naming the file (and `what`) when it does not exist.
  """
  try:
    st = os.stat(path)
  except FileNotFoundError:
    where = f" (listed in {what})" if what else ""
    raise FileNotFoundError(f"Image file not found: {path}{where}") from None
  if not os.path.isfile(path):
    raise DataError(f"Expected an image file, found a directory: {path}")
  return f"{st.st_size}:{st.st_mtime_ns}"


def to_array(image: Image.Image, size: int, channels: int = 1) -> np.ndarray:
  """DDAD's online preprocessing: grayscale (or RGB), then bilinear resize.

  Args:
    image: any PIL image.
    size: output side S.
    channels: C, 1 (grayscale) or 3 (RGB; grayscale images are replicated).

  Returns:
    [S, S, C] uint8.
  """
  image = image.convert("L" if channels == 1 else "RGB")
  image = image.resize((size, size), Image.BILINEAR)
  return np.asarray(image, dtype=np.uint8).reshape(size, size, channels)


def _read(path: str, kind: str) -> Image.Image:
  """The fully decoded image file at `path`; errors name the file."""
  try:
    with Image.open(path) as image:
      # load() forces the lazy decode, so corrupt data fails in here.
      image.load()
      return image
  except FileNotFoundError:
    raise FileNotFoundError(
      f"{kind.capitalize()} file not found: {path}"
    ) from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(
      f"Cannot decode {kind} {path}: {type(e).__name__}: {e}"
    ) from e


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


def decode(entry: Entry, size: int, channels: int = 1) -> np.ndarray:
  """Reads an entry's pixels and preprocesses them like the original code.

  Args:
    entry: the manifest entry.
    size: output side S.
    channels: C, 1 (grayscale) or 3 (RGB).

  Returns:
    [S, S, C] uint8.

  Raises:
    DataError: naming the file when it cannot be decoded.
  """
  if callable(entry.source):
    image = Image.fromarray(_pixels(entry))
  else:
    image = _read(entry.source, "image")
  return to_array(image, size, channels)


def decode_mask(entry: Entry, size: int) -> np.ndarray:
  """An entry's ground-truth mask at the size of its stored image.

  The mask is binarised (> MASK_THRESHOLD) and resized like the image
  (squashed to S x S), with nearest-neighbour sampling so that it stays
  binary. A mask may have another resolution than its image, but not
  another aspect ratio (that would pair it with the wrong pixels).

  Args:
    entry: the manifest entry; `entry.mask` None gives zeros.
    size: output side S.

  Returns:
    [S, S] uint8 in {0, 1}.

  Raises:
    DataError: naming the files for an undecodable mask, a mask of another
      aspect ratio than its image, or a normal image with anomalous pixels.
  """
  if entry.mask is None:
    return np.zeros((size, size), np.uint8)
  full = np.asarray(_read(entry.mask, "mask").convert("L")) > MASK_THRESHOLD
  if callable(entry.source):
    h, w = _pixels(entry).shape[:2]
  else:
    with Image.open(entry.source) as image:  # the header only
      w, h = image.size
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
      f" ({int(full.sum())} pixels > {MASK_THRESHOLD})"
    )
  mask = Image.fromarray(full.astype(np.uint8)).resize(
    (size, size), Image.NEAREST
  )
  mask = np.asarray(mask, dtype=np.uint8)
  if entry.label == 1 and not mask.any():
    why = (
      "is empty" if not full.any() else f"has no pixel left at {size}x{size}"
    )
    logging.warning(
      "Abnormal image %s: its mask %s %s", entry.source, entry.mask, why
    )
  return mask
