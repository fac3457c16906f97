"""A trained run as a Python object: `jaxad.load(W)` -> `TrainedModel`.

  model = jaxad.load("runs/ddad")  # W of python -m jaxad.train
  out = model.score(images)  # uint8 [N, S, S, C] -> scores [N], maps [N, S, S]
  rows = model.predict(["a.png", "scans/"])  # files, folders, .npz
  model.threshold  # {score: calibrated threshold or None}

`load` reads everything from the workdir: the config (W/config.json), the
trained model (its latest checkpoint, through `jaxad.restore.trained`, so
methods that do not train, like PPAD zero-shot, work too), the calibrated
thresholds (W/eval.json) and the calibration normals' scores
(W/calibration_scores.npz). It computes the method's score context once.

Files are decoded by `jaxad.data.manifest.decode`, the function that
prepared the training data: the same grayscale/RGB conversion and bilinear
resize to S x S. Normalisation is part of the scoring function itself
(`Method.score` takes uint8), so `score` takes the images exactly as that
decoding leaves them.

`jaxad.predict` (the command line) and `jaxad.export` build on this module.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections as mlc
import numpy as np

from jaxad import configlib, evaluate, restore, sharding, storage
from jaxad.data import inputs, manifest
from jaxad.methods import api

# ------------------------------------------------------------ the workdir


def read_config(workdir: str) -> mlc.ConfigDict:
  """The config of W's last evaluation (W/eval_config.json), else the run's
  (W/config.json), as a ConfigDict.

  The last evaluation's config carries the scoring inputs that W/eval.json's
  thresholds and W/calibration_scores.npz were computed with (a re-score
  may have changed them, e.g. D²4FAD's support set), so predictions match
  them. Keys that were added to jaxad after the run was written
  (`configlib.ADDED_KEYS`) get the value that reproduces what the run did.

  Raises:
    FileNotFoundError: W has neither file.
  """
  text = storage.read_text(os.path.join(workdir, evaluate.EVAL_CONFIG))
  if text is None:
    text = storage.read_text(os.path.join(workdir, "config.json"))
  if text is None:
    raise FileNotFoundError(
      f"No run config in {workdir} (config.json or {evaluate.EVAL_CONFIG}):"
      " W must be the --workdir of python -m jaxad.train or jaxad.evaluate"
    )
  config = json.loads(text)
  for key, value in configlib.ADDED_KEYS.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict) and leaf not in node:
      node[leaf] = value
  return mlc.ConfigDict(config)


def read_thresholds(workdir: str, names: Sequence[str]) -> dict:
  """{score: float or None}: W/eval.json's scores[name].calibrated.threshold.

  None for a score without a calibrated threshold (a run without
  calibration normals, or no eval.json).
  """
  text = storage.read_text(os.path.join(workdir, "eval.json"))
  scores = {} if text is None else json.loads(text).get("scores", {})
  out = {}
  for name in names:
    t = (scores.get(name) or {}).get("calibrated", {}).get("threshold")
    out[name] = None if t is None else float(t)
  return out


def read_calibration_scores(workdir: str, names: Sequence[str]) -> dict:
  """{score: sorted float32 [NC]} of W/calibration_scores.npz ({} if absent;
  only the keys that are score names)."""
  path = storage.path(os.path.join(workdir, "calibration_scores.npz"))
  if not path.exists():
    return {}
  with path.open("rb") as f, np.load(f, allow_pickle=False) as npz:
    return {
      k: np.sort(np.asarray(npz[k], np.float32).ravel())
      for k in names
      if k in npz.files
    }


def percentile(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """Percent of the calibration normals' scores <= each score, float [N] in
  [0, 100] (`calibration` sorted ascending)."""
  ranks = np.searchsorted(calibration, np.asarray(scores), side="right")
  return 100.0 * ranks / len(calibration)


# ------------------------------------------------------------------ inputs


def check_images(images: Any, size: int, channels: int) -> np.ndarray:
  """`images` as a numpy uint8 [N, S, S, C] array, or a ValueError.

  Raises:
    ValueError: not 4-D, not uint8, or not S x S x C, naming the contract.
  """
  contract = (
    f"uint8 [N, {size}, {size}, {channels}] (NHWC, values 0..255, as"
    " jaxad.data.manifest.decode leaves a file; normalisation is inside the"
    " model)"
  )
  shape = getattr(images, "shape", None)
  dtype = getattr(images, "dtype", None)
  if shape is None or dtype is None:
    raise ValueError(f"images must be an array {contract}, got {type(images)}")
  if np.dtype(dtype) != np.uint8:
    hint = ""
    if np.issubdtype(np.dtype(dtype), np.floating):
      hint = " (float images: convert the 0..255 values with .astype(uint8))"
    raise ValueError(f"images must be {contract}, got dtype {dtype}{hint}")
  if len(shape) != 4 or tuple(shape[1:]) != (size, size, channels):
    hint = ""
    if len(shape) == 3 and tuple(shape[1:]) == (size, size) and channels == 1:
      hint = " (add the channel axis: images[..., None])"
    elif len(shape) == 4 and tuple(shape[1:3]) != (size, size):
      hint = " (jaxad.load(W).predict(paths) decodes and resizes files)"
    raise ValueError(
      f"images must be {contract}, got shape {tuple(shape)}{hint}"
    )
  return np.asarray(images)


@dataclasses.dataclass
class Batch:
  """One batch of `TrainedModel.iter_predict`.

  Attributes:
    rows: one dict per input, in order (see `TrainedModel.predict`).
    ok: indices into `rows` of the images that were decoded and scored.
    images: uint8 [len(ok), S, S, C], as decoded.
    maps: {name: float32 [len(ok), S, S]}.
  """

  rows: list[dict]
  ok: list[int]
  images: np.ndarray
  maps: dict[str, np.ndarray]


# ------------------------------------------------------------------ model


class _LazyData:
  """The run's data, loaded (`Method.load_data`) on first attribute read.

  `score_context` gets this instead of the data, so that only a method
  whose context needs the data (D²4FAD's support set) pays for loading it.
  """

  def __init__(self, method: api.Method, config, workdir: str):
    self._args = (method, config, workdir)
    self._data = None

  @property
  def loaded(self) -> bool:
    return self._data is not None

  def __getattr__(self, name: str):
    if name.startswith("__"):
      raise AttributeError(name)
    if self._data is None:
      method, config, workdir = self._args
      self._data = method.load_data(config, workdir)
    return getattr(self._data, name)


class TrainedModel:
  """A trained run, ready to score images (see `load`).

  Attributes:
    workdir: the run's directory.
    config: its ConfigDict (W/config.json; mesh.data and eval.batch_size as
      `load` set them).
    method: the `api.Method`.
    model: the trained `api.Model` (replicated over `mesh`).
    mesh: the device mesh the batches are split over.
    context: the method's score context, computed once.
    score_names: the method's scores, in display order.
    map_names: the scores that have pixel maps ([N, S, S] float).
    threshold: {score: float or None}: the calibrated decision threshold of
      W/eval.json (abnormal = score > threshold); None without one.
    calibration: {score: sorted float32 [NC]}: the calibration normals'
      scores (W/calibration_scores.npz); {} without them.
    batch_size: images per jitted call (a multiple of the mesh's devices).
    data_loaded: whether the score context needed the run's data.
  """

  def __init__(self, workdir: str, config, method, model, mesh, data):
    self.workdir = workdir
    self.config = config
    self.method = method
    self.model = model
    self.mesh = mesh
    self.batch_size = int(config.eval.batch_size)
    self.score_names = tuple(s.name for s in method.scores(config))
    self._score = evaluate.score_fn(method, config, mesh)
    with jax.set_mesh(mesh):
      self.context = method.score_context(config, model, data)
      size, c = self.image_size, self.channels
      shapes = jax.eval_shape(
        lambda m, ctx, x: method.score(config, m, ctx, x),
        model,
        self.context,
        jax.ShapeDtypeStruct((1, size, size, c), np.uint8),
      )
    self.data_loaded = data.loaded
    self.map_names = tuple(n for n in self.score_names if n in shapes["maps"])
    self.threshold = read_thresholds(workdir, self.score_names)
    self.calibration = read_calibration_scores(workdir, self.score_names)

  @property
  def image_size(self) -> int:
    return int(self.config.data.image_size)

  @property
  def channels(self) -> int:
    return int(self.config.data.get("channels", 1))

  @property
  def input_contract(self) -> dict:
    """What `score` takes: {"image_size", "channels", "dtype": "uint8",
    "layout": "NHWC", "value_range": [0, 255], "normalisation", "decode"}."""
    return input_contract(self.image_size, self.channels)

  def __repr__(self) -> str:
    return (
      f"TrainedModel({self.workdir!r}, method={self.config.method!r},"
      f" scores={list(self.score_names)}, input=uint8"
      f" [N, {self.image_size}, {self.image_size}, {self.channels}])"
    )

  def score(self, images) -> dict[str, dict[str, np.ndarray]]:
    """Scores uint8 images [N, S, S, C] (any N >= 1), in batches.

    Returns:
      {"scores": {name: float [N]}, "maps": {name: float [N, S, S]}} as
      numpy arrays; the same numbers as `jaxad.evaluate` for the same
      images (same function, context and batching).

    Raises:
      ValueError: images that are not uint8 [N, S, S, C] with the run's
        S (data.image_size) and C (data.channels), or N = 0.
    """
    images = check_images(images, self.image_size, self.channels)
    if not len(images):
      raise ValueError("images is empty: N must be >= 1")
    with jax.set_mesh(self.mesh):
      return evaluate.score_images(
        self._score,
        self.model,
        self.context,
        images,
        self.batch_size,
        self.mesh,
      )

  def decide(self, name: str, scores: np.ndarray) -> np.ndarray | None:
    """bool [N] score > threshold, or None without a threshold."""
    t = self.threshold.get(name)
    return None if t is None else np.asarray(scores) > t

  def percentile(self, name: str, scores: np.ndarray) -> np.ndarray | None:
    """Percent of calibration normals scoring <= each score, or None."""
    cal = self.calibration.get(name)
    return None if cal is None or not len(cal) else percentile(cal, scores)

  def columns(self) -> list[str]:
    """The keys of a `predict` row, in CSV order."""
    cols = ["file"]
    for n in self.score_names:
      cols += [n, f"{n}_abnormal", f"{n}_percentile"]
    return cols + ["error"]

  def predict(
    self, paths: str | Sequence[str], *, return_maps: bool = False
  ) -> list[dict]:
    """Decodes and scores image files, folders and .npz files.

    Args:
      paths: one path or several (see `find_inputs`); rows are named by
        path (a folder's files: the folder joined with their path in it).
      return_maps: add "maps": {name: float32 [S, S]} to scored rows.

    Returns:
      One dict per image, in order: "file"; per score `n`: n (float),
      f"{n}_abnormal" (bool, score > threshold; None without a threshold),
      f"{n}_percentile" (percent of the calibration normals scoring <= it;
      None without calibration scores); "error": "" or why the file could
      not be read (then every score field is None). A bad file never
      stops the others.

    Raises:
      FileNotFoundError: a path that does not exist.
      ValueError: an npz without a usable image array.
    """
    if isinstance(paths, str | os.PathLike):
      paths = [paths]
    entries = [
      e for p in paths for e in inputs.find_inputs(str(p), full_names=True)
    ]
    rows = []
    for batch in self.iter_predict(entries):
      if return_maps:
        for j, i in enumerate(batch.ok):
          batch.rows[i]["maps"] = {k: v[j] for k, v in batch.maps.items()}
      rows += batch.rows
    return rows

  def iter_predict(
    self,
    entries: Sequence[manifest.Entry],
    *,
    workers: int | None = None,
  ) -> Iterator[Batch]:
    """`predict`, streamed: one `Batch` per `batch_size` entries.

    Decoding runs in `workers` threads (default: up to 4), one batch ahead
    of scoring; host memory holds about two batches whatever the input's
    size.
    """
    workers = workers or min(4, os.cpu_count() or 1)
    size, channels, bs = self.image_size, self.channels, self.batch_size
    # >8-bit/float/DICOM inputs are mapped to uint8 as the training data.
    intensity = str(self.config.data.get("intensity", "auto"))
    chunks = [entries[i : i + bs] for i in range(0, len(entries), bs)]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:

      def submit(chunk):
        return [
          pool.submit(inputs.decode, e, size, channels, intensity)
          for e in chunk
        ]

      pending = submit(chunks[0]) if chunks else []
      for k, chunk in enumerate(chunks):
        decoded = [f.result() for f in pending]
        pending = submit(chunks[k + 1]) if k + 1 < len(chunks) else []
        yield self._score_batch(chunk, decoded)

  def _score_batch(self, chunk, decoded) -> Batch:
    ok = [i for i, (pixels, _) in enumerate(decoded) if pixels is not None]
    rows = [dict.fromkeys(self.columns()) for _ in chunk]
    for row, entry, (_, error) in zip(rows, chunk, decoded, strict=True):
      row["file"] = entry.name
      row["error"] = error or ""
    size, c = self.image_size, self.channels
    images = np.zeros((0, size, size, c), np.uint8)
    maps = {k: np.zeros((0, size, size), np.float32) for k in self.map_names}
    if ok:
      images = np.stack([decoded[i][0] for i in ok])
      out = self.score(images)
      maps = {k: np.asarray(v, np.float32) for k, v in out["maps"].items()}
      for n in self.score_names:
        s = np.asarray(out["scores"][n], np.float64)
        abnormal, pct = self.decide(n, s), self.percentile(n, s)
        for j, i in enumerate(ok):
          rows[i][n] = float(s[j])
          rows[i][f"{n}_abnormal"] = (
            None if abnormal is None else bool(abnormal[j])
          )
          rows[i][f"{n}_percentile"] = None if pct is None else float(pct[j])
    return Batch(rows=rows, ok=ok, images=images, maps=maps)


def input_contract(size: int, channels: int) -> dict:
  """The input contract of a run's scoring function (`TrainedModel`,
  exported artefacts)."""
  return {
    "image_size": size,
    "channels": channels,
    "shape": ["N", size, size, channels],
    "dtype": "uint8",
    "layout": "NHWC",
    "value_range": [0, 255],
    "normalisation": "inside the model (it takes the uint8 pixels)",
    "decode": (
      "jaxad.data.manifest.decode: EXIF orientation applied; >8-bit,"
      " float and DICOM pixels mapped to uint8 by data.intensity"
      " (default: per-image min-max); grayscale or RGB as channels; then a"
      " bilinear resize to image_size x image_size"
    ),
  }


def load(
  workdir: str,
  *,
  batch_size: int | None = None,
  mesh_data: int = -1,
) -> TrainedModel:
  """The trained run in `workdir`, ready to score.

  Restores W's latest checkpoint with W/config.json's config (the model
  `init_state` builds, for methods that do not train), and computes the
  method's score context once. Only a method whose context reads the run's
  data (D²4FAD: its support set) loads it, as `jaxad.evaluate` does (the
  prepared dataset cache, or preparing it again: the data must be where
  the run found it); the others never touch the data.

  Args:
    workdir: the `--workdir` of `python -m jaxad.train`, or a re-score
      folder W/eval_<name>-<hash>/ in it (`restore.run_dir`).
    batch_size: images per jitted call; default the run's eval.batch_size.
      The last batch of a call is padded to it (one compiled program).
    mesh_data: devices to split batches over; -1 = all local devices.

  Raises:
    FileNotFoundError: no W/config.json, or no checkpoint for a method
      that trains.
    ValueError: a batch size the devices do not divide.
  """
  config = read_config(workdir)
  config.mesh.data = mesh_data
  if "member" in config.mesh:  # members on one device group: any count
    config.mesh.member = 1
  if batch_size is not None:
    config.eval.batch_size = int(batch_size)
  mesh = sharding.make_mesh(config.mesh)
  n = mesh.shape[api.DATA_AXIS]
  if config.eval.batch_size < 1 or config.eval.batch_size % n:
    raise ValueError(
      f"batch_size={config.eval.batch_size} must be a positive multiple of"
      f" the {n} devices (mesh_data={mesh_data}); pass batch_size="
      f"{-(-max(config.eval.batch_size, 1) // n) * n} or mesh_data=1"
    )
  method, model, mesh = restore.trained(config, restore.run_dir(workdir))
  data = _LazyData(method, config, workdir)
  return TrainedModel(workdir, config, method, model, mesh, data)
