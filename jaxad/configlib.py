"""Helpers for config files: `get_config(arg)` argument parsing, and the
check of a config against the run stored in a workdir (W/config.json)."""

import hashlib
import json
import os
import re

import jax
import ml_collections as mlc
from absl import logging

from jaxad import storage


def parse_arg(arg: str | None, **defaults) -> mlc.ConfigDict:
  """Parses a config-file argument such as `"dataset=kermany,smoke"`.

  `configs/<method>.py:smoke` passes "smoke" as `arg`. Each comma-separated item
  is `key=value` or a bare `key` (meaning True). Only keys given in
  `defaults` are accepted; values take the type of their default.

  Raises:
    ValueError: on an unknown key, naming the known ones.
  """
  result = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(
        f"Unknown config argument {key!r} in {arg!r}; known: {sorted(defaults)}"
      )
    default = defaults[key]
    if not eq:
      result[key] = True
    elif isinstance(default, bool):
      result[key] = value.lower() in ("1", "true", "yes")
    else:
      result[key] = type(default)(value)
  return mlc.ConfigDict(result)


# Keys that may change between a run and its resumption.
_RESUMABLE_CHANGES = (
  "train.log_every",
  "train.checkpoint_every",
  "train.steps_per_call",
  "data.cache_dir",
  "eval.batch_size",
  # Changes no data: a run with duplicates was refused without it.
  "data.allow_duplicates",
)
# Keys that only turn a trained model's scores into decisions, whatever
# the method: `jaxad.evaluate` may re-score a run with other values
# (besides the method's `Method.rescoring_changes`).
RESCORING_CHANGES = ("eval.target_specificity",)
# Keys added after runs were written without them, with the value that
# reproduces what those runs did: resuming such a run is allowed. Runs
# before the calibration split trained on every known normal (fraction 0:
# resuming one with another fraction is refused, as it would change the
# training set); they had no threshold, so the default specificity does
# (and `jaxad.evaluate` may re-score them at another).
ADDED_KEYS = {
  "model.compute_dtype": "float32",
  "data.exclude_sources": "",
  "eval.calibration_fraction": 0.0,
  "eval.target_specificity": 0.95,
  "data.unlabeled_dir": "",
  "data.allow_duplicates": False,
  "data.intensity": "auto",
  "data.skip_unreadable": False,
  "mesh.member": 1,
}


def changed_keys(
  old: dict, new: dict, allowed: tuple[str, ...] = ()
) -> list[str]:
  """Flattened keys whose values differ between a stored run's config
  (`old`) and `new`, besides `_RESUMABLE_CHANGES` and the `allowed`
  prefixes; a key of `ADDED_KEYS` missing from `old` has its value there.
  """
  old = {**{k: v for k, v in ADDED_KEYS.items() if k in new}, **old}
  return sorted(
    k
    for k in set(old) | set(new)
    if old.get(k) != new.get(k)
    and k not in _RESUMABLE_CHANGES
    and not k.startswith(allowed or ("\0",))
  )


class ConfigMismatchError(ValueError):
  """A config that differs from the run stored in a workdir or checkpoint
  where it may not (the message names the keys); the CLI prints it as one
  line."""


def check_against(
  config: mlc.ConfigDict,
  stored: dict,
  allowed: tuple[str, ...],
  where: str,
) -> None:
  """Refuses `config` where it differs from a stored run's (flattened)
  config `stored`, outside `allowed` (see `check_workdir`).

  Args:
    where: what holds `stored`, for the message (a workdir, a checkpoint).

  Raises:
    ConfigMismatchError: naming `where`, the keys and their (stored, new)
      values.
  """
  flat = flatten(config_dict(config))
  diff = changed_keys(stored, flat, allowed)
  if diff:
    raise ConfigMismatchError(
      f"{where} holds a run with a different config ({', '.join(diff)}: "
      f"{[(stored.get(k), flat.get(k)) for k in diff]}). Use a new "
      "--workdir, or the same config to resume."
    )
  for k in changed_keys(stored, flat, ()):  # all allowed: say so
    logging.info(
      "%s: %s %r -> %r (allowed)", where, k, stored.get(k), flat.get(k)
    )


def check_workdir(
  config: mlc.ConfigDict,
  workdir: str,
  allowed: tuple[str, ...] = (),
  *,
  write: bool = True,
  trained: bool = True,
) -> None:
  """Checks that W/config.json (if any) holds the same config; writes it.

  Args:
    allowed: key prefixes that may differ from the stored config (the
      method's `resumable_changes`), besides `_RESUMABLE_CHANGES`.
    write: write W/config.json (after the check).
    trained: whether W holds a checkpoint. Without one nothing was trained
      under the stored config (a start that failed), so another config
      replaces it, with a warning.

  Raises:
    ConfigMismatchError: W holds a trained run with another config,
      naming the keys.
  """
  path = os.path.join(workdir, "config.json")
  if (text := storage.read_text(path)) is not None:
    old = flatten(json.loads(text))
    if trained:
      check_against(config, old, allowed, workdir)
    elif write and (diff := changed_keys(old, flatten(config_dict(config)))):
      logging.warning(
        "%s had another config (%s) but no checkpoint: nothing was trained "
        "with it, so this config replaces it",
        path,
        ", ".join(diff),
      )
  if write and jax.process_index() == 0:
    # Written whole: in a multi-process run the other processes read
    # W/config.json meanwhile (never a half-written one).
    storage.write_json(path, config_dict(config), indent=2)


def config_dict(config: mlc.ConfigDict) -> dict:
  """`config` as plain JSON types (what W/config.json and checkpoints
  hold)."""
  return json.loads(config.to_json())


# data.* keys that shape the model's input: another value is another model.
MODEL_INPUT_KEYS = ("data.image_size", "data.channels")


def other_data_keys(config: mlc.ConfigDict, stored: dict) -> tuple[str, ...]:
  """The data.* keys whose values differ from a run's flattened config
  `stored`: scoring on other data than the run's (`jaxad.evaluate` writes
  such results to `eval_dir_name`, never over the run's eval.json).

  `data.cache_dir` and `MODEL_INPUT_KEYS` are not among them (the first
  changes no data, the others the model). Empty when `stored` is empty.
  """
  if not stored:
    return ()
  flat = flatten(config_dict(config))
  return tuple(
    k
    for k in changed_keys(stored, flat)
    if k.startswith("data.") and k not in MODEL_INPUT_KEYS
  )


EVAL_DIR_PREFIX = "eval_"


def eval_dir_name(config: mlc.ConfigDict) -> str:
  """'eval_<data name>-<hash>': a folder for results on other data, named
  after data.root's (or data.target's) base name and the first 8 hex
  digits of the SHA-256 of the data config (data.cache_dir left out), so
  that the same data always lands in the same folder."""
  data = flatten(config_dict(config).get("data", {}))
  data.pop("cache_dir", None)
  digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode())
  name = os.path.basename(str(data.get("root", "")).rstrip("/"))
  name = name or str(data.get("target", "")) or str(data.get("format", ""))
  name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "data"
  return f"{EVAL_DIR_PREFIX}{name}-{digest.hexdigest()[:8]}"


def flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def stored_config(workdir: str) -> dict:
  """W/config.json flattened ({} when there is none)."""
  text = storage.read_text(os.path.join(workdir, "config.json"))
  return {} if text is None else flatten(json.loads(text))
