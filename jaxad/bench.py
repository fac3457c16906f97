r"""Throughput of a config's training and scoring steps.

  python -m jaxad.bench --config configs/<method>.py [--config.k=v ...] \
    [--json OUT.json] [--data synthetic|config] [--steps 10] [--repeats 5]

For every training phase of the method (its `api.Phase`s, in order)
it compiles the jitted step the training loop runs, warms it up, then times
`--repeats` runs of `--steps` back-to-back steps (block_until_ready at the
end of each run; the median is reported). It prints and writes:
`step_ms`, `images_per_s` (distinct images a step trains on, per second),
`member_images_per_s` (members x images, for ensembles), `flops_per_step`
(XLA's cost analysis of the compiled step), `tflops_per_s`, `mfu` where the
device's peak is known, and the peak device memory where the backend reports
it; then the scoring step's images/s at `eval.batch_size`, and the input
pipeline's own images/s (grain over the prepared split, or over random
images with `--data synthetic`).

`--data synthetic` (default) times on random uint8 images shaped like the
config's data, so it needs no dataset, tfds or grain for the step timings;
`--data config` loads the config's dataset as training does.
`--phases ensembles --noscoring` times one phase alone (a quicker
comparison: `scripts/bench_cpu_layouts.sh`).
"""

import json
import statistics
import tempfile
import time

import jax
import numpy as np
from absl import app, flags, logging

from jaxad import cli, config_checks, evaluate, loop, methods, sharding

_JSON = flags.DEFINE_string("json", None, "Also write the results here.")
_DATA = flags.DEFINE_enum(
  "data", "synthetic", ["synthetic", "config"], "Images to time on."
)
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed run.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs (median taken).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
_NUM_IMAGES = flags.DEFINE_integer(
  "num_images", 1000, "--data synthetic: known normals (and test images)."
)
_PHASES = flags.DEFINE_list(
  "phases",
  None,
  "Training phases to time, by name (e.g. ensembles); default: all.",
)
_SCORING = flags.DEFINE_boolean(
  "scoring", True, "Also time the scoring step (--noscoring: skip it)."
)

# Dense peak FLOP/s per device, for MFU: (float32, bfloat16). H100/H200 are
# the figures measured on this project's machines (PERFORMANCE.md); the
# others are the vendors' dense specs. Matched by substring of device_kind.
PEAK_FLOPS = {
  "H100": (60e12, 790e12),
  "H200": (60e12, 790e12),
  "A100": (19.5e12, 312e12),
  "TPU v4": (None, 275e12),
  "TPU v5 lite": (None, 197e12),
  "TPU v5p": (None, 459e12),
  "TPU v6": (None, 918e12),
}


def compute_dtype(config) -> str:
  """The config's compute dtype name (float32 where the method has none)."""
  return config.get("model", {}).get("compute_dtype", "float32")


def peak_flops(device: jax.Device, dtype: str = "float32") -> float | None:
  """The device's dense peak FLOP/s for `dtype`, or None if unknown."""
  for kind, (f32, bf16) in PEAK_FLOPS.items():
    if kind in device.device_kind:
      return bf16 if dtype == "bfloat16" else f32
  return None


def _flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):  # older jax: one dict per program
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def _time_runs(run_once, steps: int, repeats: int) -> float:
  """Median seconds per step over `repeats` runs of `steps` steps."""
  per_step = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run_once(steps))
    per_step.append((time.perf_counter() - start) / steps)
  return statistics.median(per_step)


def _rates(
  seconds: float, flops: float | None, images: int, peak: float | None
) -> dict:
  out = {
    "step_ms": 1e3 * seconds,
    "images_per_s": images / seconds,
    "flops_per_step": flops,
    "tflops_per_s": flops / seconds / 1e12 if flops else None,
  }
  out["mfu"] = flops / seconds / peak if flops and peak else None
  return out


def bench_phases(
  method, config, data, mesh, *, steps, repeats, warmup, only=None
):
  """Times every training phase (or those named in `only`); returns
  (results, final state)."""
  state = loop.place(method.init_state(config), mesh)
  peak = peak_flops(jax.devices()[0], compute_dtype(config))
  results = []
  compiled_phases = loop.compile_phases(
    method.phases(config, data),
    mesh,
    config.train.steps_per_call,
    sharding.tree_shardings(state, mesh),
  )
  for compiled_phase in compiled_phases:
    phase = compiled_phase.phase
    if only is not None and phase.name not in only:
      continue
    # The call the loop makes: several steps per call when configured.
    fn, per_call = compiled_phase.step_fn, 1
    if compiled_phase.multi_step_fn is not None:
      fn, per_call = compiled_phase.multi_step_fn, compiled_phase.steps_per_call
    batches = None if phase.batches is None else phase.batches(0)
    start = time.perf_counter()
    compiled_phase = compiled_phase.with_derived(state)
    derive_s = time.perf_counter() - start
    inputs = compiled_phase.next_inputs(batches)
    start = time.perf_counter()
    compiled = fn.lower(state, inputs).compile()
    compile_s = time.perf_counter() - start
    holder = [state]

    def run(n, compiled=compiled, inputs=inputs, holder=holder):
      metrics = None
      for _ in range(n):
        holder[0], metrics = compiled(holder[0], inputs)
      return metrics

    jax.block_until_ready(run(warmup))
    calls = max(1, steps // per_call)
    seconds = _time_runs(run, calls, repeats) / per_call
    state = holder[0]
    result = {
      "phase": phase.name,
      "compile_s": compile_s,
      "steps_per_call": per_call,
    }
    if phase.derive is not None:  # once per run, not in the step's time
      result["derive_s"] = derive_s
    # XLA's cost analysis of a scanned loop counts its body once: take the
    # FLOPs of one step from the single-step program.
    one_step = compiled
    if per_call > 1:
      one_step = compiled_phase.step_fn.lower(holder[0], inputs).compile()
    result |= _rates(seconds, _flops(one_step), phase.batch_size, peak)
    if phase.members > 1:
      result["member_images_per_s"] = phase.batch_size * phase.members / seconds
    results.append(result)
    logging.info("bench %s: %s", phase.name, _summary(result))
  return results, state


def bench_scoring(method, config, model, data, mesh, *, steps, repeats):
  """Times the jitted scoring step on one `eval.batch_size` batch."""
  b = config.eval.batch_size
  sharding.check_batch(b, mesh, "config.eval.batch_size")
  images = jax.device_put(
    data.test[np.arange(b) % len(data.test)], sharding.batch_sharded(mesh)
  )
  context = method.score_context(config, model, data)
  score = evaluate.score_fn(method, config, mesh)
  compiled = score.lower(model, context, images).compile()

  def run(n):
    return [compiled(model, context, images) for _ in range(n)][-1]

  jax.block_until_ready(run(1))
  seconds = _time_runs(run, steps, repeats)
  peak = peak_flops(jax.devices()[0], compute_dtype(config))
  return {"batch_size": b} | _rates(seconds, _flops(compiled), b, peak)


def bench_input(
  config, workdir: str, *, synthetic: bool, num_images: int, batches: int = 20
):
  """Images/s of the grain pipeline alone (host side, no device work)."""
  try:
    from jaxad.data import pipeline  # grain and tfds: optional here
  except ImportError as e:
    return {"skipped": f"grain/tfds not installed ({e})"}
  if synthetic:
    source = pipeline.FakeSource(num_images, config.data.image_size)
  elif not config.data.get("format"):
    return {"skipped": "no data.format: the method reads its own sources"}
  else:
    source = pipeline.data_source(config.data, workdir, "normal")
  b = config.train.batch_size
  it = iter(pipeline.grain_batches(source, batch_size=b, seed=0))
  next(it)  # first batch pays the set-up
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - start
  return {"batch_size": b, "images_per_s": b * batches / seconds}


def _summary(r: dict) -> str:
  parts = [f"{r['step_ms']:.1f} ms/step", f"{r['images_per_s']:.1f} img/s"]
  if "member_images_per_s" in r:
    parts.append(f"{r['member_images_per_s']:.1f} member-img/s")
  if r.get("tflops_per_s"):
    parts.append(f"{r['tflops_per_s']:.3f} TFLOP/s")
  if r.get("mfu"):
    parts.append(f"MFU {100 * r['mfu']:.1f}%")
  if "derive_s" in r:  # for the benchmark's pool (--num_images)
    parts.append(f"{r['derive_s']:.1f} s once for derived inputs")
  return ", ".join(parts)


def run(
  config,
  workdir: str,
  *,
  synthetic: bool = True,
  num_images: int = 1000,
  steps: int = 10,
  repeats: int = 5,
  warmup: int = 2,
  phases: list[str] | None = None,
  scoring: bool = True,
) -> dict:
  """All measurements for `config`, as a JSON-able dict.

  Args:
    phases: names of the training phases to time (None: all).
    scoring: whether to time the scoring step ("scoring" is None if not).

  Raises:
    config_checks.ConfigError: a name in `phases` that the config has no
      phase of (the message lists the phases).
  """
  method = methods.get(config.method)
  method.check_config(config)
  mesh = sharding.make_mesh(config.mesh)
  if synthetic:
    data = method.synthetic_data(config, num_images)
  else:
    data = method.load_data(config, workdir)
  if phases is not None:
    names = [p.name for p in method.phases(config, data)]
    unknown = sorted(set(phases) - set(names))
    if unknown:
      raise config_checks.ConfigError(
        f"--phases={','.join(phases)}: {config.method} with this config has "
        f"no phase {', '.join(unknown)}; its phases: {', '.join(names)}"
      )
  device = jax.devices()[0]
  with jax.set_mesh(mesh):
    timed, state = bench_phases(
      method,
      config,
      data,
      mesh,
      steps=steps,
      repeats=repeats,
      warmup=warmup,
      only=phases,
    )
    scored = None
    if scoring:
      scored = bench_scoring(
        method, config, state.model(), data, mesh, steps=steps, repeats=repeats
      )
  memory = device.memory_stats() or {}
  return {
    "method": config.method,
    "data": data.name,
    "backend": jax.default_backend(),
    "device_kind": device.device_kind,
    "num_devices": jax.device_count(),
    "jax_version": jax.__version__,
    "compute_dtype": compute_dtype(config),
    "peak_flops_per_s": peak_flops(device, compute_dtype(config)),
    "mesh": dict(mesh.shape),
    "train": timed,
    "scoring": scored,
    "input_pipeline": bench_input(
      config, workdir, synthetic=synthetic, num_images=num_images
    ),
    "peak_memory_bytes": memory.get("peak_bytes_in_use"),
  }


@cli.user_errors()
def main(argv):
  del argv
  cli.setup_logging()
  sharding.initialize_distributed()
  config = cli.CONFIG.value
  with tempfile.TemporaryDirectory() as tmp:
    result = run(
      config,
      cli.WORKDIR.value or tmp,
      synthetic=_DATA.value == "synthetic",
      num_images=_NUM_IMAGES.value,
      steps=_STEPS.value,
      repeats=_REPEATS.value,
      warmup=_WARMUP.value,
      phases=_PHASES.value,
      scoring=_SCORING.value,
    )
  print(
    f"jaxad.bench {config.method} on {result['device_kind']} "
    f"x{result['num_devices']}, {result['compute_dtype']} compute "
    f"(jax {result['jax_version']})"
  )
  for r in result["train"]:
    print(f"  train {r['phase']:<10} {_summary(r)}")
  if result["scoring"] is not None:
    print(
      f"  scoring    {_summary(result['scoring'])} "
      f"(batch {result['scoring']['batch_size']})"
    )
  inp = result["input_pipeline"]
  print(
    f"  input      {inp.get('images_per_s', 0):.0f} img/s"
    if "images_per_s" in inp
    else f"  input      {inp['skipped']}"
  )
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  flags.adopt_module_key_flags(cli)  # --help lists --config, --workdir
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=cli.parse_flags)
