"""Layouts stored as numpy `.npz` files: MedMNIST, and the embedded set.

`read_medmnist` validates a MedMNIST file (`train_images` [N, H, W] or
[N, H, W, 3] uint8, `train_labels` [N, 1], same for `test_`) and
`medmnist` draws its OC-SSL split (kept in `WORKDIR/split.json`), or takes
its pool from `data.unlabeled_dir` (see `unlabeled_pool`); `embedded`
serves the Kermany CXR set shipped in `jaxad/data/embedded/` (made by
`scripts/make_embedded.py`).
"""

from __future__ import annotations

import functools
import os
import zipfile
from typing import Any

import numpy as np

from jaxad.data import manifest, splits, unlabeled_pool

EMBEDDED_NAME = "embedded/kermany_cxr64"
EMBEDDED_PATH = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "embedded", "kermany_cxr64.npz"
)


def find_npz(root: str) -> str:
  """`root` itself if a file, else the single `.npz` inside the folder."""
  if os.path.isfile(root):
    return root
  found = sorted(
    f
    for f in os.listdir(root)
    if not f.startswith(".") and f.lower().endswith(".npz")
  )
  if len(found) != 1:
    raise manifest.DataError(
      f"data.root {root} must be an .npz file or a folder holding exactly one"
      f" .npz; found {found}"
    )
  return os.path.join(root, found[0])


def open_npz(path: str) -> dict[str, np.ndarray]:
  """All arrays of an npz, with an error naming the file if unreadable."""
  try:
    with np.load(path, allow_pickle=False) as npz:
      return {k: npz[k] for k in npz.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise manifest.DataError(f"Cannot read npz {path}: {e}") from e


def _key(arrays: dict[str, np.ndarray], key: str, path: str, expected: str):
  if key not in arrays:
    raise manifest.DataError(
      f"{path}: missing key {key!r} (expected {expected}); keys found:"
      f" {sorted(arrays)}"
    )
  return arrays[key]


def check_images(arrays: dict[str, np.ndarray], key: str, path: str):
  """`arrays[key]` as uint8 [N, H, W] / [N, H, W, 1|3], else a DataError."""
  expected = "uint8 [N, H, W], [N, H, W, 1] or [N, H, W, 3]"
  images = _key(arrays, key, path, expected)
  ok = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))
  if images.dtype != np.uint8 or not ok:
    raise manifest.DataError(
      f"{path}: {key!r} must be {expected}, got {images.dtype}"
      f" {list(images.shape)}"
    )
  return images


def check_vector(
  arrays: dict[str, np.ndarray], key: str, path: str, n: int, kind: str
) -> np.ndarray:
  """`arrays[key]` as a length-n vector ([n] or [n, 1]), else a DataError."""
  what = {"iu": "integer", "U": "str"}.get(kind, kind)
  expected = f"{what} [{n}] or [{n}, 1]"
  values = _key(arrays, key, path, expected)
  shape = values.shape
  if not (shape == (n,) or shape == (n, 1)) or values.dtype.kind not in kind:
    raise manifest.DataError(
      f"{path}: {key!r} must be {expected}, got {values.dtype} {list(shape)}"
    )
  return values.reshape(n)


def read_medmnist(path: str) -> dict[str, np.ndarray]:
  """A MedMNIST npz's train/test arrays, validated.

  Args:
    path: the .npz file.

  Returns:
    {"train_images": [N, H, W(, C)] uint8, "train_labels": [N] int64, and the
    same for "test_"}.
  """
  arrays = open_npz(path)
  out = {}
  for split in ("train", "test"):
    images = check_images(arrays, f"{split}_images", path)
    labels = check_vector(arrays, f"{split}_labels", path, len(images), "iu")
    out[f"{split}_images"] = images
    out[f"{split}_labels"] = labels.astype(np.int64)
  return out


def _part(arrays, path, part, labels, stamp):
  images = check_images(arrays, f"{part}_images", path)
  names = check_vector(arrays, f"{part}_names", path, len(images), "U")
  if labels is None:
    labels = np.zeros(len(images), np.int64)
  return tuple(
    manifest.Entry(
      str(names[i]),
      int(labels[i]),
      functools.partial(images.__getitem__, i),
      f"{stamp}:{part}:{i}",
    )
    for i in range(len(images))
  )


def embedded(data: Any, workdir: str) -> manifest.Manifest:
  """The shipped Kermany CXR set (`data.format`/`data.root` are ignored)."""
  del workdir
  path = EMBEDDED_PATH
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"Embedded dataset not found: {path}; run scripts/make_embedded.py"
    )
  arrays = open_npz(path)
  stamp = manifest.file_stamp(path)
  label = {}
  for part in ("unlabeled", "test"):
    n = len(check_images(arrays, f"{part}_images", path))
    label[part] = check_vector(arrays, f"{part}_labels", path, n, "iu")
  parts = {
    "normal": _part(arrays, path, "normal", None, stamp),
    "unlabeled": _part(arrays, path, "unlabeled", label["unlabeled"], stamp),
    "test": _part(arrays, path, "test", label["test"], stamp),
  }
  params = {"format": "embedded", "root": path}
  return manifest.Manifest(EMBEDDED_NAME, int(data.image_size), parts, params)


def medmnist(
  data: Any, workdir: str, pending: splits.Pending
) -> manifest.Manifest:
  """A MedMNIST `.npz` with a seeded OC-SSL split of its train split (with
  `data.unlabeled_dir`: every train normal is a known normal, and the
  pool is that folder's images, listed in split.json)."""
  path = find_npz(manifest.root_dir(data))
  arrays = read_medmnist(path)
  normal_label = int(manifest.get(data, "normal_label", 0))
  params = {
    "format": "medmnist",
    "root": path,
    "normal_label": normal_label,
    **unlabeled_pool.split_params(data),
    "split_seed": int(manifest.get(data, "split_seed", 0)),
  }
  labels = {s: arrays[f"{s}_labels"] != normal_label for s in ("train", "test")}
  for s, abnormal in labels.items():
    # With a real pool, the train split's abnormals are not used.
    pool_only = s == "train" and "unlabeled_dir" in params
    if abnormal.all() or not (abnormal.any() or pool_only):
      raise manifest.DataError(
        f"{path}: {s}_labels must hold both normal_label={normal_label} and"
        f" other labels; found {sorted(set(arrays[f'{s}_labels'].tolist()))}"
      )

  pool_dir = params.get("unlabeled_dir", "")
  if pool_dir:  # nothing is drawn
    del params["split_seed"]

  def draw_fn():
    train = labels["train"]
    normals = np.flatnonzero(~train).tolist()
    if pool_dir:
      files = unlabeled_pool.listing(pool_dir)
      names = [f"{unlabeled_pool.PREFIX}/{f}" for f in files]
      return {"normal": normals, "unlabeled": {unlabeled_pool.KEY: names}}
    return splits.draw(
      normals,
      np.flatnonzero(train).tolist(),
      unlabeled_size=params["unlabeled_size"],
      anomaly_rate=params["anomaly_rate"],
      seed=params["split_seed"],
      what=f"{path} train split",
    )

  split, _ = splits.resolve(workdir, params, draw_fn, pending)
  split_path = os.path.join(workdir, splits.SPLIT_FILE)
  stamp = manifest.file_stamp(path)
  train = arrays["train_images"]

  def part(indices, label, images, prefix):
    for i in indices:
      if not isinstance(i, int) or not 0 <= i < len(images):
        raise manifest.DataError(
          f"{split_path}: index {i!r} out of range for {prefix}_images"
          f" [{len(images)}, ...]"
        )
    return tuple(
      manifest.Entry(
        f"{prefix}/{i:05d}",
        label,
        functools.partial(images.__getitem__, i),
        f"{stamp}:{prefix}:{i}",
      )
      for i in indices
    )

  def train_part(*keys, label):
    return part(splits.require(split, split_path, *keys), label, train, "train")

  test = arrays["test_images"]
  test_abnormal = labels["test"]
  if pool_dir:
    unlabeled = unlabeled_pool.recorded_entries(split, split_path, pool_dir)
  else:
    unlabeled = train_part("unlabeled", "0", label=0) + train_part(
      "unlabeled", "1", label=1
    )
  parts = {
    "normal": train_part("normal", label=0),
    "unlabeled": unlabeled,
    # Test order: normals then abnormals, each in index order.
    "test": part(np.flatnonzero(~test_abnormal).tolist(), 0, test, "test")
    + part(np.flatnonzero(test_abnormal).tolist(), 1, test, "test"),
  }
  name = os.path.splitext(os.path.basename(path))[0]
  return manifest.Manifest(name, int(data.image_size), parts, params)
