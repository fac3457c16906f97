"""On-disk layouts -> manifests (`manifest.Manifest`).

Four image-level layouts, chosen by `data.format`, and the three with pixel
masks of `mask_layouts.py` (`mvtec`, `bmad`, `mtd`):

* `medad`: DDAD's Med-AD archive, `ROOT/images/*` + `ROOT/data.json`; the
  unlabeled pool is the first `normal_num` / `abnormal_num` names of
  `train.unlabeled["0"|"1"]` in json order, as the original code does.
  The test split needs both `test["0"]` and `test["1"]` names (or neither:
  no test).
* `folders` (`folders_layout`): `ROOT/{train,test}/<class>/*`; one class
  is normal, all others abnormal; the OC-SSL split is a seeded draw kept in
  `WORKDIR/split.json`. `ROOT/test/` is optional: without it the run trains
  and saves, and skips evaluation.
* `medmnist`: a MedMNIST `.npz`; the same seeded draw over the train split.
* `embedded`: the small Kermany CXR set shipped in `jaxad/data/embedded/`.

A real unlabeled pool (`data.unlabeled_dir`, for medad, folders and
medmnist; see `unlabeled_pool`) replaces the simulated one: every known
normal is trained on as such, and the pool is that folder's images, their
labels unknown (`unlabeled_pool.UNKNOWN`).

Hidden files and folders (names starting with ".": `.DS_Store`, `._*`,
`.ipynb_checkpoints`) are ignored, class folders included. `build` checks
what every layout gives before any image is decoded: a test split with
both classes (or none), and no image in two splits (`leakage`).

Only names, labels and where the pixels are come out of here: decoding is done
once, by the tfds builder, when a manifest is first prepared, as grayscale
or, with `data.channels=3`, RGB.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any

from jaxad.data import (
  folders_layout,
  leakage,
  manifest,
  mask_layouts,
  npz_layouts,
  splits,
  unlabeled_pool,
)

# medad lists image files as the folders layout does.
_entries = folders_layout.file_entries
FORMATS = ("embedded", "medad", "folders", "medmnist") + mask_layouts.FORMATS


def _simulated_pool(js, path, images, params) -> tuple[manifest.Entry, ...]:
  """Med-AD's pool: the first N names of train['unlabeled']['0'|'1']."""
  pool = {c: splits.require(js, path, "train", "unlabeled", c) for c in "01"}
  nums = unlabeled_pool.pool_counts(params)
  for c, num in zip("01", nums, strict=True):
    if num > len(pool[c]):
      raise manifest.DataError(
        f"{path}: train['unlabeled'][{c!r}] has {len(pool[c])} names, but"
        f" unlabeled_size={params['unlabeled_size']} at anomaly_rate="
        f"{params['anomaly_rate']} needs the first {num}"
      )
  # The original takes the first N of each list, in json order.
  return _entries(
    pool["0"][: nums[0]], 0, images, f"{path} train['unlabeled']['0']"
  ) + _entries(
    pool["1"][: nums[1]], 1, images, f"{path} train['unlabeled']['1']"
  )


def medad(
  data: Any, workdir: str, pending: splits.Pending
) -> manifest.Manifest:
  """The Med-AD `data.json` layout (nothing is drawn: the split ships)."""
  del workdir, pending
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
  test = {c: splits.require(js, path, "test", c) for c in "01"}
  if bool(test["0"]) != bool(test["1"]):
    raise manifest.DataError(
      f"{path}: the test split needs normal and abnormal images, but"
      f" test['0'] lists {len(test['0'])} and test['1'] {len(test['1'])}"
      " (AUROC is undefined with one class; list both, or neither to"
      " train without a test)"
    )
  params = {
    "format": "medad",
    "root": root,
    **unlabeled_pool.split_params(data),
  }
  if "unlabeled_dir" in params:  # train['unlabeled'] is not read
    folder = params["unlabeled_dir"]
    # Not frozen in split.json: medad draws nothing and writes none.
    unlabeled = unlabeled_pool.entries(folder, unlabeled_pool.listing(folder))
  else:
    unlabeled = _simulated_pool(js, path, images, params)
  parts = {
    "normal": _entries(known, 0, images, f"{path} train['0']"),
    "unlabeled": unlabeled,
    "test": _entries(test["0"], 0, images, f"{path} test['0']")
    + _entries(test["1"], 1, images, f"{path} test['1']"),
  }
  return manifest.Manifest(
    os.path.basename(root), int(data.image_size), parts, params
  )


LAYOUTS = {
  "embedded": lambda data, workdir, pending: npz_layouts.embedded(
    data, workdir
  ),
  "medad": medad,
  "folders": folders_layout.folders,
  "medmnist": npz_layouts.medmnist,
  "mvtec": mask_layouts.mvtec,
  "bmad": mask_layouts.bmad,
  "mtd": mask_layouts.mtd,
}
# Layouts with an unlabeled pool that `data.unlabeled_dir` can replace.
POOL_FORMATS = ("medad", "folders", "medmnist")
# Group names of the parts in leakage messages.
GROUPS = {"normal": "known normal", "unlabeled": "unlabeled", "test": "test"}


def check_test(m: manifest.Manifest) -> None:
  """Refuses a test split with one class only (an empty one is no test).

  Raises:
    DataError: naming the dataset root and the count of each label.
  """
  counts = collections.Counter(e.label for e in m.parts["test"])
  if m.parts["test"] and not (counts[0] and counts[1]):
    raise manifest.DataError(
      f"{m.params.get('root', m.name)}: the test split holds {counts[0]}"
      f" normal and {counts[1]} abnormal images; it needs both (AUROC is"
      " undefined with one class), or none to train without a test"
    )


def build(
  data: Any,
  workdir: str,
  pending: splits.Pending | None = None,
  *,
  check_leakage: bool = True,
) -> manifest.Manifest:
  """The manifest of the layout named by `data.format`, checked.

  Every layout passes through here, and so through its checks (before any
  image is decoded): a test split with both classes or none
  (`check_test`), and, with `check_leakage`, no image in two parts
  (`leakage.check`, unless `data.allow_duplicates`).

  Args:
    data: the `data` config (format, root, image_size, channels, split
      parameters, unlabeled_dir, allow_duplicates).
    workdir: the run's directory (holds split.json for drawn splits).
    pending: where a newly drawn split.json is queued, for the caller to
      write once the images are decoded (`splits.Pending.write`); None:
      written here, after the checks.
    check_leakage: False for a caller that checks the parts it uses
      itself (the few-shot sources, whose test split is not used).

  Returns:
    The manifest, with the decoding options (`manifest.apply_options`:
    data.channels, default 1, ...).

  Raises:
    DataError: unknown format, `data.unlabeled_dir` with a layout without
      a pool, a one-class test split, duplicates, or bad data (the message
      names the file/key).
    FileNotFoundError: a missing root, file or folder.
  """
  fmt = manifest.get(data, "format", "")
  if fmt not in LAYOUTS:
    raise manifest.DataError(
      f"Unknown data.format {fmt!r}; valid formats: {list(FORMATS)}"
    )
  if manifest.get(data, "unlabeled_dir", "") and fmt not in POOL_FORMATS:
    raise manifest.DataError(
      f"data.unlabeled_dir is set, but data.format={fmt!r} has no unlabeled"
      f" pool; it is read by {list(POOL_FORMATS)}"
    )
  queue = splits.Pending() if pending is None else pending
  # The decoding options (channels, ...) are checked before any listing.
  m = manifest.apply_options(data, lambda: LAYOUTS[fmt](data, workdir, queue))
  check_test(m)
  if check_leakage:
    leakage.check(
      {GROUPS[p]: m.parts[p] for p in manifest.PARTS},
      allow=leakage.allowed(data),
      what=str(m.params.get("root", m.name)),
    )
  if pending is None:
    queue.write()
  return m
