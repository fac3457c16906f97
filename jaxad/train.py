r"""Trains a method end to end, then evaluates it.

  python -m jaxad.train --config configs/<method>.py --workdir W [--config.k=v]

Re-running the same command resumes from the last checkpoint in W (after a
crash or Ctrl-C) and ends with the same W/eval.json as an uninterrupted run.
"""

import json
import os

import ml_collections as mlc
from absl import app, flags

from jaxad import checkpoint, cli, evaluate, loop, methods, sharding

# Keys that may change between a run and its resumption.
_RESUMABLE_CHANGES = (
  "train.log_every",
  "train.checkpoint_every",
  "train.steps_per_call",
  "data.cache_dir",
  "eval.batch_size",
)
# Keys added after runs were written without them, with the value that
# reproduces what those runs did: resuming such a run is allowed.
_ADDED_KEYS = {"model.compute_dtype": "float32"}


def _check_config(
  config: mlc.ConfigDict, workdir: str, resumable: tuple[str, ...] = ()
) -> None:
  """Writes W/config.json, or checks that a resumed run uses the same one.

  Args:
    resumable: the method's key prefixes that may differ from the stored
      config (`Method.resumable_changes`), besides `_RESUMABLE_CHANGES`.
  """
  path = os.path.join(workdir, "config.json")
  flat = _flatten(json.loads(config.to_json()))
  if os.path.exists(path):
    with open(path) as f:
      old = _flatten(json.load(f))
    old = {**{k: v for k, v in _ADDED_KEYS.items() if k in flat}, **old}
    diff = sorted(
      k
      for k in set(old) | set(flat)
      if old.get(k) != flat.get(k)
      and k not in _RESUMABLE_CHANGES
      and not k.startswith(resumable or ("\0",))
    )
    if diff:
      raise ValueError(
        f"{workdir} holds a run with a different config ({', '.join(diff)}: "
        f"{[(old.get(k), flat.get(k)) for k in diff]}). Use a new --workdir, "
        "or the same config to resume."
      )
  with open(path, "w") as f:
    json.dump(json.loads(config.to_json()), f, indent=2)


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def stored_config(workdir: str) -> dict:
  """W/config.json flattened ({} when there is none)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return _flatten(json.load(f))


def run(config: mlc.ConfigDict, workdir: str, *, on_step=None) -> dict:
  """Trains (resuming from W's checkpoint), evaluates; returns eval.json."""
  method = methods.get(config.method)
  # A method may refuse a config (e.g. missing pretrained weights)
  # before W/config.json is written, so the fixed command can re-use W.
  method.check_config(config)
  os.makedirs(workdir, exist_ok=True)
  _check_config(
    config, workdir, method.resumable_changes(stored_config(workdir))
  )
  mesh = sharding.make_mesh(config.mesh)
  data = method.load_data(config, workdir)
  phases = loop.compile_phases(
    method.phases(config, data), mesh, config.train.steps_per_call
  )
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    state = ckpt.restore_latest(loop.place(method.init_state(config), mesh))
    state = loop.train(
      state,
      phases,
      workdir=workdir,
      checkpointer=ckpt,
      log_every=config.train.log_every,
      checkpoint_every=config.train.checkpoint_every,
      on_step=on_step,
    )
  finally:
    ckpt.close()
  return evaluate.evaluate(config, workdir, method, state.model(), data, mesh)


def main(argv):
  del argv
  cli.setup_logging()
  sharding.initialize_distributed()
  run(cli.CONFIG.value, cli.WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
