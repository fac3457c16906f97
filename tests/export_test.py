"""python -m jaxad.export / jaxad.load_exported: parity with jaxad.load on
real images, a symbolic batch, the input contract, no method code needed.

Uses the tiny DDAD run of tests/predict_test.py (trained once per process).
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from absl.testing import absltest
from predict_test import embedded_test_images, trained_run

import jaxad
from jaxad import export
from jaxad.data import inputs, manifest

REPO = pathlib.Path(__file__).resolve().parents[1]


def setUpModule():
  global WORKDIR, MODEL, EXPORTED, PATH, META, TMP, IMAGES
  WORKDIR = trained_run()
  TMP = tempfile.mkdtemp(prefix="jaxad-export-test-")
  PATH = os.path.join(TMP, "model.jaxexport")
  # Lowered for every platform (no accelerator needed); runs on this CPU.
  META = export.export(WORKDIR, PATH, platforms=("cpu", "cuda", "tpu"))
  EXPORTED = jaxad.load_exported(PATH)
  MODEL = jaxad.load(WORKDIR, mesh_data=2)
  # Real images: the embedded test set's, normals and abnormals, decoded
  # and resized as training and TrainedModel.predict decode them.
  raw, _ = embedded_test_images()
  path = os.path.join(TMP, "real.npz")
  np.savez(path, images=raw[::9])
  size, channels = MODEL.image_size, MODEL.channels
  IMAGES = np.stack(
    [manifest.decode(e, size, channels) for e in inputs.find_inputs(path)]
  )


def tearDownModule():
  shutil.rmtree(TMP, ignore_errors=True)


class ExportTest(absltest.TestCase):
  def assert_same(self, got, want):
    self.assertEqual(set(got["scores"]), set(want["scores"]))
    self.assertEqual(set(got["maps"]), set(want["maps"]))
    for kind in ("scores", "maps"):
      for name, value in want[kind].items():
        self.assertEqual(got[kind][name].shape, value.shape)
        np.testing.assert_allclose(
          got[kind][name], value, atol=1e-5, rtol=0, err_msg=f"{kind} {name}"
        )

  def test_scores_equal_the_trained_model_on_real_images(self):
    self.assertEqual(IMAGES.shape, (70, 32, 32, 1))
    self.assert_same(EXPORTED.score(IMAGES), MODEL.score(IMAGES))

  def test_symbolic_batch_one_and_five(self):
    self.assertEqual(str(EXPORTED.exported.in_avals[0].shape[0]), "b")
    for n in (1, 5):
      got = EXPORTED.score(IMAGES[:n])
      self.assertEqual(got["scores"]["rec"].shape, (n,))
      self.assert_same(got, MODEL.score(IMAGES[:n]))

  def test_fixed_batch_export_pads_the_last_call(self):
    path = os.path.join(TMP, "fixed.jaxexport")
    meta = export.export(WORKDIR, path, batch=4)
    self.assertFalse(meta["symbolic_batch"])
    fixed = jaxad.load_exported(path)
    self.assertEqual(fixed.fixed_batch, 4)
    self.assert_same(fixed.score(IMAGES[:5]), MODEL.score(IMAGES[:5]))

  def test_wrong_input_is_a_clear_error_before_calling(self):
    with self.assertRaisesRegex(ValueError, r"uint8 \[N, 32, 32, 1\].*64, 64"):
      EXPORTED.score(np.zeros((2, 64, 64, 1), np.uint8))
    with self.assertRaisesRegex(ValueError, r"uint8 \[N, 32, 32, 1\].*float32"):
      EXPORTED.score(IMAGES.astype(np.float32))
    with self.assertRaisesRegex(ValueError, r"shape \(32, 32, 1\)"):
      EXPORTED.score(IMAGES[0])
    with self.assertRaisesRegex(ValueError, "not a jax.export artefact"):
      bad = os.path.join(TMP, "bad.jaxexport")
      with open(bad, "wb") as f:
        f.write(b"not flatbuffers")
      jaxad.load_exported(bad)

  def test_json_beside_it(self):
    with open(PATH + ".json") as f:
      meta = json.load(f)
    self.assertEqual(meta, json.loads(json.dumps(META)))
    self.assertEqual(meta["method"], "ddad")
    self.assertEqual(meta["platforms"], ["cpu", "cuda", "tpu"])
    contract = meta["input_contract"]
    self.assertEqual(
      (contract["image_size"], contract["channels"], contract["dtype"]),
      (32, 1, "uint8"),
    )
    self.assertEqual(contract["layout"], "NHWC")
    self.assertEqual(meta["score_names"], list(MODEL.score_names))
    self.assertEqual(meta["thresholds"], MODEL.threshold)
    self.assertEqual(EXPORTED.threshold, MODEL.threshold)
    self.assertEqual(meta["config"]["data"]["image_size"], 32)
    self.assertEqual(EXPORTED.score_names, MODEL.score_names)

  def test_runs_with_jax_and_numpy_only(self):
    code = (
      "import sys, numpy as np, jaxad\n"
      f"m = jaxad.load_exported({PATH!r})\n"
      "out = m.score(np.zeros((3, 32, 32, 1), np.uint8))\n"
      "print(sorted(out['scores']), out['maps']['rec'].shape)\n"
      "heavy = ('jaxad.methods', 'jaxad.evaluate', 'flax', 'orbax', 'optax')\n"
      "print(sorted(k for k in sys.modules if k.startswith(heavy)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
      [sys.executable, "-c", code],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
      env={**env, "JAX_PLATFORMS": "cpu"},
    )
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertEqual(
      proc.stdout.splitlines(),
      ["['inter', 'intra', 'r_dual', 'rec'] (3, 32, 32)", "[]"],
    )


if __name__ == "__main__":
  absltest.main()
