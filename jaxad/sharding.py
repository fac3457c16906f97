"""Device mesh and shardings: a `member` axis and a `data` axis.

The mesh is (member, data) over every device of every host (`config.mesh`):

* batches are split over `data` (and repeated on every member group);
* member-stacked pytrees (an ensemble's K networks, every leaf [K, ...]:
  parameters, BatchNorm statistics, optimizer moments, per-member outputs)
  split their leading axis over `member`: each member group holds K / member
  networks and trains them on its own devices;
* everything else (other networks, small device-resident datasets) is
  replicated.

jit then runs one SPMD program. BatchNorm statistics and gradients are
reduced over `data` by XLA, so a sharded step computes the numbers of the
single-device step up to float32 rounding (the summation order of the
reductions changes). The members of an ensemble are independent, so the
`member` axis carries no traffic but the metrics.

An ensemble method uses three helpers: `place_members` in its `init_state`
(the loop keeps that split: `tree_shardings`), `over_members` to run its
per-member step or forward on each device's own members, and
`check_members` before compute.
"""

import itertools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxad import config_checks

MEMBER_AXIS = "member"
DATA_AXIS = "data"


def initialize_distributed() -> None:
  """Joins a multi-process job when JAXAD_DISTRIBUTED=1.

  `jax.distributed.initialize()` must run before any other JAX call in every
  process; it is gated on JAXAD_DISTRIBUTED=1 (set by `tpu_scripts/tpu.sh`
  and `scripts/multi_gpu.sh`) so single-host runs never wait for a
  coordinator. On Cloud TPU, Slurm and Open MPI JAX finds the coordinator,
  the process count and this process's id itself. Elsewhere (several GPU
  hosts) JAX reads the coordinator's host:port from JAX_COORDINATOR_ADDRESS,
  and jaxad passes JAXAD_NUM_PROCESSES and JAXAD_PROCESS_ID.

  Raises:
    ValueError: JAXAD_NUM_PROCESSES or JAXAD_PROCESS_ID not an integer.
  """
  if os.environ.get("JAXAD_DISTRIBUTED") != "1":
    return
  kwargs = {}
  for env, arg in (
    ("JAXAD_NUM_PROCESSES", "num_processes"),
    ("JAXAD_PROCESS_ID", "process_id"),
  ):
    value = os.environ.get(env, "")
    if value:
      if not value.isdigit():
        raise ValueError(f"{env}={value!r} must be a non-negative integer")
      kwargs[arg] = int(value)
  jax.distributed.initialize(**kwargs)


def mesh_shape(
  mesh_config: mlc.ConfigDict, num_devices: int
) -> tuple[int, int]:
  """(member, data) sizes from `config.mesh`.

  Args:
    mesh_config: `config.mesh`: `data` (devices per member group, -1: all
      the devices left) and `member` (member groups; absent: 1).
    num_devices: devices of the job (all hosts).

  Raises:
    ValueError: a size below 1 (data may be -1), or member x data not
      dividing the devices; the message names both keys.
  """
  member = mesh_config.get("member", 1)
  data = mesh_config.data
  if not isinstance(member, int) or member < 1 or num_devices % member:
    raise ValueError(
      f"config.mesh.member={member!r} must be a positive divisor of the "
      f"{num_devices} devices"
    )
  if data == -1:
    data = num_devices // member
  if not isinstance(data, int) or data < 1 or num_devices % (member * data):
    raise ValueError(
      f"config.mesh.member={member} x config.mesh.data={mesh_config.data} "
      f"devices must divide the {num_devices} devices (data=-1: all the "
      "devices left)"
    )
  return member, data


def make_mesh(mesh_config: mlc.ConfigDict) -> jax.sharding.Mesh:
  """The (member, data) mesh of `config.mesh` (see `mesh_shape`).

  `member` is the outer axis, so the devices of one member group (which
  all-reduce gradients every step) are neighbours: one host, or one
  TPU/NVLink island, when the groups fit in one.
  """
  member, data = mesh_shape(mesh_config, jax.device_count())
  # Auto axes: jit propagates shardings from the inputs and constraints.
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh(
    (member, data),
    (MEMBER_AXIS, DATA_AXIS),
    devices=jax.devices()[: member * data],
    axis_types=(auto, auto),
  )


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def member_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (member) axis split over `member`, the rest replicated."""
  return NamedSharding(mesh, P(MEMBER_AXIS))


def check_batch(batch_size: int, mesh: jax.sharding.Mesh, key: str) -> None:
  n = mesh.shape[DATA_AXIS]
  if batch_size % n:
    raise ValueError(
      f"{key}={batch_size} must be divisible by the {n} "
      f"devices of the mesh's data axis"
    )


def check_members(
  num_members: int, mesh_config: mlc.ConfigDict, key: str
) -> None:
  """Raises ConfigError (a ValueError) unless `config.mesh.member` divides
  the members.

  Args:
    num_members: K, the networks of one member-stacked pytree.
    mesh_config: `config.mesh`.
    key: the config key of K, e.g. "config.model.num_members".
  """
  member = mesh_config.get("member", 1)
  if num_members % member:
    raise config_checks.ConfigError(
      f"{key}={num_members} must be divisible by config.mesh.member="
      f"{member}: every device of the member axis holds the same number "
      "of members"
    )


def place_members(tree, mesh: jax.sharding.Mesh):
  """`tree` (every leaf [K, ...]) on `mesh`, split over `member`.

  An ensemble's `init_state` places its member-stacked networks with this;
  the loop's placement (`tree_shardings`) keeps the split.

  Raises:
    ValueError: a leaf without a leading axis divisible by the member axis.
  """
  n = mesh.shape[MEMBER_AXIS]
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shape = jax.numpy.shape(leaf)
    if not shape or shape[0] % n:
      raise ValueError(
        f"member-stacked leaf {jax.tree_util.keystr(path)} has shape "
        f"{shape}: its leading axis must be divisible by the {n} devices "
        "of the mesh's member axis (config.mesh.member)"
      )
  return put(tree, member_sharded(mesh))


def put(tree, shardings):
  """`jax.device_put(tree, shardings)` that also works across processes.

  In a multi-process job the mesh spans devices this process cannot
  address, and `jax.device_put` refuses an array committed to a local
  device for such a sharding. Every process computes the same values (the
  same seeds, the same host data), so each places a host copy and keeps
  only its own devices' shards. A leaf that already spans the processes
  (placed earlier) is resharded on the devices.

  Args:
    tree: a pytree of arrays (jax, numpy) or scalars.
    shardings: a `jax.sharding.Sharding` for every leaf, or a pytree of
      them with `tree`'s structure.

  Returns:
    `tree` with every leaf a jax.Array of its sharding.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)

  def one(leaf, target):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return jax.device_put(leaf, target)
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
      # Typed PRNG keys have no host copy: their key data has one.
      data = one(jax.random.key_data(leaf), target)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    return jax.device_put(np.asarray(leaf), target)

  return jax.tree.map(one, tree, shardings)


_barriers = itertools.count()


def sync_processes(name: str, timeout_s: int = 24 * 3600) -> None:
  """Waits until every process of the job reaches this point (no-op in a
  single-process run).

  Every process must call it at the same points, in the same order. It
  waits through the coordination service (orbax's barrier), not a device
  collective, so a long wait (process 0 preparing a large dataset) is
  bounded by `timeout_s` alone.

  Raises:
    jax.errors.JaxRuntimeError: DEADLINE_EXCEEDED after `timeout_s`
      seconds, or a process of the job has died.
  """
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost  # the import costs ~1 s

  # Barrier names must be unique within a job.
  multihost.sync_global_processes(
    f"jaxad:{name}:{next(_barriers)}",
    timeout=timeout_s,
    processes=set(range(jax.process_count())),
  )


def _member_split(leaf) -> bool:
  sharding = getattr(leaf, "sharding", None)
  return (
    isinstance(sharding, NamedSharding)
    and len(sharding.spec) > 0
    and sharding.spec[0] == MEMBER_AXIS
  )


def tree_shardings(tree, mesh: jax.sharding.Mesh):
  """Per-leaf shardings on `mesh` for placing a state or resident inputs.

  A leaf already split over `member` (`place_members`) keeps that split on
  `mesh`; every other leaf (host arrays, single-device arrays, anything
  else) is replicated. A method thus chooses its shardings through
  `place_members`, and the code that places its state needs no method
  names.

  Returns:
    A pytree of NamedSharding with `tree`'s structure.
  """
  return jax.tree.map(
    lambda leaf: (
      member_sharded(mesh) if _member_split(leaf) else replicated(mesh)
    ),
    tree,
  )


def member_axis_size() -> int:
  """Size of the `member` axis of the mesh in context (1 without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  return mesh.shape.get(MEMBER_AXIS, 1)


def over_members(
  fn: Callable[..., Any],
  members: Sequence[Any],
  shared: Sequence[Any] = (),
):
  """`fn(*members, *shared)` on each device's own members.

  Under a mesh (`jax.set_mesh`) whose `member` axis has n > 1 devices, fn
  runs in `jax.shard_map` manual over `member` only: each member group
  sees the [K / n, ...] slice of every `members` pytree and all of
  `shared`, and `data` stays automatic (batches constrained to `data`
  inside fn are still split). Otherwise (n = 1, no mesh: export) fn is
  called on everything.

  Args:
    fn: (*members, *shared) -> pytree whose every leaf has a leading member
      axis (the members fn was given, in order).
    members: pytrees with leading member axis K (parameters, optimizer
      state, per-member PRNG keys), K divisible by n.
    shared: pytrees every member reads (the step, the training images).

  Returns:
    fn's output, [K, ...] leaves, split over `member` when n > 1.
  """
  if member_axis_size() == 1:
    return fn(*members, *shared)
  specs = (P(MEMBER_AXIS),) * len(members) + (P(),) * len(shared)
  return jax.shard_map(
    fn,
    in_specs=specs,
    out_specs=P(MEMBER_AXIS),
    axis_names={MEMBER_AXIS},
  )(*members, *shared)
