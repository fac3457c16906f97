"""Multi-seed runs: W/seed_<s>/ per seed and W/eval_seeds.json."""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from absl.testing import absltest

from configs import ddad as ddad_config
from jaxad import seeds


def fake_eval(seed: int) -> dict:
  """An eval.json whose numbers depend on the seed."""
  return {
    "dataset": "x",
    "scores": {
      "rec": {
        "auroc": 0.5 + 0.1 * seed,
        "ap": 0.4,
        "calibrated": {"threshold": 1.0 + seed, "sensitivity": 0.2 * seed},
      },
      "inter": {"auroc": 0.9 - 0.1 * seed, "ap": 0.8},
    },
  }


class SeedsTest(absltest.TestCase):
  def test_parse(self):
    self.assertEqual(seeds.parse("0,1, 2"), [0, 1, 2])
    for bad in ("", "a,b", "1,1", "-1", "0.5"):
      with self.assertRaisesRegex(ValueError, "--seeds"):
        seeds.parse(bad)

  def test_aggregate_mean_std_values(self):
    record = seeds.aggregate({s: fake_eval(s) for s in (0, 1, 2)})
    self.assertEqual(record["seeds"], [0, 1, 2])
    self.assertEqual(list(record["scores"]), ["rec", "inter"])  # eval order
    rec = record["scores"]["rec"]
    self.assertEqual(
      list(rec),
      ["auroc", "ap", "calibrated.threshold", "calibrated.sensitivity"],
    )
    values = [0.5, 0.6, 0.7]
    np.testing.assert_allclose(rec["auroc"]["values"], values)
    self.assertAlmostEqual(rec["auroc"]["mean"], 0.6)
    self.assertAlmostEqual(rec["auroc"]["std"], np.std(values, ddof=1))
    self.assertAlmostEqual(rec["ap"]["std"], 0.0)
    self.assertAlmostEqual(record["scores"]["inter"]["auroc"]["mean"], 0.8)
    self.assertIn("±", seeds.format_table(record))

  def test_different_metrics_refused(self):
    other = fake_eval(1)
    del other["scores"]["rec"]["ap"]
    with self.assertRaisesRegex(ValueError, "seed 1.*rec"):
      seeds.aggregate({0: fake_eval(0), 1: other})

  def test_run_one_per_seed_and_writes_record(self):
    calls = []

    def run_one(config, workdir):
      calls.append((config.seed, workdir))
      return fake_eval(config.seed)

    config = ddad_config.get_config()
    with tempfile.TemporaryDirectory() as w:
      record = seeds.run(config, w, [2, 0], run_one=run_one)
      self.assertEqual(
        calls, [(2, os.path.join(w, "seed_2")), (0, os.path.join(w, "seed_0"))]
      )
      with open(os.path.join(w, seeds.EVAL_SEEDS)) as f:
        self.assertEqual(json.load(f), record)
      self.assertEqual(record["workdirs"], ["seed_2", "seed_0"])
    self.assertEqual(config.seed, 0)  # the caller's config is untouched

  def test_refuses_single_run_workdir(self):
    with tempfile.TemporaryDirectory() as w:
      with open(os.path.join(w, "config.json"), "w") as f:
        f.write("{}")
      with self.assertRaisesRegex(ValueError, "single run"):
        seeds.run(ddad_config.get_config(), w, [0], run_one=None)


class CommandLineTest(absltest.TestCase):
  def test_bad_seeds_flag_is_one_line_exit_2_before_any_work(self):
    with tempfile.TemporaryDirectory() as w:
      out = subprocess.run(
        [
          sys.executable,
          "-m",
          "jaxad.train",
          "--config",
          "configs/ddad.py:smoke",
          "--workdir",
          w,
          "--seeds=0,0",
        ],
        cwd=pathlib.Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
      )
      self.assertEqual(out.returncode, 2, out.stderr)
      self.assertRegex(out.stderr.strip(), r"^error: --seeds='0,0'")
      self.assertEqual(os.listdir(w), [])  # nothing written


if __name__ == "__main__":
  absltest.main()
