"""Helpers for config files: `get_config(arg)` argument parsing, and the
check of a config against the run stored in a workdir (W/config.json)."""

import json
import os

import jax
import ml_collections as mlc


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
}


def check_workdir(
  config: mlc.ConfigDict,
  workdir: str,
  allowed: tuple[str, ...] = (),
  *,
  write: bool = True,
) -> None:
  """Checks that W/config.json (if any) holds the same config; writes it.

  Args:
    allowed: key prefixes that may differ from the stored config (the
      method's `resumable_changes`), besides `_RESUMABLE_CHANGES`.
    write: write W/config.json (after the check).

  Raises:
    ValueError: the stored run has another config, naming the keys.
  """
  path = os.path.join(workdir, "config.json")
  flat = flatten(json.loads(config.to_json()))
  if os.path.exists(path):
    with open(path) as f:
      old = flatten(json.load(f))
    old = {**{k: v for k, v in ADDED_KEYS.items() if k in flat}, **old}
    diff = sorted(
      k
      for k in set(old) | set(flat)
      if old.get(k) != flat.get(k)
      and k not in _RESUMABLE_CHANGES
      and not k.startswith(allowed or ("\0",))
    )
    if diff:
      raise ValueError(
        f"{workdir} holds a run with a different config ({', '.join(diff)}: "
        f"{[(old.get(k), flat.get(k)) for k in diff]}). Use a new --workdir, "
        "or the same config to resume."
      )
  if write and jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(json.loads(config.to_json()), f, indent=2)


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
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return flatten(json.load(f))
