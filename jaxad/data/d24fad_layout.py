"""D²4FAD's on-disk layout -> a manifest, and its support sets (§2.6, §2.7).

    ROOT/<dataset>/train/good/*          training normals
    ROOT/<dataset>/test/good/*           test normals
    ROOT/<dataset>/test/<other>/*        test abnormals (any other folder)
    ROOT/med-kshot/<dataset>/train/shot<K>/good<K>/*   fixed K-shot supports

`data.root` is one dataset folder `ROOT/<dataset>`. Hidden files and
folders (names starting with ".") are ignored; `train/` folders other than
`good/` are not read.

Label rule (a deviation from the original): a test image is normal iff its
class folder is named exactly `good`. The original's `test.py` calls a path
normal when it contains "good" but not "ungood", which is case-sensitive,
so BMAD's `Ungood/` folder would be read as normal (METHODS.md §2.10, bug
4); here `Ungood`, `bad` or any other name is abnormal. A folder that is
`good` in another case (`Good`, `GOOD`) is refused rather than guessed.

No masks: the layout is image-level (the original computes image AUROC
only). Decoding is the builder's, as for every layout (bilinear resize; the
original resizes with LANCZOS).

Support sets (of any layout's target, see `fewshot`): the fixed folder
`<support_root>/<name>/train/shot<K>/good<K>/` as the original's `test.py`
reads it, or K of the target's training normals drawn with a seed and
recorded in `WORKDIR/split.json` (`record_support`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from absl import logging

from jaxad.data import manifest, splits

FORMAT = "d24fad"
NORMAL = "good"
KSHOT = "med-kshot"  # ROOT/med-kshot: the fixed support sets, not a dataset
EXPECTED = (
  "ROOT/<dataset>/train/good/*, ROOT/<dataset>/test/good/* and"
  " ROOT/<dataset>/test/<abnormal>/*"
)


def subfolders(path: str) -> list[str]:
  """Sorted names of the non-hidden folders in `path`."""
  return sorted(
    c
    for c in os.listdir(path)
    if not c.startswith(".") and os.path.isdir(os.path.join(path, c))
  )


def _entries(root: str, rel: str, label: int) -> tuple[manifest.Entry, ...]:
  """Entries of the images in `root/rel`, named `rel/<file>`."""
  folder = os.path.join(root, rel)
  out = []
  for f in manifest.list_images(folder):
    path = os.path.join(folder, f)
    out.append(
      manifest.Entry(f"{rel}/{f}", label, path, manifest.file_stamp(path))
    )
  return tuple(out)


def test_classes(test: str) -> list[str]:
  """Class folders of `test/`, `good` first, then the others sorted.

  Raises:
    DataError: a folder named `good` in another case (naming it).
  """
  classes = subfolders(test)
  for c in classes:
    if c != NORMAL and c.lower() == NORMAL:
      raise manifest.DataError(
        f"{os.path.join(test, c)}: the normal folder must be named exactly"
        f" {NORMAL!r} (the label rule compares folder names to {NORMAL!r};"
        " every other name is abnormal); rename it"
      )
  return [c for c in classes if c == NORMAL] + [
    c for c in classes if c != NORMAL
  ]


def d24fad(
  data: Any, workdir: str, *, need_test: bool = True
) -> manifest.Manifest:
  """The manifest of one dataset folder of the D²4FAD layout.

  Args:
    data: the `data` config: root (ROOT/<dataset>), image_size.
    workdir: unused (nothing is drawn).
    need_test: require `test/` with `good/` and at least one abnormal
      folder. False (a training source, whose test split is not used):
      `test/` may be absent, giving an empty test part.

  Returns:
    A manifest: `normal` = train/good/* (file order), no unlabeled pool,
    `test` = test/good/* (label 0) then every other test folder, sorted
    (label 1); names are paths relative to the dataset folder.

  Raises:
    FileNotFoundError: a missing root, train/good/ or (need_test) test/.
    DataError: an empty image folder, a `Good`-like folder, or (need_test)
      a test/ without normals or without abnormals; each names the folder.
  """
  del workdir
  root = manifest.root_dir(data)
  train = os.path.join(root, "train")
  if not os.path.isdir(os.path.join(train, NORMAL)):
    raise FileNotFoundError(
      f"Folder not found: {os.path.join(train, NORMAL)} (the d24fad layout"
      f" is {EXPECTED})"
    )
  ignored = [c for c in subfolders(train) if c != NORMAL]
  if ignored:
    logging.info("d24fad: not reading %s in %s (only good/)", ignored, train)
  normal = _entries(root, f"train/{NORMAL}", 0)
  test = os.path.join(root, "test")
  tests: tuple[manifest.Entry, ...] = ()
  if os.path.isdir(test):
    classes = test_classes(test)
    if need_test and (NORMAL not in classes or len(classes) < 2):
      raise manifest.DataError(
        f"{test} must hold the normal folder {NORMAL!r} and at least one"
        f" abnormal folder; found {classes}"
      )
    for c in classes:
      tests += _entries(root, f"test/{c}", int(c != NORMAL))
  elif need_test:
    raise FileNotFoundError(
      f"Folder not found: {test} (the d24fad layout is {EXPECTED})"
    )
  parts = {"normal": normal, "unlabeled": (), "test": tests}
  params = {"format": FORMAT, "root": root}
  return manifest.Manifest(
    os.path.basename(root), int(data.image_size), parts, params
  )


def datasets(root: str) -> list[str]:
  """Dataset folders of a D²4FAD ROOT: those with `train/good/`, sorted.

  `med-kshot/` and hidden folders are skipped.

  Raises:
    FileNotFoundError: ROOT is not a folder.
    DataError: ROOT holds no dataset folder.
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(f"data.root not found: {root}")
  found = [
    d
    for d in subfolders(root)
    if d != KSHOT and os.path.isdir(os.path.join(root, d, "train", NORMAL))
  ]
  if not found:
    raise manifest.DataError(
      f"data.root {root} holds no dataset folder (the d24fad layout is"
      f" {EXPECTED})"
    )
  return found


def kshot_folder(support_root: str, name: str, shots: int) -> str:
  """`support_root/<name>/train/shot<K>/good<K>`: a fixed K-shot support."""
  return os.path.join(
    support_root, name, "train", f"shot{shots}", f"{NORMAL}{shots}"
  )


def fixed_support(
  support_root: str, name: str, shots: int
) -> tuple[manifest.Entry, ...] | None:
  """The fixed K-shot support of dataset `name`, None without its folder.

  Args:
    support_root: the med-kshot folder ("" for none).
    name: the dataset's name (the folder under support_root).
    shots: K.

  Returns:
    Entries (label 0) named relative to support_root, in file order.

  Raises:
    DataError: the folder does not hold exactly K images (naming it).
  """
  folder = kshot_folder(support_root, name, shots)
  if not support_root or not os.path.isdir(folder):
    return None
  files = manifest.list_images(folder)
  if len(files) != shots:
    raise manifest.DataError(
      f"Support folder {folder} holds {len(files)} images, data.shots={shots}"
    )
  rel = os.path.relpath(folder, support_root)
  return tuple(
    manifest.Entry(f"{rel}/{f}", 0, os.path.join(folder, f), "") for f in files
  )


def draw_support(names: list[str], shots: int, seed: int) -> list[str]:
  """K of `names`: the first K of a seeded permutation, in `names` order.

  The same seed gives nested draws (the K=2 draw is in the K=4 draw).
  """
  pick = np.random.default_rng(seed).permutation(len(names))[:shots]
  return [names[i] for i in sorted(pick.tolist())]


def record_support(
  workdir: str, target: str, names: list[str], shots: int, seed: int
) -> list[str]:
  """The recorded draw of (target, K, seed) in W/split.json, or a new one.

  Args:
    workdir: the run's directory.
    target: the target's name.
    names: its training normals (manifest names), in manifest order.
    shots: K.
    seed: data.support_seed.

  Returns:
    The K support names.

  Raises:
    DataError: W/split.json is unreadable or not a few-shot record, or its
      record lists a name that is no training normal of the target.
  """
  path = os.path.join(workdir, splits.SPLIT_FILE)
  split = splits.read_json(path)
  if split is None:
    split = {"params": {"format": "fewshot"}, "support": {}}
  else:
    ok = isinstance(split, dict) and isinstance(split.get("support"), dict)
    if not ok or split.get("params") != {"format": "fewshot"}:
      raise manifest.DataError(
        f"{path} holds another kind of split than a few-shot support record;"
        " use a new workdir (or delete split.json)"
      )
  draws = split["support"].setdefault(target, {}).setdefault(str(shots), {})
  key = f"['support'][{target!r}][{str(shots)!r}][{str(seed)!r}]"
  if str(seed) in draws:
    chosen, known = draws[str(seed)], set(names)
    if not isinstance(chosen, list) or len(chosen) != shots:
      raise manifest.DataError(f"{path}: {key} must be a list of {shots} names")
    for n in chosen:
      if n not in known:
        raise manifest.DataError(
          f"{path}: {key} lists {n!r}, which is not a training normal of"
          f" {target!r}; restore the data, or use a new workdir"
        )
    logging.info("Re-using the support draw %s of %s", key, path)
    return chosen
  draws[str(seed)] = draw_support(names, shots, seed)
  splits.write_json(path, split)
  logging.info(
    "Drew %d supports of %s (seed %d): %s",
    shots,
    target,
    seed,
    path,
  )
  return draws[str(seed)]
