"""Checkpoints: an orbax CheckpointManager over the trainable state.

Only the state's pytree fields are written (steps, parameters, BatchNorm
statistics, optimizer state); static fields (graph definitions, optimizers)
and frozen networks are rebuilt from the config: a method keeps a frozen
network (e.g. a pretrained one) in a state field named `frozen`, which is
never written and always comes from the template. Restoring takes a freshly
initialised state as the template, so shapes, dtypes and shardings come from
the current config and mesh.
"""

import os

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Saves every few steps (asynchronously) and restores the latest."""

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self._manager = ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True
      ),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state) -> None:
    tree = _trainable(flax.serialization.to_state_dict(state))
    self._manager.save(step, args=ocp.args.StandardSave(tree))

  def restore_latest(self, template):
    """Returns `template` with the latest checkpoint's values, or itself.

    A checkpoint may lack parts of the template: a stage added to a finished
    run (a later stage added to a finished run) starts from the
    template's fresh initialisation, and is logged as such. Anything the
    template lacks, or a shape that differs, is an error.
    """
    step = self.latest_step()
    if step is None:
      return template
    # A checkpoint written on another device layout (trained on 8 GPUs,
    # scored on a laptop) restores onto one local device; `_merge` then
    # moves every array to the template's sharding.
    saved = self._manager.restore(
      step,
      args=ocp.args.StandardRestore(
        fallback_sharding=jax.sharding.SingleDeviceSharding(
          jax.local_devices()[0]
        )
      ),
    )
    fresh = []
    full = flax.serialization.to_state_dict(template)
    merged = _merge(_trainable(full), saved, "", fresh)
    if FROZEN in full:
      merged[FROZEN] = full[FROZEN]
    if fresh:
      logging.info("Not in the checkpoint, freshly initialised: %s", fresh)
    logging.info(
      "Restored checkpoint of step %d from %s", step, self._manager.directory
    )
    return flax.serialization.from_state_dict(template, merged)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


FROZEN = "frozen"


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
