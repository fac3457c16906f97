"""Checkpoints: an orbax CheckpointManager over the trainable state.

Only the state's pytree fields are written (steps, parameters, BatchNorm
statistics, optimizer state); static fields (graph definitions, optimizers)
and frozen networks are rebuilt from the config. Restoring takes a freshly
initialised state as the template, so shapes, dtypes and shardings come from
the current config and mesh.
"""

import os

import flax
import jax
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
    tree = flax.serialization.to_state_dict(state)
    self._manager.save(step, args=ocp.args.StandardSave(tree))

  def restore_latest(self, template):
    """Returns `template` with the latest checkpoint's values, or itself."""
    step = self.latest_step()
    if step is None:
      return template
    tree = flax.serialization.to_state_dict(template)
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree,
    )
    restored = self._manager.restore(
      step, args=ocp.args.StandardRestore(abstract)
    )
    logging.info(
      "Restored checkpoint of step %d from %s", step, self._manager.directory
    )
    return flax.serialization.from_state_dict(template, restored)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
