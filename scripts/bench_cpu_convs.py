"""Per-layer convolution timings: XLA's, jaxad's `cpu_conv`, and PyTorch's.

  python scripts/bench_cpu_convs.py [--impls xla,cpu_conv] [--shapes d24]
  TORCH_PYTHON scripts/bench_cpu_convs.py --impls torch

For each layer: the forward value (fwd), the input gradient (dx), the
weight gradient (dw) and all three in one call (all), in ms, the median of
`--reps` timed calls after one warm-up (jax: jit + block_until_ready). The
torch side imports only torch, so it runs in a Python without jax; give
it `torch.set_num_threads` through `--threads` (default: all cores).
The shapes are the D²4FAD decoder's at the paper's setting (batch 80 =
16 queries x (K + 1) slices): README "Convolutions on CPU".
"""

import argparse
import statistics
import time

import numpy as np

# name: [(N, H, W, C_in, C_out, kernel, stride, padding)]
SHAPES = {
  "d24": [
    (80, 8, 8, 512, 512, 3, 1, 1),
    (80, 16, 16, 256, 256, 3, 1, 1),
    (80, 32, 32, 128, 128, 3, 1, 1),
    (80, 32, 32, 256, 128, 1, 1, 0),
    (80, 32, 32, 128, 256, 1, 1, 0),
    (80, 8, 8, 1024, 512, 1, 1, 0),
  ],
  "tiny": [(2, 8, 8, 128, 128, 3, 1, 1), (2, 8, 8, 16, 8, 1, 1, 0)],
}
OPS = ("fwd", "dx", "dw", "all")


def _median_ms(call, reps: int) -> float:
  call()  # warm-up (compiles)
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def _value_and_grads(y, x, kernel, g):
  import jax

  out, vjp = jax.vjp(y, x, kernel)
  return (out, *vjp(g))


def jax_ops(shape, impl: str) -> dict:
  """{op: a no-argument call} for one layer, in jax."""
  import jax
  import jax.numpy as jnp

  from jaxad.models import cpu_conv

  n, h, w, ci, co, k, s, p = shape
  conv = {"xla": jax.lax.conv_general_dilated, "cpu_conv": cpu_conv.auto}[impl]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, h, w, ci), np.float32))
  kernel = jnp.asarray(rng.standard_normal((k, k, ci, co), np.float32))

  def y(x, kernel):
    return conv(
      x, kernel, (s, s), [(p, p), (p, p)],
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # fmt: skip

  g = jnp.ones(jax.eval_shape(y, x, kernel).shape, jnp.float32)
  fns = {
    "fwd": jax.jit(y),
    "dx": jax.jit(lambda x, k: jax.vjp(lambda x: y(x, k), x)[1](g)),
    "dw": jax.jit(lambda x, k: jax.vjp(lambda k: y(x, k), k)[1](g)),
    "all": jax.jit(lambda x, k: _value_and_grads(y, x, k, g)),
  }
  return {
    op: (lambda f=f: jax.block_until_ready(f(x, kernel)))
    for op, f in fns.items()
  }


def torch_ops(shape) -> dict:
  """{op: a no-argument call} for one layer, in PyTorch (NCHW)."""
  import torch

  n, h, w, ci, co, k, s, p = shape
  x = torch.randn(n, ci, h, w)
  kernel = torch.randn(co, ci, k, k)

  def run(op):
    xg = x.clone().requires_grad_(op in ("dx", "all"))
    kg = kernel.clone().requires_grad_(op in ("dw", "all"))
    out = torch.nn.functional.conv2d(xg, kg, stride=s, padding=p)
    if op != "fwd":
      out.backward(torch.ones_like(out))

  return {op: (lambda op=op: run(op)) for op in OPS}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--impls", default="xla,cpu_conv")
  parser.add_argument("--shapes", default="d24", choices=sorted(SHAPES))
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--threads", type=int, default=0)
  args = parser.parse_args()
  impls = args.impls.split(",")
  for impl in impls:
    if impl not in ("xla", "cpu_conv", "torch"):
      parser.error(f"--impls: {impl!r} is not xla, cpu_conv or torch")
  if "torch" in impls and args.threads:
    import torch

    torch.set_num_threads(args.threads)
  header = "".join(f"{op:>9s}" for op in OPS)
  print(f"{'layer (N,H,W,Cin,Cout,k,s,p)':30s} {'impl':9s}{header} (ms)")
  for shape in SHAPES[args.shapes]:
    for impl in impls:
      ops = torch_ops(shape) if impl == "torch" else jax_ops(shape, impl)
      ms = [_median_ms(ops[op], args.reps) for op in OPS]
      cells = "".join(f"{m:9.1f}" for m in ms)
      print(f"{str(shape):30s} {impl:9s}{cells}", flush=True)


if __name__ == "__main__":
  main()
