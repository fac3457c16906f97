"""Layouts with pixel ground truth -> manifests with masks.

Three layouts, chosen by `data.format`, for unsupervised (normal-only)
training: the known normals are all train normals and the unlabeled pool is
empty (`data.unlabeled_size` and `data.anomaly_rate` are not used). Every
abnormal test image must have a mask (white = anomalous); a normal test image
may have one, which must then be empty; normals without one get zeros.

* `mvtec`: MVTec AD, `ROOT/CAT/train/good/*`, `ROOT/CAT/test/<defect>/*`
  with `good` the normal test class, masks
  `ROOT/CAT/ground_truth/<defect>/<stem>_mask.png`. `data.category` names
  CAT; empty means ROOT is the category folder itself.
* `bmad`: BMAD (Brain, Liver, RESC...), `ROOT/train/good/img/*`,
  `ROOT/test/{good,Ungood}/img/*`, masks of the same file name in
  `ROOT/test/{good,Ungood}/label/` (`good/label/` may be absent). BMAD's
  `ROOT/valid/` split (same structure) is meant for threshold and
  hyper-parameter selection; it is not read.
* `mtd`: Magnetic Tile Defects, `ROOT/MT_Free/Imgs/*.jpg` normals and
  `ROOT/MT_<Defect>/Imgs/X.jpg` defects, each with its mask `X.png` beside
  it. MTD has no train/test split: `data.test_normal_fraction` (default 0.2)
  of the MT_Free images, drawn with `data.split_seed`, are the test normals,
  kept in `WORKDIR/split.json`; every defect image is a test abnormal.

Hidden files and folders (names starting with ".": `.DS_Store`, `._*`,
`.ipynb_checkpoints`) are ignored, as class or defect folders too.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging

from jaxad.data import listing, manifest, splits

FORMATS = ("mvtec", "bmad", "mtd")
# What each layout expects, for the error when a folder is missing.
EXPECTED = {
  "mvtec": "ROOT/CAT/train/good/, ROOT/CAT/test/<defect>/ with good/, masks"
  " ROOT/CAT/ground_truth/<defect>/<stem>_mask.png",
  "bmad": "ROOT/train/good/img/, ROOT/test/{good,Ungood}/img/, masks of the"
  " same name in ROOT/test/{good,Ungood}/label/",
  "mtd": "ROOT/MT_Free/Imgs/*.jpg, ROOT/MT_<Defect>/Imgs/X.jpg with X.png",
}
MTD_NORMAL = "MT_Free"
MTD_IMAGE_EXTENSIONS = (".jpg", ".jpeg")  # the .png files are the masks


def subfolders(path: str) -> list[str]:
  """Sorted names of the folders in `path`, hidden ones (".x") left out."""
  return sorted(
    c
    for c in os.listdir(path)
    if not c.startswith(".") and os.path.isdir(os.path.join(path, c))
  )


def _folder(path: str, layout: str) -> str:
  """`path`, which must be a folder; the error shows the expected layout."""
  if not os.path.isdir(path):
    raise FileNotFoundError(
      f"Folder not found: {path} (the {layout} layout is {EXPECTED[layout]})"
    )
  return path


def _entry(
  root: str, name: str, label: int, mask: str | None, what: str = ""
) -> manifest.Entry:
  """The entry of image `root/name` with mask file `root/mask` (or None).

  An abnormal image's mask must exist; a normal image's is used if it
  exists. `what` says where the image was listed, for the error.
  """
  path = os.path.join(root, name)
  stamp = manifest.file_stamp(path, what)
  if mask is not None:
    mask = os.path.join(root, mask)
    if os.path.isfile(mask):
      stamp += "|" + manifest.file_stamp(mask)
    elif label == 1:
      raise manifest.DataError(
        f"No mask for abnormal image {path}: expected {mask}"
      )
    elif os.path.lexists(mask):  # a broken link is no missing mask
      raise manifest.DataError(
        f"Mask {mask} of {path}: {listing.unreadable(mask)}"
      )
    else:
      mask = None
  return manifest.Entry(name, label, path, stamp, mask)


def _manifest(
  data: Any, name: str, parts: dict, params: dict
) -> manifest.Manifest:
  """A manifest with masks and no unlabeled pool."""
  parts = {"normal": parts["normal"], "unlabeled": (), "test": parts["test"]}
  if int(manifest.get(data, "unlabeled_size", 0)):
    logging.info(
      "%s: the %s layout has no unlabeled pool; data.unlabeled_size is not"
      " used",
      name,
      params["format"],
    )
  return manifest.Manifest(
    name, int(data.image_size), parts, params, has_masks=True
  )


def mvtec(
  data: Any, workdir: str, pending: splits.Pending
) -> manifest.Manifest:
  """MVTec AD's layout, one category (nothing is drawn)."""
  del workdir, pending
  root = manifest.root_dir(data)
  category = str(manifest.get(data, "category", ""))
  base = os.path.join(root, category) if category else root
  if not os.path.isdir(base):
    found = subfolders(root)
    raise FileNotFoundError(
      f"Category folder not found: {base} (data.category={category!r});"
      f" folders found in {root}: {found}"
    )
  train = _folder(os.path.join(base, "train", "good"), "mvtec")
  test = _folder(os.path.join(base, "test"), "mvtec")
  classes = subfolders(test)
  if "good" not in classes or len(classes) < 2:
    raise manifest.DataError(
      f"{test} must hold the normal class folder 'good' and at least one"
      f" defect folder; found {classes}"
    )
  normal = tuple(
    _entry(base, f"train/good/{f}", 0, None)
    for f in manifest.list_images(train)
  )
  tests = []
  for c in ["good"] + [c for c in classes if c != "good"]:
    for f in manifest.list_images(os.path.join(test, c)):
      mask = None
      if c != "good":
        mask = f"ground_truth/{c}/{os.path.splitext(f)[0]}_mask.png"
      tests.append(_entry(base, f"test/{c}/{f}", int(c != "good"), mask))
  name = os.path.basename(root) + (f"/{category}" if category else "")
  params = {"format": "mvtec", "root": base}
  return _manifest(data, name, {"normal": normal, "test": tuple(tests)}, params)


def bmad(data: Any, workdir: str, pending: splits.Pending) -> manifest.Manifest:
  """BMAD's layout (`valid/` is not read; nothing is drawn)."""
  del workdir, pending
  root = manifest.root_dir(data)
  train = _folder(os.path.join(root, "train", "good", "img"), "bmad")
  normal = tuple(
    _entry(root, f"train/good/img/{f}", 0, None)
    for f in manifest.list_images(train)
  )
  tests = []
  for label, c in enumerate(("good", "Ungood")):
    folder = _folder(os.path.join(root, "test", c, "img"), "bmad")
    tests += [
      _entry(root, f"test/{c}/img/{f}", label, f"test/{c}/label/{f}")
      for f in manifest.list_images(folder)
    ]
  others = set(subfolders(os.path.join(root, "test"))) - {"good", "Ungood"}
  if others:
    logging.warning(
      "bmad: not reading %s in %s (only good/ and Ungood/ are test classes)",
      sorted(others),
      os.path.join(root, "test"),
    )
  params = {"format": "bmad", "root": root}
  return _manifest(
    data,
    os.path.basename(root),
    {"normal": normal, "test": tuple(tests)},
    params,
  )


def _mtd_images(root: str, folder: str) -> list[str]:
  """Sorted `folder/Imgs/*.jpg` of MTD, relative to `root`."""
  imgs = _folder(os.path.join(root, folder, "Imgs"), "mtd")
  files = sorted(
    f
    for f in os.listdir(imgs)
    if not f.startswith(".") and f.lower().endswith(MTD_IMAGE_EXTENSIONS)
  )
  if not files:
    raise manifest.DataError(f"{imgs} has no .jpg images")
  return [f"{folder}/Imgs/{f}" for f in files]


def _mtd_mask(name: str) -> str:
  """The mask of MTD's X.jpg: X.png beside it."""
  return os.path.splitext(name)[0] + ".png"


def mtd(data: Any, workdir: str, pending: splits.Pending) -> manifest.Manifest:
  """Magnetic Tile Defects with a seeded hold-out of test normals (a new
  split.json is queued in `pending`)."""
  root = manifest.root_dir(data)
  params = {
    "format": "mtd",
    "root": root,
    "test_normal_fraction": float(
      manifest.get(data, "test_normal_fraction", 0.2)
    ),
    "split_seed": int(manifest.get(data, "split_seed", 0)),
  }

  def draw_fn():
    split = splits.hold_out(
      _mtd_images(root, MTD_NORMAL),
      fraction=params["test_normal_fraction"],
      seed=params["split_seed"],
      what=os.path.join(root, MTD_NORMAL),
    )
    defects = [
      d for d in subfolders(root) if d.startswith("MT_") and d != MTD_NORMAL
    ]
    if not defects:
      raise manifest.DataError(f"No MT_<Defect> folder in {root}")
    split["test"]["1"] = [f for d in defects for f in _mtd_images(root, d)]
    return split

  split, reused = splits.resolve(workdir, params, draw_fn, pending)
  path = os.path.join(workdir, splits.SPLIT_FILE)

  def part(*keys, label, masks):
    what = f"{path} " + "".join(f"[{k!r}]" for k in keys)
    if reused:
      what += f"; {splits.CHANGED_HINT}"
    return tuple(
      _entry(root, n, label, _mtd_mask(n) if masks else None, what)
      for n in splits.require(split, path, *keys)
    )

  parts = {
    "normal": part("normal", label=0, masks=False),
    "test": part("test", "0", label=0, masks=True)
    + part("test", "1", label=1, masks=True),
  }
  return _manifest(data, os.path.basename(root), parts, params)
