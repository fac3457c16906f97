"""The training loop's ETA: every phase priced at its own measured speed.

Phases differ in cost per step by far more than their images per step say
(DDAD's refinement runs the ensembles to make its inputs, then an ASR-Net):
pricing later phases at the current phase's speed showed 3 s with 50 s
left. Each phase's seconds per step are measured while it runs, from the
loop's log intervals, with each jitted function's first call (its compile)
left out; a phase not measured yet is "unknown" in the ETA, not guessed.
"""

import time


class StepClock:
  """Seconds per step of each phase, measured between `restart` and `lap`.

  The loop calls `restart(step)` after a compile (a jitted function's
  first call, waited for), and `lap(phase, step)` at each log, which adds
  the span since the last restart/lap to the phase's total.
  """

  def __init__(self, num_phases: int):
    self._seconds = [0.0] * num_phases
    self._steps = [0] * num_phases
    self._t0 = time.perf_counter()
    self._step0 = 0

  def restart(self, step: int) -> None:
    self._t0, self._step0 = time.perf_counter(), step

  def lap(self, phase: int, step: int) -> None:
    now = time.perf_counter()
    if step > self._step0:
      self._seconds[phase] += now - self._t0
      self._steps[phase] += step - self._step0
    self._t0, self._step0 = now, step

  def seconds_per_step(self, phase: int) -> float | None:
    """The phase's mean measured s/step; None before any measured step."""
    if not self._steps[phase]:
      return None
    return self._seconds[phase] / self._steps[phase]

  def eta(self, names: list[str], steps_left: list[int]) -> str:
    """`eta_text` of phases `names` with `steps_left` steps each to run."""
    return eta_text(
      [
        (name, left, self.seconds_per_step(i))
        for i, (name, left) in enumerate(zip(names, steps_left, strict=True))
      ]
    )


def eta_text(phases: list[tuple[str, int, float | None]]) -> str:
  """The remaining time of (name, steps left, seconds per step or None).

  Returns:
    "3m10s" when every phase with steps left is measured; "0m40s + unknown
    (refine not measured yet)" when some are not; "unknown (a, b not
    measured yet)" when none is.
  """
  known = [n * s for _, n, s in phases if n > 0 and s is not None]
  unknown = [name for name, n, s in phases if n > 0 and s is None]
  if not unknown:
    return format_seconds(sum(known))
  names = ", ".join(unknown)
  if not known:
    return f"unknown ({names} not measured yet)"
  return f"{format_seconds(sum(known))} + unknown ({names} not measured yet)"


def format_seconds(seconds: float) -> str:
  """'1h05m' from an hour on, else '4m07s'."""
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
