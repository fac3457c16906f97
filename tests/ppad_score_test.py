"""Tests of PPAD's training batches (seeded, resumable, one visit per shot
per epoch), the region fusion, the score's outputs (against the original's
formula on the tiny random CLIP of ../shared/golden: skipped with a reason
when ../shared is absent) and the SGD + cosine optimizer against torch's
CosineAnnealingLR. The end-to-end runs, refusals and shots are in
ppad_test.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized
from ppad_test import CLIP, SIZE, fake_data, need_clip

from configs import ppad as ppad_config
from jaxad import evaluate, loop, sharding
from jaxad.methods import ppad
from jaxad.methods.ppad import METHOD, prompts, sas
from jaxad.models import clip_tokenizer
from jaxad.weights import clip as clip_weights


def smoke_config(arg="smoke", **overrides):
  """configs/ppad.py:<arg> on one device (these tests read no dataset)."""
  c = ppad_config.get_config(arg)
  c.mesh.data = 1
  c.update_from_flattened_dict(overrides)
  return c


# ---------------------------------------------------------------- batches


class BatchesTest(parameterized.TestCase):
  def phase(self, data, **overrides):
    # phases() reads no weights: the smoke config's shapes and schedule.
    config = smoke_config(**overrides)
    (phase,) = METHOD.phases(config, data)
    return config, phase

  def test_schedule(self):
    config, phase = self.phase(fake_data(16))
    self.assertEqual(phase.name, "ppad")
    self.assertEqual(phase.num_steps, 3 * 16 // 8)  # epochs x shots / batch
    self.assertEqual(phase.batch_size, 8)
    self.assertEqual(phase.batch_key, "train.batch_size")
    self.assertIsNone(phase.inputs)
    # The paper's setting: 64 shots, batch 64, 100 epochs = 100 steps.
    (paper,) = METHOD.phases(ppad_config.get_config(), fake_data(64))
    self.assertEqual(paper.num_steps, 100)
    # More shots than a batch fills are dropped (whole batches only).
    _, phase = self.phase(fake_data(20))
    self.assertEqual(phase.num_steps, 3 * 2)

  def test_batches_are_seeded_and_resume(self):
    data = fake_data(16)
    config, phase = self.phase(data)
    full = list(phase.batches(0))
    self.assertLen(full, phase.num_steps)
    again = list(METHOD.phases(config, data)[0].batches(0))
    for first in range(phase.num_steps + 1):
      resumed = list(phase.batches(first))
      self.assertLen(resumed, phase.num_steps - first)
      for a, b in zip(resumed, full[first:], strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)
    for a, b in zip(again, full, strict=True):
      jax.tree.map(np.testing.assert_array_equal, a, b)
    # Another seed: another order, regions and lesions.
    _, other = self.phase(data, seed=1)
    other = list(other.batches(0))
    self.assertFalse(
      all(
        np.array_equal(a["images"], b["images"])
        for a, b in zip(other, full, strict=True)
      )
    )

  def test_batch_contents(self):
    data = fake_data(16)
    shots = {s.tobytes(): i for i, s in enumerate(data.shots)}
    self.assertLen(shots, 16)
    _, phase = self.phase(data)
    labels, regions = [], []
    for batch in phase.batches(0):
      self.assertEqual(set(batch), {"images", "labels", "regions"})
      self.assertEqual(batch["images"].shape, (8, SIZE, SIZE, 1))
      self.assertEqual(batch["images"].dtype, np.uint8)
      self.assertEqual(batch["labels"].shape, (8,))
      self.assertEqual(batch["regions"].shape, (8,))
      self.assertEqual(batch["regions"].dtype, np.int32)
      self.assertTrue(np.all((batch["regions"] >= 0) & (batch["regions"] < 5)))
      self.assertTrue(np.all(np.isin(batch["labels"], (0, 1))))
      for image, label in zip(batch["images"], batch["labels"], strict=True):
        # Unlesioned images are shots as they are; lesioned ones changed.
        self.assertEqual(image.tobytes() in shots, label == 0)
      labels.append(batch["labels"])
      regions.append(batch["regions"])
    labels, regions = np.concatenate(labels), np.concatenate(regions)
    # 48 draws at p = 0.5: both kinds, and several regions.
    self.assertBetween(labels.mean(), 0.2, 0.8)
    self.assertGreater(len(set(regions.tolist())), 2)

  def test_without_sas_every_epoch_visits_every_shot_once(self):
    data = fake_data(16)
    shots = {s.tobytes(): i for i, s in enumerate(data.shots)}
    _, phase = self.phase(data, **{"train.sas_probability": 0.0})
    steps_per_epoch = 2
    batches = list(phase.batches(0))
    orders = []
    for epoch in range(3):
      epoch_batches = batches[
        epoch * steps_per_epoch : (epoch + 1) * steps_per_epoch
      ]
      seen = []
      for batch in epoch_batches:
        np.testing.assert_array_equal(batch["labels"], 0)
        seen += [shots[image.tobytes()] for image in batch["images"]]
      self.assertEqual(sorted(seen), list(range(16)))
      orders.append(seen)
    # A new permutation per epoch.
    self.assertNotEqual(orders[0], orders[1])
    self.assertNotEqual(orders[1], orders[2])

  def test_with_sas_always_every_image_is_lesioned(self):
    data = fake_data(16)
    shots = {s.tobytes() for s in data.shots}
    _, phase = self.phase(data, **{"train.sas_probability": 1.0})
    batch = next(phase.batches(0))
    np.testing.assert_array_equal(batch["labels"], 1)
    for image in batch["images"]:
      self.assertNotIn(image.tobytes(), shots)


# ---------------------------------------------------------------- scoring


class FuseTest(absltest.TestCase):
  def test_max_above_the_threshold_else_mean(self):
    probs = np.array(
      [
        [0.9, 0.1, 0.8, 0.0],
        [0.2, 0.2, 0.8, 0.0],
        [0.1, 0.3, 0.5, 0.0],
        [0.4, 0.6, 0.5, 0.0],
        [0.4, 0.3, 0.4, 1.0],
      ],
      np.float32,
    )  # [5 regions, 4 images]
    fused = np.asarray(prompts.fuse(jnp.asarray(probs), 0.8))
    expected = [
      0.9,  # max 0.9 > 0.8: the max
      (0.1 + 0.2 + 0.3 + 0.6 + 0.3) / 5,  # max 0.6: the mean
      (0.8 + 0.8 + 0.5 + 0.5 + 0.4) / 5,  # max 0.8, not above: the mean
      1.0,  # one region sure: the max
    ]
    np.testing.assert_allclose(fused, expected, rtol=1e-6)
    self.assertEqual(fused.shape, (4,))
    np.testing.assert_allclose(
      prompts.fuse(jnp.asarray(probs), 0.0), probs.max(0), rtol=1e-6
    )
    np.testing.assert_allclose(
      prompts.fuse(jnp.asarray(probs), 1.0), probs.mean(0), rtol=1e-6
    )


@need_clip
class ScoreTest(parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    rng = np.random.default_rng(0)
    cls.images = rng.integers(0, 256, (4, SIZE, SIZE, 1), np.uint8)

  def run_score(self, config, images):
    state = METHOD.init_state(config)
    model = state.model()
    context = METHOD.score_context(config, model, None)
    out = jax.jit(lambda m, c, x: METHOD.score(config, m, c, x))(
      model, context, jnp.asarray(images)
    )
    return context, jax.device_get(out)

  @parameterized.parameters(
    ("smoke", "ppad", 5), ("smoke,zero_shot", "zero_shot", 1)
  )
  def test_outputs(self, arg, name, positions):
    config = smoke_config(arg)
    self.assertEqual([s.name for s in METHOD.scores(config)], [name])
    context, out = self.run_score(config, self.images)
    self.assertEqual(context.shape, (positions, 2, 64))  # [P, C, embed_dim]
    np.testing.assert_allclose(
      np.linalg.norm(np.asarray(context), axis=-1), 1.0, rtol=1e-5
    )
    self.assertEqual(set(out), {"scores", "maps"})
    self.assertEqual(list(out["scores"]), [name])
    self.assertEqual(out["maps"], {})
    s = out["scores"][name]
    self.assertEqual(s.shape, (4,))
    self.assertTrue(np.all(np.isfinite(s)))
    self.assertTrue(np.all((s >= 0) & (s <= 1)), s)
    # Per image: the score of an image does not depend on its batch.
    _, two = self.run_score(config, self.images[:2])
    np.testing.assert_allclose(two["scores"][name], s[:2], rtol=1e-5, atol=1e-6)
    # What evaluate traces before training agrees.
    mesh = sharding.make_mesh(config.mesh)
    model = loop.place(METHOD.init_state(config), mesh).model()
    evaluate.check_scores(
      METHOD,
      smoke_config(arg, **{"eval.batch_size": 4}),
      model,
      fake_data(),
      mesh,
    )

  def clip_and_input(self):
    """The tiny CLIP as the original builds it, and the images normalised
    by hand (CheXzero's statistics, gray stacked to RGB)."""
    clip = clip_weights.load_model(CLIP, fp16_round=True)
    x = (self.images.astype(np.float32) / 255 - 0.39799) / 0.32721
    return clip, jnp.asarray(np.repeat(x, 3, axis=-1))

  def test_zero_shot_is_the_pneumonia_softmax_of_plain_class_names(self):
    config = smoke_config("smoke,zero_shot")
    _, out = self.run_score(config, self.images)
    clip, x = self.clip_and_input()
    ids = clip_tokenizer.tokenize(["normal.", "pneumonia."])
    logits = np.asarray(
      clip.logits(clip.encode_image(x), clip.encode_text(ids))
    )
    e = np.exp(logits - logits.max(-1, keepdims=True))
    expected = e[:, 1] / e.sum(-1)
    np.testing.assert_allclose(
      out["scores"]["zero_shot"], expected, rtol=1e-5, atol=1e-6
    )

  def test_ppad_score_fuses_the_five_region_probabilities(self):
    # Region probabilities with the (golden-tested) prompt maths, the
    # state's own prompts, fused by hand: the score is wired to them.
    config = smoke_config()
    learned = jax.device_get(METHOD.init_state(config).params["prompts"])
    _, out = self.run_score(config, self.images)
    clip, x = self.clip_and_input()
    ids, slot = prompts.prompt_tokens(
      ("left lung", "right lung", "upper lung", "lower lung", ""),
      ("normal", "pneumonia"),
    )
    text = prompts.normalize(
      prompts.text_features(clip, jnp.asarray(learned["ctx"]), ids, slot)
    ).reshape(5, 2, -1)
    token_masks = jnp.asarray(sas.token_masks(sas.region_masks(SIZE), 16))
    probs = []
    for r in range(5):
      logits = np.asarray(
        prompts.region_logits(
          clip,
          jnp.asarray(learned["mask_embedding"]),
          token_masks,
          text,
          x,
          jnp.full((len(x),), r, jnp.int32),
        )
      )
      e = np.exp(logits - logits.max(-1, keepdims=True))
      probs.append(e[:, 1] / e.sum(-1))
    probs = np.stack(probs)
    self.assertGreater(np.ptp(probs, axis=0).min(), 0)  # regions differ
    top = probs.max(0)
    expected = np.where(top > 0.8, top, probs.mean(0))
    np.testing.assert_allclose(
      out["scores"]["ppad"], expected, rtol=1e-5, atol=1e-6
    )

  def test_fusion_threshold_selects_max_or_mean(self):
    _, by_max = self.run_score(
      smoke_config(**{"score.fusion_threshold": 0.0}), self.images
    )
    _, by_mean = self.run_score(
      smoke_config(**{"score.fusion_threshold": 1.0}), self.images
    )
    _, fused = self.run_score(smoke_config(), self.images)
    top, mean = by_max["scores"]["ppad"], by_mean["scores"]["ppad"]
    self.assertTrue(np.all(top >= mean - 1e-7))
    s = fused["scores"]["ppad"]
    expected = np.where(top > 0.8, top, mean)
    np.testing.assert_allclose(s, expected, rtol=1e-6)


# ------------------------------------------------------------ the optimizer


class OptimizerTest(absltest.TestCase):
  def test_sgd_momentum_with_torch_cosine_annealing(self):
    config = ppad_config.get_config()
    self.assertEqual(config.optim.lr, 1e-3)
    self.assertEqual(config.optim.momentum, 0.9)
    steps = 100
    tx = ppad.optimizer(config, steps)
    g = np.array([1.0, -2.0, 0.5], np.float64)
    params = jnp.zeros(3, jnp.float32)
    state = tx.init(params)
    update = jax.jit(lambda s: tx.update(jnp.asarray(g, jnp.float32), s))
    v, p = np.zeros(3), np.zeros(3)
    for t in range(steps + 2):
      # torch: CosineAnnealingLR(T_max=100, eta_min=0) stepped per
      # iteration, SGD(momentum=0.9, dampening=0): v = 0.9 v + g,
      # p -= lr_t v (closed form of the scheduler; flat 0 after T_max).
      lr = 1e-3 * (1 + math.cos(math.pi * min(t, steps) / steps)) / 2
      if t == 0:
        self.assertEqual(lr, 1e-3)
      v = 0.9 * v + g
      p = p - lr * v
      updates, state = update(state)
      params = optax.apply_updates(params, updates)
      np.testing.assert_allclose(
        np.asarray(updates), -lr * v, rtol=1e-5, atol=1e-9, err_msg=f"t={t}"
      )
      np.testing.assert_allclose(
        np.asarray(params), p, rtol=1e-4, atol=1e-9, err_msg=f"t={t}"
      )

  @need_clip
  def test_first_train_step_moves_the_prompts_by_lr_times_the_gradient(self):
    config = smoke_config()
    data = fake_data(16)
    (phase,) = METHOD.phases(config, data)
    mesh = sharding.make_mesh(config.mesh)
    state = loop.place(METHOD.init_state(config), mesh)
    before = jax.device_get(state.params)
    batch = next(phase.batches(0))
    with jax.set_mesh(mesh):
      after, metrics = jax.jit(phase.step_fn)(state, batch, jnp.int32(0))
    after, metrics = jax.device_get((after, metrics))
    self.assertEqual(set(metrics), {"loss", "l2_grads", "train_accuracy"})
    self.assertTrue(np.isfinite(metrics["loss"]))
    self.assertGreater(metrics["l2_grads"], 0)
    # Momentum starts at the gradient: the first update is -lr_0 g.
    delta = jax.tree.map(np.subtract, after.params, before)
    norm = float(optax.global_norm(delta))
    np.testing.assert_allclose(norm, 1e-3 * metrics["l2_grads"], rtol=1e-4)
    # Only the prompts train: the CLIP is untouched.
    jax.tree.map(
      np.testing.assert_array_equal,
      after.frozen,
      jax.device_get(state.frozen),
    )


if __name__ == "__main__":
  absltest.main()
