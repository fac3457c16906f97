r"""Trains a method end to end, then evaluates it.

  python -m jaxad.train --config configs/<method>.py --workdir W [--config.k=v]

Re-running the same command resumes from the last checkpoint in W (after a
crash, Ctrl-C, SIGTERM or kill -9) and ends with the same W/eval.json as an
uninterrupted run. Ctrl-C and SIGTERM finish the step in flight, save a
checkpoint and exit with 130 and 143 (128 + the signal); a second run on W
is refused (exit 75) while the first holds W/.lock.
"""

import os
import sys

import ml_collections as mlc
from absl import app, flags, logging

from jaxad import (
  checkpoint,
  cli,
  configlib,
  evaluate,
  loop,
  methods,
  preemption,
  seeds,
  sharding,
  storage,
  workdir_lock,
)
from jaxad.data import decode

_SEEDS = flags.DEFINE_string(
  "seeds",
  None,
  "Train one run per seed, e.g. --seeds=0,1,2: W/seed_<s>/ each (config.seed"
  " = s) and W/eval_seeds.json with every metric's mean ± std (jaxad.seeds).",
)


def run(
  config: mlc.ConfigDict,
  workdir: str,
  *,
  on_step=None,
  progress: bool = True,
) -> dict:
  """Trains (resuming from W's checkpoint), evaluates; returns eval.json.

  Called from Python (not `python -m jaxad.train`), it logs the CLI's
  progress lines to stderr unless `progress=False` (`cli.show_progress`).

  Everything that can refuse the run (the method's config check, the mesh
  and batch sizes, another run holding W, the config of W's run or of its
  latest checkpoint, the data, the score's names) runs before W/config.json
  is written, so the corrected command can re-use W; while W holds no
  checkpoint, another config replaces W/config.json.

  Raises:
    workdir_lock.WorkdirBusyError: another process holds W (its PID).
    checkpoint.UnreadableCheckpointError: no checkpoint in W can be read.
    ValueError: a config that W's run (config.json or its latest
      checkpoint's config) was not trained with, or a check above.
    preemption.Stopped: SIGINT/SIGTERM during training, after the
      checkpoint (a KeyboardInterrupt).
  """
  if not flags.FLAGS.is_parsed():  # Python, not the CLI: it sets its own
    cli.show_progress(progress)
  method = methods.get(config.method)
  method.check_config(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.eval.batch_size, mesh, "config.eval.batch_size")
  with workdir_lock.hold(workdir, "jaxad.train"):
    return _run_locked(method, config, workdir, mesh, on_step)


def _run_locked(method, config, workdir, mesh, on_step) -> dict:
  ckpt_dir = os.path.join(workdir, "checkpoints")
  # The config inside the latest checkpoint: W/config.json may be gone.
  saved = checkpoint.saved_config(ckpt_dir)
  if saved is not None and saved[1] is not None:
    flat = configlib.flatten(saved[1])
    configlib.check_against(
      config,
      flat,
      method.resumable_changes(flat),
      f"{ckpt_dir}/{saved[0]} (the run's latest checkpoint)",
    )
  # What W holds under its config: checkpoints, or (a method that does not
  # train) the results; without either, another config may replace it.
  trained = saved is not None or (
    not method.trains(config)
    and storage.path(os.path.join(workdir, "eval.json")).exists()
  )
  allowed = method.resumable_changes(configlib.stored_config(workdir))
  configlib.check_workdir(
    config, workdir, allowed, write=False, trained=trained
  )
  data = method.load_data(config, workdir)
  state = loop.place(method.init_state(config), mesh)
  phases = loop.compile_phases(
    method.phases(config, data),
    mesh,
    config.train.steps_per_call,
    sharding.tree_shardings(state, mesh),
  )
  if method.trains(config) and not sum(p.phase.num_steps for p in phases):
    raise ValueError(
      f"{config.method}: no training steps (config.epochs={config.epochs})"
    )
  evaluate.check_scores(method, config, state.model(), data, mesh)
  configlib.check_workdir(config, workdir, allowed, trained=trained)
  if not method.trains(config):  # zero-shot / imported: nothing to train
    return _evaluate(config, workdir, method, state.model(), data, mesh)
  ckpt = checkpoint.Checkpointer(ckpt_dir, config=configlib.config_dict(config))
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
  return _evaluate(config, workdir, method, state.model(), data, mesh)


def _evaluate(config, workdir, method, model, data, mesh) -> dict:
  """evaluate.evaluate, or {} for data without test images (a `folders`
  root without test/: trained and saved, nothing to score yet)."""
  if not len(data.test):
    logging.warning(
      "%s has no test images: trained and saved in %s; evaluation skipped"
      " (add the test split, then run python -m jaxad.evaluate)",
      data.name,
      workdir,
    )
    return {}
  return evaluate.evaluate(config, workdir, method, model, data, mesh)


# Exit statuses of `python -m jaxad.train` besides 0 (done) and 1 (an
# error, with its message): a run stopped by a signal exits 128 + its
# number after saving a checkpoint (the shell's convention; 137 = kill -9,
# which cannot be caught, resumes from the last periodic checkpoint).
EXIT_SIGINT = 130  # Ctrl-C
EXIT_SIGTERM = 143  # SIGTERM: a scheduler, a preemptible VM, `kill`
EXIT_BUSY = workdir_lock.EXIT_BUSY  # 75: another run holds W; try later


# A config or data mistake (the message names the key or file): one line,
# exit 2.
@cli.user_errors(decode.DataError, FileNotFoundError)
def main(argv):
  del argv
  cli.setup_logging()
  sharding.initialize_distributed()
  try:
    # Unparsed flags: main called from Python (a test), one run.
    seed_list = _SEEDS.value if flags.FLAGS.is_parsed() else None
    if seed_list is None:
      run(cli.CONFIG.value, cli.WORKDIR.value)
    else:
      seeds.run(cli.CONFIG.value, cli.WORKDIR.value, seeds.parse(seed_list))
  except KeyboardInterrupt as e:
    # The loop has logged where it stopped and how to resume: no traceback.
    sys.exit(preemption.exit_code(e))
  except workdir_lock.WorkdirBusyError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BUSY)
  except checkpoint.UnreadableCheckpointError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  flags.adopt_module_key_flags(cli)  # --help lists --config, --workdir
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=cli.parse_flags)
