r"""Keeps a residual block's output in memory on XLA:CPU.

Why: XLA:CPU fuses cheap elementwise producers into every consumer. In a
ResNet stage the residual stream x_{i+1} = relu(BN(conv(..)) + x_i) is a
chain of such ops, so each consumer of a late block (its convolution's
operand transposes, the ReLU masks of the backward pass) re-computes the
whole chain from the stage's first convolution output: it reads every
block's convolution output instead of one tensor, and the work grows with
the square of the stage length. Profiled on the D²4FAD training step
(de-WRN-50-2 decoder, batch 16 x (K + 1) = 80, 2-core Intel Xeon, jax
0.10.2): one such fusion read six 84 MB tensors and took 870 ms, and
elementwise fusions took about 11 of the step's 23 thread-seconds.

`keep(x)` wraps a block's output in `lax.optimization_barrier`, which XLA
cannot fuse through, so the output is written once and read by its
consumers. XLA:CPU removes barriers early in its pipeline (the
`cse_barrier_expander` pass), so the training-step and scoring jits
(`loop.jit_steps`, `evaluate.score_fn`) compile with `compiler_options()`,
which keeps them; elsewhere (one-off jits, jits nested in others) the
barriers are dropped and nothing changes. The same float32 operations
run, stored instead of re-computed; XLA's fusion around them differs, so
a reduction's sum may run in another order: results differ from the
unbarriered program by float32 summation order only (a training run
drifts by rounding, as with `cpu_conv`; tests/block_barrier_test.py).

Only on the CPU backend, decided when traced (as `cpu_conv.auto`): GPU
and TPU compilers make their own fusion and rematerialisation choices.
Inside `off()` (used by `jaxad.export`, whose programs may run on other
platforms) `keep` adds nothing.
"""

import contextlib

import jax

Array = jax.Array

# XLA's pass that turns optimization barriers into plain values; its name
# is XLA's (`OptimizationBarrierExpander::name()`). Disabling it keeps
# jaxad's barriers (and jax.checkpoint's, which jaxad does not use).
_BARRIER_PASS = "cse_barrier_expander"


_enabled = [True]


def _on_cpu() -> bool:
  return _enabled[0] and jax.default_backend() == "cpu"


@contextlib.contextmanager
def off():
  """Within it, `keep` is the identity and `compiler_options` None."""
  before, _enabled[0] = _enabled[0], False
  try:
    yield
  finally:
    _enabled[0] = before


def keep(x: Array) -> Array:
  """x itself; on CPU behind an optimization barrier (module docstring).

  Args:
    x: any array (a residual block's output, [B, H, W, C]).

  Returns:
    x, unchanged in value, shape and dtype. Differentiable (the barrier's
    gradient is the identity).
  """
  return jax.lax.optimization_barrier(x) if _on_cpu() else x


def compiler_options() -> dict[str, str] | None:
  """`jax.jit(..., compiler_options=...)` that keeps `keep`'s barriers.

  Returns:
    {"xla_disable_hlo_passes": "cse_barrier_expander"} on the CPU backend,
    None (the compiler's defaults) elsewhere. jax takes compiler options
    on top-level jits only: a jit built with them cannot be called inside
    another jit on CPU (ValueError from jax); call the function it wraps.
  """
  return {"xla_disable_hlo_passes": _BARRIER_PASS} if _on_cpu() else None
