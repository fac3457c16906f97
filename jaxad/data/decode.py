"""Image and mask files -> exact pixels: the one place files are decoded.

Every image goes through `read_image`, which returns an 8-bit PIL image that
`to_array` converts (grayscale or RGB) and resizes; masks go through
`read_mask`. The rules, documented once here and in the README ("Data
formats and failure behaviour"):

* Orientation: a JPEG/TIFF EXIF Orientation tag is applied
  (`PIL.ImageOps.exif_transpose`) to images and masks before anything else,
  so a mask drawn on the displayed image lines up with it.
* Intensities, chosen by `data.intensity` (`parse_intensity`):

  - "auto" (default): 8-bit images (PIL modes 1, L, P, RGB, RGBA, ...) are
    used exactly as stored. Images with more bits or float samples (16-bit
    PNG/TIFF, int16/int32 TIFF, float32 TIFF, DICOM) are mapped by a
    per-image min-max over their finite values: min -> 0, max -> 255,
    linear, rounded to the nearest integer. A DICOM file's own VOI LUT or
    window (the first, when it holds several) is applied instead when it
    has one, its output range mapped linearly to 0..255.
  - "minmax": as "auto", but a DICOM file's VOI LUT / window is ignored.
  - "window:LOW,HIGH": every image, 8-bit ones included, is mapped by the
    fixed window LOW -> 0, HIGH -> 255 (linear, clipped, rounded), in the
    units of its stored values (DICOM: after the rescale slope/intercept,
    e.g. Hounsfield units; its own VOI is ignored).

  NaN maps to the window's low end (0), +inf to 255 and -inf to 0. An image
  without any finite value, or a constant one under min-max, cannot be
  mapped: `DataError` naming the file.
* DICOM (`.dcm`, `.dicom`, any case; needs pydicom, `pip install
  'jaxad[dicom]'`): rescale slope/intercept or modality LUT
  (`pydicom.pixels.apply_modality_lut`), then the intensity rule above
  (the VOI LUT or window: `dicom.apply_voi`), then MONOCHROME1 is inverted
  (255 - x) so that high is bright. RGB / YBR colour images are read as
  RGB. Multi-frame files and other photometric interpretations are refused.
* Masks: a pixel is anomalous when its stored value is non-zero (0/1 and
  0/255 masks alike; anti-aliased edges count); a palette ("P") mask by its
  palette index (index 0 is the background, as labelme writes them), not
  its colour; with an alpha channel, transparent pixels are background.
  Masks are not intensity-mapped. Store masks losslessly (PNG, TIFF, BMP):
  a JPEG mask's compression noise would count as anomalous.

Errors name the file: `FileNotFoundError` (also for a broken symbolic
link), `DataError` (undecodable, unsupported, unmappable) and `ImportError`
(pydicom missing; never skipped by `data.skip_unreadable`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (
  ".png",
  ".jpg",
  ".jpeg",
  ".bmp",
  ".tif",
  ".tiff",
  ".dcm",
  ".dicom",
)
DICOM_EXTENSIONS = (".dcm", ".dicom")
DICOM_EXTRA = "pip install 'jaxad[dicom]'"
INTENSITY_DEFAULT = "auto"
INTENSITY_HELP = (
  '"auto" (8-bit images as stored, others per-image min-max, a DICOM file'
  ' its own VOI window), "minmax", or "window:LOW,HIGH" (LOW < HIGH,'
  " finite numbers)"
)
# Bumped whenever decoding changes what a file gives; it enters the cache key
# of manifests with file sources (`Manifest.cache_key`), so that caches
# prepared by an older decoder (16-bit images clipped, EXIF ignored, 0/1
# masks read as empty) are not reused.
DECODER_VERSION = 2

# PIL modes whose samples are 8-bit: used as stored (PIL converts them to L
# or RGB exactly as before, which the golden tests rely on).
_EIGHT_BIT_MODES = frozenset(
  "1 L LA La P PA RGB RGBA RGBa RGBX CMYK YCbCr LAB HSV".split()
)


class DataError(ValueError):
  """Bad or inconsistent input data; the message names the file or key.

  Defined here, the lowest data module; `manifest.DataError` is this class.
  """


@dataclasses.dataclass(frozen=True)
class Intensity:
  """A parsed `data.intensity`.

  Attributes:
    mode: "auto", "minmax" or "window".
    low, high: the window (mode "window" only), in stored units.
  """

  mode: str
  low: float = 0.0
  high: float = 0.0

  @property
  def window(self) -> tuple[float, float] | None:
    """(low, high) for mode "window", else None."""
    return (self.low, self.high) if self.mode == "window" else None


@functools.lru_cache(maxsize=64)
def parse_intensity(value: str) -> Intensity:
  """Parses a `data.intensity` value (see the module docstring).

  Raises:
    DataError: naming data.intensity, the value and what is allowed.
  """
  text = str(value).strip()
  if text in ("auto", "minmax"):
    return Intensity(text)
  if text.startswith("window:"):
    parts = text[len("window:") :].split(",")
    try:
      low, high = (float(p) for p in parts)
    except ValueError:
      low = high = math.nan
    if math.isfinite(low) and math.isfinite(high) and low < high:
      return Intensity("window", low, high)
  raise DataError(f"data.intensity={value!r}; expected {INTENSITY_HELP}")


def to_uint8(
  values: np.ndarray,
  what: str,
  window: tuple[float, float] | None = None,
) -> np.ndarray:
  """Maps float or integer samples to uint8 (the rule of the module doc).

  Args:
    values: any real array ([H, W] or [H, W, C]).
    what: the file, for errors.
    window: (low, high) -> (0, 255); None: the finite min and max.

  Returns:
    uint8 array of `values`' shape: round((x - low) / (high - low) * 255),
    clipped to 0..255; NaN -> 0.

  Raises:
    DataError: no finite value, or min == max without a window.
  """
  x = np.asarray(values, np.float64)
  finite = np.isfinite(x)
  if not finite.any():
    raise DataError(
      f"Cannot map the intensities of {what}: it has no finite pixel value"
      " (all NaN or inf)"
    )
  if window is None:
    low, high = float(x[finite].min()), float(x[finite].max())
    if low == high:
      raise DataError(
        f"Cannot map the intensities of {what}: every pixel is {low:g}, so"
        " a per-image min-max is undefined; set data.intensity="
        '"window:LOW,HIGH" for a fixed mapping'
      )
  else:
    low, high = window
    if not high > low:
      raise DataError(
        f"Cannot map the intensities of {what}: its window {low:g}..{high:g}"
        " is empty"
      )
  with np.errstate(invalid="ignore", over="ignore"):
    scaled = (x - low) / (high - low) * 255.0
  scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
  return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def check_file(path: str, kind: str = "image") -> None:
  """Raises unless `path` is a regular file (followed through links).

  Raises:
    FileNotFoundError: missing, or a broken symbolic link (named).
    DataError: a directory or a special file (FIFO, socket, device).
  """
  if not os.path.exists(path):
    link = (
      f" (a broken symbolic link to {os.readlink(path)})"
      if os.path.islink(path)
      else ""
    )
    raise FileNotFoundError(f"{kind.capitalize()} file not found: {path}{link}")
  if os.path.isdir(path):
    raise DataError(f"Expected an {kind} file, found a directory: {path}")
  if not os.path.isfile(path):
    raise DataError(f"{kind.capitalize()} {path} is not a regular file")


def is_dicom(path: str) -> bool:
  """Whether `path` names a DICOM file (by extension, any case)."""
  return path.lower().endswith(DICOM_EXTENSIONS)


def _open(path: str, kind: str) -> Image.Image:
  """The fully decoded, EXIF-oriented PIL image at `path`."""
  check_file(path, kind)
  try:
    with Image.open(path) as image:
      # load() forces the lazy decode, so corrupt data fails in here.
      image.load()
      ImageOps.exif_transpose(image, in_place=True)  # no copy when upright
      return image
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(
      f"Cannot decode {kind} {path}: {type(e).__name__}: {e}"
    ) from e


def read_image(path: str, intensity: Intensity | str = "auto") -> Image.Image:
  """An image file as an 8-bit PIL image (the module's rules).

  Args:
    path: image file (PIL formats, or DICOM by extension).
    intensity: `Intensity` or a `data.intensity` string.

  Returns:
    An oriented PIL image: a file with 8-bit samples in its own mode (to be
    converted by `to_array`), anything else mode "L" or "RGB".

  Raises:
    FileNotFoundError, DataError, ImportError: see the module docstring.
  """
  if isinstance(intensity, str):
    intensity = parse_intensity(intensity)
  if is_dicom(path):
    from jaxad.data import dicom  # pydicom only for DICOM files

    return dicom.read(path, intensity)
  image = _open(path, "image")
  if image.mode in _EIGHT_BIT_MODES:
    if intensity.window is None:
      return image
    colour = image.mode not in ("1", "L", "LA", "La")
    pixels = np.asarray(image.convert("RGB" if colour else "L"))
    return Image.fromarray(to_uint8(pixels, path, intensity.window))
  if image.mode in ("I", "F") or image.mode.startswith("I;16"):
    # One channel of 16/32-bit integers or float32: map to 8 bits.
    pixels = np.asarray(image)
    return Image.fromarray(to_uint8(pixels, path, intensity.window), "L")
  return image  # any other PIL mode: PIL's own conversion, as before


def array_image(pixels: np.ndarray, intensity: Intensity | str) -> Image.Image:
  """A PIL image of raw uint8 [H, W] / [H, W, 3] pixels (npz sources), with
  the `data.intensity` window applied (other modes: unchanged)."""
  if isinstance(intensity, str):
    intensity = parse_intensity(intensity)
  if intensity.window is not None:
    pixels = to_uint8(pixels, "an array image", intensity.window)
  return Image.fromarray(pixels)


def to_array(image: Image.Image, size: int, channels: int = 1) -> np.ndarray:
  """DDAD's online preprocessing: grayscale (or RGB), then bilinear resize
  to S x S whatever the aspect ratio (a non-square image is squashed, not
  cropped or padded, as DDAD's `resize((64, 64), BILINEAR)`).

  Args:
    image: any PIL image (as `read_image` returns).
    size: output side S.
    channels: C, 1 (grayscale: PIL's ITU-R 601-2 luma for colour images) or
      3 (RGB; grayscale images are replicated).

  Returns:
    [S, S, C] uint8.
  """
  image = image.convert("L" if channels == 1 else "RGB")
  image = image.resize((size, size), Image.BILINEAR)
  return np.asarray(image, dtype=np.uint8).reshape(size, size, channels)


def image_size(path: str) -> tuple[int, int]:
  """(width, height) of an image file as `read_image` orients it, from its
  header only (EXIF orientations 5-8 swap the sides)."""
  if is_dicom(path):
    from jaxad.data import dicom

    ds = dicom.dcmread(path, header_only=True)
    return int(ds.Columns), int(ds.Rows)
  check_file(path, "image")
  try:
    with Image.open(path) as image:
      w, h = image.size
      orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(
      f"Cannot decode image {path}: {type(e).__name__}: {e}"
    ) from e
  return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def read_mask(path: str) -> np.ndarray:
  """A mask file as [H, W] bool, True = anomalous (the module's rules).

  Raises:
    FileNotFoundError: the mask file is missing (or a broken link).
    DataError: it cannot be decoded.
  """
  if is_dicom(path):
    from jaxad.data import dicom

    return dicom.read_mask(path)
  image = _open(path, "mask")
  mode = image.mode
  if mode == "P":  # the palette index, never its colour
    return np.asarray(image) != 0
  if mode in ("PA", "LA", "La", "RGBA", "RGBa"):
    pixels = np.asarray(image)  # [H, W, bands], alpha last
    return (pixels[..., :-1] != 0).any(-1) & (pixels[..., -1] != 0)
  if mode in ("1", "L", "I", "F") or mode.startswith("I;16"):
    pixels = np.asarray(image)
    if pixels.dtype.kind == "f":
      pixels = np.nan_to_num(pixels, nan=0.0)
    return pixels != 0
  if mode in ("RGB", "RGBX"):
    return (np.asarray(image) != 0).any(-1)
  return np.asarray(image.convert("L")) != 0
