"""Tests of jaxad.models.resnet: shapes, parameter counts, SE, dilation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

from jaxad.models import resnet

# torchvision's published parameter counts minus the classifier (fc):
# 512 * 1000 + 1000 for basic blocks, 2048 * 1000 + 1000 for bottlenecks.
TORCHVISION_PARAMS = {
  "resnet18": 11_689_512 - 513_000,
  "resnet34": 21_797_672 - 513_000,
  "resnet50": 25_557_032 - 2_049_000,
  "resnet101": 44_549_160 - 2_049_000,
  "wide_resnet50_2": 68_883_240 - 2_049_000,
  "wide_resnet101_2": 126_886_696 - 2_049_000,
}


def abstract(**kw) -> resnet.ResNet:
  return nnx.eval_shape(lambda: resnet.ResNet(**kw, rngs=nnx.Rngs(0)))


def feature_shapes(model, size=64, batch=2) -> dict[str, tuple]:
  """Output shapes by abstract evaluation: no compile, no compute."""
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  out = jax.eval_shape(
    lambda s, x: nnx.merge(graphdef, s)(x, train=False), state, x
  )
  return {k: v.shape for k, v in out.items()}


@functools.partial(jax.jit, static_argnames=("graphdef", "train"))
def forward(graphdef, params, stats, x, train=False):
  model = nnx.merge(graphdef, params, stats)
  out = model(x, train=train)
  return out, nnx.state(model, nnx.BatchStat).to_pure_dict()


def init(seed=0, **kw):
  """(graphdef, params, batch_stats) of a model with random numpy values.

  Not the model's own initialisers: XLA takes over 10 s to compile those for
  a 1-block ResNet-50 on a 2-core CPU (`test_init` checks them on a small
  model). Random BN statistics make eval mode non-trivial, as in the golden
  files.
  """
  model = abstract(**kw)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel" and len(shape) == 4:  # kaiming normal, fan-out
      std = np.sqrt(2.0 / (shape[0] * shape[1] * shape[3]))
      return rng.normal(0.0, std, shape).astype(np.float32)
    if name == "var":
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    base = 1.0 if name == "scale" else 0.0
    return (base + rng.normal(0.0, 0.1, shape)).astype(np.float32)

  params, stats = (
    jax.tree_util.tree_map_with_path(
      fill, nnx.state(model, kind).to_pure_dict()
    )
    for kind in (nnx.Param, nnx.BatchStat)
  )
  return nnx.graphdef(model), params, stats


class ShapesTest(parameterized.TestCase):
  @parameterized.parameters(*resnet.VARIANTS)
  def test_full_depth_shapes_and_param_count(self, variant):
    model = abstract(variant=variant)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    self.assertEqual(n, TORCHVISION_PARAMS[variant])
    c = 64 if variant in ("resnet18", "resnet34") else 256
    self.assertEqual(model.channels, (64, c, 2 * c, 4 * c, 8 * c))
    self.assertEqual(
      feature_shapes(model),
      {
        "stem": (2, 16, 16, 64),
        "layer1": (2, 16, 16, c),
        "layer2": (2, 8, 8, 2 * c),
        "layer3": (2, 4, 4, 4 * c),
        "layer4": (2, 2, 2, 8 * c),
      },
    )

  def test_bottleneck_widths(self):
    r50, wrn = abstract(variant="resnet50"), abstract(variant="wide_resnet50_2")
    self.assertEqual(r50.layer2[0].conv2.kernel.shape, (3, 3, 128, 128))
    self.assertEqual(wrn.layer2[0].conv2.kernel.shape, (3, 3, 256, 256))
    self.assertEqual(wrn.layer2[0].conv3.kernel.shape, (1, 1, 256, 512))
    # v1.5: the stride is on the 3x3 conv, and on the shortcut.
    self.assertEqual(r50.layer2[0].conv1.strides, (1, 1))
    self.assertEqual(r50.layer2[0].conv2.strides, (2, 2))
    self.assertEqual(r50.layer2[0].downsample.conv.strides, (2, 2))
    self.assertIsNone(r50.layer1[1].downsample)
    # layer1's first block projects 64 -> 256 without a stride.
    self.assertEqual(r50.layer1[0].downsample.conv.strides, (1, 1))

  def test_blocks_and_stages(self):
    model = abstract(variant="wide_resnet50_2", num_blocks=(1, 2, 1), stages=3)
    self.assertEqual([len(model.layer1), len(model.layer2)], [1, 2])
    self.assertFalse(hasattr(model, "layer4"))
    self.assertCountEqual(
      feature_shapes(model, size=32), ["stem", "layer1", "layer2", "layer3"]
    )

  @parameterized.parameters("resnet18", "resnet50")
  def test_one_block_forward_runs(self, variant):
    graphdef, params, stats = init(variant=variant, num_blocks=(1,) * 4)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    out, new_stats = forward(graphdef, params, stats, x)
    self.assertEqual(
      {k: v.shape for k, v in out.items()},
      feature_shapes(abstract(variant=variant, num_blocks=(1,) * 4), size=32),
    )
    for v in out.values():
      self.assertTrue(np.isfinite(np.asarray(v)).all())
    # Eval mode leaves the running statistics alone; train mode moves them
    # by PyTorch's momentum 0.1 towards the batch's.
    same = jax.tree.map(np.array_equal, stats, new_stats)
    self.assertTrue(all(jax.tree.leaves(same)))
    _, trained = forward(graphdef, params, stats, x, train=True)
    conv1 = nnx.merge(graphdef, params, stats).conv1
    batch_mean = jnp.mean(conv1(x), axis=(0, 1, 2))
    np.testing.assert_allclose(
      trained["bn1"]["mean"],
      0.9 * stats["bn1"]["mean"] + 0.1 * batch_mean,
      rtol=1e-4,
      atol=1e-6,
    )

  def test_init(self):
    model = resnet.ResNet(
      "resnet18",
      num_blocks=(1,),
      stages=1,
      se="pre_add",
      zero_init_residual=True,
      rngs=nnx.Rngs(0),
    )
    kernel = np.asarray(model.conv1.kernel[...])  # (7, 7, 3, 64)
    # torchvision: kaiming normal, fan-out, gain sqrt(2).
    self.assertAlmostEqual(kernel.std(), np.sqrt(2 / (49 * 64)), delta=0.005)
    np.testing.assert_array_equal(model.bn1.scale[...], 1.0)
    np.testing.assert_array_equal(model.layer1[0].bn1.bias[...], 0.0)
    np.testing.assert_array_equal(model.layer1[0].bn2.scale[...], 0.0)
    fc1 = np.asarray(model.layer1[0].se.fc1.kernel[...])  # (64, 4)
    self.assertLessEqual(np.abs(fc1).max(), 1 / np.sqrt(64))  # torch Linear

  def test_max_pool_pads_with_minus_inf(self):
    x = -jnp.ones((1, 5, 5, 1))  # zero padding would give 0 at the borders
    y = resnet.max_pool_3s2p1(x)
    self.assertEqual(y.shape, (1, 3, 3, 1))
    np.testing.assert_array_equal(y, -1.0)
    # Windows cover rows/cols {-1, 0, 1} and {1, 2, 3}, as in torch.
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    y = resnet.max_pool_3s2p1(x)[0, ..., 0]
    np.testing.assert_array_equal(y, [[5.0, 7.0], [13.0, 15.0]])


class SqueezeExciteTest(parameterized.TestCase):
  def test_se_shapes(self):
    model = abstract(variant="resnet50", se="pre_add", se_stem=True)
    self.assertEqual(model.se_stem.fc1.kernel.shape, (64, 4))
    self.assertEqual(model.layer1[0].se.fc1.kernel.shape, (256, 16))
    self.assertEqual(model.layer4[2].se.fc2.kernel.shape, (128, 2048))
    self.assertEqual(feature_shapes(model)["layer4"], (2, 2, 2, 2048))
    r18 = abstract(variant="resnet18", se="post_add", se_reduction=8)
    self.assertEqual(r18.layer1[0].se.fc1.kernel.shape, (64, 8))
    self.assertEqual(feature_shapes(r18)["layer4"], (2, 2, 2, 512))

  @parameterized.parameters("pre_add", "post_add")
  def test_se_placement(self, placement):
    """Gate ~0 and ~1 (through fc2's bias) expose where SE sits."""
    kw = dict(variant="resnet50", num_blocks=(1,), stages=1)
    graphdef, params, stats = init(**kw)
    se_graphdef, se_params, _ = init(**kw, se=placement)
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    ref, _ = forward(graphdef, params, stats, x)
    for gate_bias in (30.0, -30.0):
      p = jax.tree.map(lambda a: a, params)
      block = se_params["layer1"][0]["se"]
      p["layer1"][0]["se"] = {
        "fc1": block["fc1"],
        "fc2": {
          "kernel": jnp.zeros_like(block["fc2"]["kernel"]),
          "bias": jnp.full_like(block["fc2"]["bias"], gate_bias),
        },
      }
      out, _ = forward(se_graphdef, p, stats, x)
      if gate_bias > 0:  # gate 1: SE is the identity wherever it sits
        np.testing.assert_allclose(out["layer1"], ref["layer1"], atol=1e-5)
        continue
      if placement == "post_add":
        expected = np.zeros_like(ref["layer1"])
      else:  # the residual branch is cut: relu(shortcut)
        block0 = nnx.merge(graphdef, params, stats).layer1[0]
        expected = jax.nn.relu(block0.downsample(ref["stem"], train=False))
      np.testing.assert_allclose(out["layer1"], expected, atol=1e-5)


class DilationTest(absltest.TestCase):
  def conv2s(self, model, stage):
    blocks = getattr(model, f"layer{stage}")
    return [(b.conv2.strides[0], b.conv2.kernel_dilation[0]) for b in blocks]

  def test_replace_stride_with_dilation(self):
    model = abstract(
      variant="resnet50", replace_stride_with_dilation=(False, True, True)
    )
    # torchvision: a dilated stage's first block keeps the previous dilation.
    self.assertEqual(self.conv2s(model, 2), [(2, 1)] + [(1, 1)] * 3)
    self.assertEqual(self.conv2s(model, 3), [(1, 1)] + [(1, 2)] * 5)
    self.assertEqual(self.conv2s(model, 4), [(1, 2)] + [(1, 4)] * 2)
    self.assertEqual(model.layer4[1].conv2.padding, ((4, 4), (4, 4)))
    self.assertIsNotNone(model.layer3[0].downsample)  # 512 -> 1024 channels
    self.assertEqual(model.layer3[0].downsample.conv.strides, (1, 1))
    shapes = feature_shapes(model)
    self.assertEqual(shapes["layer3"], (2, 8, 8, 1024))
    self.assertEqual(shapes["layer4"], (2, 8, 8, 2048))

  def test_explicit_dilation_keeps_strides(self):
    model = abstract(variant="wide_resnet50_2", dilation=(1, 2, 4, 8))
    self.assertEqual(self.conv2s(model, 1), [(1, 1)] * 3)
    self.assertEqual(self.conv2s(model, 2), [(2, 2)] + [(1, 2)] * 3)
    self.assertEqual(self.conv2s(model, 4), [(2, 8)] + [(1, 8)] * 2)
    self.assertEqual(model.layer3[0].conv2.padding, ((4, 4), (4, 4)))
    self.assertEqual(
      feature_shapes(model), feature_shapes(abstract(variant="resnet50"))
    )

  def test_dilated_forward_runs(self):
    model = init(
      variant="resnet50",
      num_blocks=(1, 2, 1, 1),
      dilation=(1, 2, 4, 8),
      se="pre_add",
    )
    out, _ = forward(*model, jnp.ones((1, 64, 64, 3)))
    self.assertEqual(out["layer4"].shape, (1, 2, 2, 2048))
    self.assertTrue(np.isfinite(np.asarray(out["layer4"])).all())

  def test_bad_arguments(self):
    for kw, msg in [
      (dict(variant="resnet51"), "variant"),
      (dict(se="after"), "se must be"),
      (dict(stages=5), "stages"),
      (dict(num_blocks=(1, 1)), "num_blocks"),
      (
        dict(dilation=(1, 2, 2, 2), replace_stride_with_dilation=(0, 1, 1)),
        "not both",
      ),
      (dict(variant="resnet18", dilation=(1, 1, 2, 1)), "basic blocks"),
    ]:
      with self.assertRaisesRegex(ValueError, msg):
        abstract(**kw)


if __name__ == "__main__":
  absltest.main()
