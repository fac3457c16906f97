"""Checkpoints: an orbax CheckpointManager over the trainable state.

Only the state's pytree fields are written (steps, parameters, BatchNorm
statistics, optimizer state); static fields (graph definitions, optimizers)
and frozen networks are rebuilt from the config: a method keeps a frozen
network (e.g. a pretrained one) in a state field named `frozen`, which is
never written and always comes from the template. Restoring takes a freshly
initialised state as the template, so shapes, dtypes and shardings come from
the current config and mesh.

Each step folder holds two orbax items: `default` (the state; the name
orbax gives a single-item checkpoint, so runs written before the config
item restore as they are) and `config` (the run's config as JSON), so a
checkpoint says which config trained it even when W/config.json is gone.
A step that cannot be read (a truncated or missing file) is moved to
`<directory>_unreadable/<step>` and the previous one restored, with a
warning; when none can be read, the error says which folder to delete.
"""

import logging as logging_std
import os
import sys
import traceback

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from jaxad import sharding, storage

STATE_ITEM = "default"
CONFIG_ITEM = "config"


class UnreadableCheckpointError(RuntimeError):
  """No checkpoint of a run can be read; the message names what to delete."""


def _item_handlers() -> dict:
  return {
    STATE_ITEM: ocp.StandardCheckpointHandler(),
    CONFIG_ITEM: ocp.JsonCheckpointHandler(),
  }


def _drop_read_only_notice(record: logging_std.LogRecord) -> bool:
  # orbax warns "Given directory is read only" on every read-only manager.
  return "Given directory is read only" not in record.getMessage()


class _AbortedReadNoise(logging_std.Filter):
  """asyncio's "... exception was never retrieved" for orbax's reads."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    text = record.getMessage()
    if "exception was never retrieved" not in text:
      return True
    tb = record.exc_info[2] if record.exc_info else None
    files = [frame.filename for frame in traceback.extract_tb(tb)]
    return not any("/orbax/checkpoint/" in f for f in [text, *files])


_quiet = []


def _quiet_aborted_reads() -> None:
  """Keeps a failed restore to the one warning or error jaxad writes.

  When one read of a checkpoint fails (a truncated file), orbax closes its
  event loop while tensorstore's other reads are still in flight; each then
  prints a traceback ("Event loop is closed", a coroutine's or a task's
  error), hundreds of lines for one bad file, some after the restore call
  has returned. Installed once, before the first restore: these filters
  pass on everything but that noise.
  """
  if _quiet:
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    error, obj = unraisable.exc_value, unraisable.object
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      return
    code = getattr(obj, "cr_code", None)  # a coroutine of orbax's
    if code is not None and "/orbax/checkpoint/" in code.co_filename:
      return
    previous(unraisable)

  sys.unraisablehook = hook
  logging_std.getLogger("asyncio").addFilter(_AbortedReadNoise())
  _quiet.append(hook)


def _first_line(error: BaseException, limit: int = 260) -> str:
  """The first line of the error at the root of `error`'s chain (orbax
  wraps tensorstore's, which names the file and byte range)."""
  seen = {id(error)}
  while (cause := error.__cause__ or error.__context__) and id(
    cause
  ) not in seen:
    seen.add(id(cause))
    error = cause
  text = (str(error).strip().splitlines() or [""])[0]
  text = f"{type(error).__name__}: {text}"
  return text if len(text) <= limit else text[: limit - 3] + "..."


class Checkpointer:
  """Saves every few steps (asynchronously) and restores the latest
  readable step."""

  def __init__(
    self,
    directory: str,
    *,
    max_to_keep: int = 2,
    config: dict | None = None,
    read_only: bool = False,
  ):
    """
    Args:
      directory: the checkpoints folder (created if missing, unless
        `read_only`).
      max_to_keep: steps kept; older ones are deleted after a save.
      config: the run's config (`json.loads(config.to_json())`), saved in
        every step as its `config` item; None saves the state alone.
      read_only: restore only, and change nothing in `directory` (no clean
        up, no setting aside): for readers that may run beside training
        (`jaxad.restore.trained`, `jaxad.load`).
    """
    self.directory = storage.absolute(directory)  # local or gs://
    self._config = config
    self._read_only = read_only
    options = ocp.CheckpointManagerOptions(
      # What orbax sets for read_only (it warns about each other value).
      max_to_keep=None if read_only else max_to_keep,
      save_interval_steps=0 if read_only else 1,
      create=not read_only,
      read_only=read_only,
      # The temporary folder of a save cut short (kill -9, preemption);
      # only the run that writes the folder may remove it.
      cleanup_tmp_directories=not read_only,
    )
    absl_logger = logging_std.getLogger("absl")
    absl_logger.addFilter(_drop_read_only_notice)
    try:
      self._manager = ocp.CheckpointManager(
        storage.path(self.directory),
        options=options,
        item_handlers=_item_handlers(),
      )
    finally:
      absl_logger.removeFilter(_drop_read_only_notice)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state) -> None:
    tree = _trainable(flax.serialization.to_state_dict(state))
    items = {STATE_ITEM: ocp.args.StandardSave(tree)}
    if self._config is not None:
      items[CONFIG_ITEM] = ocp.args.JsonSave(self._config)
    self._manager.save(step, args=ocp.args.Composite(**items))

  def saved_config(self) -> tuple[int, dict | None] | None:
    """(step, config dict) of the latest step whose config can be read.

    Returns:
      None without any step; (step, None) for a step written without a
      config item (before configs were saved) or when no step's config
      can be read (restoring then reports the unreadable steps).
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    for step in steps:
      try:
        out = self._manager.restore(
          step, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()})
        )
      except KeyError:  # "Item config was not found": an older checkpoint
        return step, None
      except Exception:  # unreadable: restore_latest says so
        continue
      return step, out[CONFIG_ITEM]
    return (steps[0], None) if steps else None

  def restore_latest(self, template, *, allow_untrained: bool = True):
    """Returns `template` with the latest readable checkpoint's values, or
    `template` itself when there is no checkpoint.

    A checkpoint may lack parts of the template: a stage added to a finished
    run starts from the template's fresh initialisation, and is logged as
    such (with `allow_untrained`; else an error). Anything the template
    lacks, or a shape that differs, is an error. Unreadable steps newer
    than the restored one are named in a warning and (unless read-only)
    moved to `<directory>_unreadable/`, so that training continues from
    the good step.

    Raises:
      UnreadableCheckpointError: no step can be read; the one-line message
        names the folder to delete.
      ValueError: the checkpoint does not fit the template (another
        config), or lacks parts of it and not `allow_untrained`.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return template
    # A checkpoint written on another device layout (trained on 8 GPUs,
    # scored on a laptop) restores onto one local device; `_merge` then
    # moves every array to the template's sharding.
    restore = ocp.args.StandardRestore(
      fallback_sharding=jax.sharding.SingleDeviceSharding(
        jax.local_devices()[0]
      )
    )
    _quiet_aborted_reads()
    bad, saved = [], None
    for step in steps:
      try:
        saved = self._manager.restore(
          step, args=ocp.args.Composite(**{STATE_ITEM: restore})
        )[STATE_ITEM]
        break
      except Exception as e:  # orbax/tensorstore/json errors
        bad.append((step, e))
    if saved is None:
      raise UnreadableCheckpointError(
        f"No checkpoint in {self.directory} can be read (step "
        f"{bad[0][0]}: {_first_line(bad[0][1])}): delete {self.directory} "
        "to train this run from the start"
      )
    if bad:
      self._set_aside(bad, step)
    fresh = []
    full = flax.serialization.to_state_dict(template)
    merged = _merge(_trainable(full), saved, "", fresh)
    if fresh and not allow_untrained:
      raise ValueError(
        f"The checkpoint of step {step} in {self.directory} has no {fresh}: "
        "this config has parts the run did not train (e.g. a stage turned "
        "on after training). Train them first (python -m jaxad.train, same "
        "workdir and config), or use the config the run was trained with"
      )
    if FROZEN in full:
      merged[FROZEN] = full[FROZEN]
    if fresh:
      logging.info("Not in the checkpoint, freshly initialised: %s", fresh)
    logging.info("Restored checkpoint of step %d from %s", step, self.directory)
    return flax.serialization.from_state_dict(template, merged)

  def _set_aside(self, bad: list, good: int) -> None:
    """Moves the unreadable steps out of the manager's folder: left there,
    the manager would take them as the latest and skip the saves of every
    step up to theirs."""
    aside = self.directory + "_unreadable"
    if self._read_only:
      for step, error in bad:
        logging.warning(
          "Checkpoint %s cannot be read (%s); restored step %d instead",
          os.path.join(self.directory, str(step)),
          _first_line(error),
          good,
        )
      return
    for step, error in bad:
      path = os.path.join(self.directory, str(step))
      target = os.path.join(aside, str(step))
      if jax.process_index() == 0:
        n = 0
        while storage.path(target).exists():
          n += 1
          target = os.path.join(aside, f"{step}-{n}")
        # A file in it: a bucket's folder exists only once it holds one.
        storage.write_text(os.path.join(aside, "README.txt"), _ASIDE_NOTE)
        storage.path(path).rename(target)
      logging.warning(
        "Checkpoint %s cannot be read (%s); moved it to %s and restored "
        "step %d instead",
        path,
        _first_line(error),
        target,
        good,
      )
    # Every process restores at the same point and finds the same steps
    # unreadable (a step process 0 moved is missing for the others): none
    # may list the steps again before the moves are done.
    sharding.sync_processes("set aside unreadable checkpoints")
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def saved_config(directory: str) -> tuple[int, dict | None] | None:
  """`Checkpointer.saved_config` of `directory`; None when it does not
  exist (nothing is created)."""
  if not storage.path(directory).is_dir():
    return None
  ckpt = Checkpointer(directory, read_only=True)
  try:
    return ckpt.saved_config()
  finally:
    ckpt.close()


FROZEN = "frozen"

_ASIDE_NOTE = (
  "Checkpoint steps of this run that could not be read, moved here by\n"
  "jaxad so that training resumed from the last readable step. Safe to\n"
  "delete.\n"
)


def _trainable(tree: dict) -> dict:
  """The state dict without its frozen networks."""
  return {k: v for k, v in tree.items() if k != FROZEN}


def _merge(template, saved, path, fresh):
  """`template`'s structure with `saved`'s values, placed like template's."""
  if isinstance(template, dict):
    if not isinstance(saved, dict):
      raise ValueError(f"Checkpoint has a leaf at {path!r}, expected a tree")
    extra = sorted(set(saved) - set(template))
    if extra:
      raise ValueError(
        f"Checkpoint has {extra} under {path or '/'!r}, which this config "
        "does not; use the config the run was trained with"
      )
    out = {}
    for key, value in template.items():
      sub = f"{path}/{key}"
      if key in saved:
        out[key] = _merge(value, saved[key], sub, fresh)
      else:
        fresh.append(sub)
        out[key] = value
    return out
  if isinstance(saved, dict) or np.shape(saved) != np.shape(template):
    raise ValueError(
      f"Checkpoint {path!r} has shape {np.shape(saved)}, this config "
      f"expects {np.shape(template)}"
    )
  return jax.device_put(
    np.asarray(saved, dtype=template.dtype), template.sharding
  )
