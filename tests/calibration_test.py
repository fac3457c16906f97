"""The decision threshold chosen on held-out normals only (issue 14).

The rule (`metrics.threshold_at_specificity`) on hand cases; evaluation
that never lets the test set choose the threshold; and a real DDAD run
whose eval.json has the calibrated block. The calibration split of every
loader is tested in calibration_split_test.py.
"""

import json
import os
import shutil
import tempfile

import flax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl.testing import absltest, parameterized

from configs import ddad as ddad_config
from jaxad import configlib, evaluate, metrics, restore, sharding, train
from jaxad.data import oneclass, splits
from jaxad.methods import api

BLOCK = {
  "threshold",
  "target_specificity",
  "num_calibration",
  "calibration_specificity",
  "sensitivity",
  "specificity",
}


class TempDirTestCase(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

  def path(self, *names):
    return os.path.join(self.tmp, *names)

  def split_json(self, workdir):
    with open(os.path.join(workdir, splits.SPLIT_FILE)) as f:
      return json.load(f)


# ------------------------------------------------------------------ the rule


class ThresholdRuleTest(parameterized.TestCase):
  @parameterized.parameters(
    (0.95, 10.0),  # ceil(9.5) = 10th smallest
    (0.9, 9.0),
    (0.7, 7.0),  # 0.7 * 10 = 7.000000000000001 in floats: still the 7th
    (0.3, 3.0),
    (1.0, 10.0),
    (0.01, 1.0),
  )
  def test_kth_smallest_of_ten(self, target, expected):
    scores = np.array([7, 3, 10, 1, 9, 2, 8, 4, 6, 5], np.float32)
    self.assertEqual(metrics.threshold_at_specificity(scores, target), expected)

  def test_ties_count_as_normal(self):
    # 3 of 4 scores are <= 1, so 1 already has specificity 0.75 >= 0.5.
    self.assertEqual(metrics.threshold_at_specificity([1, 1, 1, 5], 0.5), 1.0)
    self.assertEqual(metrics.threshold_at_specificity([1, 1, 1, 5], 0.75), 1.0)
    self.assertEqual(metrics.threshold_at_specificity([1, 1, 1, 5], 0.8), 5.0)
    self.assertEqual(metrics.threshold_at_specificity([4.5], 0.95), 4.5)

  def test_smallest_observed_score_reaching_the_target(self):
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 20, 101):
      scores = np.round(rng.normal(size=n), 1)  # with ties
      for target in (0.05, 0.5, 0.9, 0.95, 0.99, 1.0):
        t = metrics.threshold_at_specificity(scores, target)
        self.assertIn(t, scores)
        self.assertGreaterEqual(np.mean(scores <= t), target)
        below = scores[scores < t]
        if len(below):  # no smaller observed score reaches the target
          self.assertLess(np.mean(scores <= below.max()), target)

  def test_refusals(self):
    for bad in ([], [[1.0, 2.0]]):
      with self.assertRaisesRegex(ValueError, "non-empty 1-d"):
        metrics.threshold_at_specificity(np.asarray(bad), 0.9)
    with self.assertRaisesRegex(ValueError, "not finite"):
      metrics.threshold_at_specificity([1.0, np.nan], 0.9)
    for target in (0.0, -0.1, 1.5):
      with self.assertRaisesRegex(ValueError, r"\(0, 1\]"):
        metrics.threshold_at_specificity([1.0, 2.0], target)

  def test_calibrated_metrics(self):
    calibration = np.arange(1, 21, dtype=np.float32)  # 1..20
    scores = np.array([5, 18, 19, 30, 40, 10], np.float32)
    labels = np.array([0, 0, 0, 1, 1, 1])
    block = metrics.calibrated_metrics(calibration, scores, labels, 0.9)
    self.assertEqual(
      block,
      {
        "threshold": 18.0,  # the 18th of 20
        "target_specificity": 0.9,
        "num_calibration": 20,
        "calibration_specificity": 0.9,
        "sensitivity": 2 / 3,  # 30, 40 > 18; 10 is not
        "specificity": 2 / 3,  # 5, 18 <= 18; 19 is not
      },
    )


# ------------------------------------------------------ evaluation, no leaks


class MeanScore(api.Defaults):
  """A stub method: the image score is the mean pixel value."""

  def init_state(self, config):
    del config
    return api.new_state(params={}, batch_stats={}, opt_state={}, graphdefs={})

  def phases(self, config, data):
    return []

  def scores(self, config):
    return (api.Score("mean", "mean pixel value"),)

  def score(self, config, model, context, images):
    x = images.astype(jnp.float32)
    return {"scores": {"mean": x.mean(axis=(1, 2, 3))}, "maps": {}}


def constant_images(values, size=4):
  values = np.asarray(values, np.uint8)
  return np.broadcast_to(
    values[:, None, None, None], (len(values), size, size, 1)
  )


def stub_data(test_shift=0, calibration=tuple(range(20))):
  test_values = np.array([5, 15, 17, 18, 40, 60, 16, 80]) + test_shift
  return oneclass.OneClassData(
    name="stub",
    normal=constant_images([1, 2]),
    unlabeled=constant_images([]),
    unlabeled_labels=np.zeros(0, np.int32),
    test=constant_images(test_values),
    test_labels=np.array([0, 0, 0, 0, 1, 1, 1, 1], np.int32),
    test_names=tuple(f"t{i}" for i in range(8)),
    calibration=constant_images(calibration),
    calibration_names=tuple(f"c{i}" for i in range(len(calibration))),
  )


class EvaluateTest(TempDirTestCase):
  def evaluate(self, data, workdir, target=0.9):
    config = ml_collections.ConfigDict(
      {
        "eval": {
          "batch_size": 4,
          "calibration_fraction": 0.1,
          "target_specificity": target,
        },
        "mesh": {"data": 1},
      }
    )
    model = api.Model(
      params={}, batch_stats={}, frozen={}, graphdefs=flax.core.freeze({})
    )
    mesh = sharding.make_mesh(config.mesh)
    os.makedirs(workdir, exist_ok=True)
    return evaluate.evaluate(config, workdir, MeanScore(), model, data, mesh)

  def test_threshold_comes_from_the_calibration_normals_only(self):
    base = self.evaluate(stub_data(), self.path("base"))["scores"]["mean"]
    # Every test score moved far away: a threshold that looked at the test
    # set (its normals, or both classes) would move with it.
    far = self.evaluate(stub_data(100), self.path("far"))["scores"]["mean"]
    self.assertEqual(base["calibrated"]["threshold"], 17.0)  # 18th of 0..19
    self.assertEqual(far["calibrated"]["threshold"], 17.0)
    self.assertEqual(base["calibrated"]["num_calibration"], 20)
    self.assertEqual(base["calibrated"]["calibration_specificity"], 0.9)
    self.assertEqual(base["calibrated"]["specificity"], 0.75)  # 18 > 17
    self.assertEqual(base["calibrated"]["sensitivity"], 0.75)  # 16 <= 17
    self.assertEqual(far["calibrated"]["specificity"], 0.0)
    self.assertEqual(far["calibrated"]["sensitivity"], 1.0)
    # The calibration normals do move it.
    moved = self.evaluate(
      stub_data(calibration=tuple(range(50, 70))), self.path("moved")
    )
    self.assertEqual(moved["scores"]["mean"]["calibrated"]["threshold"], 67.0)

  def test_calibration_scores_file_and_table(self):
    workdir = self.path("w")
    result = self.evaluate(stub_data(), workdir, target=0.5)
    self.assertEqual(set(result["scores"]["mean"]["calibrated"]), BLOCK)
    self.assertEqual(result["scores"]["mean"]["calibrated"]["threshold"], 9.0)
    with open(os.path.join(workdir, "eval.json")) as f:
      self.assertEqual(json.load(f), result)
    path = os.path.join(workdir, "calibration_scores.npz")
    with np.load(path) as z:
      self.assertEqual(set(z.files), {"mean", "names"})
      self.assertEqual(z["mean"].dtype, np.float32)
      np.testing.assert_array_equal(z["mean"], np.arange(20))
      self.assertEqual(z["names"].tolist(), [f"c{i}" for i in range(20)])
    table = evaluate.format_table(result)
    self.assertIn("threshold", table)
    self.assertIn("target specificity 0.5 on 20 calibration normals", table)
    # Without calibration normals: no block, a warning, no stale file.
    with self.assertLogs(level="WARNING") as logs:
      result = self.evaluate(stub_data(calibration=()), workdir)
    self.assertIn("no calibration normals", "\n".join(logs.output))
    self.assertNotIn("calibrated", result["scores"]["mean"])
    self.assertFalse(os.path.exists(path))
    self.assertNotIn("threshold", evaluate.format_table(result))

  def test_bad_target_specificity_is_refused(self):
    with self.assertRaisesRegex(ValueError, "eval.target_specificity=1.5"):
      self.evaluate(stub_data(), self.path("w"), target=1.5)


# ------------------------------------------------------------ a real run


class OldRunTest(TempDirTestCase):
  def test_runs_without_the_keys_resume_with_fraction_zero(self):
    config = ddad_config.get_config("smoke")
    old = json.loads(config.to_json())
    del old["eval"]["calibration_fraction"], old["eval"]["target_specificity"]
    os.makedirs(self.path("old"))
    with open(self.path("old", "config.json"), "w") as f:
      json.dump(old, f)
    # The old run trained on every known normal: resuming it with a
    # calibration split would change its training set.
    with self.assertRaisesRegex(ValueError, "eval.calibration_fraction"):
      configlib.check_workdir(config, self.path("old"), write=False)
    config.eval.calibration_fraction = 0.0
    configlib.check_workdir(config, self.path("old"), write=False)
    self.assertIn("eval.target_specificity", configlib.RESCORING_CHANGES)


class RealRunTest(TempDirTestCase):
  def test_ddad_smoke_eval_json_has_the_calibrated_block(self):
    config = ddad_config.get_config("smoke")
    config.data.cache_dir = self.path("cache")
    config.mesh.data = 1
    config.refine.enabled = False  # the ensembles' scores suffice here
    workdir = self.path("run")
    result = train.run(config, workdir)
    record = self.split_json(workdir)["calibration"]
    self.assertEqual((record["fraction"], record["seed"]), (0.1, 0))
    self.assertLen(record["names"], 50)  # of the 500 known normals
    data = api.Defaults().load_data(config, workdir)
    self.assertLen(data.normal, 450)  # what was trained on
    self.assertEmpty(set(record["names"]) & set(data.normal_names))
    self.assertEmpty(set(record["names"]) & set(data.test_names))
    with np.load(os.path.join(workdir, "calibration_scores.npz")) as z:
      cal = {k: z[k] for k in z.files}
    self.assertEqual(set(cal), set(result["scores"]) | {"names"})
    self.assertEqual(cal["names"].tolist(), record["names"])
    for name, m in result["scores"].items():
      block = m["calibrated"]
      self.assertEqual(set(block), BLOCK)
      self.assertEqual(block["num_calibration"], 50)
      self.assertEqual(block["target_specificity"], 0.95)
      self.assertGreaterEqual(block["calibration_specificity"], 0.95)
      self.assertEqual(cal[name].shape, (50,))
      self.assertEqual(cal[name].dtype, np.float32)
      self.assertEqual(
        block["threshold"], metrics.threshold_at_specificity(cal[name], 0.95)
      )
      for k in ("sensitivity", "specificity"):
        self.assertBetween(block[k], 0.0, 1.0)
    # Another target specificity re-scores the trained run, no retraining.
    rescore = config.copy_and_resolve_references()
    rescore.eval.target_specificity = 0.5
    method, model, mesh = restore.trained(rescore, workdir)
    again = evaluate.evaluate(rescore, workdir, method, model, data, mesh)
    for name, m in again["scores"].items():
      self.assertEqual(m["auroc"], result["scores"][name]["auroc"])
      self.assertEqual(
        m["calibrated"]["threshold"],
        metrics.threshold_at_specificity(cal[name], 0.5),
      )
    # Another calibration split is another training set: refused.
    changed = config.copy_and_resolve_references()
    changed.eval.calibration_fraction = 0.2
    with self.assertRaisesRegex(ValueError, "eval.calibration_fraction"):
      restore.trained(changed, workdir)


if __name__ == "__main__":
  absltest.main()
