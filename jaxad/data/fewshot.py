"""Host arrays for D²4FAD's few-shot cross-dataset setting (METHODS.md §2).

Leave-one-dataset-out (§2.1, §2.4): of the datasets listed in the config,
one is the target; the training pool is the training normals of every
*other* one (the source id of each image kept), and the target gives the
test split (all of it: nothing is dropped, unlike the original's
`drop_last` test loader, §2.10 bug 3) and the K-shot support set.

The data config (sources, target, shots, support) is described and
checked in `jaxad.data.fewshot_sources`.

Each entry is loaded by its layout with no unlabeled pool
(`unlabeled_size=0`), prepared and cached by the tfds builder like any
one-class dataset (a source without its test split); the splits a layout
draws (folders, medmnist, mtd) are kept in W/sources/<name>/split.json.
A drawn support is K of the target's training normals, never test
images, recorded in W/split.json as
{"params": {"format": "fewshot"}, "support": {target: {"<K>": {"<seed>":
[names]}}}}: the same (target, K, seed) re-uses its record, and another K
or seed adds one (the support is an input, not a weight, so re-scoring
with other shots needs no retraining). Draws are nested: K supports are
the first K of one seeded permutation, so 2 ⊂ 4 ⊂ 8 for a seed.

The calibration normals (`load`'s `calibration_fraction`, the run's
`eval.calibration_fraction`) are a seeded (split_seed) fraction of the
target's training normals, recorded in W/split.json's "calibration"
({"fraction", "seed", "names"}); the draw does not depend on the support,
so re-scoring with other shots keeps the record, and the current support
images (by name, or identical pixels for a fixed support) are left out of
what is scored. They are never test images, nor trained on (no target
image is).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from jaxad.data import (
  d24fad_layout,
  fewshot_sources,
  layouts,
  leakage,
  manifest,
  oneclass,
  splits,
)

DataError = manifest.DataError


@dataclasses.dataclass(frozen=True)
class FewShotData:
  """uint8 images of one leave-one-dataset-out run (satisfies EvalData).

  Attributes:
    name: the target's name.
    pools: [N, S, S, C] uint8 training normals of the sources, grouped by
      source in entry order (`episodes.source_ranges` relies on it).
    pool_source: [N] int32 source id (index into source_names), sorted.
    source_names: the source names, in id order.
    support: [K, S, S, C] uint8 normal support images of the target.
    support_names: their names (drawn: the target's names for them;
      fixed: relative to the support root).
    support_from: how the support was chosen, for logs and reports.
    test: [NT, S, S, C] uint8 target test images, normals first.
    test_labels: [NT] int32, 0 normal, 1 abnormal.
    test_names: the NT test image names, in order.
    test_masks: [NT, S, S] uint8 in {0, 1} for targets with masks, else
      None.
    calibration: [NC, S, S, C] uint8 calibration normals of the target
      (training normals, never a support); [0, S, S, C] when there are none
      (the default: None is replaced).
    calibration_names: their names (the target's manifest names).
  """

  name: str
  pools: np.ndarray
  pool_source: np.ndarray
  source_names: tuple[str, ...]
  support: np.ndarray
  support_names: tuple[str, ...]
  support_from: str
  test: np.ndarray
  test_labels: np.ndarray
  test_names: tuple[str, ...]
  test_masks: np.ndarray | None = None
  calibration: np.ndarray | None = None
  calibration_names: tuple[str, ...] = ()

  def __post_init__(self):
    if self.calibration is None:
      empty = oneclass.no_calibration(self.test)
      object.__setattr__(self, "calibration", empty)


def _manifest(
  src: fewshot_sources.Source,
  workdir: str,
  is_target: bool,
  pending: splits.Pending,
):
  """The entry's manifest; its own drawn split goes to W/sources/<name>/
  (queued in `pending`, written once the data is prepared).

  A source keeps only its training normals: its test images (and masks)
  are never used, so they are not decoded (nor their masks checked).
  Duplicates are checked by `leakage.check_target`, over what is used.
  """
  sub = os.path.join(workdir, "sources", src.name)
  if src.format != d24fad_layout.FORMAT:
    m = layouts.build(src.data, sub, pending, check_leakage=False)
  else:
    m = d24fad_layout.d24fad(src.data, sub, need_test=is_target)
    m = dataclasses.replace(m, channels=manifest.channels(src.data))
  if is_target:
    return m
  parts = {**m.parts, "unlabeled": (), "test": ()}
  return dataclasses.replace(m, parts=parts, has_masks=False)


def _warn_if_small(name: str, m: manifest.Manifest, size: int) -> None:
  """Warns when a dataset's first training normal is upsampled."""
  if not m.parts["normal"]:
    return
  entry = m.parts["normal"][0]
  try:
    if callable(entry.source):
      h, w = np.asarray(entry.source()).shape[:2]
    else:
      with Image.open(entry.source) as image:  # the header only
        w, h = image.size
  except (OSError, ValueError):
    return  # decoding reports it, naming the file
  if min(h, w) < size:
    logging.warning(f"{name}: {entry.name} is {w}x{h}, upsampled to {size}")


def _support(target, m, shots, mode, seed, workdir):
  """(how, names, fixed entries or None) of the target's support set."""
  folder = d24fad_layout.kshot_folder(target.support_root, target.name, shots)
  fixed = None
  if mode != "drawn":
    fixed = d24fad_layout.fixed_support(target.support_root, target.name, shots)
  if fixed is None and mode == "fixed":
    raise FileNotFoundError(
      f"data.support='fixed' but {target.name!r} has no support folder"
      f" {folder if target.support_root else '(support_root is unset)'}"
      f" for data.shots={shots}"
    )
  if fixed is not None:
    return f"fixed: {folder}", [e.name for e in fixed], fixed
  if mode == "auto" and target.support_root:  # a support root without K
    logging.warning("%s not found: drawing the supports", folder)
  normals = [e.name for e in m.parts["normal"]]
  if len(normals) < shots:
    raise DataError(
      f"Target {target.name!r} ({target.data.root}) has {len(normals)}"
      f" training normals, fewer than data.shots={shots} supports to draw"
    )
  names = d24fad_layout.record_support(
    workdir, target.name, normals, shots, seed
  )
  return f"drawn: seed {seed} of {len(normals)} training normals", names, None


def _read_normals(builder, indices: list[int]) -> np.ndarray:
  """[len(indices), S, S, C] uint8 training normals at manifest positions
  `indices`, reading only those records."""
  if not indices:
    return np.zeros((0, *builder.info.features["image"].shape), np.uint8)
  from jaxad.data import builder as builder_lib  # tfds: only to prepare

  records = builder_lib.split_source(builder, "normal").__getitems__(indices)
  if [int(r["index"]) for r in records] != indices:
    raise DataError(f"Corrupt cache {builder.data_dir}: delete it")
  return np.stack([r["image"] for r in records])


def _calibration(builder, names, held, support, support_names):
  """(images, names) of the held-out target normals that are no support:
  not named as one (a drawn support), nor identical to one (any)."""
  named = set(support_names)
  want = [i for i in np.flatnonzero(held).tolist() if names[i] not in named]
  images = _read_normals(builder, want)
  same = {hashlib.sha1(x.tobytes()).digest() for x in support}
  keep = [hashlib.sha1(x.tobytes()).digest() not in same for x in images]
  dropped = int(np.sum(held)) - int(np.sum(keep))
  if dropped:
    logging.info(
      "%d of the %d calibration normals are supports: not scored",
      dropped,
      int(np.sum(held)),
    )
  return images[np.asarray(keep, bool)], tuple(
    names[i] for i, k in zip(want, keep, strict=True) if k
  )


def _check_support_is_no_test_image(support, names, test, target, allow):
  """Raises DataError when a support image has the pixels of a target
  test image (a warning with data.allow_duplicates)."""
  hashes = {
    hashlib.sha1(x.tobytes()).digest(): n
    for x, n in zip(test["image"], test["name"], strict=True)
  }
  for x, n in zip(support, names, strict=True):
    if (hit := hashes.get(hashlib.sha1(x.tobytes()).digest())) is None:
      continue
    message = f"Support image {n} of {target} is identical to test image {hit}"
    if not allow:
      raise DataError(
        f"{message}: it would score that test image against itself. Remove"
        f" it from the support folder (or set {leakage.ALLOW_KEY}=true)"
      )
    logging.warning("%s (%s=true)", message, leakage.ALLOW_KEY)


def load(
  data: Any, workdir: str, calibration_fraction: float = 0.0
) -> FewShotData:
  """Checks, prepares (once, cached) and reads a leave-one-out run's data.

  Args:
    data: the `data` config (see the module docstring).
    workdir: the run's directory (split.json, sources/<name>/split.json).
    calibration_fraction: `eval.calibration_fraction`: the share of the
      target's training normals held out as calibration normals (see the
      module docstring); 0: none.

  Returns:
    The sources' training pools, the target's support, calibration normals
    and test split.

  Raises:
    DataError / FileNotFoundError, naming the key, file or folder, before
    any image is decoded: see `fewshot_sources.check_config`, plus a
    missing folder, a source with fewer than 2 training normals (a query
    needs another image of its source), a target test split without both
    labels, a fixed support folder without exactly K images, a target with
    fewer than K training normals for a draw, a changed support or
    calibration record, a calibration fraction outside [0, 1); after
    decoding, before any split record is written: a support image
    identical to a target test image (unless data.allow_duplicates).
  """
  from jaxad.data import builder as builder_lib  # tfds: only to prepare

  splits.check_calibration_fraction(calibration_fraction)
  entries, t = fewshot_sources.check_config(data)
  target = entries[t]
  shots = int(manifest.get(data, "shots", 0))
  size = int(target.data.image_size)
  pending = splits.Pending()
  manifests = [
    _manifest(e, workdir, i == t, pending) for i, e in enumerate(entries)
  ]
  for i, (e, m) in enumerate(zip(entries, manifests, strict=True)):
    if i != t and len(m.parts["normal"]) < 2:
      raise DataError(
        f"Source {e.name!r} ({e.data.root}) has {len(m.parts['normal'])}"
        " training normals; a source needs at least 2"
      )
    _warn_if_small(e.name, m, size)
  labels = {x.label for x in manifests[t].parts["test"]}
  if labels != {0, 1}:
    raise DataError(
      f"Target {target.name!r} ({target.data.root}): the test split must"
      f" hold normals and abnormals; labels found: {sorted(labels)}"
    )
  sources = {
    e.name: m.parts["normal"]
    for i, (e, m) in enumerate(zip(entries, manifests, strict=True))
    if i != t
  }
  leakage.check_target(
    sources,
    manifests[t].parts["normal"],
    manifests[t].parts["test"],
    target=target.name,
    allow=leakage.allowed(data),
  )
  how, support_names, fixed = _support(
    target,
    manifests[t],
    shots,
    str(manifest.get(data, "support", "auto")),
    int(manifest.get(data, "support_seed", 0)),
    workdir,
  )
  seed = int(manifest.get(data, "split_seed", 0))
  target_names = tuple(e.name for e in manifests[t].parts["normal"])
  held = oneclass.hold_out_calibration(
    workdir,
    target_names,
    fraction=calibration_fraction,
    seed=seed,
    what=f"Target {target.name!r}: training normals",
    empty={"params": {"format": "fewshot"}, "support": {}},
    pending=pending,
  )
  # Everything is checked: decode (or re-use the cache), then write the
  # split records.
  cache = target.data.cache_dir
  builders = [builder_lib.prepare(m, cache) for m in manifests]
  # The support and calibration draws index the target's training normals
  # as listed: one left out while decoding (data.skip_unreadable) would
  # shift them onto other images.
  kept = builders[t].manifest.parts["normal"]
  if len(kept) != len(manifests[t].parts["normal"]):
    left_out = {e.name for e in manifests[t].parts["normal"]} - {
      e.name for e in kept
    }
    raise DataError(
      f"Target {target.name!r}: training normals could not be decoded"
      f" ({sorted(left_out)[:5]}); fix or remove them (a skip would move"
      " the support and calibration draws onto other images)"
    )
  cap = int(manifest.get(data, "max_source_images", 0))
  pools, ids = [], []
  for i, b in enumerate(builders):
    if i != t:
      images = builder_lib.read_split(b, "normal")["image"]
      if 0 < cap < len(images):  # a seeded subset, in manifest order
        rng = np.random.default_rng([seed, i])
        images = images[np.sort(rng.permutation(len(images))[:cap])]
      pools.append(images)
      ids.append(np.full(len(pools[-1]), len(ids), np.int32))
  test = builder_lib.read_split(builders[t], "test")
  if fixed is not None:
    c = manifests[t].channels
    intensity = manifests[t].intensity
    support = np.stack([manifest.decode(e, size, c, intensity) for e in fixed])
  else:
    # Only the K records: records are stored at their manifest position.
    index = {n: i for i, n in enumerate(target_names)}
    support = _read_normals(builders[t], [index[n] for n in support_names])
  calibration, calibration_names = _calibration(
    builders[t], target_names, held, support, support_names
  )
  # A support identical to a test image (a duplicate across splits; a
  # fixed support folder is not among leakage's files) would score that
  # test image against itself.
  _check_support_is_no_test_image(
    support, support_names, test, target.name, leakage.allowed(data)
  )
  pending.write()  # everything is checked: the split records
  out = FewShotData(
    name=target.name,
    pools=np.concatenate(pools),
    pool_source=np.concatenate(ids),
    source_names=tuple(e.name for i, e in enumerate(entries) if i != t),
    support=support,
    support_names=tuple(support_names),
    support_from=how,
    test=test["image"],
    test_labels=test["label"],
    test_names=test["name"],
    test_masks=test["mask"],
    calibration=calibration,
    calibration_names=calibration_names,
  )
  logging.info(
    "Few-shot data: sources %s (pool %d, images %s); target %s: %d supports"
    " (%s), %d calibration normals, test %d (%d abnormal), %s",
    ", ".join(
      f"{n} {len(p)}" for n, p in zip(out.source_names, pools, strict=True)
    ),
    len(out.pools),
    out.pools.shape[1:],
    out.name,
    len(out.support),
    how,
    len(out.calibration),
    len(out.test),
    int(out.test_labels.sum()),
    "with masks" if out.test_masks is not None else "no masks",
  )
  return out
