"""jaxad: fast JAX/Flax anomaly detection for medical images.

Using a trained run from Python (imported on first use, so that
`import jaxad` stays cheap):

* `jaxad.load(workdir) -> jaxad.inference.TrainedModel`: score uint8
  images, predict files, calibrated thresholds;
* `jaxad.load_exported(path) -> jaxad.export.ExportedModel`: a
  `python -m jaxad.export` artefact, run with jax and numpy only.
"""

import importlib
from typing import TYPE_CHECKING

_LAZY = {
  "load": "jaxad.inference",
  "TrainedModel": "jaxad.inference",
  "load_exported": "jaxad.export",
  "ExportedModel": "jaxad.export",
}

__all__ = ["ExportedModel", "TrainedModel", "load", "load_exported"]

if TYPE_CHECKING:
  from jaxad.export import ExportedModel, load_exported
  from jaxad.inference import TrainedModel, load


def __getattr__(name: str):
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'jaxad' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY))
