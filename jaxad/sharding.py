"""Device mesh and shardings: one `data` axis over every device of every host.

Parameters (and small device-resident datasets) are replicated, batches are
split over `data`. jit then runs one SPMD program; BatchNorm statistics and
gradients are reduced across devices by XLA, so a sharded step computes the
same numbers as the single-device step.
"""

import os

import jax
import ml_collections as mlc
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def initialize_distributed() -> None:
  """Joins a multi-host job when `tpu_scripts/run.sh` asks for it.

  `jax.distributed.initialize()` must run before any other JAX call on every
  host; it is gated on JAXAD_DISTRIBUTED=1 so single-host runs never wait
  for a coordinator.
  """
  if os.environ.get("JAXAD_DISTRIBUTED") == "1":
    jax.distributed.initialize()


def make_mesh(mesh_config: mlc.ConfigDict) -> jax.sharding.Mesh:
  """Builds the mesh from `config.mesh` (`data=-1`: all devices)."""
  n = mesh_config.data
  if n == -1:
    n = jax.device_count()
  if n < 1 or jax.device_count() % n:
    raise ValueError(
      f"config.mesh.data={mesh_config.data} does not divide "
      f"the {jax.device_count()} devices"
    )
  # Auto axes: jit propagates shardings from the inputs and constraints.
  return jax.make_mesh(
    (n,),
    ("data",),
    devices=jax.devices()[:n],
    axis_types=(jax.sharding.AxisType.Auto,),
  )


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`."""
  return NamedSharding(mesh, P("data"))


def check_batch(batch_size: int, mesh: jax.sharding.Mesh, key: str) -> None:
  n = mesh.shape["data"]
  if batch_size % n:
    raise ValueError(
      f"{key}={batch_size} must be divisible by the {n} "
      f"devices of the mesh's data axis"
    )
