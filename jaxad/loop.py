"""The shared training loop: phases of jitted steps, logging, checkpoints.

Every method hands the loop a list of `Phase`s. The loop runs their steps
back to back with a global step counter (so a resumed run knows which phase
it is in), and only talks to the host every `log_every` steps: metrics stay
on the device until then, so dispatch runs ahead of compute. At each log it
checks for NaN/Inf, prints step, loss, throughput and ETA, and appends a line
to WORKDIR/metrics.jsonl. Checkpoints are written every `checkpoint_every`
steps, at the end of each phase and on Ctrl-C or SIGTERM (`preemption`),
and never from a non-finite state, so the last good checkpoint survives a
divergence. The ETA prices each phase at its own measured speed (`eta`).
"""

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxad import checkpoint, eta, preemption, sharding, storage
from jaxad.methods import api
from jaxad.models import block_barrier


@dataclasses.dataclass(frozen=True)
class CompiledPhase:
  """A method's `api.Phase` as the loop runs it: jitted, state-donating
  steps that advance the global step, and the placed inputs."""

  phase: api.Phase
  step_fn: Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]]
  # `steps_per_call` steps per call (see `jit_steps`); None when 1.
  multi_step_fn: Callable[[Any, Any], tuple[Any, dict]] | None
  steps_per_call: int
  inputs: Any  # placed `phase.inputs` (None for a host-batch phase)
  mesh: jax.sharding.Mesh

  def next_inputs(self, batches: Iterator | None):
    """The inputs of the next step: resident, or the next host batch.

    Raises:
      ValueError: the iterator ended early, or a leaf of the batch has no
        leading axis of the phase's `batch_size`.
    """
    if batches is None:
      return self.inputs
    name, b = self.phase.name, self.phase.batch_size
    try:
      batch = next(batches)
    except StopIteration:
      raise ValueError(
        f"Phase {name!r}: its batches iterator ended before the phase's "
        f"{self.phase.num_steps} steps"
      ) from None
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
      if np.ndim(leaf) == 0 or np.shape(leaf)[0] != b:
        raise ValueError(
          f"Phase {name!r}: batch leaf {jax.tree_util.keystr(path)} has "
          f"shape {np.shape(leaf)}; every leaf needs a leading axis of "
          f"batch_size={b}"
        )
    # `sharding.put`: in a multi-process job each process places its own
    # devices' shards of the (same) global batch.
    return sharding.put(batch, sharding.batch_sharded(self.mesh))

  def with_derived(self, state) -> "CompiledPhase":
    """This phase with `phase.derive`'s inputs added (itself without one).

    Called once per run before the phase's first step; logs what was
    derived, its size and time (it may take minutes: e.g. a frozen
    network over a whole resident pool).
    """
    derive = self.phase.derive
    if derive is None:
      return self
    start = time.perf_counter()
    with jax.set_mesh(self.mesh):
      derived = derive(state, self.inputs, self.mesh)
    derived = place(derived, self.mesh)
    jax.block_until_ready(derived)
    logging.info(
      "Phase %s: derived %s (%.1f MB per device) in %.1f s with compiling",
      self.phase.name,
      ", ".join(f"{k} {list(v.shape)}" for k, v in derived.items()),
      sum(v.nbytes for v in derived.values()) / 1e6,
      time.perf_counter() - start,
    )
    return dataclasses.replace(self, inputs={**self.inputs, **derived})


def place(tree, mesh: jax.sharding.Mesh):
  """`tree` on `mesh`: leaves a method split over the `member` axis
  (`sharding.place_members`) stay split, the rest is replicated."""
  # `sharding.put`, not jax.device_put: in a multi-process job a leaf on a
  # local device is placed from its host copy.
  return sharding.put(tree, sharding.tree_shardings(tree, mesh))


def compile_phase(
  phase: api.Phase,
  start: int,
  mesh: jax.sharding.Mesh,
  steps_per_call: int,
  state_shardings=None,
) -> CompiledPhase:
  """Wraps `phase.step_fn` into the loop's jitted steps.

  Args:
    start: the global step at which the phase starts; the step function
      gets `state.step - start` as its phase-local step.
    steps_per_call: steps per jitted call (1 for host-batch phases, whose
      every step needs a new input).
    state_shardings: the state's shardings (`sharding.tree_shardings` of
      the placed state), kept by every step; None: replicated.
  """
  sharding.check_batch(phase.batch_size, mesh, f"config.{phase.batch_key}")
  if (phase.inputs is None) == (phase.batches is None):
    raise ValueError(
      f"Phase {phase.name!r}: give exactly one of inputs and batches"
    )
  if phase.derive is not None and not isinstance(phase.inputs, dict):
    raise ValueError(f"Phase {phase.name!r}: derive needs dict inputs")

  def step(state, inputs):
    new, metrics = phase.step_fn(state, inputs, state.step - start)
    return new.replace(step=state.step + 1), metrics

  if phase.batches is not None:
    steps_per_call = 1
  single, multi = jit_steps(
    step,
    steps_per_call=steps_per_call,
    out_shardings=(
      sharding.replicated(mesh) if state_shardings is None else state_shardings,
      sharding.replicated(mesh),  # the metrics
    ),
  )
  inputs = None if phase.inputs is None else place(phase.inputs, mesh)
  return CompiledPhase(phase, single, multi, steps_per_call, inputs, mesh)


def compile_phases(
  phases: list[api.Phase],
  mesh: jax.sharding.Mesh,
  steps_per_call: int,
  state_shardings=None,
) -> list[CompiledPhase]:
  """`compile_phase` of each phase, with its global start step."""
  out, start = [], 0
  for phase in phases:
    out.append(
      compile_phase(phase, start, mesh, steps_per_call, state_shardings)
    )
    start += phase.num_steps
  return out


def repeat_steps(step: Callable, num_steps: int, *, unroll: bool) -> Callable:
  """`step` run `num_steps` times in one program.

  Returns:
    (state, inputs) -> (state, metrics averaged over the steps).
  """

  def run(state, inputs):
    def body(state, _):
      return step(state, inputs)

    state, metrics = jax.lax.scan(
      body, state, None, length=num_steps, unroll=num_steps if unroll else 1
    )
    return state, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)

  return run


def jit_steps(step: Callable, *, steps_per_call: int, out_shardings):
  """The jitted, state-donating (single step, multi-step or None) pair.

  Several steps per call keep Python out of the hot loop where dispatch
  dominates (small models on GPU/TPU). On XLA CPU a convolution inside a
  while loop runs about 30x slower (PERFORMANCE.md), so there the steps are
  unrolled instead of scanned. On CPU both compile with
  `block_barrier.compiler_options()`, so they cannot be called inside
  another jit there (jax refuses nested compiler options): nest `step`
  itself (`fn.__wrapped__`).
  """
  if steps_per_call < 1:
    raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call}")

  def jit(fn):
    return jax.jit(
      fn,
      donate_argnums=0,
      out_shardings=out_shardings,
      compiler_options=block_barrier.compiler_options(),
    )

  multi = None
  if steps_per_call > 1:
    unroll = jax.default_backend() == "cpu"
    multi = jit(repeat_steps(step, steps_per_call, unroll=unroll))
  return jit(step), multi


def _call_fits(step: int, k: int, end: int, *cadences: int) -> bool:
  """Whether k steps from `step` stay within the phase and cross no log or
  checkpoint boundary (landing on one is fine)."""
  return step + k <= end and all(
    (step // c + 1) * c >= step + k for c in cadences
  )


def _keep_metrics_until(path: str, step: int) -> None:
  """Drops metrics.jsonl records after `step`: a resumed run logs the steps
  after its checkpoint again."""
  if jax.process_index() or (text := storage.read_text(path)) is None:
    return
  lines = text.splitlines(keepends=True)
  kept = [line for line in lines if json.loads(line)["step"] <= step]
  if len(kept) != len(lines):
    storage.write_text(path, "".join(kept))


class NonFiniteError(FloatingPointError):
  """Raised when a loss or the parameters become NaN/Inf."""


@jax.jit
def _all_finite(tree) -> jax.Array:
  flags = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(x.dtype, jnp.floating)
  ]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def _alive(tree) -> bool:
  """False if a step was interrupted after its inputs were donated."""
  return not any(x.is_deleted() for x in jax.tree.leaves(tree))


def train(
  state,
  phases: list[CompiledPhase],
  *,
  workdir: str,
  checkpointer: checkpoint.Checkpointer,
  log_every: int,
  checkpoint_every: int,
  on_step: Callable[[int], None] | None = None,
):
  """Runs the phases from `state.step` on; returns the final state.

  Args:
    state: the method's state (restored or fresh), placed by `place`;
      `state.step` is the global step.
    phases: from `compile_phases`; phase i covers global steps
      [sum(n_<i), sum(n_<=i)).
    on_step: called with the global step after each dispatched step (tests
      use it to interrupt a run).
  """
  total = sum(p.phase.num_steps for p in phases)
  step = int(state.step)
  names = [p.phase.name for p in phases]
  ends = list(np.cumsum([p.phase.num_steps for p in phases]))
  clock = eta.StepClock(len(phases))
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  _keep_metrics_until(metrics_path, step)
  start = 0
  stop = preemption.StopOnSignal()
  try:
    stop.__enter__()
    for i, compiled in enumerate(phases):
      phase = compiled.phase
      end = start + phase.num_steps
      if step >= end:
        start = end
        continue
      logging.info(
        "Phase %s: steps %d..%d of %d (batch %d%s)",
        phase.name,
        step,
        end,
        total,
        phase.batch_size,
        f" x {phase.members} members" if phase.members > 1 else "",
      )
      batches = None if phase.batches is None else phase.batches(step - start)
      compiled = compiled.with_derived(state)
      pending, t_last, step_last = [], time.perf_counter(), step
      k = compiled.steps_per_call
      compiled_fns = set()  # this phase's functions called (compiled) yet
      with jax.set_mesh(compiled.mesh):
        while step < end:
          multi = k > 1 and _call_fits(
            step, k, end, log_every, checkpoint_every
          )
          if multi:
            state, metrics = compiled.multi_step_fn(state, compiled.inputs)
            pending.append((metrics, k))
            step += k
          else:
            inputs = compiled.next_inputs(batches)
            state, metrics = compiled.step_fn(state, inputs)
            pending.append((metrics, 1))
            step += 1
          if multi not in compiled_fns:  # its compile: not a step's time
            compiled_fns.add(multi)
            jax.block_until_ready(state)
            clock.restart(step)
          if on_step is not None:
            on_step(step)
          signum = _agreed_stop(stop, step, log_every)
          if signum:
            raise preemption.Stopped(signum)
          last = step == end
          if step % log_every == 0 or last:
            # Timed once the steps ran, not when they were dispatched.
            jax.block_until_ready([m for m, _ in pending])
            clock.lap(i, step)
            left = [
              max(0, e - max(step, e - p.phase.num_steps))
              for e, p in zip(ends, phases, strict=True)
            ]
            _log(
              phase,
              step,
              total,
              clock.eta(names, left),
              pending,
              t_last,
              step_last,
              metrics_path,
              checkpointer,
            )
            pending, t_last, step_last = [], time.perf_counter(), step
          if step % checkpoint_every == 0 or last:
            _save(checkpointer, step, state)
      start = end
  except KeyboardInterrupt as e:
    saved = _alive(state) and int(state.step) == step
    if saved and step > (checkpointer.latest_step() or 0):
      _save(checkpointer, step, state)
      checkpointer.wait()
    how = (
      f"{e.args[0]} at step {step}"
      if isinstance(e, preemption.Stopped)
      else f"Interrupted at step {step}"
    )
    logging.warning(
      "%s; %s. Re-run the same command to resume.",
      how,
      f"checkpoint of step {step} in {workdir}"
      if saved
      else f"the step in flight was lost; the last checkpoint is step "
      f"{checkpointer.latest_step()}",
    )
    raise
  finally:
    stop.__exit__()
    checkpointer.wait()
  return state


def _log(
  phase, step, total, eta_text, pending, t_last, step_last, path, checkpointer
):
  # The one host sync per log interval; (metrics, number of steps) pairs.
  host = jax.device_get([m for m, _ in pending])
  weights = [n for _, n in pending]
  for k, v in host[0].items():
    if np.ndim(v):
      raise ValueError(
        f"Phase {phase.name!r}: metric {k!r} has shape {np.shape(v)}; a "
        "step's metrics must be scalars"
      )
  mean = {
    k: float(np.average([m[k] for m in host], weights=weights)) for k in host[0]
  }
  bad = {k: v for k, v in mean.items() if not np.isfinite(v)}
  if bad:
    raise NonFiniteError(
      f"Non-finite metrics {bad} in phase {phase.name} by step {step}. "
      f"Training stopped; the last good checkpoint (step "
      f"{checkpointer.latest_step()}) is kept. Lower the learning rate or "
      "check the input data."
    )
  dt = max(time.perf_counter() - t_last, 1e-9)
  images_per_s = (step - step_last) * phase.batch_size / dt
  losses = " ".join(f"{k}={v:.5f}" for k, v in mean.items() if "loss" in k)
  rate = f"{images_per_s:.0f} img/s"
  # seconds: the interval's wall-clock (eval.json's run.seconds sums them).
  record = dict(
    step=step, phase=phase.name, images_per_s=images_per_s, seconds=dt
  )
  if phase.members > 1:
    rate += f" ({images_per_s * phase.members:.0f} member-img/s)"
    record["member_images_per_s"] = images_per_s * phase.members
  logging.info(
    "[%s] step %d/%d %s | %s | ETA %s",
    phase.name,
    step,
    total,
    losses,
    rate,
    eta_text,
  )
  if jax.process_index() == 0:
    storage.append_line(path, json.dumps(record | mean))


def _agreed_stop(stop, step: int, log_every: int) -> int:
  """The signal to stop on after `step` (0: go on).

  In a multi-process job every process must stop after the same step: one
  that stopped alone would leave the others waiting in the next step's
  collectives, and its checkpoint (saved by all processes together) would
  never complete. The processes agree at log boundaries, where the loop
  waits for the devices anyway: a signal to any process stops them all
  there, at most `log_every` steps after it.
  """
  if jax.process_count() == 1:
    return stop.signum if stop.requested else 0
  if step % log_every:
    return 0
  from jax.experimental import multihost_utils

  mine = np.int32(stop.signum if stop.requested else 0)
  return int(np.max(multihost_utils.process_allgather(mine)))


def _save(checkpointer, step, state):
  if not bool(_all_finite(state)):
    raise NonFiniteError(
      f"The state became non-finite by step {step}; not saving it. The last "
      f"good checkpoint (step {checkpointer.latest_step()}) is kept."
    )
  checkpointer.save(step, state)
