"""A workdir's checkpoints and config survive what users do to them: a
corrupt latest checkpoint, a deleted config.json, a failed start, and
`jaxad.evaluate` with another config (untrained parts, other data)."""

import glob
import json
import os
import shutil
import tempfile
from unittest import mock

import ml_collections as mlc
from absl.testing import absltest

from jaxad import (
  checkpoint,
  configlib,
  evaluate,
  loop,
  restore,
  sharding,
  train,
)
from tests import loop_test, train_test


def truncate_largest_file(step_dir: str) -> str:
  files = [f for f in glob.glob(f"{step_dir}/**", recursive=True)]
  path = max((f for f in files if os.path.isfile(f)), key=os.path.getsize)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  return path


class CorruptCheckpointTest(absltest.TestCase):
  """On the loop's counter state: steps 3 and 6 saved, then corrupted."""

  def setUp(self):
    super().setUp()
    self.workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.mesh = sharding.make_mesh(mlc.ConfigDict({"data": 1}))
    self.train(loop_test.counter())

  def train(self, state):
    ckpt = checkpoint.Checkpointer(self.directory)
    try:
      return loop.train(
        loop.place(state, self.mesh),
        loop.compile_phases([loop_test.phase("count", 6)], self.mesh, 1),
        workdir=self.workdir,
        checkpointer=ckpt,
        log_every=3,
        checkpoint_every=3,
      )
    finally:
      ckpt.close()

  def restore(self, **kw):
    ckpt = checkpoint.Checkpointer(self.directory, **kw)
    try:
      return ckpt.restore_latest(loop.place(loop_test.counter(), self.mesh))
    finally:
      ckpt.close()

  def test_a_corrupt_latest_falls_back_to_the_previous_with_a_warning(self):
    bad = os.path.join(self.directory, "6")
    truncate_largest_file(bad)
    # A reader beside training (jaxad.load) falls back, moving nothing.
    with self.assertLogs("absl", "WARNING") as logs:
      state = self.restore(read_only=True)
    self.assertEqual((int(state.step), float(state.total)), (3, 3.0))
    self.assertIn(f"Checkpoint {bad} cannot be read", "".join(logs.output))
    self.assertTrue(os.path.isdir(bad))
    # Training moves the bad step aside, so that it saves step 6 again.
    with self.assertLogs("absl", "WARNING") as logs:
      state = self.restore()
    aside = os.path.join(self.workdir, "checkpoints_unreadable", "6")
    self.assertIn(f"moved it to {aside} and restored step 3", logs.output[-1])
    self.assertTrue(os.path.isdir(aside))
    self.assertFalse(os.path.exists(bad))
    state = self.train(state)
    self.assertEqual((int(state.step), float(state.total)), (6, 6.0))
    state = self.restore()
    self.assertEqual((int(state.step), float(state.total)), (6, 6.0))

  def test_none_readable_is_one_line_naming_the_folder_to_delete(self):
    for step in (3, 6):
      truncate_largest_file(os.path.join(self.directory, str(step)))
    with self.assertRaises(checkpoint.UnreadableCheckpointError) as error:
      self.restore()
    message = str(error.exception)
    self.assertNotIn("\n", message)
    self.assertRegex(message, r"can be read \(step 6: .*\): delete ")
    self.assertTrue(
      message.endswith(
        f"delete {self.directory} to train this run from the start"
      )
    )
    self.assertTrue(os.path.isdir(os.path.join(self.directory, "6")))


class RunConfigTest(absltest.TestCase):
  """One tiny DDAD run, trained over a config.json left by a failed start."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.root = os.path.join(cls.tmp, "data")
    train_test.make_folders(cls.root)
    cls.config = train_test.tiny_config(cls.root, os.path.join(cls.tmp, "c"))
    cls.config.epochs = 1
    cls.workdir = os.path.join(cls.tmp, "run")
    # A start that failed after writing config.json (before any checkpoint)
    # with another seed: nothing was trained with it, so it is replaced.
    os.makedirs(cls.workdir)
    failed = cls.config.copy_and_resolve_references()
    failed.seed = 7
    with open(os.path.join(cls.workdir, "config.json"), "w") as f:
      f.write(failed.to_json())
    cls.result = train.run(cls.config, cls.workdir)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def copy(self, name):
    path = os.path.join(self.tmp, name)
    shutil.copytree(self.workdir, path)
    return path

  def test_a_config_json_without_checkpoints_was_replaced(self):
    self.assertEqual(configlib.stored_config(self.workdir)["seed"], 0)
    # With checkpoints, another config is refused as before.
    other = self.config.copy_and_resolve_references()
    other.seed = 7
    with self.assertRaisesRegex(ValueError, r"different config \(seed"):
      configlib.check_workdir(other, self.workdir, write=False, trained=True)

  def test_a_failed_start_writes_no_config(self):
    workdir = os.path.join(self.tmp, "failed")
    bad = self.config.copy_and_resolve_references()
    bad.data.root = os.path.join(self.tmp, "missing")
    with self.assertRaisesRegex((OSError, ValueError), "missing"):
      train.run(bad, workdir)
    self.assertFalse(os.path.exists(os.path.join(workdir, "config.json")))

  def test_a_deleted_config_json_does_not_let_another_config_train(self):
    workdir = self.copy("deleted")
    os.remove(os.path.join(workdir, "config.json"))
    other = self.config.copy_and_resolve_references()
    other.model.latent_size = 8
    with self.assertRaisesRegex(
      ValueError,
      r"checkpoints/\d+ \(the run's latest checkpoint\) holds a run with a "
      r"different config \(model.latent_size",
    ):
      train.run(other, workdir)
    with self.assertRaisesRegex(ValueError, "model.latent_size"):
      restore.trained(other, workdir)
    self.assertFalse(os.path.exists(os.path.join(workdir, "config.json")))
    # Every step holds the config it was trained with.
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    step, saved = ckpt.saved_config()
    ckpt.close()
    self.assertEqual(saved, json.loads(self.config.to_json()))

  def test_evaluate_refuses_a_stage_the_run_did_not_train(self):
    refined = self.config.copy_and_resolve_references()
    refined.refine.enabled = True
    with self.assertRaisesRegex(
      ValueError, r"has no \['/params/asr'.*parts the run did not train"
    ):
      restore.trained(refined, self.workdir)

  def test_evaluate_on_other_data_writes_to_its_own_folder(self):
    self.assertEqual(
      restore.output_dir(self.config, self.workdir), self.workdir
    )
    rescored = self.config.copy_and_resolve_references()
    rescored.eval.target_specificity = 0.5  # not other data: W itself
    self.assertEqual(restore.output_dir(rescored, self.workdir), self.workdir)
    other = self.config.copy_and_resolve_references()
    other.data.root = os.path.join(self.tmp, "other_set")
    restore.trained(other, self.workdir)  # allowed: the model is the same
    out = restore.output_dir(other, self.workdir)
    self.assertEqual(os.path.dirname(out), self.workdir)
    self.assertRegex(os.path.basename(out), r"^eval_other_set-[0-9a-f]{8}$")
    self.assertEqual(restore.output_dir(other, self.workdir), out)  # stable
    # Another input size is another model: refused.
    resized = self.config.copy_and_resolve_references()
    resized.data.image_size = 64
    with self.assertRaisesRegex(ValueError, "data.image_size"):
      restore.trained(resized, self.workdir)

  def test_evaluate_main_on_other_data_keeps_the_runs_eval_json(self):
    workdir = self.copy("other_data")
    with open(os.path.join(workdir, "eval.json"), "rb") as f:
      own = f.read()
    other_root = os.path.join(self.tmp, "other_set")
    train_test.make_folders(other_root)
    other = self.config.copy_and_resolve_references()
    other.data.root = other_root
    with (
      mock.patch.object(evaluate, "cli") as cli,  # no flags parsed here
      mock.patch.object(evaluate.sharding, "initialize_distributed"),
      mock.patch.object(evaluate, "_REPORT") as report,
    ):
      cli.CONFIG.value, cli.WORKDIR.value = other, workdir
      report.value = False
      evaluate.main([])
    out = restore.output_dir(other, workdir)
    with open(os.path.join(out, "eval.json")) as f:
      result = json.load(f)
    self.assertEqual(result["num_normal"] + result["num_abnormal"], 16)
    self.assertTrue(os.path.isfile(os.path.join(out, "split.json")))
    with open(os.path.join(workdir, "eval.json"), "rb") as f:
      self.assertEqual(f.read(), own)  # the run's results are untouched

  def test_a_corrupt_latest_checkpoint_resumes_to_the_same_result(self):
    workdir = self.copy("corrupt")
    directory = os.path.join(workdir, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit())
    self.assertLen(steps, 2)
    truncate_largest_file(os.path.join(directory, str(steps[-1])))
    with self.assertLogs("absl", "WARNING") as logs:
      result = train.run(self.config, workdir)
    self.assertTrue(
      any(f"restored step {steps[0]} instead" in m for m in logs.output)
    )
    self.assertEqual(
      evaluate.without_run(result), evaluate.without_run(self.result)
    )


if __name__ == "__main__":
  absltest.main()
