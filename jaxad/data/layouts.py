"""On-disk layouts -> manifests (`manifest.Manifest`).

Four image-level layouts, chosen by `data.format`, and the three with pixel
masks of `mask_layouts.py` (`mvtec`, `bmad`, `mtd`):

* `medad`: DDAD's Med-AD archive, `ROOT/images/*` + `ROOT/data.json`; the
  unlabeled pool is the first `normal_num` / `abnormal_num` names of
  `train.unlabeled["0"|"1"]` in json order, as the original code does.
* `folders`: `ROOT/{train,test}/<class>/*`; one class is normal, all others
  abnormal; the OC-SSL split is a seeded draw kept in `WORKDIR/split.json`.
* `medmnist`: a MedMNIST `.npz`; the same seeded draw over the train split.
* `embedded`: the small Kermany CXR set shipped in `jaxad/data/embedded/`.

Only names, labels and where the pixels are come out of here: decoding is done
once, by the tfds builder, when a manifest is first prepared, as grayscale
or, with `data.channels=3`, RGB.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import numpy as np
from absl import logging

from jaxad.data import manifest, mask_layouts, npz_layouts, splits

FORMATS = ("embedded", "medad", "folders", "medmnist") + mask_layouts.FORMATS


def split_params(data: Any) -> dict[str, Any]:
  """The config values every OC-SSL split depends on."""
  return {
    "unlabeled_size": int(manifest.get(data, "unlabeled_size", 1000)),
    "anomaly_rate": float(manifest.get(data, "anomaly_rate", 0.6)),
  }


def _entries(names: list[Any], label: int, root: str, what: str):
  """Entries for image files `root/name`, each stamped by size and mtime."""
  out = []
  for name in names:
    if not isinstance(name, str):
      raise manifest.DataError(f"{what}: expected file names, got {name!r}")
    path = os.path.join(root, name)
    out.append(
      manifest.Entry(name, label, path, manifest.file_stamp(path, what))
    )
  return tuple(out)


def medad(data: Any, workdir: str) -> manifest.Manifest:
  """The Med-AD `data.json` layout (`workdir` is unused: the split ships)."""
  del workdir
  root = manifest.root_dir(data)
  path = os.path.join(root, "data.json")
  images = os.path.join(root, "images")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"data.json not found: {path} (the medad layout is ROOT/data.json +"
      " ROOT/images/)"
    )
  if not os.path.isdir(images):
    raise FileNotFoundError(f"Image folder not found: {images}")
  try:
    with open(path) as f:
      js = json.load(f)
  except (OSError, ValueError) as e:
    raise manifest.DataError(f"Invalid JSON in {path}: {e}") from e
  known = splits.require(js, path, "train", "0")
  pool = {c: splits.require(js, path, "train", "unlabeled", c) for c in "01"}
  test = {c: splits.require(js, path, "test", c) for c in "01"}
  params = {"format": "medad", "root": root, **split_params(data)}
  nums = splits.unlabeled_counts(
    params["unlabeled_size"], params["anomaly_rate"]
  )
  for c, num in zip("01", nums, strict=True):
    if num > len(pool[c]):
      raise manifest.DataError(
        f"{path}: train['unlabeled'][{c!r}] has {len(pool[c])} names, but"
        f" unlabeled_size={params['unlabeled_size']} at anomaly_rate="
        f"{params['anomaly_rate']} needs the first {num}"
      )
  # The original takes the first N of each list, in json order.
  unlabeled = _entries(
    pool["0"][: nums[0]], 0, images, f"{path} train['unlabeled']['0']"
  ) + _entries(
    pool["1"][: nums[1]], 1, images, f"{path} train['unlabeled']['1']"
  )
  parts = {
    "normal": _entries(known, 0, images, f"{path} train['0']"),
    "unlabeled": unlabeled,
    "test": _entries(test["0"], 0, images, f"{path} test['0']")
    + _entries(test["1"], 1, images, f"{path} test['1']"),
  }
  return manifest.Manifest(
    os.path.basename(root), int(data.image_size), parts, params
  )


def _list_split(root: str, split: str, normal_class: str):
  """(normal files, abnormal files) of ROOT/split, as paths relative to ROOT."""
  folder = os.path.join(root, split)
  if not os.path.isdir(folder):
    raise FileNotFoundError(
      f"Folder not found: {folder} (the folders layout is ROOT/train/<class>/"
      " and ROOT/test/<class>/)"
    )
  classes = sorted(
    c for c in os.listdir(folder) if os.path.isdir(os.path.join(folder, c))
  )
  if normal_class not in classes:
    raise manifest.DataError(
      f"Normal class folder {os.path.join(folder, normal_class)} not found;"
      f" classes found: {classes}"
    )
  abnormal = [c for c in classes if c != normal_class]
  if not abnormal:
    raise manifest.DataError(
      f"No abnormal class in {folder}: only the normal class"
      f" {normal_class!r} was found (every other folder is abnormal)"
    )
  files = {}
  for c in classes:
    files[c] = [
      f"{split}/{c}/{f}" for f in manifest.list_images(os.path.join(folder, c))
    ]
  logging.info(
    "%s: %s", folder, ", ".join(f"{c} {len(v)}" for c, v in files.items())
  )
  return files[normal_class], [f for c in abnormal for f in files[c]]


def folders(data: Any, workdir: str) -> manifest.Manifest:
  """`ROOT/{train,test}/<class>/*` with a seeded OC-SSL split of train."""
  root = manifest.root_dir(data)
  normal_class = str(manifest.get(data, "normal_class", "NORMAL"))
  params = {
    "format": "folders",
    "root": root,
    "normal_class": normal_class,
    **split_params(data),
    "split_seed": int(manifest.get(data, "split_seed", 0)),
  }

  def draw_fn():
    normals, abnormals = _list_split(root, "train", normal_class)
    split = splits.draw(
      normals,
      abnormals,
      unlabeled_size=params["unlabeled_size"],
      anomaly_rate=params["anomaly_rate"],
      seed=params["split_seed"],
      what=os.path.join(root, "train"),
    )
    test_normals, test_abnormals = _list_split(root, "test", normal_class)
    split["test"] = {"0": test_normals, "1": test_abnormals}
    return split

  split = splits.resolve(workdir, params, draw_fn)
  path = os.path.join(workdir, splits.SPLIT_FILE)

  def part(*keys, label):
    what = f"{path} " + "".join(f"[{k!r}]" for k in keys)
    return _entries(splits.require(split, path, *keys), label, root, what)

  parts = {
    "normal": part("normal", label=0),
    "unlabeled": part("unlabeled", "0", label=0)
    + part("unlabeled", "1", label=1),
    "test": part("test", "0", label=0) + part("test", "1", label=1),
  }
  return manifest.Manifest(
    os.path.basename(root), int(data.image_size), parts, params
  )


def medmnist(data: Any, workdir: str) -> manifest.Manifest:
  """A MedMNIST `.npz` with a seeded OC-SSL split of its train split."""
  path = npz_layouts.find_npz(manifest.root_dir(data))
  arrays = npz_layouts.read_medmnist(path)
  normal_label = int(manifest.get(data, "normal_label", 0))
  params = {
    "format": "medmnist",
    "root": path,
    "normal_label": normal_label,
    **split_params(data),
    "split_seed": int(manifest.get(data, "split_seed", 0)),
  }
  labels = {s: arrays[f"{s}_labels"] != normal_label for s in ("train", "test")}
  for s, abnormal in labels.items():
    if abnormal.all() or not abnormal.any():
      raise manifest.DataError(
        f"{path}: {s}_labels must hold both normal_label={normal_label} and"
        f" other labels; found {sorted(set(arrays[f'{s}_labels'].tolist()))}"
      )

  def draw_fn():
    train = labels["train"]
    return splits.draw(
      np.flatnonzero(~train).tolist(),
      np.flatnonzero(train).tolist(),
      unlabeled_size=params["unlabeled_size"],
      anomaly_rate=params["anomaly_rate"],
      seed=params["split_seed"],
      what=f"{path} train split",
    )

  split = splits.resolve(workdir, params, draw_fn)
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
  parts = {
    "normal": train_part("normal", label=0),
    "unlabeled": train_part("unlabeled", "0", label=0)
    + train_part("unlabeled", "1", label=1),
    # Test order: normals then abnormals, each in index order.
    "test": part(np.flatnonzero(~test_abnormal).tolist(), 0, test, "test")
    + part(np.flatnonzero(test_abnormal).tolist(), 1, test, "test"),
  }
  name = os.path.splitext(os.path.basename(path))[0]
  return manifest.Manifest(name, int(data.image_size), parts, params)


def build(data: Any, workdir: str) -> manifest.Manifest:
  """The manifest of the layout named by `data.format`.

  Args:
    data: the `data` config (format, root, image_size, channels, split
      parameters).
    workdir: the run's directory (holds split.json for drawn splits).

  Returns:
    The manifest, with `data.channels` (default 1).

  Raises:
    DataError: unknown format or bad data (the message names the file/key).
    FileNotFoundError: a missing root, file or folder.
  """
  fmt = manifest.get(data, "format", "")
  layouts = {
    "embedded": npz_layouts.embedded,
    "medad": medad,
    "folders": folders,
    "medmnist": medmnist,
    "mvtec": mask_layouts.mvtec,
    "bmad": mask_layouts.bmad,
    "mtd": mask_layouts.mtd,
  }
  if fmt not in layouts:
    raise manifest.DataError(
      f"Unknown data.format {fmt!r}; valid formats: {list(FORMATS)}"
    )
  channels = manifest.channels(data)
  return dataclasses.replace(layouts[fmt](data, workdir), channels=channels)
