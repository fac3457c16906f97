"""End-to-end tests: train, resume, evaluate, config errors, NaN guard."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import ml_collections as mlc
import numpy as np
from absl.testing import absltest
from PIL import Image

from configs import ddad as ddad_config
from jaxad import (
  checkpoint,
  configlib,
  evaluate,
  loop,
  restore,
  sharding,
  train,
)
from jaxad.data import oneclass
from jaxad.methods.ddad import METHOD

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_folders(root):
  """A tiny `folders` layout: smooth normals, abnormals with a bright box."""
  rng = np.random.default_rng(0)
  counts = {
    "train/NORMAL": 40,
    "train/PNEUMONIA": 12,
    "test/NORMAL": 8,
    "test/PNEUMONIA": 8,
  }
  for folder, n in counts.items():
    os.makedirs(os.path.join(root, folder))
    for i in range(n):
      img = np.tile(np.linspace(40, 200, 32), (32, 1)) + rng.normal(
        0, 5, (32, 32)
      )
      if "PNEUMONIA" in folder:
        r, c = rng.integers(4, 20, 2)
        img[r : r + 10, c : c + 10] = 255
      Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
        os.path.join(root, folder, f"{i:03d}.png")
      )


def tiny_config(root, cache):
  c = ddad_config.get_config()
  c.epochs = 2
  c.data.update(
    format="folders",
    root=root,
    image_size=32,
    unlabeled_size=8,
    anomaly_rate=0.5,
    cache_dir=cache,
  )
  c.model.update(num_members=2, width=0.5)
  c.train.update(batch_size=8, log_every=2, checkpoint_every=3)
  c.eval.batch_size = 8
  c.mesh.data = 1
  c.refine.enabled = False  # tests that need the stage turn it on
  return c


class TrainTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()  # checkpoints are large: removed below
    cls.root = os.path.join(cls.tmp, "data")
    make_folders(cls.root)
    cls.config = tiny_config(cls.root, os.path.join(cls.tmp, "cache"))

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def workdir(self, name):
    return os.path.join(self.tmp, name)

  def test_run_written_before_compute_dtype_existed_resumes(self):
    workdir = self.workdir("old_config")
    os.makedirs(workdir)
    old = json.loads(self.config.to_json())
    del old["model"]["compute_dtype"]
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(old, f)
    configlib.check_workdir(self.config, workdir)  # float32: what it did
    bf16 = self.config.copy_and_resolve_references()
    bf16.model.compute_dtype = "bfloat16"
    with self.assertRaisesRegex(ValueError, "model.compute_dtype"):
      configlib.check_workdir(bf16, workdir)

  def test_an_allowed_change_on_resume_is_logged(self):
    config = mlc.ConfigDict({"model": {"teacher_cache": False, "x": 1}})
    stored = {"model.teacher_cache": True, "model.x": 1}
    with self.assertLogs("absl", level="INFO") as logs:
      configlib.check_against(config, stored, ("model.teacher_cache",), "W")
    self.assertEqual(len(logs.output), 1)
    self.assertIn("model.teacher_cache True -> False (allowed)", logs.output[0])

  def test_refinement_stage_can_be_added_to_a_finished_run(self):
    workdir = self.workdir("refine")
    base = train.run(self.config, workdir)
    config = self.config.copy_and_resolve_references()
    config.refine.update(enabled=True, epochs=1, batch_size=8)
    result = train.run(config, workdir)  # resumes: only the new stage runs
    self.assertEqual(set(result["scores"]), {"rec", "intra", "inter", "r_dual"})
    for name in ("rec", "intra", "inter"):  # the ensembles did not move
      self.assertEqual(result["scores"][name], base["scores"][name])
    maps = np.load(os.path.join(workdir, "maps.npz"))
    self.assertEqual(maps["r_dual"].shape, (16, 32, 32))
    changed = config.copy_and_resolve_references()
    changed.refine.lr = 1.0  # the stage exists now: no more changes
    with self.assertRaisesRegex(ValueError, "refine.lr"):
      train.run(changed, workdir)
    # Evaluation refuses another trained config, and a missing checkpoint.
    changed = config.copy_and_resolve_references()
    changed.model.latent_size = 8
    with self.assertRaisesRegex(ValueError, "model.latent_size"):
      restore.trained(changed, workdir)
    with self.assertRaisesRegex(FileNotFoundError, "train first"):
      restore.trained(config, self.workdir("never-trained"))
    self.assertFalse(os.path.exists(self.workdir("never-trained")))

  def test_a_refused_run_leaves_its_workdir_reusable(self):
    workdir = self.workdir("refused")
    bad = self.config.copy_and_resolve_references()
    bad.mesh.data = 8
    bad.train.batch_size = 12  # does not divide the 8 devices
    with self.assertRaisesRegex(ValueError, "train.batch_size=12"):
      train.run(bad, workdir)
    bad.train.batch_size = 8
    bad.eval.batch_size = 12
    with self.assertRaisesRegex(ValueError, "eval.batch_size=12"):
      train.run(bad, workdir)
    self.assertFalse(os.path.exists(os.path.join(workdir, "config.json")))

  def test_scores_that_disagree_with_the_method_are_refused_before_training(
    self,
  ):
    class Renamed(METHOD.__class__):
      def score(self, config, model, context, images):
        out = super().score(config, model, context, images)
        return {"scores": out["scores"], "maps": {"other": out["maps"]["rec"]}}

    data = oneclass.load(self.config.data, self.workdir("renamed"))
    mesh = sharding.make_mesh(self.config.mesh)
    model = loop.place(METHOD.init_state(self.config), mesh).model()
    with self.assertRaisesRegex(ValueError, r"maps \['other'\] are not"):
      evaluate.check_scores(Renamed(), self.config, model, data, mesh)

  def test_nan_loss_stops_with_a_clear_error_and_no_bad_checkpoint(self):
    config = self.config.copy_and_resolve_references()
    # A valid but diverging step size: Adam moves every weight by ~lr, so
    # the next forward pass overflows float32 (a NaN lr is refused first).
    config.optim.lr = 1e38
    with self.assertRaisesRegex(loop.NonFiniteError, "last good checkpoint"):
      train.run(config, self.workdir("nan"))
    ckpt = checkpoint.Checkpointer(
      os.path.join(self.workdir("nan"), "checkpoints")
    )
    self.assertIsNone(ckpt.latest_step())
    ckpt.close()


def run_cli(*args, timeout=600):
  return subprocess.run(
    [sys.executable, "-m", "jaxad.train", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
    # A user's single-device run: not the 8 fake devices of conftest.
    env={
      **{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
      "JAX_PLATFORMS": "cpu",
    },
  )


class CommandLineTest(absltest.TestCase):
  def tempdir(self):
    path = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path

  def test_misspelt_override_is_an_error_naming_the_key(self):
    out = run_cli(
      "--config",
      "configs/ddad.py",
      "--config.epochz=3",
      "--workdir",
      self.tempdir(),
    )
    self.assertEqual(out.returncode, 2)  # one line, no traceback
    self.assertEqual(
      out.stderr.strip().splitlines()[-1],
      "error: unknown config key 'epochz' in ['--config.epochz']. Did you"
      ' mean "epochs" instead of "epochz"?',
    )
    self.assertNotIn("Traceback", out.stderr)

  def test_help_lists_the_shared_flags(self):
    out = run_cli("--help")  # absl exits with 1 after printing the usage
    for flag in ("--config", "--workdir", "--config.<key>=<value>"):
      self.assertIn(flag, out.stdout)

  def test_unknown_config_argument(self):
    out = run_cli(
      "--config",
      "configs/ddad.py:smok",
      "--workdir",
      self.tempdir(),
    )
    self.assertNotEqual(out.returncode, 0)
    self.assertIn("smok", out.stderr)


if __name__ == "__main__":
  absltest.main()
