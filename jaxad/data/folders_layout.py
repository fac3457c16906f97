"""The `folders` layout: `ROOT/{train,test}/<class>/*` -> a manifest.

One class folder (`data.normal_class`) is normal, every other one abnormal;
hidden folders (".ipynb_checkpoints") are no class. The OC-SSL split of
ROOT/train is a seeded draw (`splits.draw`) kept in `WORKDIR/split.json`
with the test listing, so that a resumed run sees the same split; images
added after it was drawn are named in a warning (they are not used), and a
listed image that is gone is an error saying the data changed.

With `data.unlabeled_dir` nothing is drawn: the known normals are all of
ROOT/train/<normal_class> and the pool is that folder's images
(`unlabeled_pool`), listed in split.json all the same; ROOT/train needs no
abnormal class.

`ROOT/test/` is optional: without it the test part is empty (the run
trains and saves, and skips evaluation), and a test folder added later is
listed, and recorded in split.json, by the next run on that workdir.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging

from jaxad.data import manifest, mask_layouts, splits, unlabeled_pool


def file_entries(names: list[Any], label: int, root: str, what: str):
  """Entries for image files `root/name`, each stamped by size and mtime
  (`what`: where the names were listed, for errors)."""
  out = []
  for name in names:
    if not isinstance(name, str):
      raise manifest.DataError(f"{what}: expected file names, got {name!r}")
    path = os.path.join(root, name)
    out.append(
      manifest.Entry(name, label, path, manifest.file_stamp(path, what))
    )
  return tuple(out)


def _list_split(
  root: str, split: str, normal_class: str, *, need_abnormal: bool = True
) -> tuple[list[str], list[str]]:
  """(normal files, abnormal files) of ROOT/split, as paths relative to ROOT.

  Hidden folders (".ipynb_checkpoints") are no class. Without
  `need_abnormal` (a real unlabeled pool: ROOT/train's abnormal classes
  are not used), only the normal class is listed.
  """
  folder = os.path.join(root, split)
  if not os.path.isdir(folder):
    raise FileNotFoundError(
      f"Folder not found: {folder} (the folders layout is ROOT/train/<class>/"
      " and ROOT/test/<class>/)"
    )
  classes = mask_layouts.subfolders(folder)
  if normal_class not in classes:
    raise manifest.DataError(
      f"Normal class folder {os.path.join(folder, normal_class)} not found;"
      f" classes found: {classes}"
    )
  abnormal = [c for c in classes if c != normal_class]
  if not need_abnormal:
    if abnormal:
      logging.info(
        "%s: data.unlabeled_dir is the unlabeled pool; not reading %s",
        folder,
        abnormal,
      )
    abnormal = []
  elif not abnormal:
    raise manifest.DataError(
      f"No abnormal class in {folder}: only the normal class"
      f" {normal_class!r} was found (every other folder is abnormal)"
    )
  files = {}
  for c in [normal_class] + abnormal:
    files[c] = [
      f"{split}/{c}/{f}" for f in manifest.list_images(os.path.join(folder, c))
    ]
  logging.info(
    "%s: %s", folder, ", ".join(f"{c} {len(v)}" for c, v in files.items())
  )
  return files[normal_class], [f for c in abnormal for f in files[c]]


def _warn_unlisted(root: str, split: dict, params: dict, path: str) -> None:
  """Warns about images added after a re-used split.json was drawn.

  Every train normal, test image and pool image is in a folders split, so
  one of these that is not is new: it is not used (said, not silent).
  """
  listed = {
    n
    for k in ("normal", "unlabeled", "test")
    for n in (
      split.get(k, [])
      if isinstance(split.get(k), list)
      else [x for v in (split.get(k) or {}).values() for x in v]
    )
  }
  folders = [os.path.join("train", params["normal_class"])]
  test = os.path.join(root, "test")
  if os.path.isdir(test):
    folders += [os.path.join("test", c) for c in mask_layouts.subfolders(test)]
  found = []
  try:  # a folder that cannot be listed fails where it is read, if at all
    for d in folders:
      if os.path.isdir(os.path.join(root, d)):
        found += [
          f"{d}/{f}" for f in manifest.list_images(os.path.join(root, d))
        ]
    if os.path.isdir(params.get("unlabeled_dir", "")):
      found += [
        f"{unlabeled_pool.PREFIX}/{f}"
        for f in unlabeled_pool.listing(params["unlabeled_dir"])
      ]
  except manifest.DataError:
    pass
  new = [f for f in found if f not in listed]
  if new:
    logging.warning(
      "%d image(s) of %s are not in %s (e.g. %s): added after the split"
      " was drawn, they are not used. Use a new workdir (or delete"
      " split.json) to draw a split with them.",
      len(new),
      root,
      path,
      new[0],
    )


def _add_late_test(
  root: str,
  split: dict,
  normal_class: str,
  path: str,
  pending: splits.Pending,
) -> None:
  """A run drawn without ROOT/test gets the test folder added since.

  The test split is not drawn and is never trained on, so a run trained
  without one can be evaluated once its test images exist: they are
  listed now, and recorded in split.json (queued in `pending`).
  """
  if split.get("test") != {"0": [], "1": []}:
    return
  if not os.path.isdir(os.path.join(root, "test")):
    return
  normals, abnormals = _list_split(root, "test", normal_class)
  split["test"] = {"0": normals, "1": abnormals}
  logging.info(
    "%s was drawn without a test split: adding the %d images of %s",
    path,
    len(normals) + len(abnormals),
    os.path.join(root, "test"),
  )
  test = split["test"]
  pending.add(path, lambda current: {**(current or {}), "test": test})


def folders(
  data: Any, workdir: str, pending: splits.Pending
) -> manifest.Manifest:
  """`ROOT/{train,test}/<class>/*` with a seeded OC-SSL split of train.

  `ROOT/test/` is optional (a run without a test trains and saves, and
  skips evaluation); with `data.unlabeled_dir`, nothing is drawn (the
  known normals are all of ROOT/train/<normal_class>, the pool is that
  folder's images) and the listing is kept in split.json all the same.
  """
  root = manifest.root_dir(data)
  normal_class = str(manifest.get(data, "normal_class", "NORMAL"))
  params = {
    "format": "folders",
    "root": root,
    "normal_class": normal_class,
    **unlabeled_pool.split_params(data),
    "split_seed": int(manifest.get(data, "split_seed", 0)),
  }
  pool_dir = params.get("unlabeled_dir", "")
  if pool_dir:  # nothing is drawn
    del params["split_seed"]

  def draw_fn():
    normals, abnormals = _list_split(
      root, "train", normal_class, need_abnormal=not pool_dir
    )
    if pool_dir:
      split = {
        "normal": normals,
        "unlabeled": {
          unlabeled_pool.KEY: [
            f"{unlabeled_pool.PREFIX}/{f}"
            for f in unlabeled_pool.listing(pool_dir)
          ]
        },
      }
    else:
      split = splits.draw(
        normals,
        abnormals,
        unlabeled_size=params["unlabeled_size"],
        anomaly_rate=params["anomaly_rate"],
        seed=params["split_seed"],
        what=os.path.join(root, "train"),
      )
    if os.path.isdir(os.path.join(root, "test")):
      test_normals, test_abnormals = _list_split(root, "test", normal_class)
    else:
      logging.warning(
        "No test folder %s: the run trains and saves, and skips evaluation",
        os.path.join(root, "test"),
      )
      test_normals, test_abnormals = [], []
    split["test"] = {"0": test_normals, "1": test_abnormals}
    return split

  split, reused = splits.resolve(workdir, params, draw_fn, pending)
  path = os.path.join(workdir, splits.SPLIT_FILE)
  if reused:
    _add_late_test(root, split, normal_class, path, pending)
    _warn_unlisted(root, split, params, path)

  def part(*keys, label):
    what = f"{path} " + "".join(f"[{k!r}]" for k in keys)
    if reused:
      what += f"; {splits.CHANGED_HINT}"
    return file_entries(splits.require(split, path, *keys), label, root, what)

  if pool_dir:
    unlabeled = unlabeled_pool.recorded_entries(split, path, pool_dir)
  else:
    unlabeled = part("unlabeled", "0", label=0) + part(
      "unlabeled", "1", label=1
    )
  parts = {
    "normal": part("normal", label=0),
    "unlabeled": unlabeled,
    "test": part("test", "0", label=0) + part("test", "1", label=1),
  }
  return manifest.Manifest(
    os.path.basename(root), int(data.image_size), parts, params
  )
