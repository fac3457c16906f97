"""Config checks every method shares, run before any data or compute.

Each method's `check_config` (the method contract, jaxad/methods/api.py)
calls `check_shared` first, then checks its own keys; `jaxad.train`,
`jaxad.evaluate` and `jaxad.bench` call `check_config` before they touch
the workdir, the data or the compiler, so an impossible config is refused
in well under a second. Every refusal is a `ConfigError` (a ValueError) or
a `ConfigPathError` (a FileNotFoundError) whose message names the key, the
value and what is allowed, e.g.

  config.train.batch_size=0: must be an integer >= 1 (images per step or
  per call)

and the entry points print it as one line (`jaxad.cli.user_errors`).

Shared checks (`check_shared`):
* `epochs`: an integer >= 1 when the method trains, >= 0 when it does not
  (zero-shot baselines, imported weights);
* by key name, wherever the key sits in the config: every `batch_size`,
  `log_every`, `checkpoint_every`, `steps_per_call`, `image_size`,
  `shots` >= 1; learning rates (`lr`, `*_lr`) > 0; weight decays, loss
  weights >= 0; Adam's `b1`/`b2` and SGD's `momentum` in [0, 1); the
  fractions (`eval.calibration_fraction` in [0, 1),
  `eval.target_specificity` in (0, 1], `data.anomaly_rate` in [0, 1],
  `data.test_normal_fraction` in (0, 1), probabilities and decision
  thresholds in [0, 1]); Gaussian `sigma` > 0; `data.*seed` >= 0
  (numpy's); `data.channels` 1 or 3;
* `data.format` and `data.root` (`check_source`): a known layout; the
  embedded set takes no root (a root with the default format would train
  on the embedded set); an existing root of the right kind (a folder, or
  for medmnist an `.npz` that is a zip of `.npy` arrays). An empty or
  missing root is left to the data layer, which names it before reading
  anything (a benchmark on synthetic data needs none);
* `data.unlabeled_dir`, when set: an existing folder.

`check_embedded_pool` (methods that train on the unlabeled pool): with the
embedded set, whose pool is fixed, `data.anomaly_rate` must be its rate.
A method's own checks build their messages with `refuse` (the same form).
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import zipfile
from collections.abc import Callable, Iterator
from typing import Any


class ConfigError(ValueError):
  """An impossible config value: the message names config.<key>, the value
  and what is allowed."""


class ConfigPathError(FileNotFoundError):
  """A file or folder a config key names is missing or unreadable."""


def refuse(key: str, value: Any, allowed: str) -> ConfigError:
  """`ConfigError("config.<key>=<value!r>: <allowed>")`, to raise."""
  return ConfigError(f"config.{key}={value!r}: {allowed}")


def config_errors(check: Callable[..., None]) -> Callable[..., None]:
  """Decorates a method's `check_config`: every ValueError it raises
  becomes a `ConfigError` and every FileNotFoundError a `ConfigPathError`
  (same message), so that the CLI prints them as one line; by the
  contract, whatever check_config refuses is the user's config."""

  @functools.wraps(check)
  def wrapped(*args, **kwargs):
    try:
      return check(*args, **kwargs)
    except (ConfigError, ConfigPathError):
      raise
    except FileNotFoundError as e:
      raise ConfigPathError(str(e)) from e
    except ValueError as e:
      raise ConfigError(str(e)) from e

  return wrapped


# ------------------------------------------------------------- single keys


def get(config: Any, key: str, default: Any = None) -> Any:
  """`config.<dotted key>`, or `default` where a part of it is absent."""
  node = config
  for part in key.split("."):
    if not hasattr(node, "get") or part not in node:
      return default
    node = node[part]
  return node


def check_int(key: str, value: Any, minimum: int, why: str = "") -> None:
  """Raises ConfigError unless `value` is an integer >= minimum."""
  if (
    isinstance(value, bool)
    or not isinstance(value, numbers.Integral)
    or value < minimum
  ):
    raise refuse(key, value, f"must be an integer >= {minimum}{why}")


def check_number(
  key: str,
  value: Any,
  low: float,
  high: float = math.inf,
  *,
  low_open: bool = False,
  high_open: bool = False,
  why: str = "",
) -> None:
  """Raises ConfigError unless `value` is a finite number in the interval
  (low or [low, high] or high), written as such in the message."""
  interval = (
    f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
  )
  ok = (
    isinstance(value, numbers.Real)
    and not isinstance(value, bool)
    and math.isfinite(value)
    and (value > low if low_open else value >= low)
    and (value < high if high_open else value <= high)
  )
  if not ok:
    if high == math.inf:
      bound = f"> {low:g}" if low_open else f">= {low:g}"
      raise refuse(key, value, f"must be a number {bound}{why}")
    raise refuse(key, value, f"must be in {interval}{why}")


# Integer keys, by the last part of their dotted name, wherever they sit:
# name -> (minimum, what they count).
_COUNTS = {
  "batch_size": (1, "images per step or per call"),
  "log_every": (1, "steps"),
  "checkpoint_every": (1, "steps"),
  "steps_per_call": (1, "steps"),
  "image_size": (1, "pixels"),
  "shots": (1, "images"),
  "unlabeled_size": (0, "images"),
  "max_source_images": (0, "images"),
}
_INF = math.inf
# Number keys, likewise: name -> (low, high, low_open, high_open).
_INTERVALS = {
  "b1": (0, 1, False, True),
  "b2": (0, 1, False, True),
  "momentum": (0, 1, False, True),
  "disc_dropout": (0, 1, False, True),
  "calibration_fraction": (0, 1, False, True),
  "target_specificity": (0, 1, True, False),
  "anomaly_rate": (0, 1, False, False),
  "test_normal_fraction": (0, 1, True, True),
  "sas_probability": (0, 1, False, False),
  "fusion_threshold": (0, 1, False, False),
  "decision_threshold": (0, 1, False, False),
  "sigma": (0, _INF, True, False),
  "adv_weight": (0, _INF, False, False),
  "entropy_weight": (0, _INF, False, False),
}
_WHY = {
  "calibration_fraction": " (the share of known normals held out; one"
  " must be left to train on)",
  "anomaly_rate": " (the abnormal share of the unlabeled pool)",
}


def _check_leaf(key: str, value: Any) -> None:
  """The by-name rule of one key (module docstring), if it has one."""
  name = key.rsplit(".", 1)[-1]
  if name in _COUNTS:
    minimum, unit = _COUNTS[name]
    check_int(key, value, minimum, f" ({unit})")
  elif key.startswith("data.") and name.endswith("seed"):
    check_int(key, value, 0, " (numpy seeds are non-negative)")
  elif name == "lr" or name.endswith("_lr"):
    check_number(key, value, 0, low_open=True, why=" (a step size)")
  elif name.endswith("weight_decay"):
    check_number(key, value, 0)
  elif name in _INTERVALS:
    low, high, low_open, high_open = _INTERVALS[name]
    check_number(
      key,
      value,
      low,
      high,
      low_open=low_open,
      high_open=high_open,
      why=_WHY.get(name, ""),
    )


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """(dotted key, value) of every leaf of a (Config)dict tree."""
  for k, v in node.items():
    if hasattr(v, "items"):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def check_keys(config: Any) -> None:
  """Applies the by-name rules (module docstring) to every key present."""
  for key, value in _leaves(config):
    _check_leaf(key, value)
  channels = get(config, "data.channels")
  if channels is not None and channels not in (1, 3):
    raise refuse("data.channels", channels, "must be 1 (grayscale) or 3 (RGB)")


def check_epochs(config: Any, *, trains: bool, method: str) -> None:
  """`config.epochs`: >= 1 when `method` trains, >= 0 when it does not."""
  epochs = get(config, "epochs")
  if trains:
    why = f" ({method} trains for this many epochs)"
    check_int("epochs", epochs, 1, why)
  else:
    check_int("epochs", epochs, 0, f" ({method} does not train here)")


# -------------------------------------------------------------------- data

# What each one-class layout reads at data.root (jaxad.data.layouts).
LAYOUTS = {
  "embedded": "the Kermany CXR set shipped with jaxad; no data.root",
  "medad": "a folder ROOT/data.json + ROOT/images/",
  "folders": "a folder ROOT/train/<class>/ + ROOT/test/<class>/",
  "medmnist": "a MedMNIST .npz file, or a folder holding exactly one",
  "mvtec": "a folder ROOT/CAT/train/good/ + ROOT/CAT/test/<defect>/",
  "bmad": "a folder ROOT/train/good/img/ + ROOT/test/{good,Ungood}/img/",
  "mtd": "a folder ROOT/MT_Free/Imgs/ + ROOT/MT_<Defect>/Imgs/",
}


def _formats_hint(root: str) -> str:
  hint = ", ".join(f for f in LAYOUTS if f != "embedded")
  if root.lower().endswith(".npz"):
    hint += "; medmnist for an .npz"
  return hint


def check_source(data: Any, key: str = "data") -> None:
  """Checks `data.format` and `data.root` of a one-class layout.

  Args:
    data: a `data` config (or a few-shot source entry) with `format`,
      `root`.
    key: where `data` sits, for messages ("data", "data.sources[0]").

  Raises:
    ConfigError: an unknown format; a root with the embedded set (the
      format was probably not set); a root of the wrong kind (a file for a
      folder layout); an .npz that is not one. A root that is empty or
      does not exist is left to the data layer, which names it before
      reading anything (benchmarks on synthetic data need none).
  """
  fmt = get(data, "format", "")
  root = str(get(data, "root", "") or "")
  if fmt not in LAYOUTS:
    raise refuse(f"{key}.format", fmt, f"must be one of {list(LAYOUTS)}")
  if fmt == "embedded":
    if root:
      raise refuse(
        f"{key}.root",
        root,
        f"set, but {key}.format='embedded' (the default) ignores it and"
        " would train on the embedded set: also set"
        f" --config.{key}.format to the dataset's layout"
        f" ({_formats_hint(root)})",
      )
    return
  if not root:
    # The data layer refuses it at once; `jaxad.bench` (synthetic data by
    # default) needs no root.
    return
  if "://" in root:
    raise refuse(
      f"{key}.root",
      root,
      "a URI, but datasets are read from a local folder (workdirs may be"
      " gs://, data roots not): copy the data to every host first, e.g."
      " with tpu_scripts/tpu.sh's DATA= or `gcloud storage cp -r`",
    )
  path = os.path.abspath(os.path.expanduser(root))
  if not os.path.exists(path):
    return  # the data layer names it at once; evaluation may expect it
  if fmt == "medmnist":
    check_npz(_single_npz(path, f"{key}.root"), f"{key}.root")
  elif not os.path.isdir(path):
    raise refuse(
      f"{key}.root",
      root,
      f"a file, but {key}.format={fmt!r} reads {LAYOUTS[fmt]}"
      + ("; for an .npz use medmnist" if root.lower().endswith(".npz") else ""),
    )


def _single_npz(path: str, key: str) -> str:
  """`path` if a file, else the one `.npz` inside the folder `path`."""
  if not os.path.isdir(path):
    return path
  found = sorted(f for f in os.listdir(path) if f.lower().endswith(".npz"))
  if len(found) != 1:
    raise refuse(
      key,
      path,
      f"a folder holding {len(found)} .npz files {found[:5]}; medmnist"
      " needs the .npz file itself or a folder holding exactly one",
    )
  return os.path.join(path, found[0])


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a member, or an empty archive


def check_npz(path: str, key: str) -> None:
  """Raises unless `path` is an `.npz` (a zip of `.npy` arrays); reads the
  zip's directory only.

  Raises:
    ConfigPathError: the file cannot be read.
    ConfigError: not a zip (e.g. a pickle, an .npy, a truncated download),
      or a zip without `.npy` members.
  """
  try:
    with open(path, "rb") as f:
      head = f.read(4)
  except OSError as e:
    raise ConfigPathError(f"config.{key}={path!r}: cannot read it: {e}") from e
  what = "must be an .npz file (a zip of .npy arrays, as numpy.savez writes)"
  if head not in _ZIP_MAGIC:
    raise refuse(key, path, f"{what}; this file starts with {head!r}")
  try:
    with zipfile.ZipFile(path) as z:
      names = z.namelist()
  except (zipfile.BadZipFile, OSError) as e:
    raise refuse(key, path, f"{what}; it is a broken zip ({e})") from e
  arrays = [n for n in names if n.endswith(".npy")]
  if not arrays or len(arrays) != len(names):
    others = [n for n in names if not n.endswith(".npy")][:5]
    raise refuse(key, path, f"{what}; it holds {others or 'no arrays'}")


def check_embedded_pool(config: Any) -> None:
  """For methods that train on the unlabeled pool (DDAD): the embedded set
  ships a fixed pool, so `data.anomaly_rate` must be its rate there.

  Raises:
    ConfigError: another rate, which the embedded set would ignore (and
      config.json record); names the layouts that draw a pool instead.
  """
  if get(config, "data.format") != "embedded" or get(
    config, "data.unlabeled_dir"
  ):
    return
  # Imported here: the CLI imports this module before any numpy is needed.
  import numpy as np

  from jaxad.data import npz_layouts

  if not os.path.isfile(npz_layouts.EMBEDDED_PATH):
    return  # the data layer says how to make it
  with np.load(npz_layouts.EMBEDDED_PATH) as z:  # reads one small array
    labels = np.asarray(z["unlabeled_labels"]).reshape(-1)
  rate, value = float(labels.mean()), config.data.anomaly_rate
  if not math.isclose(value, rate, rel_tol=1e-9, abs_tol=1e-12):
    raise refuse(
      "data.anomaly_rate",
      value,
      f"the embedded set's unlabeled pool is fixed ({len(labels)} images,"
      f" {int(labels.sum())} abnormal), so only {rate:g} is allowed with"
      " data.format='embedded'; to draw a pool at another rate, set"
      " data.format (folders, medad or medmnist) and data.root",
    )


def check_folder(config: Any, key: str) -> None:
  """Raises ConfigPathError if `config.<key>` is set but not a folder."""
  value = str(get(config, key, "") or "")
  if value and not os.path.isdir(os.path.expanduser(value)):
    raise ConfigPathError(f"config.{key}={value!r}: no such folder")


# --------------------------------------------------------------- together


def check_shared(config: Any, *, trains: bool, method: str) -> None:
  """Every check the methods share (module docstring); no data is read.

  Args:
    config: the run's config.
    trains: the method's `trains(config)`.
    method: the method's name, for messages ("DDAD").

  Raises:
    ConfigError, ConfigPathError: naming the key, the value and what is
      allowed.
  """
  check_epochs(config, trains=trains, method=method)
  check_keys(config)
  if get(config, "data.format") is not None:
    check_source(config.data)
  check_folder(config, "data.unlabeled_dir")
