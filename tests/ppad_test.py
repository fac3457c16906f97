"""Tests of PPAD on the method contract (jaxad/methods/ppad/__init__.py).

The zero-shot baseline and an imported prompt checkpoint scored without a
checkpoint or training; the config refusals; the seeded K-shot record
W/shots.json (batches, fusion, score outputs and the optimizer: in
ppad_score_test.py). Tests on the tiny random CLIP of
../shared/golden (the `:smoke` config) or on ../shared/data are skipped
with a reason when ../shared is absent.
"""

import dataclasses
import json
import os
import shutil
import tempfile
import unittest

import jax
import numpy as np
from absl.testing import absltest, parameterized
from data_test import KERMANY, SHARED
from weights_test import _tensor, torch_save

import jaxad
from configs import ppad as ppad_config
from jaxad import evaluate, loop, restore, train
from jaxad.methods import ppad
from jaxad.methods.ppad import METHOD

CLIP = SHARED / "golden" / "clip_vit_tiny_random.pt"
CLIP_JSON = SHARED / "golden" / "clip_vit_tiny_random.json"
SIZE = 64  # the :smoke image size, the tiny CLIP's resolution
N_CTX, TEXT_WIDTH, GRID, VISION_WIDTH = 16, 128, 4, 128  # the tiny CLIP
EVAL_KEYS = {
  "auroc",
  "ap",
  "f1",
  "accuracy",
  "sensitivity",
  "specificity",
  "decision_threshold",
}

need_clip = unittest.skipUnless(
  CLIP.is_file(), f"{CLIP} absent (shared data sits beside the checkout)"
)
need_data = unittest.skipUnless(
  CLIP.is_file() and KERMANY.is_dir(),
  f"{CLIP} or {KERMANY} absent (shared data sits beside the checkout)",
)

_CACHE = []  # one prepared-dataset cache for the whole module


def setUpModule():
  _CACHE.append(tempfile.mkdtemp())


def tearDownModule():
  shutil.rmtree(_CACHE.pop(), ignore_errors=True)


def smoke_config(arg="smoke", **overrides):
  """configs/ppad.py:<arg> on one of conftest's 8 fake devices."""
  c = ppad_config.get_config(arg)
  c.data.cache_dir = os.path.join(_CACHE[0], "cache")
  c.mesh.data = 1
  c.update_from_flattened_dict(overrides)
  return c


def subset(data, n):
  """n test images of a PPADData, half of each class (a quick evaluation)."""
  labels = np.asarray(data.test_labels)
  index = np.concatenate(
    [np.flatnonzero(labels == c)[: n // 2] for c in (0, 1)]
  )
  return dataclasses.replace(
    data,
    test=data.test[index],
    test_labels=labels[index],
    test_names=tuple(data.test_names[i] for i in index),
  )


def fake_data(k=16, n_test=4, seed=0):
  """PPADData with k distinct random shots (no files)."""
  rng = np.random.default_rng(seed)
  img = lambda n: rng.integers(0, 256, (n, SIZE, SIZE, 1), np.uint8)
  return ppad.PPADData(
    name="fake",
    shots=img(k),
    test=img(n_test),
    test_labels=np.arange(n_test, dtype=np.int32) % 2,
    test_names=tuple(str(i) for i in range(n_test)),
  )


def write_prompt_checkpoint(path, ctx, mask, *, drop=None):
  """A released PPAD prompt file's layout (torch.save, nested dicts, fp16,
  with extra entries the reader must ignore); `drop` omits one key."""
  rng = np.random.default_rng(1)
  learner = {
    "ctx": _tensor(ctx, "0"),
    "token_prefix": _tensor(
      rng.normal(size=(10, 1, TEXT_WIDTH)).astype(np.float16), "1"
    ),
    "clip_model.visual.proj": _tensor(
      rng.normal(size=(VISION_WIDTH, 64)).astype(np.float16), "2"
    ),
  }
  masker = {"mask_embedding": _tensor(mask, "3")}
  if drop == "ctx":
    del learner["ctx"]
  if drop == "mask_embedding":
    del masker["mask_embedding"]
  torch_save(
    path, {"prompt_learner_ctx": learner, "image_mask_learner": masker}
  )


class TempDirTestCase(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

  def path(self, name):
    return os.path.join(self.tmp, name)


# ------------------------------------------------------------ no training


@need_data
class ZeroShotTest(TempDirTestCase):
  def test_train_only_evaluates_and_evaluate_needs_no_checkpoint(self):
    config = smoke_config("smoke,zero_shot")
    self.assertEqual(config.model.mode, "zero_shot")
    self.assertFalse(METHOD.trains(config))
    self.assertEqual([s.name for s in METHOD.scores(config)], ["zero_shot"])
    self.assertEqual(METHOD.scores(config)[0].threshold, 0.5)

    # jaxad.train: evaluates, writes eval.json, trains and saves nothing.
    work = self.path("train")
    result = train.run(config, work)
    self.assertFalse(os.path.exists(os.path.join(work, "checkpoints")))
    self.assertFalse(os.path.exists(os.path.join(work, "metrics.jsonl")))
    with open(os.path.join(work, "eval.json")) as f:
      stored = json.load(f)
    self.assertEqual(stored, json.loads(json.dumps(result)))
    self.assertEqual(list(stored["scores"]), ["zero_shot"])
    m = stored["scores"]["zero_shot"]
    self.assertEqual(set(m), EVAL_KEYS | {"calibrated"})
    self.assertEqual(m["decision_threshold"], 0.5)
    for key in EVAL_KEYS - {"decision_threshold"}:
      self.assertBetween(m[key], 0.0, 1.0)
    self.assertEqual(stored["num_normal"] + stored["num_abnormal"], 624)
    with np.load(os.path.join(work, "scores.npz")) as npz:
      z = npz["zero_shot"]
    self.assertEqual(z.shape, (624,))
    self.assertTrue(np.all((z >= 0) & (z <= 1)))
    self.assertFalse(METHOD.phases(config, METHOD.load_data(config, work)))

    # jaxad.evaluate's main on a new workdir: no checkpoint, no training,
    # the same eval.json as jaxad.train's.
    fresh = self.path("evaluate")
    method, model, mesh = restore.trained(config, fresh)
    self.assertIs(method, METHOD)
    data = method.load_data(config, fresh)
    stale = os.path.join(fresh, "report")  # an earlier evaluation's report
    os.makedirs(stale)
    again = evaluate.evaluate(config, fresh, method, model, data, mesh)
    self.assertEqual(evaluate.without_run(again), evaluate.without_run(result))
    self.assertFalse(os.path.exists(stale))  # removed: it showed other numbers
    self.assertFalse(os.path.exists(os.path.join(fresh, "checkpoints")))
    # jaxad.load (predict, export) on a workdir only jaxad.evaluate wrote.
    loaded = jaxad.load(fresh, mesh_data=1)
    np.testing.assert_allclose(
      loaded.score(data.test[:4])["scores"]["zero_shot"], z[:4], rtol=1e-5
    )
    # ... and on the train run's workdir (its config.json agrees).
    _, model, _ = restore.trained(config, work)
    jax.tree.map(
      np.testing.assert_array_equal,
      jax.device_get(model.frozen),
      jax.device_get(METHOD.init_state(config).frozen),
    )

  def test_evaluate_refuses_another_runs_workdir(self):
    config = smoke_config("smoke,zero_shot")
    work = self.path("w")
    os.makedirs(work)
    other = smoke_config("smoke,zero_shot", seed=3)
    with open(os.path.join(work, "config.json"), "w") as f:
      f.write(other.to_json())
    with self.assertRaisesRegex(ValueError, "seed"):
      restore.trained(config, work)
    # Scoring inputs (score.*) may change, as for a trained run.
    rescored = smoke_config("smoke,zero_shot", seed=3)
    rescored.score.decision_threshold = 0.3
    restore.trained(rescored, work)


@need_clip
class PromptCheckpointTest(TempDirTestCase):
  def setUp(self):
    super().setUp()
    with open(CLIP_JSON) as f:
      c = json.load(f)["config"]
    # The learner's shapes follow from the tiny CLIP's config.
    self.assertEqual(c["transformer_width"], TEXT_WIDTH)
    self.assertEqual(c["vision_width"], VISION_WIDTH)
    self.assertEqual(c["image_resolution"] // c["vision_patch_size"], GRID)
    self.assertEqual(c["image_resolution"], SIZE)
    rng = np.random.default_rng(0)
    self.ctx = (0.02 * rng.normal(size=(N_CTX, TEXT_WIDTH))).astype(np.float16)
    self.mask = (0.2 * rng.normal(size=(1, GRID * GRID, VISION_WIDTH))).astype(
      np.float16
    )

  def test_imported_prompts_are_the_state_and_are_not_trained(self):
    path = self.path("PPAD_ZhangLab.pt")
    write_prompt_checkpoint(path, self.ctx, self.mask)
    config = smoke_config(**{"model.prompts_checkpoint": path})
    self.assertFalse(METHOD.trains(config))
    self.assertTrue(METHOD.trains(smoke_config()))
    state = METHOD.init_state(config)
    p = jax.device_get(state.params["prompts"])
    self.assertEqual(p["ctx"].dtype, np.float32)
    self.assertEqual(p["mask_embedding"].dtype, np.float32)
    np.testing.assert_array_equal(p["ctx"], self.ctx.astype(np.float32))
    np.testing.assert_array_equal(
      p["mask_embedding"], self.mask.astype(np.float32)
    )
    self.assertEqual(METHOD.phases(config, fake_data()), [])
    # A fresh (not imported) state has other prompts: the file was read.
    fresh = jax.device_get(METHOD.init_state(smoke_config()).params["prompts"])
    self.assertFalse(np.allclose(fresh["ctx"], p["ctx"]))

  @need_data
  def test_evaluate_scores_the_imported_prompts_without_a_checkpoint(self):
    path = self.path("prompts.pt")
    write_prompt_checkpoint(path, self.ctx, self.mask)
    config = smoke_config(**{"model.prompts_checkpoint": path})
    work = self.path("w")
    method, model, mesh = restore.trained(config, work)
    np.testing.assert_array_equal(
      jax.device_get(model.params["prompts"]["ctx"]),
      self.ctx.astype(np.float32),
    )
    data = subset(method.load_data(config, work), config.eval.batch_size)
    result = evaluate.evaluate(config, work, method, model, data, mesh)
    self.assertEqual(list(result["scores"]), ["ppad"])
    self.assertEqual(set(result["scores"]["ppad"]), EVAL_KEYS | {"calibrated"})
    self.assertFalse(os.path.exists(os.path.join(work, "checkpoints")))
    with np.load(os.path.join(work, "scores.npz")) as npz:
      imported = npz["ppad"]
    # Without the file the prompts train: evaluate then needs a checkpoint.
    trained = smoke_config()
    with self.assertRaisesRegex(FileNotFoundError, "No checkpoint"):
      restore.trained(trained, self.path("untrained"))
    # Another prompt set scores the same images otherwise.
    fresh_model = loop.place(METHOD.init_state(trained), mesh).model()
    with jax.set_mesh(mesh):
      ctx = METHOD.score_context(trained, fresh_model, data)
      fresh = evaluate.score_images(
        evaluate.score_fn(METHOD, trained, mesh),
        fresh_model,
        ctx,
        data.test,
        trained.eval.batch_size,
        mesh,
      )["scores"]["ppad"]
    self.assertFalse(np.allclose(imported, fresh, atol=1e-4))

  @parameterized.named_parameters(
    ("ctx_width", "prompt_learner_ctx.ctx", (N_CTX, 64), None),
    ("ctx_length", "prompt_learner_ctx.ctx", (8, TEXT_WIDTH), None),
    (
      "mask_grid",
      "image_mask_learner.mask_embedding",
      None,
      (1, 49, VISION_WIDTH),
    ),
    (
      "mask_no_batch_axis",
      "image_mask_learner.mask_embedding",
      None,
      (GRID * GRID, VISION_WIDTH),
    ),
  )
  def test_wrong_shape_is_refused_naming_the_key(self, key, ctx, mask):
    path = self.path("bad.pt")
    write_prompt_checkpoint(
      path,
      self.ctx if ctx is None else np.zeros(ctx, np.float16),
      self.mask if mask is None else np.zeros(mask, np.float16),
    )
    with self.assertRaisesRegex(ValueError, f"{key}.*shape"):
      METHOD.init_state(smoke_config(**{"model.prompts_checkpoint": path}))

  @parameterized.parameters(
    ("ctx", "prompt_learner_ctx.ctx"),
    ("mask_embedding", "image_mask_learner.mask_embedding"),
  )
  def test_missing_key_is_refused_naming_it(self, drop, key):
    path = self.path("missing.pt")
    write_prompt_checkpoint(path, self.ctx, self.mask, drop=drop)
    with self.assertRaisesRegex(ValueError, f"no {key}"):
      METHOD.init_state(smoke_config(**{"model.prompts_checkpoint": path}))


# --------------------------------------------------------------- refusals


class CheckConfigTest(TempDirTestCase):
  def config(self, arg="smoke", **overrides):
    # check_config only needs the files to exist: any file will do here.
    base = {"model.clip_weights": __file__}
    return smoke_config(arg, **{**base, **overrides})

  def test_smoke_configs_pass(self):
    METHOD.check_config(self.config())
    METHOD.check_config(self.config("smoke,zero_shot"))
    METHOD.check_config(self.config(**{"model.prompts_checkpoint": __file__}))
    # Zero-shot and imported prompts draw no batches: any shot count.
    METHOD.check_config(self.config("smoke,zero_shot", **{"data.shots": 1}))
    METHOD.check_config(
      self.config(**{"data.shots": 1, "model.prompts_checkpoint": __file__})
    )

  @parameterized.named_parameters(
    (
      "no_clip",
      {"model.clip_weights": ""},
      ValueError,
      r"config\.model\.clip_weights is empty.*CheXzero",
    ),
    (
      "clip_file_absent",
      {"model.clip_weights": "/nonexistent/best_64.pt"},
      FileNotFoundError,
      r"config\.model\.clip_weights: no file /nonexistent/best_64\.pt",
    ),
    (
      "prompts_file_absent",
      {"model.prompts_checkpoint": "/nonexistent/PPAD.pt"},
      FileNotFoundError,
      r"config\.model\.prompts_checkpoint: no file /nonexistent/PPAD\.pt",
    ),
    (
      "bad_mode",
      {"model.mode": "bogus"},
      ValueError,
      r"config\.model\.mode='bogus'",
    ),
    (
      "zero_shot_with_prompts",
      {"model.mode": "zero_shot", "model.prompts_checkpoint": __file__},
      ValueError,
      r"config\.model\.prompts_checkpoint",
    ),
    ("rgb", {"data.channels": 3}, ValueError, r"config\.data\.channels=3"),
    (
      "fewer_shots_than_a_batch",
      {"data.shots": 4},
      ValueError,
      r"config\.data\.shots=4.*config\.train\.batch_size=8",
    ),
    (
      "sas_probability",
      {"train.sas_probability": 1.5},
      ValueError,
      r"config\.train\.sas_probability=1\.5",
    ),
    (
      "negative_sas_probability",
      {"train.sas_probability": -0.1},
      ValueError,
      r"config\.train\.sas_probability=-0\.1",
    ),
    (
      "three_classes",
      {"model.classnames": ("normal", "pneumonia", "covid")},
      ValueError,
      r"config\.model\.classnames",
    ),
    ("bad_dtype", {"model.compute_dtype": "int8"}, ValueError, "compute_dtype"),
  )
  def test_refused_naming_the_key(self, overrides, error, message):
    config = self.config(**overrides)
    with self.assertRaisesRegex(error, message):
      METHOD.check_config(config)
    # jaxad.train refuses before anything is written to the workdir.
    work = self.path("w")
    with self.assertRaisesRegex(error, message):
      train.run(config, work)
    self.assertFalse(os.path.exists(work))

  @need_clip
  def test_image_size_must_be_the_clips(self):
    config = smoke_config(**{"data.image_size": 32})
    for fn in (METHOD.check_config, METHOD.init_state):
      with self.assertRaisesRegex(
        ValueError, r"config\.data\.image_size=32.*64"
      ):
        fn(config)


# -------------------------------------------------------------- the shots


@need_data
class ShotsTest(TempDirTestCase):
  def shots(self, work, **overrides):
    config = smoke_config(**overrides)
    data = METHOD.load_data(config, work)
    with open(os.path.join(work, "shots.json")) as f:
      return config, data, json.load(f)

  def test_shots_are_a_seeded_draw_of_known_normals(self):
    from jaxad.data import oneclass

    config, data, record = self.shots(self.path("a"))
    self.assertEqual(record["shot_seed"], 0)
    index = record["indices_into_known_normals"]
    self.assertLen(index, 16)
    self.assertEqual(index, sorted(set(index)))
    normal = oneclass.load(config.data, self.path("a")).normal
    self.assertEqual(record["known_normals"], len(normal))
    self.assertGreater(len(normal), 16)
    self.assertTrue(all(0 <= i < len(normal) for i in index))
    np.testing.assert_array_equal(data.shots, normal[index])
    self.assertEqual(data.shots.shape, (16, SIZE, SIZE, 1))
    self.assertEqual(data.shots.dtype, np.uint8)
    # The same seed in another workdir: the same draw.
    _, _, same = self.shots(self.path("b"))
    self.assertEqual(same, record)
    # Another shot seed: another draw, recorded as such.
    _, _, other = self.shots(self.path("c"), **{"data.shot_seed": 1})
    self.assertEqual(other["shot_seed"], 1)
    self.assertNotEqual(other["indices_into_known_normals"], index)
    # The shot seed is not the run's seed.
    _, _, seeded = self.shots(self.path("d"), seed=5)
    self.assertEqual(seeded["indices_into_known_normals"], index)


if __name__ == "__main__":
  absltest.main()
