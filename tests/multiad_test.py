"""Tests of Multi-AD: losses and maps against numpy, the frozen teacher
(jaxad.models.teacher), the step as the loop compiles it, the refusal
without teacher weights, and an end-to-end run of the `:smoke` config
(train, kill and resume, evaluate) on a tiny MTD fixture with pixel
masks."""

import functools
import json
import os
import shutil
import struct
import tempfile

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx
from PIL import Image
from scipy import ndimage

from configs import multiad as multiad_config
from jaxad import checkpoint, loop, sharding, train
from jaxad.data import oneclass
from jaxad.methods import multiad, updates
from jaxad.methods.multiad import METHOD, losses, nets
from jaxad.models import discriminator, teacher

SIZE = 32  # the :smoke image size


def smoke_config(**overrides):
  c = multiad_config.get_config("smoke")
  c.mesh.data = 1  # conftest fakes 8 devices; a user's run has one
  c.update_from_flattened_dict(overrides)
  return c


def tiny_data(n_normal=16):
  rng = np.random.default_rng(0)
  img = lambda n: rng.integers(0, 256, (n, SIZE, SIZE, 1), np.uint8)
  return oneclass.OneClassData(
    name="tiny",
    normal=img(n_normal),
    unlabeled=img(0),
    unlabeled_labels=np.zeros(0, np.int32),
    test=img(4),
    test_labels=np.array([0, 0, 1, 1], np.int32),
    test_names=("a", "b", "c", "d"),
  )


def numpy_normalize(f):
  return f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)


def numpy_upsample(m, size):
  """Bilinear, half-pixel centres, edge-clamped: torch's align_corners=False."""

  def axis_weights(n):
    src = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = np.zeros((size, n))
    w[np.arange(size), lo] += 1 - (src - lo)
    w[np.arange(size), hi] += src - lo
    return w

  wh, ww = axis_weights(m.shape[1]), axis_weights(m.shape[2])
  return np.einsum("ih,bhw,jw->bij", wh, m, ww)


class LossAndMapTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    shapes = [(2, 8, 8, 6), (2, 4, 4, 5), (2, 2, 2, 4), (2, 1, 1, 3)]
    self.t = [rng.normal(size=s).astype(np.float32) for s in shapes]
    self.s = [rng.normal(size=s).astype(np.float32) for s in shapes]

  def test_distillation_loss(self):
    want = sum(
      np.sum((numpy_normalize(t) - numpy_normalize(s)) ** 2, axis=(1, 2, 3))
      / (2 * t.shape[1] * t.shape[2])
      for t, s in zip(self.t, self.s, strict=True)
    )
    got = jax.jit(losses.distillation_loss)(self.t, self.s)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    self.assertEqual(got.shape, (2,))

  def test_normalize_has_finite_gradient_at_zero(self):
    f = jnp.zeros((1, 2, 2, 3)).at[0, 0, 0].set(1.0)
    grad = jax.grad(lambda f: jnp.sum(losses.l2_normalize(f) * 2.0))(f)
    self.assertTrue(np.all(np.isfinite(grad)))

  def test_bce(self):
    z = np.array([-30.0, -2.0, 0.0, 0.5, 3.0], np.float32)
    p = 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
    for target in (0.0, 1.0):
      want = -(target * np.log(p) + (1 - target) * np.log(1 - p))
      got = jax.jit(functools.partial(losses.bce_with_logits, target=target))(z)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  @parameterized.parameters("product", "sum")
  def test_cosine_maps_and_fusion(self, fusion):
    cos = [
      1 - np.sum(numpy_normalize(t) * numpy_normalize(s), -1)
      for t, s in zip(self.t, self.s, strict=True)
    ]
    ups = [numpy_upsample(m, 16) for m in cos]
    want = np.prod(ups, 0) if fusion == "product" else np.sum(ups, 0)
    levels = [
      losses.cosine_distance(t, s) for t, s in zip(self.t, self.s, strict=True)
    ]
    got = losses.fuse(levels, 16, fusion=fusion)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    with self.assertRaisesRegex(ValueError, "fusion"):
      losses.fuse(levels, 16, fusion="max")

  @parameterized.parameters((0.5, 0, 5), (4.0, 0, 33), (1.0, 3, 3))
  def test_gaussian_smoothing(self, sigma, kernel_size, width):
    self.assertLen(losses.gaussian_kernel(sigma, kernel_size), width)
    maps = np.random.default_rng(1).uniform(size=(2, 40, 36)).astype("f4")
    # scipy's "mirror" is cv2's BORDER_REFLECT_101; radius = width // 2.
    want = ndimage.gaussian_filter(
      maps.astype(np.float64),
      (0, sigma, sigma),
      mode="mirror",
      radius=(0, width // 2, width // 2),
    )
    got = jax.jit(
      functools.partial(
        losses.gaussian_smooth, sigma=sigma, kernel_size=kernel_size
      )
    )(maps)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  def test_bad_smoothing(self):
    with self.assertRaisesRegex(ValueError, "sigma"):
      losses.gaussian_kernel(0.0)
    with self.assertRaisesRegex(ValueError, "odd"):
      losses.gaussian_kernel(1.0, 4)

  def test_anomaly_map_is_zero_for_identical_features(self):
    amap = losses.anomaly_map(
      self.t, self.t, 16, fusion="sum", sigma=4.0, kernel_size=0
    )
    np.testing.assert_allclose(amap, 0.0, atol=1e-5)

  def test_teacher_input(self):
    x = np.full((1, 2, 2, 1), 255, np.uint8)
    got = multiad.to_teacher_input(x)
    want = (1.0 - np.array(multiad.IMAGENET_MEAN)) / multiad.IMAGENET_STD
    self.assertEqual(got.shape, (1, 2, 2, 3))
    np.testing.assert_allclose(got[0, 0, 0], want, rtol=1e-6)

  def test_discriminator_shapes(self):
    # Abstract: shapes only, no compile.
    d = nnx.eval_shape(
      lambda: discriminator.Discriminator(
        4, spatial=(2, 2), channels=(3, 5), rngs=nnx.Rngs(0)
      )
    )
    self.assertEqual(d.fc.kernel.shape, (5 * 2 * 2, 1))
    graphdef, state = nnx.split(d)
    x = jax.ShapeDtypeStruct((3, 2, 2, 4), jnp.float32)
    call = lambda train: lambda s, x: nnx.merge(graphdef, s)(x, train=train)
    self.assertEqual(jax.eval_shape(call(False), state, x).shape, (3,))
    with self.assertRaisesRegex(ValueError, "key"):
      jax.eval_shape(call(True), state, x)


def leaves_with_paths(tree):
  return {
    jax.tree_util.keystr(p): np.asarray(v)
    for p, v in jax.tree_util.tree_leaves_with_path(tree)
  }


def write_safetensors(path, tensors):
  """A minimal .safetensors writer (float32)."""
  header, offset, blobs = {}, 0, []
  for name, value in tensors.items():
    blob = np.ascontiguousarray(value, np.float32).tobytes()
    header[name] = {
      "dtype": "F32",
      "shape": list(value.shape),
      "data_offsets": [offset, offset + len(blob)],
    }
    offset += len(blob)
    blobs.append(blob)
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def torchvision_state_dict(params, stats):
  """Flax ResNet trees -> torchvision keys and layouts (no SE)."""
  out = {}
  bn = {"scale": "weight", "bias": "bias", "mean": "running_mean"}
  bn["var"] = "running_var"
  flat = jax.tree_util.tree_flatten_with_path((params, stats))[0]
  for path, value in flat:
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path[1:]]
    *mods, leaf = keys
    if mods[-2:-1] == ["downsample"]:
      mods[-1] = {"conv": "0", "bn": "1"}[mods[-1]]
    value = np.asarray(value)
    if leaf == "kernel":
      out[".".join(mods + ["weight"])] = value.transpose(3, 2, 0, 1)
    else:
      out[".".join(mods + [bn[leaf]])] = value
  return out


class StateAndStepTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = smoke_config()
    cls.mesh = sharding.make_mesh(cls.config.mesh)

  def test_refuses_without_teacher_weights(self):
    config = smoke_config(**{"model.teacher_weights": ""})
    workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, workdir)
    for fn in (
      lambda: METHOD.check_config(config),
      lambda: METHOD.init_state(config),
      lambda: train.run(config, workdir),
    ):
      with self.assertRaisesRegex(
        ValueError,
        "teacher_weights is empty.*resnet50-0676ba61.pth.*"
        "wide_resnet50_2-95faca4d.pth.*teacher_weights=random",
      ):
        fn()
    # Nothing written: the fixed command can use the same workdir.
    self.assertFalse(os.path.exists(os.path.join(workdir, "config.json")))
    config.model.teacher_weights = os.path.join(workdir, "missing.pth")
    with self.assertRaisesRegex(FileNotFoundError, "missing.pth"):
      METHOD.init_state(config)
    with self.assertRaisesRegex(ValueError, "fusion"):
      METHOD.check_config(smoke_config(**{"score.fusion": "max"}))
    # The paper's setting is the default.
    self.assertEqual(multiad_config.get_config().model.teacher_weights, "")

  def test_teacher_weights_check_reads_no_method_config(self):
    # Another method (D2-4FAD) names its own keys and offline config.
    with self.assertRaisesRegex(
      ValueError,
      r"^config\.teacher\.weights is empty\. D2-4FAD's teacher .*"
      r"config\.teacher\.variant='wide_resnet50_2'.*"
      r"wide_resnet50_2-95faca4d\.pth.*--config\.teacher\.weights=random "
      r"\(or x:offline\)",
    ):
      teacher.check_weights(
        "",
        "wide_resnet50_2",
        method="D2-4FAD",
        key="config.teacher.weights",
        variant_key="config.teacher.variant",
        offline=" (or x:offline)",
      )
    teacher.check_weights(teacher.RANDOM, "resnet50", method="m")

  def test_random_teacher_is_rebuilt_identically_and_logged(self):
    with self.assertLogs(level="WARNING") as logs:
      a = METHOD.init_state(self.config)
    self.assertIn("RANDOMLY INITIALISED", "".join(logs.output))
    b = METHOD.init_state(self.config)
    for tree in ("frozen", "params"):
      la = leaves_with_paths(getattr(a, tree))
      lb = leaves_with_paths(getattr(b, tree))
      self.assertEqual(la.keys(), lb.keys())
      for k in la:
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)
    self.assertEqual(set(a.frozen), {"teacher"})
    self.assertEqual(set(a.graphdefs), {"teacher", "student", "disc"})
    # Runs written before the method contract restore: the same
    # checkpointed tree (the frozen teacher and the graphs are not in it).
    tree = flax.serialization.to_state_dict(a)
    self.assertIn(checkpoint.FROZEN, tree)  # which Checkpointer skips
    del tree[checkpoint.FROZEN]
    self.assertEqual(set(tree), {"step", "params", "batch_stats", "opt_state"})
    for field in ("params", "batch_stats", "opt_state"):
      self.assertEqual(set(tree[field]), {"student", "disc"}, field)

  def test_teacher_from_a_torchvision_checkpoint(self):
    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp)
    rng = np.random.default_rng(3)
    kw = nets.resnet_kwargs(self.config, "teacher")
    # Shapes only: nothing is initialised or compiled.
    shapes = nnx.eval_shape(lambda: teacher.build(kw, 0))
    template = updates.init_net(shapes, None)[:2]
    values = jax.tree.map(
      lambda v: rng.normal(size=v.shape).astype(np.float32), template
    )
    path = os.path.join(tmp, "teacher.safetensors")
    write_safetensors(path, torchvision_state_dict(*values))
    want = leaves_with_paths({"params": values[0], "batch_stats": values[1]})
    # The shared loader (no method config), then through Multi-AD's state.
    direct = teacher.load_teacher(kw, path, jax.random.key(0))
    config = smoke_config(**{"model.teacher_weights": path})
    for got in (
      {"params": direct[0], "batch_stats": direct[1]},
      METHOD.init_state(config).frozen["teacher"],
    ):
      got = leaves_with_paths(got)
      self.assertEqual(got.keys(), want.keys())
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)

  def test_step_updates_student_and_discriminator_only(self):
    state = loop.place(METHOD.init_state(self.config), self.mesh)
    # Copies: the step donates `state`, and np.asarray may share its buffers.
    before = jax.tree.map(np.array, state)
    (phase,) = METHOD.phases(self.config, tiny_data())
    self.assertEqual(phase.num_steps, 2)  # 1 epoch of 16 images, batch 8
    (compiled,) = loop.compile_phases([phase], self.mesh, 1)
    with jax.set_mesh(self.mesh):
      state, metrics = compiled.step_fn(state, compiled.inputs)
    after = jax.tree.map(np.array, state)
    self.assertEqual(int(after.step), 1)  # advanced by the loop
    for k, v in leaves_with_paths(before.frozen).items():
      np.testing.assert_array_equal(
        v, leaves_with_paths(after.frozen)[k], err_msg=k
      )
    for tree in ("params", "batch_stats"):
      for net in ("student", "disc"):
        old = leaves_with_paths(getattr(before, tree)[net])
        new = leaves_with_paths(getattr(after, tree)[net])
        changed = [k for k in old if not np.array_equal(old[k], new[k])]
        kernels = [k for k in old if "kernel" in k or tree == "batch_stats"]
        self.assertNotEmpty(kernels)
        self.assertContainsSubset(kernels, changed, f"{tree}/{net}")
    self.assertContainsSubset(
      {"student_loss", "kd_loss", "adv_loss", "disc_loss", "l2_grads"},
      set(metrics),
    )
    for k, v in metrics.items():
      self.assertTrue(np.isfinite(v), k)
    np.testing.assert_allclose(
      metrics["student_loss"],
      metrics["kd_loss"] + 0.1 * metrics["adv_loss"],
      rtol=1e-5,
    )


def make_mtd(root, n_free=20, n_defect=6):
  """A tiny MTD layout: textured normals, defects with a bright square."""
  rng = np.random.default_rng(0)
  for i in range(n_free):
    img = rng.normal(120, 10, (SIZE, SIZE)).clip(0, 255).astype(np.uint8)
    os.makedirs(f"{root}/MT_Free/Imgs", exist_ok=True)
    Image.fromarray(img).save(f"{root}/MT_Free/Imgs/f{i:02d}.jpg")
  os.makedirs(f"{root}/MT_Crack/Imgs", exist_ok=True)
  for i in range(n_defect):
    img = rng.normal(120, 10, (SIZE, SIZE)).clip(0, 255).astype(np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    r, c = rng.integers(2, SIZE - 12, 2)
    img[r : r + 10, c : c + 10] = 255
    mask[r : r + 10, c : c + 10] = 255
    Image.fromarray(img).save(f"{root}/MT_Crack/Imgs/c{i}.jpg")
    Image.fromarray(mask).save(f"{root}/MT_Crack/Imgs/c{i}.png")


class EndToEndTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()  # checkpoints: removed after the test
    self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
    make_mtd(os.path.join(self.tmp, "mtd"))

  def test_smoke_run_with_pixel_masks(self):
    config = smoke_config(
      **{
        "data.format": "mtd",
        "data.root": os.path.join(self.tmp, "mtd"),
        "data.cache_dir": os.path.join(self.tmp, "cache"),
        "epochs": 2,  # 16 train normals, batch 8: 4 steps
        "train.log_every": 2,
        # All 16 trained on (the calibrated threshold: calibration_test).
        "eval.calibration_fraction": 0.0,
      }
    )
    full_dir = os.path.join(self.tmp, "full")
    full = train.run(config, full_dir)
    self.assertEqual((full["num_normal"], full["num_abnormal"]), (4, 6))
    self.assertEqual(set(full["scores"]), {"multiad"})
    self.assertEqual(
      set(full["scores"]["multiad"]), {"auroc", "ap", "pixel_auroc", "aupro"}
    )
    for v in full["scores"]["multiad"].values():
      self.assertTrue(0.0 <= v <= 1.0)
    with open(os.path.join(full_dir, "eval.json")) as f:
      self.assertEqual(json.load(f), full)
    maps = np.load(os.path.join(full_dir, "maps.npz"))
    self.assertEqual(maps["multiad"].shape, (10, SIZE, SIZE))
    with open(os.path.join(full_dir, "metrics.jsonl")) as f:
      self.assertIn("kd_loss", json.loads(f.readline()))

    # Interruption, resumption and re-evaluation: conformance_test.


if __name__ == "__main__":
  absltest.main()
