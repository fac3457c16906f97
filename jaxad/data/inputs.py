"""The user's input files for prediction (`jaxad.predict`, `jaxad.load`).

An image file, a folder (recursive; hidden files and folders ignored) or an
`.npz`, as `manifest.Entry`s that `manifest.decode` reads exactly as the
training data (pass the run's `data.intensity` to `decode`). Nothing in a
folder is dropped without a word: an image file that cannot be read (a
broken symbolic link, say) stays an entry, whose `decode` gives the error
row naming it; other files are counted by `count_other_files`.
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

  A folder is walked recursively, in sorted order (into linked folders,
  each real folder once), for files whose extension (any case) is one of
  `IMAGE_EXTENSIONS`, DICOM included; files and folders whose name starts
  with "." are ignored, like the training layouts do. Other files are
  ignored too (they are counted by `count_other_files`). A broken symbolic
  link or unreadable file with an image extension is listed: its `decode`
  reports it.
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
    for root, _, files in _walk(path):
      for f in files:
        if not f.lower().endswith(manifest.IMAGE_EXTENSIONS):
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
  return sum(
    1
    for _, _, files in _walk(path)
    for f in files
    if not f.lower().endswith(manifest.IMAGE_EXTENSIONS)
  )


def _walk(path: str):
  """`os.walk(path)` in sorted order, without hidden names ("." first),
  into linked folders too (each real folder once, so link loops end).

  Yields:
    (folder, subfolders, files), files sorted and not hidden.
  """
  seen = set()
  for root, dirs, files in os.walk(path, followlinks=True):
    real = os.path.realpath(root)
    if real in seen:  # a link back to a folder already walked
      dirs[:] = []
      continue
    seen.add(real)
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    yield root, dirs, sorted(f for f in files if not f.startswith("."))


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


def decode(
  entry: manifest.Entry,
  size: int,
  channels: int,
  intensity: str = "auto",
):
  """(pixels [S, S, C] uint8, None) or (None, "ErrorType: message").

  Args:
    entry: from `find_inputs`.
    size, channels: the run's data.image_size and data.channels.
    intensity: the run's data.intensity (`jaxad.data.decode`), so that the
      inputs are mapped as the training images were.
  """
  try:
    return manifest.decode(entry, size, channels, intensity), None
  except Exception as e:  # noqa: BLE001 - one bad file never stops a batch
    return None, f"{type(e).__name__}: {e}"
