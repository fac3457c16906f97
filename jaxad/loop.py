"""The shared training loop: phases of jitted steps, logging, checkpoints.

Every method hands the loop a list of `Phase`s. The loop runs their steps
back to back with a global step counter (so a resumed run knows which phase
it is in), and only talks to the host every `log_every` steps: metrics stay
on the device until then, so dispatch runs ahead of compute. At each log it
checks for NaN/Inf, prints step, loss, throughput and ETA, and appends a line
to WORKDIR/metrics.jsonl. Checkpoints are written every `checkpoint_every`
steps, at the end of each phase and on Ctrl-C, and never from a non-finite
state, so the last good checkpoint survives a divergence.
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

from jaxad import checkpoint, sharding
from jaxad.methods import api


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
    """The inputs of the next step: resident, or the next host batch."""
    if batches is None:
      return self.inputs
    return jax.device_put(next(batches), sharding.batch_sharded(self.mesh))


def place(tree, mesh: jax.sharding.Mesh):
  """`tree` replicated over `mesh` (the state, resident inputs)."""
  return jax.device_put(tree, sharding.replicated(mesh))


def compile_phase(
  phase: api.Phase, start: int, mesh: jax.sharding.Mesh, steps_per_call: int
) -> CompiledPhase:
  """Wraps `phase.step_fn` into the loop's jitted steps.

  Args:
    start: the global step at which the phase starts; the step function
      gets `state.step - start` as its phase-local step.
    steps_per_call: steps per jitted call (1 for host-batch phases, whose
      every step needs a new input).
  """
  sharding.check_batch(phase.batch_size, mesh, f"config.{phase.batch_key}")
  if (phase.inputs is None) == (phase.batches is None):
    raise ValueError(
      f"Phase {phase.name!r}: give exactly one of inputs and batches"
    )

  def step(state, inputs):
    new, metrics = phase.step_fn(state, inputs, state.step - start)
    return new.replace(step=state.step + 1), metrics

  if phase.batches is not None:
    steps_per_call = 1
  single, multi = jit_steps(
    step,
    steps_per_call=steps_per_call,
    out_shardings=sharding.replicated(mesh),
  )
  inputs = None if phase.inputs is None else place(phase.inputs, mesh)
  return CompiledPhase(phase, single, multi, steps_per_call, inputs, mesh)


def compile_phases(
  phases: list[api.Phase], mesh: jax.sharding.Mesh, steps_per_call: int
) -> list[CompiledPhase]:
  """`compile_phase` of each phase, with its global start step."""
  out, start = [], 0
  for phase in phases:
    out.append(compile_phase(phase, start, mesh, steps_per_call))
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
  unrolled instead of scanned.
  """
  if steps_per_call < 1:
    raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call}")

  def jit(fn):
    return jax.jit(fn, donate_argnums=0, out_shardings=out_shardings)

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


def _format_eta(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


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
  # Work (images x members) still to do after each phase, for the ETA.
  work = [p.phase.num_steps * _work_per_step(p.phase) for p in phases]
  after = [sum(work[i + 1 :]) for i in range(len(phases))]
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  start = 0
  try:
    for compiled, later in zip(phases, after, strict=True):
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
      pending, t_last, step_last = [], time.perf_counter(), step
      k = compiled.steps_per_call
      with jax.set_mesh(compiled.mesh):
        while step < end:
          if k > 1 and _call_fits(step, k, end, log_every, checkpoint_every):
            state, metrics = compiled.multi_step_fn(state, compiled.inputs)
            pending.append((metrics, k))
            step += k
          else:
            inputs = compiled.next_inputs(batches)
            state, metrics = compiled.step_fn(state, inputs)
            pending.append((metrics, 1))
            step += 1
          if on_step is not None:
            on_step(step)
          last = step == end
          if step % log_every == 0 or last:
            remaining = (end - step) * _work_per_step(phase) + later
            _log(
              phase,
              step,
              total,
              remaining,
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
  except KeyboardInterrupt:
    if (
      _alive(state)
      and int(state.step) == step
      and step > (checkpointer.latest_step() or 0)
    ):
      _save(checkpointer, step, state)
      checkpointer.wait()
    logging.warning(
      "Interrupted at step %d; checkpoint kept in %s. Re-run "
      "the same command to resume.",
      step,
      workdir,
    )
    raise
  finally:
    checkpointer.wait()
  return state


def _work_per_step(phase: api.Phase) -> int:
  return phase.batch_size * phase.members


def _log(
  phase, step, total, remaining, pending, t_last, step_last, path, checkpointer
):
  # The one host sync per log interval; (metrics, number of steps) pairs.
  host = jax.device_get([m for m, _ in pending])
  weights = [n for _, n in pending]
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
  eta = remaining / max(images_per_s * phase.members, 1e-9)
  losses = " ".join(f"{k}={v:.5f}" for k, v in mean.items() if "loss" in k)
  rate = f"{images_per_s:.0f} img/s"
  record = dict(step=step, phase=phase.name, images_per_s=images_per_s)
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
    _format_eta(eta),
  )
  if jax.process_index() == 0:
    with open(path, "a") as f:
      f.write(json.dumps(record | mean) + "\n")


def _save(checkpointer, step, state):
  if not bool(_all_finite(state)):
    raise NonFiniteError(
      f"The state became non-finite by step {step}; not saving it. The last "
      f"good checkpoint (step {checkpointer.latest_step()}) is kept."
    )
  checkpointer.save(step, state)
