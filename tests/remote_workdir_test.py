"""Workdirs in a bucket: `gs://` on tests/fake_gcs.py's local buckets.

Training, resuming, evaluating, jaxad.load / predict and export on a
`gs://bucket/run` workdir write to the bucket, nothing lands in the
working directory (the old `$PWD/gs:/bucket/run`), and the results equal
a local run's (tests/predict_test.py's, same config).
"""

import contextlib
import json
import os
import shutil
import tempfile
import types

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from PIL import Image

import jaxad
from configs import ddad as ddad_config
from jaxad import checkpoint, evaluate, export, predict, train
from jaxad.data import builder
from tests import fake_gcs, predict_test

RUN = "gs://bucket/run"


def setUpModule():
  global TMP, ROOT, CWD, LOCAL, RESULT, _STACK, _OLD_CWD
  LOCAL = predict_test.trained_run()  # before the cwd changes
  TMP = tempfile.mkdtemp(prefix="jaxad-gcs-")
  ROOT, CWD = os.path.join(TMP, "buckets"), os.path.join(TMP, "cwd")
  os.makedirs(CWD)
  _OLD_CWD = os.getcwd()
  os.chdir(CWD)  # where a workdir taken for a local path would land
  _STACK = contextlib.ExitStack()
  _STACK.enter_context(fake_gcs.buckets(ROOT))
  config = ddad_config.get_config("smoke")
  config.mesh.data = 2
  config.data.cache_dir = os.path.join(TMP, "cache")
  RESULT = train.run(config, RUN, progress=False)


def tearDownModule():
  _STACK.close()
  os.chdir(_OLD_CWD)
  shutil.rmtree(TMP, ignore_errors=True)


def in_bucket(*parts) -> str:
  return os.path.join(ROOT, "bucket", "run", *parts)


class RemoteWorkdirTest(absltest.TestCase):
  def test_nothing_lands_in_the_working_directory(self):
    self.assertEqual(os.listdir(CWD), [])

  def test_the_run_is_in_the_bucket(self):
    for name in (
      "config.json",
      "split.json",
      "metrics.jsonl",
      "eval.json",
      "eval_config.json",
      "scores.npz",
      "maps.npz",
      "calibration_scores.npz",
    ):
      self.assertTrue(os.path.isfile(in_bucket(name)), name)
    steps = [s for s in os.listdir(in_bucket("checkpoints")) if s.isdigit()]
    self.assertNotEqual(steps, [])
    self.assertFalse(os.path.exists(in_bucket(".lock")))  # no flock there

  def test_results_equal_the_local_runs(self):
    with open(os.path.join(LOCAL, "eval.json")) as f:
      local = json.load(f)
    local_scores = json.loads(json.dumps(evaluate.without_run(local)))
    self.assertEqual(evaluate.without_run(RESULT), evaluate.without_run(local))
    with open(in_bucket("eval.json")) as f:
      self.assertEqual(evaluate.without_run(json.load(f)), local_scores)

  def test_a_second_run_resumes_from_the_bucket(self):
    config = ddad_config.get_config("smoke")
    config.mesh.data = 2
    config.data.cache_dir = os.path.join(TMP, "cache")
    with open(in_bucket("metrics.jsonl")) as f:
      logged = f.read()
    steps = []
    again = train.run(config, RUN, on_step=steps.append, progress=False)
    self.assertEqual(steps, [])  # restored at the last step: none to run
    self.assertEqual(evaluate.without_run(again), evaluate.without_run(RESULT))
    with open(in_bucket("metrics.jsonl")) as f:
      self.assertEqual(f.read(), logged)  # nothing trained again

  def test_load_predict_and_export_from_the_bucket(self):
    remote = jaxad.load(RUN, mesh_data=2)
    local = jaxad.load(LOCAL, mesh_data=2)
    inputs = os.path.join(TMP, "inputs")
    os.makedirs(inputs)
    for i, pixels in enumerate(predict_test.embedded_test_images()[0][:6]):
      Image.fromarray(pixels[..., 0]).save(os.path.join(inputs, f"{i}.png"))
    # The same program on the same weights: the same rows, to the bit.
    self.assertEqual(remote.predict(inputs), local.predict(inputs))
    out = RUN + "/predictions/p"
    summary = predict.predict(remote, inputs, out)
    self.assertEqual(summary["scored"], 6)
    self.assertEqual(summary["output"], out)
    for name in ("predictions.csv", "summary.json", "maps.npz"):
      self.assertTrue(os.path.isfile(in_bucket("predictions", "p", name)))
    meta = export.export(RUN, RUN + "/model.jaxexport")
    self.assertEqual(meta["workdir"], RUN)
    exported = export.load_exported(RUN + "/model.jaxexport")
    images = np.random.default_rng(0).integers(
      0, 256, (5, remote.image_size, remote.image_size, 1), np.uint8
    )
    want = local.score(images)["scores"]
    for name, value in exported.score(images)["scores"].items():
      # Another compiled program of the same maths (as tests/export_test).
      np.testing.assert_allclose(value, want[name], atol=1e-5)
    self.assertEqual(os.listdir(CWD), [])

  def test_an_unreadable_checkpoint_is_set_aside_in_the_bucket(self):
    directory = "gs://bucket/ckpt"
    ckpt = checkpoint.Checkpointer(directory)
    for step in (1, 2):
      ckpt.save(step, {"w": jnp.full(3, float(step))})
    ckpt.close()
    step_dir = os.path.join(ROOT, "bucket", "ckpt", "2")
    for folder, _, files in os.walk(step_dir):
      for name in files:
        if name.startswith("manifest"):  # the array data's index
          os.remove(os.path.join(folder, name))
    ckpt = checkpoint.Checkpointer(directory)
    restored = ckpt.restore_latest({"w": jnp.zeros(3)})
    ckpt.close()
    np.testing.assert_array_equal(restored["w"], [1.0, 1.0, 1.0])
    aside = os.path.join(ROOT, "bucket", "ckpt_unreadable")
    self.assertCountEqual(os.listdir(aside), ["2", "README.txt"])

  def test_skipped_files_are_listed_in_the_bucket(self):
    workdir = "gs://bucket/skips"
    skipped = types.SimpleNamespace(name="d", skipped=[("a.png", "bad\tfile")])
    builder.report_skipped(skipped, workdir)
    with open(os.path.join(ROOT, "bucket", "skips", "skipped.txt")) as f:
      self.assertEqual(f.read(), "a.png\tbad file\n")
    builder.report_skipped(types.SimpleNamespace(name="d", skipped=[]), workdir)
    self.assertFalse(
      os.path.exists(os.path.join(ROOT, "bucket", "skips", "skipped.txt"))
    )
    self.assertEqual(os.listdir(CWD), [])


if __name__ == "__main__":
  absltest.main()
