"""Host arrays for DDAD's one-class semi-supervised (OC-SSL) setting.

`load(config.data, workdir, calibration_fraction)` builds the manifest of
the configured layout, prepares it once through the tfds builder (cached as
array_record) and reads the three splits back through their data sources,
so what is trained on is exactly what is cached. A seeded fraction of the
known normals is held out as calibration normals (never trained on; their
scores set the decision threshold), recorded in W/split.json.

Every check on the data runs before W/split.json is written: the layout's
(`layouts.build`: listing, test classes, duplicates across parts, before
any image is decoded), decoding every image, then the calibration draw's
(its record, duplicates between calibration and trained normals); only
then are the drawn split and the calibration record written. A run
refused for its data leaves no split.json, so the corrected data draws
afresh.

A test part may be empty (a `folders` root without `test/`): the arrays
are then [0, S, S, C], and there is nothing to evaluate.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
from absl import logging

from jaxad.data import layouts, leakage, splits, unlabeled_pool
from jaxad.data import manifest as manifest_lib

if TYPE_CHECKING:  # tfds is imported only to prepare data, not to train on
  from jaxad.data import builder as builder_lib  # arrays (bench, GPU images)


@dataclasses.dataclass(frozen=True)
class OneClassData:
  """uint8 images for the one-class semi-supervised setting.

  Attributes:
    name: e.g. "embedded/kermany_cxr64", or the basename of data.root.
    normal: [N0, S, S, C] uint8 known normals (C = data.channels, 1 or 3),
      the calibration normals excluded: what a method trains on.
    unlabeled: [NU, S, S, C] uint8 unlabeled pool (may be [0, S, S, C]).
    unlabeled_labels: [NU] int32 ground truth of the pool, for reporting
      only; -1 (`unlabeled_pool.UNKNOWN`) where it is unknown (a real pool,
      `data.unlabeled_dir`): never a class.
    test: [NT, S, S, C] uint8 test images, normals first; [0, S, S, C]
      without a test split (nothing to evaluate).
    test_labels: [NT] int32, 0 normal, 1 abnormal.
    test_names: the NT test image names, in order.
    test_masks: [NT, S, S] uint8 pixel ground truth in {0, 1} (1 =
      anomalous), for layouts with masks; None for image-level datasets.
    normal_names: the N0 known normals' names, in order.
    calibration: [NC, S, S, C] uint8 calibration normals, held out of the
      known normals (`api.EvalData`); [0, S, S, C] when there are none (the
      default: None is replaced).
    calibration_names: their names, in order.
  """

  name: str
  normal: np.ndarray
  unlabeled: np.ndarray
  unlabeled_labels: np.ndarray
  test: np.ndarray
  test_labels: np.ndarray
  test_names: tuple[str, ...]
  test_masks: np.ndarray | None = None
  normal_names: tuple[str, ...] = ()
  calibration: np.ndarray | None = None
  calibration_names: tuple[str, ...] = ()

  def __post_init__(self):
    if self.calibration is None:
      object.__setattr__(self, "calibration", no_calibration(self.test))


def no_calibration(test: np.ndarray) -> np.ndarray:
  """[0, S, S, C] uint8: no calibration normals for test images `test`."""
  return np.zeros((0, *np.shape(test)[1:]), np.uint8)


def hold_out_calibration(
  workdir: str,
  names: tuple[str, ...],
  *,
  fraction: float,
  seed: int,
  what: str,
  empty: dict | None = None,
  pending: splits.Pending | None = None,
) -> np.ndarray:
  """Draws (`splits.draw_calibration`) and records the calibration normals.

  Args:
    workdir: the run's directory; the draw goes to W/split.json's
      "calibration" ({"fraction", "seed", "names"}), or is checked against
      the record there (`splits.record_calibration`). Nothing is recorded
      for fraction 0.
    names: the candidate normals' names (manifest names), in order.
    fraction, seed: `eval.calibration_fraction`, data.split_seed.
    what: the dataset, for messages.
    empty: a new split.json's content besides the record (see
      `splits.record_calibration`).
    pending: where a new record is queued, to be written once the data is
      checked; None writes it now (an existing record is checked now).

  Returns:
    [N] bool, True for the calibration normals.
  """
  pick = splits.draw_calibration(
    len(names), fraction=fraction, seed=seed, what=what
  )
  if fraction > 0:
    record = {
      "fraction": float(fraction),
      "seed": int(seed),
      "names": [names[i] for i in pick],
    }
    splits.record_calibration(workdir, record, empty, pending)
  held = np.zeros(len(names), bool)
  held[pick] = True
  return held


def prepare(data: Any, workdir: str) -> builder_lib.OneClassDataset:
  """Builds the layout's manifest and prepares it (once; then cached).

  A newly drawn split is written to W/split.json only once every image is
  decoded.

  Args:
    data: the `data` config (format, root, image_size, channels, split
      parameters, cache_dir).
    workdir: the run's directory (a drawn split is kept in split.json there).

  Returns:
    The prepared tfds builder.
  """
  from jaxad.data import builder as builder_lib  # tfds: see the top

  pending = splits.Pending()
  manifest = layouts.build(data, workdir, pending)
  builder = builder_lib.prepare(
    manifest, manifest_lib.get(data, "cache_dir", ""), workdir
  )
  pending.write()
  return builder


def check_calibration(
  data: Any, manifest: manifest_lib.Manifest, held: np.ndarray
) -> None:
  """Refuses a calibration normal identical to a trained known normal
  (`leakage.check`; `data.allow_duplicates` overrides): its score would
  set the threshold as if it had never been seen.

  Args:
    data: the `data` config.
    manifest: the layout's manifest.
    held: [N] bool over its known normals, True for calibration normals.
  """
  if not held.any():
    return
  normal = manifest.parts["normal"]
  leakage.check(
    {
      "trained normal": [e for e, h in zip(normal, held, strict=True) if not h],
      "calibration": [e for e, h in zip(normal, held, strict=True) if h],
    },
    allow=leakage.allowed(data),
    what=str(manifest.params.get("root", manifest.name)),
  )


def load(
  data: Any, workdir: str, calibration_fraction: float = 0.0
) -> OneClassData:
  """Prepares (once, cached) and reads a layout into host arrays.

  Args:
    data: the `data` config; see `prepare`.
    workdir: the run's directory.
    calibration_fraction: `eval.calibration_fraction`: the share of the
      known normals held out as calibration normals (`hold_out_calibration`,
      seeded by data.split_seed, recorded in W/split.json), removed from
      `normal`; 0: none (every known normal is trained on).

  Returns:
    The known normals, calibration normals, unlabeled pool and test split
    as [N, S, S, C] uint8, and the test masks where the layout has them.

  Raises:
    DataError: a fraction outside [0, 1) (before anything is read), any
      check of `layouts.build` (before any image is decoded), an image
      that cannot be decoded, a resumed run whose recorded calibration
      split differs (see `splits.record_calibration`), or a calibration
      duplicate (`check_calibration`); all before W/split.json is written.
  """
  from jaxad.data import builder as builder_lib  # tfds: see the top

  splits.check_calibration_fraction(calibration_fraction)
  pending = splits.Pending()
  builder = builder_lib.prepare(
    layouts.build(data, workdir, pending),
    manifest_lib.get(data, "cache_dir", ""),
    workdir,
  )
  # The builder's manifest: what was stored (a file left out while
  # decoding, with data.skip_unreadable, is not in it).
  manifest = builder.manifest
  normal = builder_lib.read_split(builder, "normal")
  names = tuple(e.name for e in manifest.parts["normal"])
  if names != normal["name"]:
    raise manifest_lib.DataError(
      f"Corrupt cache {builder.data_dir}: its known normals are not the"
      " manifest's; delete that folder to re-prepare"
    )
  held = hold_out_calibration(
    workdir,
    names,
    fraction=calibration_fraction,
    seed=int(manifest_lib.get(data, "split_seed", 0)),
    what=manifest.name,
    pending=pending,
  )
  check_calibration(data, manifest, held)
  pending.write()  # every check has passed, every image is decoded
  unlabeled = builder_lib.read_split(builder, "unlabeled")
  test = builder_lib.read_split(builder, "test")
  out = OneClassData(
    name=manifest.name,
    normal=normal["image"][~held],
    unlabeled=unlabeled["image"],
    unlabeled_labels=unlabeled["label"],
    test=test["image"],
    test_labels=test["label"],
    test_names=test["name"],
    test_masks=test["mask"],
    normal_names=tuple(n for n, h in zip(names, held, strict=True) if not h),
    calibration=normal["image"][held],
    calibration_names=tuple(n for n, h in zip(names, held, strict=True) if h),
  )
  pool_labels = out.unlabeled_labels
  if (pool_labels == unlabeled_pool.UNKNOWN).any():
    pool = f"{len(out.unlabeled)} unlabeled (classes unknown)"
  else:
    pool = f"{len(out.unlabeled)} unlabeled ({int(pool_labels.sum())} abnormal)"
  logging.info(
    "Loaded %s: %d known normals (+%d calibration), %s, %s, images %s, %s",
    out.name,
    len(out.normal),
    len(out.calibration),
    pool,
    f"{len(out.test)} test ({int(out.test_labels.sum())} abnormal)"
    if len(out.test)
    else "no test split (nothing to evaluate)",
    out.test.shape[1:],
    "with masks" if out.test_masks is not None else "no masks",
  )
  return out


def synthetic(data: Any, num_images: int) -> OneClassData:
  """Seeded random data shaped like the `data` config's (for jaxad.bench).

  Returns:
    Known normals and test images [num_images, S, S, C] uint8 (S =
    data.image_size, C = data.channels or 1), an unlabeled pool of
    data.unlabeled_size, test labels alternating 0/1, and
    max(1, num_images // 10) calibration normals.
  """
  rng = np.random.default_rng(0)
  size = data.image_size
  shape = (size, size, manifest_lib.get(data, "channels", 1))
  unlabeled = manifest_lib.get(data, "unlabeled_size", 0)

  def images(n):
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8)

  normal, pool, test = images(num_images), images(unlabeled), images(num_images)
  num_calibration = max(1, num_images // 10)
  return OneClassData(
    name="synthetic",
    normal=normal,
    unlabeled=pool,
    unlabeled_labels=np.zeros(unlabeled, np.int32),
    test=test,
    test_labels=np.arange(num_images, dtype=np.int32) % 2,
    test_names=tuple(f"synthetic/{i}" for i in range(num_images)),
    normal_names=tuple(f"synthetic/normal/{i}" for i in range(num_images)),
    calibration=images(num_calibration),
    calibration_names=tuple(
      f"synthetic/calibration/{i}" for i in range(num_calibration)
    ),
  )
