"""Seeded splits of layouts that ship none, and their split.json.

`folders` and `medmnist` draw the one-class semi-supervised (OC-SSL) split:
of the train normals, `normal_num` go to the unlabeled pool together with
`abnormal_num` train abnormals, and the rest are the known normals. `mtd`,
which has no train/test split at all, holds out a fraction of its normals
for the test (`hold_out`). Either draw is written to `WORKDIR/split.json` so
that it can be inspected and so that a resumed run sees exactly the same
split.

Every method also holds out calibration normals, never trained on, whose
scores set the decision threshold (`eval.calibration_fraction`,
`draw_calibration`); they are recorded under split.json's "calibration"
key (`record_calibration`), beside whatever the layout wrote there.

split.json is written only once the data has passed every check (listing,
leakage, decoding): the loaders collect what to write in a `Pending` and
write it after the images are prepared. A run refused for its data thus
leaves no split.json behind, and the corrected data draws afresh.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from jaxad import sharding, storage
from jaxad.data import manifest

SPLIT_FILE = "split.json"
# Added to the message of a file that a reused split.json lists but that is
# gone: the data changed after the split was drawn.
CHANGED_HINT = (
  "the data changed since the split was drawn: restore it, or use a new"
  " workdir (or delete split.json) to draw a new split"
)


@dataclasses.dataclass
class Pending:
  """Split records to write once the data has passed every check.

  Attributes:
    updates: (path, update) in the order added; `write` replaces the JSON
      object at path (None when there is no file) by update(object).
  """

  updates: list[
    tuple[str, collections.abc.Callable[[dict[str, Any] | None], dict]]
  ] = dataclasses.field(default_factory=list)

  def add(
    self,
    path: str,
    update: collections.abc.Callable[[dict[str, Any] | None], dict],
  ) -> None:
    """Queues update(current content of path) to be written to path."""
    self.updates.append((path, update))

  def write(self) -> None:
    """Writes every queued record, in order, each atomically; then empties
    the queue (a second call writes nothing)."""
    updates, self.updates = self.updates, []
    for path, update in updates:
      write_json(path, update(read_json(path)))


def unlabeled_counts(
  unlabeled_size: int, anomaly_rate: float
) -> tuple[int, int]:
  """How DDAD sizes the unlabeled pool.

  Args:
    unlabeled_size: total pool size (the original's `extra_data`).
    anomaly_rate: fraction of abnormal images (`ar`).

  Returns:
    (normal_num, abnormal_num) with abnormal_num = int(size * rate).
  """
  if unlabeled_size < 0:
    raise manifest.DataError(
      f"data.unlabeled_size must be >= 0, got {unlabeled_size}"
    )
  if not 0.0 <= anomaly_rate <= 1.0:
    raise manifest.DataError(
      f"data.anomaly_rate must be in [0, 1], got {anomaly_rate}"
    )
  abnormal_num = int(unlabeled_size * anomaly_rate)
  return unlabeled_size - abnormal_num, abnormal_num


def draw(
  normals: collections.abc.Sequence[Any],
  abnormals: collections.abc.Sequence[Any],
  *,
  unlabeled_size: int,
  anomaly_rate: float,
  seed: int,
  what: str,
) -> dict[str, Any]:
  """Draws the OC-SSL split of a train set.

  Args:
    normals: train normal ids (file names or indices), in a fixed order.
    abnormals: train abnormal ids, in a fixed order.
    unlabeled_size: size of the unlabeled pool.
    anomaly_rate: fraction of abnormal images in the pool.
    seed: seed of `np.random.default_rng`.
    what: the dataset, for error messages.

  Returns:
    {"normal": [ids], "unlabeled": {"0": [ids], "1": [ids]}}, each list in
    the order of the inputs.

  Raises:
    DataError: when the pool needs more images than there are, or would leave
      no known normals.
  """
  normal_num, abnormal_num = unlabeled_counts(unlabeled_size, anomaly_rate)
  if normal_num >= len(normals):
    raise manifest.DataError(
      f"{what}: unlabeled_size={unlabeled_size} at anomaly_rate={anomaly_rate}"
      f" needs {normal_num} train normals for the unlabeled pool, but there"
      f" are only {len(normals)} and at least one must stay a known normal"
    )
  if abnormal_num > len(abnormals):
    raise manifest.DataError(
      f"{what}: unlabeled_size={unlabeled_size} at anomaly_rate={anomaly_rate}"
      f" needs {abnormal_num} train abnormals, but there are only"
      f" {len(abnormals)}"
    )
  rng = np.random.default_rng(seed)
  # Sorted picks keep split.json in input order, which makes it easy to read.
  pick_n = set(rng.choice(len(normals), normal_num, replace=False).tolist())
  pick_a = np.sort(rng.choice(len(abnormals), abnormal_num, replace=False))
  return {
    "normal": [x for i, x in enumerate(normals) if i not in pick_n],
    "unlabeled": {
      "0": [normals[i] for i in sorted(pick_n)],
      "1": [abnormals[i] for i in pick_a.tolist()],
    },
  }


def hold_out(
  normals: collections.abc.Sequence[Any],
  *,
  fraction: float,
  seed: int,
  what: str,
) -> dict[str, Any]:
  """Draws the test normals of a layout without a train/test split.

  Args:
    normals: normal ids (file names), in a fixed order.
    fraction: share of the normals held out for the test, in (0, 1);
      round(fraction * N) of them, at least one on either side.
    seed: seed of `np.random.default_rng`.
    what: the dataset, for error messages.

  Returns:
    {"normal": [train ids], "test": {"0": [test ids]}}, in input order.
  """
  num = len(normals)
  num_test = round(fraction * num)
  if not 0.0 < fraction < 1.0 or not 0 < num_test < num:
    raise manifest.DataError(
      f"{what}: data.test_normal_fraction={fraction} of {num} normals holds"
      f" out {num_test} for the test; it must leave at least one normal on"
      " either side"
    )
  rng = np.random.default_rng(seed)
  pick = set(rng.choice(num, num_test, replace=False).tolist())
  return {
    "normal": [x for i, x in enumerate(normals) if i not in pick],
    "test": {"0": [normals[i] for i in sorted(pick)]},
  }


CALIBRATION = "calibration"
# The calibration draw's stream: not the OC-SSL draw's, which uses the
# same data.split_seed.
_CALIBRATION_SALT = 0xCA11B


def check_calibration_fraction(fraction: float) -> None:
  """Raises DataError unless `eval.calibration_fraction` is in [0, 1)."""
  if not 0.0 <= fraction < 1.0:
    raise manifest.DataError(
      f"eval.calibration_fraction must be in [0, 1), got {fraction}"
    )


def draw_calibration(
  num: int, *, fraction: float, seed: int, what: str
) -> list[int]:
  """Which of `num` normals are held out for calibration.

  Args:
    num: the candidate normals (e.g. the known normals, in manifest order).
    fraction: `eval.calibration_fraction`, in [0, 1): round(fraction *
      num) of them, at least 1 when fraction > 0 and num >= 2, and at most
      num - 1 (one is left).
    seed: data.split_seed; the draw is
      `default_rng([seed, _CALIBRATION_SALT]).choice(num, n)`.
    what: the dataset, for messages.

  Returns:
    The sorted indices of the calibration normals ([] for fraction 0).

  Raises:
    DataError: a fraction outside [0, 1).
  """
  check_calibration_fraction(fraction)
  if fraction == 0.0:
    return []
  if num < 2:
    logging.warning(
      "%s: %d normal(s), too few to hold out calibration normals: no"
      " decision threshold (eval.calibration_fraction=%s)",
      what,
      num,
      fraction,
    )
    return []
  size = min(max(round(fraction * num), 1), num - 1)
  rng = np.random.default_rng([seed, _CALIBRATION_SALT])
  return sorted(rng.choice(num, size, replace=False).tolist())


def record_calibration(
  workdir: str,
  record: dict[str, Any],
  empty: dict[str, Any] | None = None,
  pending: Pending | None = None,
) -> None:
  """Records the calibration split in W/split.json, or checks the record.

  Args:
    workdir: the run's directory.
    record: {"fraction", "seed", "names"} of this run's calibration draw.
    empty: what a new split.json holds besides the record when the layout
      wrote none ({} by default); a layout's "params" stay as they are, so
      `resolve` still accepts the file.
    pending: where to queue a new record, to be written once the data is
      checked (`Pending.write`); None writes it now. An existing record is
      checked now either way.

  Raises:
    DataError: split.json is unreadable or not a JSON object, or holds
      another calibration record (a resumed run must keep its split).
  """
  path = os.path.join(workdir, SPLIT_FILE)
  split = read_json(path)
  if split is None:
    split = dict(empty or {})
  elif not isinstance(split, dict):
    raise manifest.DataError(f"{path}: expected a JSON object")
  old = split.get(CALIBRATION)
  if old is None:

    def update(current):
      if not isinstance(current, dict):  # no file, or the layout's is queued
        current = dict(empty or {})
      return {**current, CALIBRATION: record}

    if pending is None:
      write_json(path, update(read_json(path)))
    else:
      pending.add(path, update)
    logging.info(
      "Held out %d calibration normals (fraction %s, seed %s): %s",
      len(record["names"]),
      record["fraction"],
      record["seed"],
      path,
    )
    return
  if old == record:
    return
  if not isinstance(old, dict):
    old = {"names": old}
  diff = [
    f"{k}: {old.get(k)!r} in file, {record[k]!r} now"
    for k in ("fraction", "seed")
    if old.get(k) != record[k]
  ]
  if old.get("names") != record["names"]:
    diff.append(
      "names: other images than in the file"
      + ("" if diff else " (the data changed)")
    )
  raise manifest.DataError(
    f"{path}: {CALIBRATION!r} holds another calibration split"
    f" ({'; '.join(diff)}). A resumed run must keep its split: restore the"
    " config and data, or use a new workdir."
  )


def resolve(
  workdir: str,
  params: dict[str, Any],
  draw_fn: collections.abc.Callable[[], dict[str, Any]],
  pending: Pending | None = None,
) -> tuple[dict[str, Any], bool]:
  """Re-uses `WORKDIR/split.json` if present, else draws a split.

  Args:
    workdir: the run's directory.
    params: what the split depends on (format, root, seed, sizes...).
    draw_fn: makes the split dict (see `draw`) when there is none yet.
    pending: where a new split is queued, to be written once the data is
      checked (`Pending.write`); None writes it now.

  Returns:
    (the split dict with "params" added, whether it was re-used from
    split.json).

  Raises:
    DataError: if an existing split.json is invalid or was drawn with other
      parameters.
  """
  path = os.path.join(workdir, SPLIT_FILE)
  split = read_json(path)
  if split is not None:
    if not isinstance(split, dict) or "params" not in split:
      raise manifest.DataError(f"{path}: missing key 'params'")
    old = split["params"]
    diff = {
      k: (old.get(k), params.get(k))
      for k in sorted(set(old) | set(params))
      if old.get(k) != params.get(k)
    }
    if diff:
      lines = ", ".join(
        f"{k}: {a!r} in file, {b!r} in config" for k, (a, b) in diff.items()
      )
      raise manifest.DataError(
        f"{path} was drawn with other parameters ({lines}). A resumed run"
        " must keep its split: restore the config, or use a new workdir"
        " (or delete split.json) to draw a new split."
      )
    logging.info("Re-using the one-class split in %s", path)
    return split, True
  split = {"params": params, **draw_fn()}
  if pending is None:
    write_json(path, split)
  else:  # merged over whatever the file holds when it is written
    pending.add(path, lambda current: {**(current or {}), **split})
  logging.info(
    "Drew a one-class split (seed %s) for %s", params.get("split_seed"), path
  )
  return split, False


def read_json(path: str) -> Any:
  """The JSON record at `path`, or None if there is no file.

  Raises:
    DataError: the file cannot be read or parsed, naming it.
  """
  try:
    text = storage.read_text(path)
    return None if text is None else json.loads(text)
  except (OSError, ValueError) as e:
    raise manifest.DataError(f"Cannot read {path}: {e}") from e


def write_json(path: str, record: dict) -> None:
  """Writes `record` to `path` whole (`jaxad.storage.write_json`: locally a
  temporary file, then a rename), so that a crash never leaves a
  half-written split.

  In a multi-process job process 0 writes (every process draws the same
  split from the same seed) and every process waits until it has, so that
  none reads the workdir's splits before they are there: every process
  must call it at the same points.
  """
  if jax.process_index() == 0:
    storage.write_json(path, record, indent=1)
  sharding.sync_processes(f"wrote {path}")


def require(split: dict[str, Any], path: str, *keys: str) -> Any:
  """`split[k0][k1]...`, with an error naming the missing key.

  Args:
    split: a parsed split.json or data.json.
    path: its file, for the message.
    *keys: the key path.

  Returns:
    The value, which must be a list.
  """
  value: Any = split
  for i, k in enumerate(keys):
    if not isinstance(value, dict) or k not in value:
      where = "".join(f"[{x!r}]" for x in keys[: i + 1])
      raise manifest.DataError(f"{path}: missing key {where}")
    value = value[k]
  if not isinstance(value, list):
    where = "".join(f"[{x!r}]" for x in keys)
    raise manifest.DataError(
      f"{path}: {where} must be a list, got {type(value).__name__}"
    )
  return value
