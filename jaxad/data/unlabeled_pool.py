"""The unlabeled pool of DDAD's one-class semi-supervised setting.

Simulated (the default): `data.unlabeled_size` images of the labelled
train set, `data.anomaly_rate` of them abnormal, drawn by the layout
(`split_params`, `pool_counts`). Its labels are known, and only reported.

Real: `data.unlabeled_dir`, a folder of images with no labels (medad,
folders and medmnist layouts). The pool is that folder's image files as
they are, sorted by name (hidden files skipped, other files reported); its
size and anomaly rate are unknown and not needed, so `data.unlabeled_size`
and `data.anomaly_rate` are not used (nor refused: every config carries
defaults for them) and nothing is drawn: every known normal is trained on
as such. Each pool image has the label UNKNOWN (-1), which nothing reads
as a class: it is stored so that the arrays keep their shape, and reported
as "unknown". Subfolders are refused rather than guessed at (a pool has no
classes).
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging

from jaxad.data import manifest, splits

UNKNOWN = -1  # the label of a pool image whose class is not known
KEY = "unknown"  # split.json["unlabeled"][KEY]: the real pool's names
PREFIX = "unlabeled"  # pool images are named PREFIX/<file name>


def folder(data: Any) -> str:
  """`data.unlabeled_dir` as an absolute folder, or "" when unset.

  Raises:
    FileNotFoundError: the folder does not exist (naming the key).
  """
  value = str(manifest.get(data, "unlabeled_dir", "") or "")
  if not value:
    return ""
  path = os.path.abspath(os.path.expanduser(value))
  if not os.path.isdir(path):
    raise FileNotFoundError(
      f"data.unlabeled_dir={value!r}: folder not found ({path})"
    )
  return path


def split_params(data: Any) -> dict[str, Any]:
  """The config values a split's pool depends on: `unlabeled_size` and
  `anomaly_rate`, or, with a real pool, its folder only."""
  path = folder(data)
  if path:
    for key in ("unlabeled_size", "anomaly_rate"):
      if manifest.get(data, key, None) is not None:
        logging.info(
          "data.unlabeled_dir is the unlabeled pool: data.%s is not used",
          key,
        )
    return {"unlabeled_dir": path}
  return {
    "unlabeled_size": int(manifest.get(data, "unlabeled_size", 1000)),
    "anomaly_rate": float(manifest.get(data, "anomaly_rate", 0.6)),
  }


def pool_counts(params: dict[str, Any]) -> tuple[int, int]:
  """(normal_num, abnormal_num) drawn into the pool: (0, 0) for a real
  one (see `splits.unlabeled_counts`)."""
  if "unlabeled_dir" in params:
    return 0, 0
  return splits.unlabeled_counts(
    params["unlabeled_size"], params["anomaly_rate"]
  )


def listing(path: str) -> list[str]:
  """The sorted image file names of a real pool's folder.

  Raises:
    DataError: the folder holds non-hidden subfolders, or no image.
  """
  subs = sorted(
    f
    for f in os.listdir(path)
    if not f.startswith(".") and os.path.isdir(os.path.join(path, f))
  )
  if subs:
    raise manifest.DataError(
      f"data.unlabeled_dir {path} holds folders {subs[:5]}"
      f"{' ...' if len(subs) > 5 else ''}: an unlabeled pool has no"
      " classes; put its images directly in that folder"
    )
  return manifest.list_images(path)


def file_name(name: str, where: str) -> str:
  """The file name of pool image `PREFIX/<file>` (as split.json lists it).

  Raises:
    DataError: another name, naming `where` (the split file).
  """
  head, sep, tail = name.partition("/")
  if head != PREFIX or not sep or not tail or "/" in tail:
    raise manifest.DataError(
      f"{where}: {name!r} is no unlabeled pool image ({PREFIX}/<file>)"
    )
  return tail


def entries(path: str, files: list[str]) -> tuple[manifest.Entry, ...]:
  """Manifest entries (label UNKNOWN) of files in a real pool's folder."""
  out = []
  for f in files:
    source = os.path.join(path, f)
    stamp = manifest.file_stamp(source, f"data.unlabeled_dir {path}")
    out.append(manifest.Entry(f"{PREFIX}/{f}", UNKNOWN, source, stamp))
  return tuple(out)


def recorded_entries(
  split: dict[str, Any], split_path: str, path: str
) -> tuple[manifest.Entry, ...]:
  """The pool folder `path`'s files as recorded in a split.json (`split`,
  read from `split_path`) under "unlabeled"/KEY: `entries` of them.

  Raises:
    DataError: the record is missing or names a file that is not a pool
      image (`splits.require`, `file_name`).
  """
  names = splits.require(split, split_path, "unlabeled", KEY)
  return entries(path, [file_name(n, split_path) for n in names])
