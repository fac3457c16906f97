"""Listing a folder's image files: nothing dropped without a word.

`list_images` is what every folder layout lists a class folder with:
hidden names are ignored, other files and subfolders are counted in a
warning, and an image file that cannot be read is an error naming it, or,
inside `skipping(True)` (`data.skip_unreadable=true`, set up by
`manifest.apply_options`), left out and recorded with its reason (the
builder writes them to W/skipped.txt). `file_stamp` fingerprints a file.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

from absl import logging

from jaxad.data.decode import IMAGE_EXTENSIONS, DataError

SKIP_HINT = (
  "set data.skip_unreadable=true to leave such files out (each listed in"
  " W/skipped.txt)"
)


# The files `list_images` left out, while `skipping(True)` is active.
_SKIPPED: contextvars.ContextVar[list | None] = contextvars.ContextVar(
  "jaxad_skipped", default=None
)


@contextlib.contextmanager
def skipping(enabled: bool):
  """While active and `enabled`, `list_images` leaves unreadable files out.

  Yields:
    The list that receives each left-out file's (path, reason); empty when
    not enabled (unreadable files are then errors).
  """
  skipped: list[tuple[str, str]] = []
  token = _SKIPPED.set(skipped if enabled else None)
  try:
    yield skipped
  finally:
    _SKIPPED.reset(token)


def unreadable(path: str) -> str:
  """Why an image file listed in a folder cannot be read ("" if it can)."""
  if not os.path.exists(path):
    if os.path.islink(path):
      return f"broken symbolic link to {os.readlink(path)}"
    return "file vanished while listing"
  if not os.path.isfile(path):
    return "not a regular file"
  if not os.access(path, os.R_OK):
    return "not readable (permission denied)"
  if os.path.getsize(path) == 0:
    return "empty file (0 bytes)"
  return ""


def list_images(folder: str) -> list[str]:
  """Sorted image file names in a folder; it must hold at least one.

  Hidden names (starting with ".": .DS_Store, ._x.png, .ipynb_checkpoints)
  are ignored. Files without an image extension (`IMAGE_EXTENSIONS`, any
  case) and subfolders (not searched) are counted in a warning. An image
  file that cannot be read (a broken symbolic link, no read permission, 0
  bytes, not a regular file) is an error naming it, or, inside
  `skipping(True)`, left out and recorded.

  Raises:
    DataError: an unreadable image file; no image file at all.
  """
  files, other, folders = [], [], []
  recorded = _SKIPPED.get()
  for f in sorted(os.listdir(folder)):
    if f.startswith("."):
      continue
    path = os.path.join(folder, f)
    if os.path.isdir(path):
      folders.append(f)
    elif not f.lower().endswith(IMAGE_EXTENSIONS):
      other.append(f)
    elif why := unreadable(path):
      if recorded is None:
        raise DataError(f"Unreadable image file {path}: {why}; {SKIP_HINT}")
      recorded.append((path, why))
    else:
      files.append(f)
  if other:
    logging.warning(
      "Skipping %d non-image files in %s (e.g. %s)",
      len(other),
      folder,
      other[0],
    )
  if folders:
    logging.warning(
      "Not searching %d subfolders of %s (e.g. %s): images must be directly"
      " in it",
      len(folders),
      folder,
      folders[0],
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
    FileNotFoundError: naming the file (and `what`) when it does not exist
      or is a broken symbolic link.
  """
  try:
    st = os.stat(path)
  except FileNotFoundError:
    where = f" (listed in {what})" if what else ""
    if os.path.islink(path):
      where += f" (a broken symbolic link to {os.readlink(path)})"
    raise FileNotFoundError(f"Image file not found: {path}{where}") from None
  if not os.path.isfile(path):
    raise DataError(f"Expected an image file, found a directory: {path}")
  return f"{st.st_size}:{st.st_mtime_ns}"
