r"""Exports a trained run's scoring function as a `jax.export` artefact.

  python -m jaxad.export --workdir W [--output model.jaxexport] \
      [--platforms cpu,cuda,tpu] [--batch N]

writes
* `model.jaxexport`: `Method.score` closed over the run's config, trained
  model and score context, serialised by `jax.export` (StableHLO) with a
  symbolic batch dimension: uint8 [b, S, S, C] -> {"scores": {name: [b]},
  "maps": {name: [b, S, S]}} for any b >= 1 (--batch N: N only), on each
  platform asked;
* `model.jaxexport.json`: the config, the input contract (size, channels,
  dtype uint8, layout NHWC, value range; normalisation is inside the
  function), the score and map names, the calibrated thresholds and the
  calibration normals' scores.

`jaxad.load_exported(path)` runs it with jax and numpy alone: neither the
method's code nor jaxad's training stack is imported (nor needed in a
deployment that has only this module).

The weights and the score context are baked into the artefact as
constants, not passed as arguments: one file is the whole model, its only
argument is the images, and the input contract cannot be called with the
wrong weights. The cost: the serialised module holds every weight (the
flatbuffer format caps it under 2 GiB, checked before exporting), and a
retrained run needs a new export (which is what a deployment wants
anyway). Serialisation needs the `flatbuffers` package
(`pip install 'jaxad[export]'`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxad import storage
from jaxad.models import block_barrier

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
FORMAT = "jaxad.export/1"
# The flatbuffer holding the serialised module is limited to 2 GiB.
MAX_CONSTANT_BYTES = 1_900_000_000


def _check_serialization() -> None:
  try:
    import flatbuffers  # noqa: F401
  except ImportError as e:
    raise ImportError(
      "jax.export serialisation needs the flatbuffers package: pip install"
      " 'jaxad[export]' (or pip install flatbuffers)"
    ) from e


def export(
  workdir: str,
  output: str,
  *,
  platforms: Sequence[str] = ("cpu",),
  batch: int | None = None,
) -> dict:
  """Serialises W's scoring function to `output` (+ `output`.json).

  Args:
    workdir: a trained run (`jaxad.load` reads it).
    output: the artefact's path; the JSON goes to `output + ".json"`.
    platforms: lowered for each of these ("cpu", "cuda", "rocm", "tpu"); a
      machine need not have the accelerator to export for it.
    batch: None: a symbolic batch dimension (any batch size); an int: that
      batch size only (`ExportedModel.score` pads to it), for a method
      whose `score` cannot be traced with a symbolic batch.

  Returns:
    The JSON's content.

  Raises:
    ValueError: an unknown platform, weights too large to serialise, or a
      method whose `score` does not trace with a symbolic batch.
    ImportError: flatbuffers is not installed.
  """
  from jaxad import inference  # the method's code: only to export

  platforms = tuple(platforms)
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise ValueError(f"platforms {list(platforms)}: choose from {PLATFORMS}")
  if str(output).endswith("/") or storage.path(output).is_dir():
    raise ValueError(
      f"output {output} is a folder: give the artefact's file path, e.g."
      f" {str(output).rstrip('/')}/model.jaxexport"
    )
  storage.path(output)  # an unreachable URI fails here, before any work
  _check_serialization()
  trained = inference.load(workdir, mesh_data=1)
  config, method = trained.config, trained.method
  # On one device, closed over: they become the module's constants.
  device = jax.local_devices()[0]
  model = jax.device_put(trained.model, device)
  context = jax.device_put(trained.context, device)
  size = sum(x.nbytes for x in jax.tree.leaves((model, context)))
  if size > MAX_CONSTANT_BYTES:
    raise ValueError(
      f"{workdir}: the weights and score context take {size / 2**30:.2f} GiB,"
      " more than a serialised jax.export module can hold (2 GiB)"
    )

  def score(images):
    return method.score(config, model, context, images)

  s, c = trained.image_size, trained.channels
  b = jax.export.symbolic_shape("b")[0] if batch is None else int(batch)
  spec = jax.ShapeDtypeStruct((b, s, s, c), np.uint8)
  try:
    # No CPU-only fusion barriers in a program other platforms may run.
    with block_barrier.off():
      exported = jax.export.export(jax.jit(score), platforms=platforms)(spec)
  except Exception as e:  # noqa: BLE001 - re-raised with the way out
    if batch is not None:
      raise
    raise ValueError(
      f"Tracing {config.method}.score with a symbolic batch failed"
      f" ({type(e).__name__}: {str(e).splitlines()[0]}). If that is about"
      " the batch dimension, export a fixed batch (--batch N, batch=N), or"
      " make the method batch-polymorphic (images.shape[0], not"
      " len(images))"
    ) from e
  blob = exported.serialize()
  meta = {
    "format": FORMAT,
    "workdir": storage.absolute(workdir),
    "method": config.method,
    "platforms": list(exported.platforms),
    "jax_version": jax.__version__,
    "input_contract": inference.input_contract(s, c),
    "score_names": list(trained.score_names),
    "map_names": list(trained.map_names),
    "batch_size": trained.batch_size if batch is None else int(batch),
    "symbolic_batch": batch is None,
    "thresholds": trained.threshold,
    "calibration_scores": {
      k: [float(x) for x in v] for k, v in trained.calibration.items()
    },
    "weights_bytes": int(size),
    "config": json.loads(config.to_json()),
  }
  storage.write_bytes(output, bytes(blob))
  storage.write_json(output + ".json", meta, indent=2)
  return meta


class ExportedModel:
  """An artefact of `export`, ready to score (see `load_exported`).

  Attributes:
    exported: the deserialised `jax.export.Exported`.
    meta: the artefact's JSON ({} when it is missing).
    image_size, channels: the input's S and C (from the exported function).
    score_names, map_names: its outputs.
    threshold: {score: float or None}, the run's calibrated thresholds.
    input_contract: as `jaxad.inference.input_contract`.
    config: the run's config, a plain dict.
    batch_size: images per call of `score` (each distinct batch compiles
      once); an artefact exported with a fixed batch takes exactly that
      many, and `score` pads the last call to it.
    fixed_batch: that batch size, or None (symbolic batch).
  """

  def __init__(self, exported: Any, meta: dict, batch_size: int | None):
    self.exported = exported
    self.meta = meta
    avals = exported.in_avals
    shape = avals[0].shape if len(avals) == 1 else ()
    if (
      len(shape) != 4
      or avals[0].dtype != np.uint8
      or not all(isinstance(d, int) for d in shape[1:])
      or shape[1] != shape[2]
    ):
      raise ValueError(
        f"Not a jaxad artefact: its inputs are {avals}, not uint8 [b, S, S, C]"
      )
    self.image_size, self.channels = int(shape[1]), int(shape[3])
    out = jax.tree.unflatten(exported.out_tree, exported.out_avals)
    self.score_names = tuple(meta.get("score_names", sorted(out["scores"])))
    self.map_names = tuple(n for n in self.score_names if n in out["maps"])
    thresholds = meta.get("thresholds") or {}
    self.threshold = {n: thresholds.get(n) for n in self.score_names}
    self.config = meta.get("config", {})
    self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
    self.batch_size = self.fixed_batch or int(
      batch_size or meta.get("batch_size") or 64
    )
    self.input_contract = meta.get("input_contract") or {
      "image_size": self.image_size,
      "channels": self.channels,
      "dtype": "uint8",
      "layout": "NHWC",
    }

  @property
  def platforms(self) -> tuple[str, ...]:
    return tuple(self.exported.platforms)

  def __repr__(self) -> str:
    return (
      f"ExportedModel(scores={list(self.score_names)}, input=uint8"
      f" [N, {self.image_size}, {self.image_size}, {self.channels}],"
      f" platforms={list(self.platforms)})"
    )

  def check(self, images) -> np.ndarray:
    """`images` as numpy uint8 [N, S, S, C], or a ValueError naming the
    contract (before anything runs)."""
    s, c = self.image_size, self.channels
    contract = f"uint8 [N, {s}, {s}, {c}] (NHWC, values 0..255)"
    shape = getattr(images, "shape", None)
    dtype = getattr(images, "dtype", None)
    if shape is None or dtype is None:
      raise ValueError(
        f"images must be an array {contract}, got {type(images)}"
      )
    if np.dtype(dtype) != np.uint8:
      raise ValueError(f"images must be {contract}, got dtype {dtype}")
    if len(shape) != 4 or tuple(shape[1:]) != (s, s, c) or not shape[0]:
      raise ValueError(f"images must be {contract}, got shape {tuple(shape)}")
    return np.asarray(images)

  def score(self, images) -> dict[str, dict[str, np.ndarray]]:
    """Scores uint8 images [N, S, S, C] in batches of `batch_size`.

    Returns:
      {"scores": {name: [N]}, "maps": {name: [N, S, S]}} as numpy arrays.

    Raises:
      ValueError: images not uint8 [N, S, S, C] (N >= 1) of the export.
    """
    images = self.check(images)
    n, b = len(images), self.batch_size
    chunks = []
    for i in range(0, n, b):
      batch = images[i : i + b]
      pad = b - len(batch) if self.fixed_batch else 0
      if pad:
        batch = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)])
      chunks.append(jax.device_get(self.exported.call(batch)))
    return jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *chunks)


def load_exported(path: str, *, batch_size: int | None = None) -> ExportedModel:
  """The artefact at `path` (and its `path`.json), ready to score.

  Needs jax, numpy and flatbuffers only; the method's code is not
  imported. Runs on the default backend, which must be one of the
  artefact's platforms.

  Args:
    path: the file `python -m jaxad.export` wrote.
    batch_size: images per call; default the run's eval.batch_size.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: not a jax.export artefact, or not one for this backend.
  """
  _check_serialization()
  blob = storage.path(path).read_bytes()
  meta = {}
  if (text := storage.read_text(path + ".json")) is not None:
    meta = json.loads(text)
  else:
    from absl import logging

    logging.warning(
      "%s.json is missing: no thresholds, score names or input contract;"
      " scores only (keep the JSON beside the artefact)",
      path,
    )
  try:
    exported = jax.export.deserialize(bytearray(blob))
  except Exception as e:  # flatbuffers raises assorted errors on bad bytes
    raise ValueError(
      f"{path} is not a jax.export artefact ({type(e).__name__}: {e})"
    ) from e
  backend = jax.default_backend()
  if backend not in exported.platforms and not (
    backend == "gpu" and {"cuda", "rocm"} & set(exported.platforms)
  ):
    raise ValueError(
      f"{path} was exported for {list(exported.platforms)}, not this"
      f" {backend!r} backend: export again with --platforms"
      f" {','.join([*exported.platforms, backend])}"
    )
  return ExportedModel(exported, meta, batch_size)


def main(argv):
  del argv
  from absl import logging

  from jaxad import cli

  with cli.user_errors(ValueError, FileNotFoundError, ImportError):
    _main(logging, cli)


def _main(logging, cli) -> None:
  cli.setup_logging()
  workdir, output = cli.WORKDIR.value, _OUTPUT.value
  if output is None:
    output = os.path.join(workdir, "model.jaxexport")
  meta = export(workdir, output, platforms=_PLATFORMS.value, batch=_BATCH.value)
  logging.info(
    "Exported %s (%s, scores %s, input uint8 [%s, %d, %d, %d], %.1f MB of"
    " weights) to %s and %s.json",
    workdir,
    ",".join(meta["platforms"]),
    ",".join(meta["score_names"]),
    "b" if meta["symbolic_batch"] else meta["batch_size"],
    meta["input_contract"]["image_size"],
    meta["input_contract"]["image_size"],
    meta["input_contract"]["channels"],
    meta["weights_bytes"] / 1e6,
    output,
    output,
  )


if __name__ == "__main__":
  from absl import app, flags

  from jaxad import cli  # defines --workdir (--config unused)

  flags.adopt_module_key_flags(cli)  # --help lists --workdir

  _OUTPUT = flags.DEFINE_string(
    "output", None, "The artefact's path; default W/model.jaxexport."
  )
  _PLATFORMS = flags.DEFINE_list(
    "platforms", ["cpu"], f"Platforms to lower for, from {PLATFORMS}."
  )
  _BATCH = flags.DEFINE_integer(
    "batch",
    None,
    "Export this batch size only (default: a symbolic batch, any size).",
  )
  flags.mark_flags_as_required(["workdir"])
  app.run(main, flags_parser=cli.parse_flags)
