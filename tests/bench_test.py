"""Smoke test of `python -m jaxad.bench` (no timing assertions)."""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

from absl.testing import absltest

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_bench(config: str) -> tuple[subprocess.CompletedProcess, dict]:
  """Runs `python -m jaxad.bench` briefly; returns (process, --json dict)."""
  out_json = os.path.join(tempfile.mkdtemp(), "bench.json")
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxad.bench",
      f"--config={config}",
      f"--json={out_json}",
      "--steps=2",
      "--repeats=1",
      "--warmup=1",
      "--num_images=64",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env={
      **{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
      "JAX_PLATFORMS": "cpu",
    },
  )
  if out.returncode:
    raise AssertionError(out.stderr[-3000:])
  with open(out_json) as f:
    return out, json.load(f)


class BenchTest(absltest.TestCase):
  def test_ddad_smoke_reports_every_phase_scoring_and_input(self):
    out, result = run_bench("configs/ddad.py:smoke")
    self.assertEqual(
      [p["phase"] for p in result["train"]],
      ["ensembles", "udm_tail", "refine"],
    )
    ensembles = result["train"][0]
    # smoke: 2 + 2 members at batch 32, so 4 member-images per image.
    self.assertAlmostEqual(
      ensembles["member_images_per_s"], 4 * ensembles["images_per_s"]
    )
    for r in [*result["train"], result["scoring"]]:
      self.assertGreater(r["images_per_s"], 0)
      self.assertGreater(r["flops_per_step"], 0)
      self.assertIsNone(r["mfu"])  # no known peak for a CPU
    self.assertEqual(result["scoring"]["batch_size"], 64)
    self.assertGreater(result["input_pipeline"]["images_per_s"], 0)
    self.assertIn("member-img/s", out.stdout)

  def test_input_benchmark_skips_a_config_without_data_format(self):
    from configs import d24fad as d24fad_config
    from jaxad import bench

    config = d24fad_config.get_config("smoke")  # reads data.sources
    result = bench.bench_input(
      config, tempfile.mkdtemp(), synthetic=False, num_images=8
    )
    self.assertIn("no data.format", result["skipped"])

  def test_step_timing_imports_neither_tfds_nor_grain(self):
    # A GPU image may lack them; only data preparation needs them.
    code = (
      "import sys; sys.modules['tensorflow_datasets'] = None;"
      " sys.modules['grain'] = None;"
      " import jaxad.bench, jaxad.methods.ddad, jaxad.methods.multiad"
    )
    out = subprocess.run(
      [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True
    )
    self.assertEqual(out.returncode, 0, out.stderr[-2000:])


if __name__ == "__main__":
  absltest.main()
