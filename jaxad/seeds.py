r"""Repeated runs over seeds, for numbers with their spread.

  python -m jaxad.train --config configs/<method>.py --workdir W --seeds 0,1,2

trains one run per seed, in turn, in `W/seed_<s>/` (each with `config.seed`
set to s; everything else, including the data split seeds, is the same, so
the spread is that of training randomness: init, data order, draws), then
writes `W/eval_seeds.json`:

  {"seeds": [0, 1, 2], "workdirs": ["seed_0", ...],
   "std": "sample standard deviation over seeds (ddof=1)",
   "scores": {<score>: {<metric>: {"mean", "std", "values"}, ...}}}

with every number of the seeds' `eval.json` `scores` (AUROC, AP, pixel
metrics, the calibrated threshold's sensitivity and specificity, ...).
Re-running the same command resumes: finished seeds are re-evaluated from
their checkpoints, an interrupted one continues where it stopped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import ml_collections as mlc
import numpy as np
from absl import logging

from jaxad import config_checks, configlib, storage

EVAL_SEEDS = "eval_seeds.json"
_STD = "sample standard deviation over seeds (ddof=1)"


def parse(text: str) -> list[int]:
  """ "0,1,2" -> [0, 1, 2].

  Raises:
    config_checks.ConfigError: (a ValueError) not a comma-separated list of
      distinct integers >= 0, naming the flag and the value.
  """
  try:
    seeds = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    seeds = None
  if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
    raise config_checks.ConfigError(
      f"--seeds={text!r}: expected distinct integers >= 0 separated by"
      " commas, e.g. --seeds=0,1,2"
    )
  return seeds


def seed_workdir(workdir: str, seed: int) -> str:
  """`W/seed_<seed>`: the workdir of one seed's run."""
  return os.path.join(workdir, f"seed_{seed}")


def run(
  config: mlc.ConfigDict,
  workdir: str,
  seeds: Sequence[int],
  *,
  run_one: Callable[[mlc.ConfigDict, str], dict] | None = None,
) -> dict:
  """Trains and evaluates `config` once per seed; writes W/eval_seeds.json.

  Args:
    config: the run's config; `config.seed` is replaced per run.
    workdir: W; the runs go to `W/seed_<s>/`.
    seeds: distinct seeds, in the order they run.
    run_one: (config, workdir) -> eval.json content; `jaxad.train.run` by
      default.

  Returns:
    The content of W/eval_seeds.json.

  Raises:
    ValueError: W holds a single run (W/config.json), or `seeds` is empty
      or repeats a seed.
  """
  if run_one is None:
    from jaxad import train  # train's CLI imports this module

    run_one = train.run
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"seeds must be distinct and not empty, got {seeds}")
  if storage.path(os.path.join(workdir, "config.json")).exists():
    raise ValueError(
      f"{workdir} holds a single run (config.json): use a new --workdir for"
      " a multi-seed run"
    )
  results = {}
  for i, seed in enumerate(seeds):
    logging.info("Seed %d (%d of %d)", seed, i + 1, len(seeds))
    one = mlc.ConfigDict(config.to_dict())
    one.seed = seed
    results[seed] = run_one(one, seed_workdir(workdir, seed))
  record = aggregate(results)
  storage.write_json(os.path.join(workdir, EVAL_SEEDS), record, indent=2)
  logging.info("Over %d seeds:\n%s", len(seeds), format_table(record))
  return record


def aggregate(results: dict[int, dict]) -> dict:
  """{seed: eval.json content} -> the eval_seeds.json record.

  Every number under `scores.<name>` (nested dicts flattened with ".", e.g.
  "calibrated.sensitivity") gets its mean, sample std (ddof=1; 0.0 for a
  single seed) and per-seed values in seed order.

  Raises:
    ValueError: the runs report different scores or metrics.
  """
  seeds = list(results)
  flat = {s: _flat_scores(r["scores"]) for s, r in results.items()}
  keys = set(flat[seeds[0]])
  for s in seeds[1:]:
    if set(flat[s]) != keys:
      raise ValueError(
        f"seed {s} reports other metrics than seed {seeds[0]}:"
        f" {sorted(set(flat[s]) ^ keys)}"
      )
  scores: dict[str, dict] = {}
  for name, metric in sorted(keys, key=lambda k: _order(results, k)):
    values = np.asarray([flat[s][name, metric] for s in seeds], np.float64)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    scores.setdefault(name, {})[metric] = {
      "mean": float(np.mean(values)),
      "std": std,
      "values": values.tolist(),
    }
  return {
    "seeds": seeds,
    "workdirs": [f"seed_{s}" for s in seeds],
    "std": _STD,
    "scores": scores,
  }


def _order(results: dict[int, dict], key: tuple[str, str]) -> tuple[int, int]:
  """Keeps eval.json's order: the method's scores, then their metrics."""
  first = next(iter(results.values()))["scores"]
  names = list(first)
  metrics = list(_flat_scores({key[0]: first[key[0]]}))
  return names.index(key[0]), metrics.index(key)


def _flat_scores(scores: dict) -> dict[tuple[str, str], float]:
  out = {}
  for name, metrics in scores.items():
    for k, v in configlib.flatten(metrics).items():
      if isinstance(v, int | float) and not isinstance(v, bool):
        out[name, k] = float(v)
  return out


def format_table(record: dict) -> str:
  """eval_seeds.json as a console table: mean ± std of AUROC, AP and the
  calibrated sensitivity/specificity when present."""
  columns = ["auroc", "ap", "calibrated.sensitivity", "calibrated.specificity"]
  columns = [c for c in columns if c in next(iter(record["scores"].values()))]
  heads = {"calibrated.sensitivity": "sens", "calibrated.specificity": "spec"}
  header = f"{'score':<10}" + "".join(
    f" {heads.get(c, c.upper()):>15}" for c in columns
  )
  lines = [header]
  for name, metrics in record["scores"].items():
    cells = "".join(
      f" {metrics[c]['mean']:>7.4f}±{metrics[c]['std']:<7.4f}"
      if c in metrics
      else f" {'-':>15}"
      for c in columns
    )
    lines.append(f"{name:<10}{cells}")
  lines.append(f"(seeds {record['seeds']}; ± {record['std']})")
  return "\n".join(lines)
