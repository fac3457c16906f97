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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxad import checkpoint


@dataclasses.dataclass(frozen=True)
class Phase:
  """A run of `num_steps` calls of `step_fn(state, inputs) -> (state, m)`."""

  name: str
  num_steps: int
  step_fn: Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]]
  inputs: Any  # device-resident arrays passed (not donated) to every step
  member_images_per_step: int  # images x ensemble members trained per step
  images_per_step: int  # distinct images a step draws (its batch size)
  # The same step run `steps_per_call` times per call (see `jit_steps`);
  # None when steps_per_call is 1.
  multi_step_fn: Callable[[Any, Any], tuple[Any, dict]] | None = None
  steps_per_call: int = 1


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
  phases: list[Phase],
  *,
  workdir: str,
  checkpointer: checkpoint.Checkpointer,
  log_every: int,
  checkpoint_every: int,
  on_step: Callable[[int], None] | None = None,
):
  """Runs the phases from `state.step` on; returns the final state.

  Args:
    state: a method's train state (restored or fresh); `state.step` is the
      global step.
    phases: run in order; phase i covers global steps
      [sum(n_<i), sum(n_<=i)).
    on_step: called with the global step after each dispatched step (tests
      use it to interrupt a run).
  """
  total = sum(p.num_steps for p in phases)
  step = int(state.step)
  # Member-images still to train after each phase, for the ETA.
  after = [
    sum(q.num_steps * q.member_images_per_step for q in phases[i + 1 :])
    for i in range(len(phases))
  ]
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  start = 0
  try:
    for phase, later in zip(phases, after, strict=True):
      end = start + phase.num_steps
      if step >= end:
        start = end
        continue
      logging.info(
        "Phase %s: steps %d..%d of %d (%d member-images/step)",
        phase.name,
        step,
        end,
        total,
        phase.member_images_per_step,
      )
      pending, t_last, step_last = [], time.perf_counter(), step
      k = phase.steps_per_call
      while step < end:
        if k > 1 and _call_fits(step, k, end, log_every, checkpoint_every):
          state, metrics = phase.multi_step_fn(state, phase.inputs)
          pending.append((metrics, k))
          step += k
        else:
          state, metrics = phase.step_fn(state, phase.inputs)
          pending.append((metrics, 1))
          step += 1
        if on_step is not None:
          on_step(step)
        last = step == end
        if step % log_every == 0 or last:
          remaining = (end - step) * phase.member_images_per_step + later
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
  dt = time.perf_counter() - t_last
  rate = (step - step_last) * phase.member_images_per_step / max(dt, 1e-9)
  eta = remaining / max(rate, 1e-9)
  losses = " ".join(f"{k}={v:.5f}" for k, v in mean.items() if "loss" in k)
  logging.info(
    "[%s] step %d/%d %s | %.0f member-img/s | ETA %s",
    phase.name,
    step,
    total,
    losses,
    rate,
    _format_eta(eta),
  )
  record = dict(step=step, phase=phase.name, member_images_per_s=rate, **mean)
  if jax.process_index() == 0:
    with open(path, "a") as f:
      f.write(json.dumps(record) + "\n")


def _save(checkpointer, step, state):
  if not bool(_all_finite(state)):
    raise NonFiniteError(
      f"The state became non-finite by step {step}; not saving it. The last "
      f"good checkpoint (step {checkpointer.latest_step()}) is kept."
    )
  checkpointer.save(step, state)
