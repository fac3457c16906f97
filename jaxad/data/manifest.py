"""Manifests: what goes into each split of a one-class dataset, before decoding.

Every on-disk layout (see `layouts.py`) is turned into a `Manifest`: for each
part (`normal`, `unlabeled`, `test`) a tuple of `Entry`s naming an image, its
label and where its pixels come from. The single tfds builder (`builder.py`)
turns any manifest into array_record splits, so decoding, resizing and caching
are written once.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np
from PIL import Image

PARTS = ("normal", "unlabeled", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

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
      index); it enters the cache key so that changed inputs re-prepare.
  """

  name: str
  label: int
  source: Source
  stamp: str


@dataclasses.dataclass(frozen=True)
class Manifest:
  """The three parts of a one-class dataset, plus what identifies it.

  Attributes:
    name: dataset name, e.g. "kermany_cxr_224" or "embedded/kermany_cxr64".
    image_size: side S of the stored [S, S, 1] uint8 images.
    parts: `normal`, `unlabeled`, `test` -> tuple of entries, in the order
      they are read back (test: normals then abnormals).
    params: format, absolute root and split parameters (enter the cache key).
  """

  name: str
  image_size: int
  parts: dict[str, tuple[Entry, ...]]
  params: dict[str, Any]

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
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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


def to_gray(image: Image.Image, size: int) -> np.ndarray:
  """DDAD's online preprocessing: grayscale, then bilinear resize.

  Args:
    image: any PIL image.
    size: output side S.

  Returns:
    [S, S, 1] uint8.
  """
  image = image.convert("L").resize((size, size), Image.BILINEAR)
  return np.asarray(image, dtype=np.uint8)[:, :, None]


def decode(entry: Entry, size: int) -> np.ndarray:
  """Reads an entry's pixels and preprocesses them like the original code.

  Args:
    entry: the manifest entry.
    size: output side S.

  Returns:
    [S, S, 1] uint8.

  Raises:
    DataError: naming the file when it cannot be decoded.
  """
  if callable(entry.source):
    pixels = np.asarray(entry.source())
    if pixels.dtype != np.uint8 or not (
      pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] in (1, 3))
    ):
      raise DataError(
        f"Image {entry.name!r}: expected uint8 [H, W], [H, W, 1] or [H, W, 3],"
        f" got {pixels.dtype} {list(pixels.shape)}"
      )
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
      pixels = pixels[:, :, 0]
    return to_gray(Image.fromarray(pixels), size)
  try:
    with Image.open(entry.source) as image:
      # convert() forces the lazy decode, so corrupt data fails in here.
      return to_gray(image, size)
  except FileNotFoundError:
    raise FileNotFoundError(f"Image file not found: {entry.source}") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(
      f"Cannot decode image {entry.source}: {type(e).__name__}: {e}"
    ) from e
