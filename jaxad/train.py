r"""Trains a method end to end, then evaluates it.

  python -m jaxad.train --config configs/<method>.py --workdir W [--config.k=v]

Re-running the same command resumes from the last checkpoint in W (after a
crash or Ctrl-C) and ends with the same W/eval.json as an uninterrupted run.
"""

import os
import sys

import ml_collections as mlc
from absl import app, flags

from jaxad import (
  checkpoint,
  cli,
  configlib,
  evaluate,
  loop,
  methods,
  sharding,
)


def run(config: mlc.ConfigDict, workdir: str, *, on_step=None) -> dict:
  """Trains (resuming from W's checkpoint), evaluates; returns eval.json.

  Everything that can refuse the run (the method's config check, the mesh
  and batch sizes, the data, the score's names) runs before W/config.json
  is written, so the corrected command can re-use W.
  """
  method = methods.get(config.method)
  method.check_config(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.eval.batch_size, mesh, "config.eval.batch_size")
  allowed = method.resumable_changes(configlib.stored_config(workdir))
  configlib.check_workdir(config, workdir, allowed, write=False)
  os.makedirs(workdir, exist_ok=True)
  data = method.load_data(config, workdir)
  phases = loop.compile_phases(
    method.phases(config, data), mesh, config.train.steps_per_call
  )
  if method.trains(config) and not sum(p.phase.num_steps for p in phases):
    raise ValueError(
      f"{config.method}: no training steps (config.epochs={config.epochs})"
    )
  state = loop.place(method.init_state(config), mesh)
  evaluate.check_scores(method, config, state.model(), data, mesh)
  configlib.check_workdir(config, workdir, allowed)
  if not method.trains(config):  # zero-shot / imported: nothing to train
    return evaluate.evaluate(config, workdir, method, state.model(), data, mesh)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    state = loop.train(
      ckpt.restore_latest(state),
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
  try:
    run(cli.CONFIG.value, cli.WORKDIR.value)
  except KeyboardInterrupt:
    # The loop has logged where it stopped and how to resume: no traceback.
    sys.exit(130)


if __name__ == "__main__":
  flags.adopt_module_key_flags(cli)  # --help lists --config, --workdir
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
