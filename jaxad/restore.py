"""A trained run restored from its workdir, for scoring: the method, its
trained model and the mesh (`trained`), and where results on other data go
(`output_dir`). Used by `jaxad.evaluate` and `jaxad.load`."""

import os

import ml_collections as mlc

from jaxad import checkpoint, configlib, loop, methods, sharding


def run_config(workdir: str) -> dict:
  """The flattened config W's run was trained with: the config inside W's
  latest checkpoint (it survives a deleted W/config.json), else
  W/config.json; {} when W has neither."""
  saved = checkpoint.saved_config(os.path.join(workdir, "checkpoints"))
  if saved is not None and saved[1] is not None:
    return configlib.flatten(saved[1])
  return configlib.stored_config(workdir)


def output_dir(config: mlc.ConfigDict, workdir: str) -> str:
  """Where `jaxad.evaluate` writes: W for the run's own data; for other
  data (`configlib.other_data_keys`), W/eval_<name>-<hash>/
  (`configlib.eval_dir_name`), so that W/eval.json stays the run's."""
  if not configlib.other_data_keys(config, run_config(workdir)):
    return workdir
  return os.path.join(workdir, configlib.eval_dir_name(config))


def run_dir(folder: str) -> str:
  """The trained run a results folder belongs to (the inverse of
  `output_dir`): `folder` itself, or W for a re-score folder
  W/eval_<name>-<hash>/, which holds an evaluation's config, eval.json and
  data records but no config.json or checkpoint of its own."""
  folder = folder.rstrip("/") or folder
  parent = os.path.dirname(folder)
  if (
    os.path.basename(folder).startswith(configlib.EVAL_DIR_PREFIX)
    and not configlib.stored_config(folder)
    and configlib.stored_config(parent)
  ):
    return parent
  return folder


def trained(config: mlc.ConfigDict, workdir: str):
  """The method, its trained `Model` from W's latest checkpoint, the mesh.

  `config` is checked against the run's config (the one inside W's latest
  checkpoint, and W/config.json): it may differ in what re-scoring may change
  (`Method.rescoring_changes`, `configlib.RESCORING_CHANGES`, the mesh),
  what resuming may, and the data scored (`configlib.other_data_keys`);
  not in anything the checkpoint lacks (a part the run never trained).

  Raises:
    FileNotFoundError: W has no checkpoint.
    ValueError: `config` differs from the run's in another key, has
      parts the checkpoint lacks (e.g. `refine.enabled=True` on a run
      trained without refinement), or data the run makes invalid
      (`Method.check_scoring_data`).
    checkpoint.UnreadableCheckpointError: no checkpoint in W can be read.
  """
  mesh = sharding.make_mesh(config.mesh)
  method = methods.get(config.method)
  method.check_config(config)
  rescoring = (
    method.rescoring_changes() + configlib.RESCORING_CHANGES + ("mesh.",)
  )

  def allowed(stored: dict) -> tuple[str, ...]:
    return (
      method.resumable_changes(stored)
      + rescoring
      + configlib.other_data_keys(config, stored)
    )

  stored = configlib.stored_config(workdir)
  if not method.trains(config):  # zero-shot / imported: nothing to restore
    configlib.check_workdir(config, workdir, allowed(stored), write=False)
    return method, loop.place(method.init_state(config), mesh).model(), mesh
  directory = os.path.join(workdir, "checkpoints")
  found = checkpoint.saved_config(directory)
  if found is None:
    raise FileNotFoundError(
      f"No checkpoint in {directory}: train first with python -m jaxad.train"
    )
  step, saved = found
  if saved is not None:  # the config it was trained with
    saved = configlib.flatten(saved)
    where = f"{directory}/{step} (the run's latest checkpoint)"
    configlib.check_against(config, saved, allowed(saved), where)
  configlib.check_workdir(config, workdir, allowed(stored), write=False)
  method.check_scoring_data(config, saved if saved is not None else stored)
  ckpt = checkpoint.Checkpointer(directory, read_only=True)
  try:
    # A part of this config the checkpoint lacks was never trained: an
    # error, not a freshly initialised network scored.
    state = ckpt.restore_latest(
      loop.place(method.init_state(config), mesh), allow_untrained=False
    )
  finally:
    ckpt.close()
  return method, state.model(), mesh
