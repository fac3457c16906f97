"""What produced an eval.json: method, config hash, versions, machine, time.

Written under eval.json's "run" key, apart from the scores so that two
evaluations of the same checkpoint compare equal on `scores` alone (the
wall-clock and the commit differ between them).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess

import jax
import ml_collections as mlc

from jaxad import storage

_PACKAGES = ("jaxad", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint")


def describe(
  config: mlc.ConfigDict, workdir: str, *, seconds: dict[str, float]
) -> dict:
  """The "run" record of eval.json.

  Args:
    config: the config the scores were made with.
    workdir: W; its metrics.jsonl gives the training phases' wall-clock.
    seconds: other timed parts, e.g. {"evaluate": 12.3}.

  Returns:
    {"method", "config_sha256" (of the config's sorted JSON), "versions"
    {package: version or None}, "commit" (jaxad's git commit, "+dirty"
    when the checkout has changes; None outside a git checkout), "backend",
    "device_kind", "num_devices", "num_processes", "seconds" {"train.<phase>":
    s, ...} (wall-clock of the steps kept in metrics.jsonl, so a resumed
    run counts the steps it ran before the interruption too)}.
  """
  canonical = json.dumps(json.loads(config.to_json()), sort_keys=True)
  return {
    "method": config.get("method"),
    "config_sha256": hashlib.sha256(canonical.encode()).hexdigest(),
    "versions": {p: _version(p) for p in _PACKAGES},
    "commit": _commit(),
    "backend": jax.default_backend(),
    "device_kind": jax.devices()[0].device_kind,
    "num_devices": jax.device_count(),
    "num_processes": jax.process_count(),
    "seconds": train_seconds(workdir)
    | {k: round(v, 3) for k, v in seconds.items()},
  }


def train_seconds(workdir: str) -> dict[str, float]:
  """{"train.<phase>": seconds} summed from W/metrics.jsonl's "seconds"
  fields (the wall-clock of each logged interval); {} without them."""
  text = storage.read_text(os.path.join(workdir, "metrics.jsonl"))
  out: dict[str, float] = {}
  if text is None:
    return out
  for line in text.splitlines():
    record = json.loads(line)
    if "seconds" in record:
      key = f"train.{record['phase']}"
      out[key] = out.get(key, 0.0) + record["seconds"]
  return {k: round(v, 3) for k, v in out.items()}


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def _commit() -> str | None:
  """jaxad's git commit when it runs from a checkout (else None).

  Only when the package sits at the top of its git checkout: an installed
  copy inside a venv inside some checkout is not that checkout's code.
  """
  here = os.path.dirname(os.path.abspath(__file__))
  if not os.path.exists(os.path.join(os.path.dirname(here), ".git")):
    return None
  try:
    head = subprocess.run(
      ["git", "-C", here, "rev-parse", "HEAD"],
      capture_output=True,
      text=True,
      timeout=5,
      check=True,
    ).stdout.strip()
    dirty = subprocess.run(
      ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
      capture_output=True,
      text=True,
      timeout=5,
      check=True,
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return head + ("+dirty" if dirty else "")
