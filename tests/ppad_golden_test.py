"""PPAD's prompt learning against the original code's vectors
(../shared/golden/ppad_tiny_random.*, README "PPAD": its PromptLearner and
ImageMaskLearner on the tiny random CLIP, float32; skipped with a reason
when absent): logits of images each with its own region, the BCE loss, the
gradients w.r.t. ctx and mask_embedding, per-region probabilities and the
fused score.

Error measure: max|ours - golden| / max|golden| per array. The logits are
exp(logit_scale) ~ 14 times a cosine of float32 features through 2 + 2
tiny transformer layers: rounding is ~1e-6 relative; 1e-4 leaves room for
another CPU's summation order, not for a wrong token or mask.
"""

import json
import unittest

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest
from data_test import SHARED

from jaxad import weights
from jaxad.methods.ppad import prompts, sas
from jaxad.weights import clip as clip_weights

GOLDEN = SHARED / "golden"
CLIP = GOLDEN / "clip_vit_tiny_random.pt"
IO = GOLDEN / "ppad_tiny_random.io.safetensors"
TOL = 1e-4


def rel_err(ours, golden) -> float:
  ours, golden = np.asarray(ours, np.float64), np.asarray(golden, np.float64)
  return float(np.max(np.abs(ours - golden)) / np.max(np.abs(golden)))


@unittest.skipUnless(IO.exists(), f"golden vectors absent: {IO}")
class PPADGoldenTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    cls.io = weights.read_safetensors(IO)
    with open(GOLDEN / "ppad_tiny_random.json") as f:
      cls.meta = json.load(f)
    # The original builds its CLIP with OpenAI's build_model, which rounds
    # the projections to fp16 (then .float() in the generator).
    cls.clip = clip_weights.load_model(CLIP, fp16_round=True)
    cls.ids, cls.slot = prompts.prompt_tokens(
      tuple(cls.meta["positions"]), tuple(cls.meta["classnames"])
    )
    cls.x = jnp.asarray(cls.io["images_nchw"].transpose(0, 2, 3, 1))
    cls.token_masks = jnp.asarray(cls.io["token_masks"])

  def text(self, ctx):
    t = prompts.text_features(self.clip, ctx, self.ids, self.slot)
    return prompts.normalize(t).reshape(5, 2, -1)

  def test_float32_weights_are_not_the_originals(self):
    # Without build_model's fp16 rounding the logits move by ~1e-3: the
    # rounding is needed, and the test can tell.
    clip32 = clip_weights.load_model(CLIP)
    t = prompts.normalize(
      prompts.text_features(
        clip32, jnp.asarray(self.io["ctx"]), self.ids, self.slot
      )
    ).reshape(5, 2, -1)
    logits = prompts.region_logits(
      clip32,
      jnp.asarray(self.io["mask_embedding"]),
      self.token_masks,
      t,
      self.x,
      jnp.asarray(self.io["image_region"]),
    )
    self.assertGreater(rel_err(logits, self.io["train.logits"]), 10 * TOL)

  def test_positions_and_template_are_the_originals(self):
    self.assertEqual(tuple(self.meta["positions"]), prompts.POSITIONS)
    self.assertEqual(
      self.meta["prompt_template"].format(position="", classname="c"),
      " " + "X " * prompts.N_CTX + "c.",
    )
    np.testing.assert_array_equal(
      sas.token_masks(sas.region_masks(64), 16), self.io["token_masks"]
    )

  def test_training_logits_loss_and_gradients(self):
    regions = jnp.asarray(self.io["image_region"])
    labels = jnp.asarray(self.io["labels"])

    def loss_fn(ctx, mask_embedding):
      logits = prompts.region_logits(
        self.clip,
        mask_embedding,
        self.token_masks,
        self.text(ctx),
        self.x,
        regions,
      )
      return optax.sigmoid_binary_cross_entropy(logits, labels).mean(), logits

    (loss, logits), (g_ctx, g_mask) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True
    )(jnp.asarray(self.io["ctx"]), jnp.asarray(self.io["mask_embedding"]))
    self.assertLess(rel_err(logits, self.io["train.logits"]), TOL)
    self.assertLess(rel_err(loss, self.io["train.loss"][0]), TOL)
    self.assertLess(rel_err(g_ctx, self.io["train.grad_ctx"]), TOL)
    self.assertLess(rel_err(g_mask, self.io["train.grad_mask_embedding"]), TOL)

  def test_scoring_probabilities_and_fusion(self):
    text = self.text(jnp.asarray(self.io["ctx"]))
    b = len(self.x)
    probs = jnp.stack(
      [
        jax.nn.softmax(
          prompts.region_logits(
            self.clip,
            jnp.asarray(self.io["mask_embedding"]),
            self.token_masks,
            text,
            self.x,
            jnp.full((b,), r),
          )
        )[:, 1]
        for r in range(5)
      ]
    )
    self.assertLess(rel_err(probs, self.io["eval.probs_per_region"]), TOL)
    score = prompts.fuse(probs, self.meta["fusion_threshold"])
    self.assertLess(rel_err(score, self.io["eval.score"]), TOL)


if __name__ == "__main__":
  absltest.main()
