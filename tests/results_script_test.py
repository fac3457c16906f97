"""scripts/d24fad_results.py reads each K's eval.json from where
jaxad.evaluate wrote it: W/eval.json for the trained K, W/eval_<...>/ for
another K (other data), and never a stale one."""

import importlib.util
import json
import os
import shutil
import tempfile
import time

from absl.testing import absltest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script():
  path = os.path.join(REPO, "scripts", "d24fad_results.py")
  spec = importlib.util.spec_from_file_location("d24fad_results", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def write_eval(folder, shots, auroc):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "eval_config.json"), "w") as f:
    json.dump({"data": {"shots": shots}}, f)
  with open(os.path.join(folder, "eval.json"), "w") as f:
    json.dump({"scores": {"d24fad": {"auroc": auroc}}}, f)


class EvalJsonTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.w = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.w, ignore_errors=True)
    self.script = load_script()

  def auroc(self, shots, since):
    result = self.script.eval_json(self.w, shots, since)
    return result["scores"]["d24fad"]["auroc"]

  def test_the_trained_k_in_w_and_another_k_in_its_folder(self):
    before = time.time() - 60
    write_eval(self.w, 4, 0.4)  # the training run's own
    write_eval(os.path.join(self.w, "eval_t-0000aaaa"), 2, 0.2)
    write_eval(os.path.join(self.w, "eval_t-0000bbbb"), 8, 0.8)
    self.assertEqual(self.auroc(4, before), 0.4)
    self.assertEqual(self.auroc(2, before), 0.2)
    self.assertEqual(self.auroc(8, before), 0.8)

  def test_a_result_older_than_the_run_is_refused(self):
    write_eval(os.path.join(self.w, "eval_t-0000bbbb"), 8, 0.8)
    with self.assertRaisesRegex(SystemExit, "data.shots=8"):
      self.script.eval_json(self.w, 8, time.time() + 60)


if __name__ == "__main__":
  absltest.main()
