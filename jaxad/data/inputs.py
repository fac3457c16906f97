"""The user's input files for prediction (`jaxad.predict`, `jaxad.load`).

An image file, a folder (recursive; hidden files and folders ignored) or an
`.npz`, as `manifest.Entry`s that `manifest.decode` reads exactly as the
training data.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from jaxad.data import manifest

NPZ_IMAGE_KEY = "images"
NPZ_NAMES_KEY = "names"


def find_inputs(path: str, *, full_names: bool = False) -> list[manifest.Entry]:
  """The images under `path`: an image file, a folder or a `.npz`.

  A folder is walked recursively, in sorted order, for files whose
  extension (any case) is one of `IMAGE_EXTENSIONS`; files and folders
  whose name starts with "." are ignored, like the training layouts do.
  Other files are ignored too (they are counted by `count_other_files`).
  A `.npz` holds "images": uint8 [N, H, W], [N, H, W, 1] or [N, H, W, 3]
  (any H, W: resized like files), and optionally "names": [N] str; without
  an "images" key, its only array is used. The npz is read whole.

  Args:
    path: the input.
    full_names: name entries by their path (`path` joined with the file's
      path under it) rather than relative to `path` (a file: its basename;
      an npz image: "<file name>[i]" or its "names" entry).

  Returns:
    Entries (label 0, empty stamp) for `manifest.decode`: file sources, or
    functions returning an npz image's pixels.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: an npz without a usable image array.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"Input not found: {path}")
  if os.path.isdir(path):
    entries = []
    for root, dirs, files in os.walk(path):
      dirs[:] = sorted(d for d in dirs if not d.startswith("."))
      for f in sorted(files):
        if f.startswith(".") or not f.lower().endswith(
          manifest.IMAGE_EXTENSIONS
        ):
          continue
        full = os.path.join(root, f)
        rel = os.path.relpath(full, path).replace(os.sep, "/")
        entries.append(manifest.Entry(full if full_names else rel, 0, full, ""))
    return entries
  if path.lower().endswith(".npz"):
    return _npz_inputs(path, full_names)
  name = path if full_names else os.path.basename(path)
  return [manifest.Entry(name, 0, path, "")]


def count_other_files(path: str) -> int:
  """Files under a folder `path` that `find_inputs` leaves out for their
  extension (not hidden ones); 0 for a file."""
  if not os.path.isdir(path):
    return 0
  n = 0
  for _, dirs, files in os.walk(path):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    n += sum(
      1
      for f in files
      if not f.startswith(".")
      and not f.lower().endswith(manifest.IMAGE_EXTENSIONS)
    )
  return n


def _npz_inputs(path: str, full_names: bool) -> list[manifest.Entry]:
  expected = (
    f"a key {NPZ_IMAGE_KEY!r} (or a single array) of uint8 [N, H, W],"
    f" [N, H, W, 1] or [N, H, W, 3], and optionally {NPZ_NAMES_KEY!r} [N] str"
  )
  try:
    with np.load(path, allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
    raise ValueError(f"Cannot read npz {path}: {e}") from e
  key = NPZ_IMAGE_KEY if NPZ_IMAGE_KEY in arrays else None
  if key is None and len(arrays) == 1:
    key = next(iter(arrays))
  if key is None:
    raise ValueError(
      f"{path}: expected {expected}; keys found: {sorted(arrays)}"
    )
  images, names = arrays[key], arrays.get(NPZ_NAMES_KEY)
  ok = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))
  if images.dtype != np.uint8 or not ok:
    raise ValueError(
      f"{path}: {key!r} is {images.dtype} {list(images.shape)}; expected"
      f" {expected}"
    )
  base = path if full_names else os.path.basename(path)
  if names is None:
    names = [f"{base}[{i}]" for i in range(len(images))]
  else:
    names = [str(n) for n in np.asarray(names).ravel()]
    if len(names) != len(images) or len(set(names)) != len(names):
      raise ValueError(
        f"{path}: {NPZ_NAMES_KEY!r} must hold {len(images)} distinct names,"
        f" got {len(names)} ({len(set(names))} distinct)"
      )
  return [
    manifest.Entry(name, 0, lambda i=i: images[i], "")
    for i, name in enumerate(names)
  ]


def decode(entry: manifest.Entry, size: int, channels: int):
  """(pixels [S, S, C] uint8, None) or (None, "ErrorType: message")."""
  try:
    return manifest.decode(entry, size, channels), None
  except Exception as e:  # noqa: BLE001 - one bad file never stops a batch
    return None, f"{type(e).__name__}: {e}"
