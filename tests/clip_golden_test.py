"""Tests of the CLIP pieces for PPAD: `jaxad.weights.clip` (OpenAI-layout
checkpoints, read without torch), `jaxad.models.clip` (the towers and the
PPAD hooks) and `jaxad.models.clip_tokenizer`, against the golden files from
OpenAI's CLIP code (../shared/golden, README "CLIP"; made by
generators/make_clip_golden.py; skipped with a reason when absent), plus
tests on a randomly initialised tiny CLIP that need no files.

Error measure: per array, max|ours - golden| / max|golden|.
"""

import json
import pathlib
import struct
import tempfile
import unittest
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from data_test import SHARED
from flax import nnx

from jaxad import weights
from jaxad.models import clip, clip_tokenizer
from jaxad.weights import clip as clip_weights

GOLDEN = SHARED / "golden"
PT = GOLDEN / "clip_vit_tiny_random.pt"
IO = GOLDEN / "clip_vit_tiny_random.io.safetensors"
JSON = GOLDEN / "clip_vit_tiny_random.json"
# Both sides compute in float32 (golden: torch on CPU; ours: XLA with float32
# matmuls). Two towers of 2 blocks, width 128, sum a few hundred float32
# products per output with different orders and fused ops, so each op's
# rounding (~6e-8 relative) accumulates to ~1e-6 (measured: 2e-7 image,
# 8e-7 text, 5e-7 logits); 1e-5 leaves 10x headroom and still catches any
# layout error (a wrong transpose or q/k/v order gives O(1) errors).
TOL = 1e-5
# bfloat16 matmuls keep 8 mantissa bits (~4e-3 per rounding); measured
# ~1e-2 on the text features after 2 blocks. A wrong computation is O(1).
TOL_BF16 = 5e-2
TINY = clip.CLIPConfig(
  embed_dim=64,
  image_resolution=64,
  vision_layers=2,
  vision_width=128,
  vision_patch_size=16,
  context_length=77,
  vocab_size=49408,
  transformer_width=128,
  transformer_heads=2,
  transformer_layers=2,
)


def rel_err(ours, golden) -> float:
  ours, golden = np.asarray(ours, np.float64), np.asarray(golden, np.float64)
  assert ours.shape == golden.shape, (ours.shape, golden.shape)
  return float(np.abs(ours - golden).max() / np.abs(golden).max())


def need(*paths):
  for path in paths:
    if not path.is_file():
      raise unittest.SkipTest(
        f"{path} absent (shared data sits beside the checkout)"
      )


def write_safetensors(path, tensors: dict):
  """A minimal safetensors writer (float32 / int64 only)."""
  names = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}
  header, blobs, offset = {}, [], 0
  for k, v in tensors.items():
    v = np.asarray(v, order="C")  # (ascontiguousarray makes 0-d 1-d)
    header[k] = {
      "dtype": names[v.dtype],
      "shape": list(v.shape),
      "data_offsets": [offset, offset + v.nbytes],
    }
    blobs.append(v.tobytes())
    offset += v.nbytes
  raw = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


@jax.jit
def _features(model, images, ids):
  return model.encode_image(images), model.encode_text(ids)


def features(model, images, ids):
  with jax.default_matmul_precision("float32"):
    return _features(model, images, ids)


class GoldenTest(absltest.TestCase):
  """The tiny random CLIP converted from its .pt against OpenAI's outputs."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    need(PT, IO, JSON)
    cls.state_dict = weights.read_state_dict(PT)
    cls.config, cls.params = clip_weights.load(PT)
    cls.model = clip.from_params(cls.config, cls.params)
    cls.g = weights.read_state_dict(IO)
    cls.json = json.loads(JSON.read_text())
    cls.images = np.transpose(cls.g["image_nchw"], (0, 2, 3, 1))  # NHWC
    cls.ids = cls.g["text_ids"]
    cls.img_f, cls.txt_f = features(cls.model, cls.images, cls.ids)

  def test_config_inferred_and_param_shapes(self):
    self.assertEqual(clip.CLIPConfig(**self.json["config"]), self.config)
    self.assertEqual(self.config, TINY)
    abstract = nnx.eval_shape(lambda: clip.CLIP(TINY, rngs=nnx.Rngs(0)))
    want = nnx.state(abstract, nnx.Param).to_pure_dict()
    self.assertEqual(
      jax.tree.map(lambda a: (a.shape, a.dtype), self.params),
      jax.tree.map(lambda a: (a.shape, a.dtype), want),
    )

  def test_features_and_logits(self):
    for name, ours in (
      ("image_features", self.img_f),
      ("text_features", self.txt_f),
      ("logits_per_image", self.model.logits(self.img_f, self.txt_f)),
    ):
      self.assertEqual(ours.dtype, jnp.float32)
      err = rel_err(ours, self.g[name])
      self.assertLess(err, TOL, f"{name}: relative error {err:.2e}")

  def test_tokenizer_cases(self):
    tok = clip_tokenizer.default_tokenizer()
    for text, ids in self.json["tokenizer_cases"].items():
      self.assertEqual(tok.encode(text), ids, repr(text))

  def test_text_ids_from_prompts(self):
    ids = clip_tokenizer.tokenize(self.json["prompts"])
    self.assertEqual((ids.dtype, ids.shape), (np.int32, (5, 77)))
    np.testing.assert_array_equal(ids, self.ids)

  def test_text_embedding_hook_and_short_context(self):
    m = self.model
    emb = m.embed_tokens(self.ids)
    self.assertEqual(emb.shape, (5, 77, 128))
    with jax.default_matmul_precision("float32"):
      via_emb = m.encode_text_embeddings(emb, self.ids)
      # Causal mask: padding after EOT may be dropped without any change.
      short = m.encode_text(self.ids[:, :20])
    self.assertLess(rel_err(via_emb, self.txt_f), TOL)
    self.assertLess(rel_err(short, self.txt_f), TOL)

  def test_bfloat16_close_to_float32(self):
    bf16 = clip.from_params(self.config, self.params, compute_dtype="bfloat16")
    img_f, txt_f = features(bf16, self.images, self.ids)
    self.assertEqual(img_f.dtype, jnp.float32)
    for name, ours in (("image_features", img_f), ("text_features", txt_f)):
      err = rel_err(ours, self.g[name])
      self.assertLess(err, TOL_BF16, f"{name}: bfloat16 relative error {err}")
      self.assertGreater(err, 0.0, "bfloat16 compute had no effect")

  def convert_error(self, state_dict) -> str:
    with self.assertRaises(ValueError) as cm:
      clip_weights.convert(state_dict)
    return str(cm.exception)

  def test_missing_key_is_named(self):
    sd = dict(self.state_dict)
    del sd["visual.ln_post.bias"]
    self.assertIn("visual.ln_post.bias", self.convert_error(sd))
    del sd["visual.conv1.weight"]  # needed to infer the config
    self.assertIn("visual.conv1.weight", self.convert_error(sd))

  def test_misshaped_key_is_named(self):
    sd = dict(self.state_dict)
    key = "transformer.resblocks.1.attn.in_proj_weight"
    sd[key] = sd[key][:-1]
    msg = self.convert_error(sd)
    self.assertIn(key, msg)
    self.assertIn("(383, 128)", msg)

  def test_unexpected_key_is_named_and_build_model_extras_ignored(self):
    sd = dict(self.state_dict)
    sd["visual.attnpool.k_proj.bias"] = np.zeros(4, np.float32)
    self.assertIn("visual.attnpool.k_proj.bias", self.convert_error(sd))
    sd = dict(self.state_dict)
    sd.update(input_resolution=np.array(64), context_length=np.array(77))
    sd["vocab_size"] = np.array(49408)
    self.assertEqual(clip_weights.convert(sd)[0], TINY)

  def test_safetensors_with_module_prefix(self):
    sd = {"module." + k: v for k, v in self.state_dict.items()}
    with tempfile.TemporaryDirectory() as d:
      path = pathlib.Path(d) / "clip.safetensors"
      write_safetensors(path, sd)
      config, params = clip_weights.load(path)
    self.assertEqual(config, TINY)
    got = jax.tree.leaves(params)
    want = jax.tree.leaves(self.params)
    self.assertEqual(len(got), len(want))
    for a, b in zip(got, want, strict=True):
      np.testing.assert_array_equal(a, b)


class NoFilesTest(absltest.TestCase):
  """Hooks, the TorchScript refusal and tokenize's edges (no shared data)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = clip.CLIP(TINY, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    cls.images = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
    cls.prompt = rng.normal(size=(1, 16, 128)).astype(np.float32)

  def encode(self, images, prompt=None, mask=None):
    with jax.default_matmul_precision("float32"):
      return np.asarray(self.model.encode_image(images, prompt, mask))

  def test_all_ones_mask_is_identity(self):
    plain = self.encode(self.images)
    ones = self.encode(self.images, self.prompt, np.ones((1, 16), np.float32))
    np.testing.assert_allclose(ones, plain, rtol=0, atol=1e-6)

  def test_all_zeros_mask_replaces_every_patch_token(self):
    zeros = self.encode(self.images, self.prompt, np.zeros((2, 16), np.float32))
    # The image no longer matters, and the prompt went in where the patch
    # tokens do (before the class token and the positional embedding).
    with jax.default_matmul_precision("float32"):
      ref = self.model.visual.encode_tokens(np.repeat(self.prompt, 2, 0))
    np.testing.assert_allclose(zeros, ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(zeros[0], zeros[1], rtol=0, atol=1e-5)
    self.assertGreater(np.abs(zeros - self.encode(self.images)).max(), 1e-2)

  def test_partial_mask_mixes_row_major_patches(self):
    # Independent numpy patch embedding: patch (r, c) is pixel rows
    # 16r..16r+15, columns 16c..16c+15, token index 4r + c.
    x, k = self.images, np.asarray(self.model.visual.conv1.kernel[...])
    patches = x.reshape(2, 4, 16, 4, 16, 3).transpose(0, 1, 3, 2, 4, 5)
    tokens = np.einsum("brcijk,ijko->brco", patches, k).reshape(2, 16, 128)
    mask = np.zeros((2, 16), np.float32)
    mask[0, :8] = 1.0  # image 0 keeps its upper half, image 1 nothing
    mixed = mask[..., None] * tokens + (1 - mask[..., None]) * self.prompt
    with jax.default_matmul_precision("float32"):
      ref = np.asarray(self.model.visual.encode_tokens(mixed))
    ours = self.encode(self.images, self.prompt, mask)
    self.assertLess(rel_err(ours, ref), 1e-5)

  def test_gradients_reach_only_replaced_prompt_tokens(self):
    mask = np.ones((1, 16), np.float32)
    mask[0, 5] = 0.0

    def loss(prompt):
      return jnp.sum(self.model.encode_image(self.images, prompt, mask) ** 2)

    g = np.asarray(jax.grad(loss)(jnp.asarray(self.prompt)))[0]
    self.assertGreater(np.abs(g[5]).max(), 0.0)
    np.testing.assert_array_equal(np.delete(g, 5, axis=0), 0.0)

  def test_bad_hook_arguments(self):
    with self.assertRaisesRegex(ValueError, "go together"):
      self.model.encode_image(self.images, self.prompt)
    with self.assertRaisesRegex(ValueError, "token_mask must be"):
      self.model.encode_image(self.images, self.prompt, np.ones((1, 15)))

  def test_torchscript_archive_refused(self):
    with tempfile.TemporaryDirectory() as d:
      path = pathlib.Path(d) / "ViT-B-32.pt"
      with zipfile.ZipFile(path, "w") as zf:
        for name in ("data.pkl", "constants.pkl", "code/__torch__/m.py"):
          zf.writestr(f"ViT-B-32/{name}", b"")
      with self.assertRaisesRegex(ValueError, "TorchScript"):
        clip_weights.load(path)

  def test_not_a_vit_clip(self):
    with self.assertRaisesRegex(ValueError, "visual.proj"):
      clip_weights.convert({"visual.attnpool.c_proj.weight": np.zeros(1)})

  def test_tokenize_edges(self):
    ids = clip_tokenizer.tokenize("Pneumonia")
    np.testing.assert_array_equal(ids[0, :3], [49406, 42906, 49407])
    self.assertFalse(ids[0, 3:].any())
    long = "lung " * 80
    with self.assertRaisesRegex(RuntimeError, "Input lung lung .* too long"):
      clip_tokenizer.tokenize([long])
    cut = clip_tokenizer.tokenize([long], truncate=True)
    self.assertEqual((cut[0, 0], cut[0, -1]), (49406, 49407))
    tok = clip_tokenizer.default_tokenizer()
    self.assertEqual(tok.decode(tok.encode("Left lung.")), "left lung . ")
    # ftfy-like cleaning: curly quotes, ligatures, width, entities.
    self.assertEqual(tok.encode("“ﬁne” ＸＹ &amp;"), tok.encode('"fine" XY &'))


if __name__ == "__main__":
  absltest.main()
