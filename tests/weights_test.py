"""Tests of jaxad.weights: torch-free checkpoint readers and the torchvision
ResNet converter, against the golden files in ../shared/golden (skipped with
a reason when absent)."""

import collections
import io
import json
import os
import pickle
import shutil
import struct
import sys
import tempfile
import types
import unittest
import zipfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from data_test import SHARED
from flax import nnx

from jaxad import weights
from jaxad.models import resnet
from jaxad.weights import torchvision

GOLDEN = SHARED / "golden"
MANIFEST = GOLDEN / "torchvision_resnet_keys.json"
_STORAGE_NAMES = {
  np.dtype(np.float32): "FloatStorage",
  np.dtype(np.float16): "HalfStorage",
  np.dtype(jnp.bfloat16): "BFloat16Storage",
  np.dtype(np.int64): "LongStorage",
}


def need(path):
  if not path.is_file():
    raise unittest.SkipTest(
      f"{path} absent (shared data sits beside the checkout)"
    )


# --------------------------------------------------- a torch.save stand-in
# Writes both torch.save formats byte for byte as torch does, from numpy, so
# the readers are tested on strided views, offsets, dtypes and the legacy
# format, of which ../shared has no example. The pickles name torch's globals
# through stub modules that exist only while pickling.


class _Storage:
  def __init__(self, key, data):
    self.key, self.data = key, np.ascontiguousarray(data).reshape(-1)


class _Tensor:
  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, tuple(size), tuple(stride))

  def __reduce__(self):
    rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
    return rebuild, self.args + (False, collections.OrderedDict())


def _tensor(array, key):
  """A tensor owning its own contiguous storage."""
  array = np.asarray(array)
  stride = [s // array.itemsize for s in array.strides] if array.ndim else []
  return _Tensor(_Storage(key, array), 0, array.shape, stride)


def _pickle(obj, *, legacy):
  def rebuild(*args):
    raise AssertionError("never called")

  rebuild.__module__, rebuild.__qualname__ = (
    "torch._utils",
    "_rebuild_tensor_v2",
  )
  torch = types.ModuleType("torch")
  utils = types.ModuleType("torch._utils")
  utils._rebuild_tensor_v2 = rebuild
  for name in _STORAGE_NAMES.values():
    setattr(torch, name, type(name, (), {"__module__": "torch"}))
  storages = {}

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if not isinstance(obj, _Storage):
        return None
      storages[obj.key] = obj.data
      kind = getattr(torch, _STORAGE_NAMES[obj.data.dtype])
      pid = ("storage", kind, obj.key, "cpu", obj.data.size)
      return pid + (None,) if legacy else pid

  buf = io.BytesIO()
  with mock.patch.dict(sys.modules, {"torch": torch, "torch._utils": utils}):
    Pickler(buf, protocol=2).dump(obj)
  return buf.getvalue(), storages


def torch_save(path, obj, *, legacy=False):
  data_pkl, storages = _pickle(obj, legacy=legacy)
  if legacy:
    with open(path, "wb") as f:
      for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(header, f, protocol=2)
      f.write(data_pkl)
      keys = sorted(storages)
      pickle.dump(keys, f, protocol=2)
      for k in keys:
        f.write(struct.pack("<q", storages[k].size) + storages[k].tobytes())
    return
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr("archive/data.pkl", data_pkl)
    zf.writestr("archive/byteorder", "little")
    for k, v in storages.items():
      zf.writestr(f"archive/data/{k}", v.tobytes())
    zf.writestr("archive/version", "3\n")


def write_safetensors(path, tensors):
  names = {np.float32: "F32", np.float16: "F16", np.int64: "I64"}
  header, blobs, offset = {}, [], 0
  for k, v in tensors.items():
    raw = np.ascontiguousarray(v).tobytes()
    name = "BF16" if v.dtype == jnp.bfloat16 else names[v.dtype.type]
    header[k] = dict(
      dtype=name, shape=list(v.shape), data_offsets=[offset, offset + len(raw)]
    )
    blobs.append(raw)
    offset += len(raw)
  head = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


class ReaderTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.tmp)
    base = np.arange(24, dtype=np.float32)
    shared = _Storage("7", base)
    self.obj = collections.OrderedDict(
      full=_Tensor(shared, 0, (2, 3, 4), (12, 4, 1)),
      transposed=_Tensor(shared, 0, (4, 3), (1, 4)),  # a .T view
      offset=_Tensor(shared, 12, (3,), (2,)),  # x[12:18:2]
      scalar=_tensor(np.array(5, np.int64), "1"),
      half=_tensor(np.linspace(-1, 1, 6, dtype=np.float16), "2"),
      bf16=_tensor(np.linspace(-1, 1, 6).astype(jnp.bfloat16), "3"),
    )
    self.expected = dict(
      full=base.reshape(2, 3, 4),
      transposed=base[:12].reshape(3, 4).T,
      offset=base[12:18:2],
      scalar=np.array(5, np.int64),
      half=np.linspace(-1, 1, 6, dtype=np.float16),
      bf16=np.linspace(-1, 1, 6).astype(jnp.bfloat16),
    )

  def assert_state_dicts_equal(self, got, expected):
    self.assertEqual(list(got), list(expected))
    for k, v in expected.items():
      self.assertEqual((got[k].dtype, got[k].shape), (v.dtype, v.shape), k)
      np.testing.assert_array_equal(got[k], v, err_msg=k)
      self.assertTrue(got[k].flags.c_contiguous and got[k].flags.writeable)

  @parameterized.parameters(False, True)
  def test_torch_save_formats(self, legacy):
    path = os.path.join(self.tmp, "x.pth")
    torch_save(path, self.obj, legacy=legacy)
    self.assert_state_dicts_equal(weights.read_state_dict(path), self.expected)
    torch_save(path, {"state_dict": self.obj}, legacy=legacy)  # unwrapped
    self.assert_state_dicts_equal(weights.read_state_dict(path), self.expected)

  def test_safetensors(self):
    path = os.path.join(self.tmp, "x.safetensors")
    write_safetensors(path, self.expected)
    self.assert_state_dicts_equal(weights.read_state_dict(path), self.expected)
    with open(path, "r+b") as f:  # shorten the data: offsets no longer fit
      f.truncate(os.path.getsize(path) - 4)
    with self.assertRaisesRegex(ValueError, "data_offsets"):
      weights.read_safetensors(path)

  def test_refuses_other_globals(self):
    path = os.path.join(self.tmp, "evil.pth")
    with zipfile.ZipFile(path, "w") as zf:  # unpickling would call os.system
      zf.writestr("archive/data.pkl", pickle.dumps({"x": os.system}))
    with self.assertRaisesRegex(pickle.UnpicklingError, "refusing.*system"):
      weights.read_state_dict(path)

  def test_bad_tensors(self):
    path = os.path.join(self.tmp, "bad.pth")
    past = _Tensor(_Storage("0", np.zeros(4, np.float32)), 2, (3,), (1,))
    torch_save(path, {"x": past})
    with self.assertRaisesRegex(ValueError, "reads past its storage 0"):
      weights.read_state_dict(path)
    torch_save(path, {"x": 3})  # a state dict holds tensors only
    with self.assertRaisesRegex(ValueError, "entry 'x' is a int"):
      weights.read_state_dict(path)
    with open(path, "wb") as f:
      f.write(b"not a checkpoint")
    with self.assertRaisesRegex(ValueError, "neither safetensors"):
      weights.read_state_dict(path)

  @parameterized.parameters("resnet50", "wide_resnet50_2")
  def test_golden_pth_equals_safetensors(self, name):
    pth = GOLDEN / f"{name}_1block_random.pth"
    need(pth)
    expected = weights.read_state_dict(pth.with_suffix(".safetensors"))
    got = weights.read_state_dict(pth)
    self.assertLen(got, len(expected))
    self.assert_state_dicts_equal(got, {k: expected[k] for k in got})
    legacy = os.path.join(self.tmp, "legacy.pth")
    torch_save(legacy, {k: _tensor(v, k) for k, v in got.items()}, legacy=True)
    self.assert_state_dicts_equal(weights.read_state_dict(legacy), got)


def manifest(variant):
  need(MANIFEST)
  with open(MANIFEST) as f:
    return json.load(f)[variant]


def leaves(tree):
  return {
    "/".join(str(k.key) for k in path): v
    for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


class ConvertTest(parameterized.TestCase):
  @parameterized.parameters("resnet18", "resnet50", "wide_resnet50_2")
  def test_full_depth_manifest_maps_one_to_one(self, variant):
    keys = manifest(variant)
    # Tensor i is filled with i, so each Flax leaf shows which key it got.
    state_dict = {
      k: np.full(shape, i, np.float32)
      for i, (k, shape) in enumerate(keys.items())
    }
    state_dict["conv1.weight"] = np.arange(64 * 3 * 49, dtype=np.float32)
    state_dict["conv1.weight"] = state_dict["conv1.weight"].reshape(64, 3, 7, 7)
    with self.assertLogs(level="INFO") as logs:
      params, stats = torchvision.convert(state_dict, {"variant": variant})
    self.assertTrue(any("2 fc (classifier)" in m for m in logs.output))
    got = {**leaves(params), **leaves(stats)}
    used = [
      k
      for k in keys
      if not k.endswith("num_batches_tracked") and not k.startswith("fc.")
    ]
    self.assertLen(got, len(used))  # every leaf filled (convert is strict)
    values = {k: i for i, k in enumerate(keys)}
    seen = sorted(int(v.flat[0]) for p, v in got.items() if p != "conv1/kernel")
    self.assertEqual(
      seen, sorted(values[k] for k in used if k != "conv1.weight")
    )
    for path, v in got.items():
      self.assertEqual(v.dtype, np.float32)
      if path != "conv1/kernel":
        self.assertLen(np.unique(v), 1, path)
    # Spot checks of names and layouts.
    np.testing.assert_array_equal(
      params["conv1"]["kernel"],
      state_dict["conv1.weight"].transpose(2, 3, 1, 0),
    )
    down = "layer2.0.downsample"
    self.assertEqual(
      params["layer2"][0]["downsample"]["bn"]["scale"][0],
      values[f"{down}.1.weight"],
    )
    self.assertEqual(
      stats["layer3"][1]["bn2"]["var"][0], values["layer3.1.bn2.running_var"]
    )
    c = keys[f"{down}.0.weight"]
    self.assertEqual(
      params["layer2"][0]["downsample"]["conv"]["kernel"].shape,
      (1, 1, c[1], c[0]),
    )

  def test_teacher_without_layer4_loads_a_full_checkpoint(self):
    keys = manifest("wide_resnet50_2")
    state_dict = {k: np.zeros(s, np.float32) for k, s in keys.items()}
    with self.assertLogs(level="INFO") as logs:
      params, _ = torchvision.convert(
        state_dict, {"variant": "wide_resnet50_2", "stages": 3}
      )
    self.assertNotIn("layer4", params)
    self.assertTrue(any("layer4 (not built)" in m for m in logs.output))

  def test_errors_name_key_and_shapes(self):
    keys = manifest("resnet50")
    config = {"variant": "resnet50"}
    state_dict = {k: np.zeros(s, np.float32) for k, s in keys.items()}
    bad = dict(state_dict, **{"layer1.0.conv9.weight": np.zeros((2, 2))})
    with self.assertRaisesRegex(
      ValueError, r"checkpoint key layer1.0.conv9.weight \(2, 2\): no Flax leaf"
    ):
      torchvision.convert(bad, config)
    bad = dict(state_dict)
    bad["layer2.0.conv2.weight"] = np.zeros((128, 128, 1, 1), np.float32)
    with self.assertRaisesRegex(
      ValueError,
      r"layer2.0.conv2.weight has shape \(128, 128, 1, 1\) \(as Flax "
      r"\(1, 1, 128, 128\)\) but Flax leaf params/layer2/0/conv2/kernel has "
      r"shape \(3, 3, 128, 128\)",
    ):
      torchvision.convert(bad, config)
    bad = {k: v for k, v in state_dict.items() if "layer4.2.bn3" not in k}
    with self.assertRaisesRegex(
      ValueError,
      r"4 problems(.|\n)*batch_stats/layer4/2/bn3/var \(2048,\) has no "
      r"checkpoint value \(expected key layer4.2.bn3.running_var\)",
    ):
      torchvision.convert(bad, config)
    # A model deeper than the checkpoint: the 1-block golden has no layer4.
    short = {k: v for k, v in state_dict.items() if not k.startswith("layer4")}
    with self.assertRaisesRegex(ValueError, "params/layer4/0/conv1/kernel"):
      torchvision.convert(short, config)
    with self.assertRaisesRegex(ValueError, "needs a model"):
      torchvision.convert(state_dict, config, missing="keep")

  def test_se_weights(self):
    keys = manifest("resnet18")
    # The small model of resnet_test's test_init: its eager init is shared.
    config = dict(variant="resnet18", num_blocks=(1,), stages=1, se="pre_add")
    state_dict = {
      k: np.ones(s, np.float32)
      for k, s in keys.items()
      if not k.startswith(("layer1.1", "layer2", "layer3", "layer4"))
    }
    with self.assertRaisesRegex(ValueError, "layer1/0/se/fc1/kernel"):
      torchvision.convert(state_dict, config)
    # SE stays as initialised ("keep"), or comes in timm's SE-ResNet names.
    model = resnet.ResNet(**config, rngs=nnx.Rngs(0))
    params, _ = torchvision.convert(state_dict, model, missing="keep")
    np.testing.assert_array_equal(
      params["layer1"][0]["se"]["fc1"]["kernel"],
      model.layer1[0].se.fc1.kernel[...],
    )
    np.testing.assert_array_equal(params["layer1"][0]["conv1"]["kernel"], 1.0)
    fc1 = np.arange(4 * 64, dtype=np.float32).reshape(4, 64, 1, 1)
    se = {
      "layer1.0.se.fc1.weight": fc1,
      "layer1.0.se.fc1.bias": np.zeros(4, np.float32),
      "layer1.0.se.fc2.weight": np.zeros((64, 4), np.float32),
      "layer1.0.se.fc2.bias": np.zeros(64, np.float32),
    }
    params, _ = torchvision.convert({**state_dict, **se}, config)
    np.testing.assert_array_equal(
      params["layer1"][0]["se"]["fc1"]["kernel"], fc1[:, :, 0, 0].T
    )


class GoldenTest(parameterized.TestCase):
  @parameterized.product(
    name=("resnet50", "wide_resnet50_2"), suffix=(".pth", ".safetensors")
  )
  def test_reproduces_torchvision(self, name, suffix):
    ckpt = GOLDEN / f"{name}_1block_random{suffix}"
    io_path = GOLDEN / f"{name}_1block_random.io.safetensors"
    need(ckpt)
    need(io_path)
    config = dict(variant=name, num_blocks=(1, 1, 1), stages=3)
    params, stats = torchvision.load(ckpt, config)
    graphdef = nnx.graphdef(
      nnx.eval_shape(lambda: resnet.ResNet(**config, rngs=nnx.Rngs(0)))
    )
    golden = weights.read_state_dict(io_path)
    x = golden["input_nchw"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    out = jax.jit(lambda p, s, x: nnx.merge(graphdef, p, s)(x, train=False))(
      params, stats, x
    )
    self.assertCountEqual(out, ["stem", "layer1", "layer2", "layer3"])
    for k, v in out.items():
      ref = golden[k].transpose(0, 2, 3, 1)
      self.assertEqual(v.shape, ref.shape)
      rel = np.abs(np.asarray(v) - ref).max() / np.abs(ref).max()
      self.assertLess(rel, 1e-5, f"{name} {k}: relative error {rel:.2e}")

  def test_load_into(self):
    ckpt = GOLDEN / "resnet50_1block_random.safetensors"
    need(ckpt)
    config = dict(num_blocks=(1, 1, 1), stages=3)
    model = nnx.eval_shape(lambda: resnet.ResNet(**config, rngs=nnx.Rngs(0)))
    torchvision.load_into(model, ckpt)
    state_dict = weights.read_state_dict(ckpt)
    np.testing.assert_array_equal(
      model.layer3[0].bn3.var[...], state_dict["layer3.0.bn3.running_var"]
    )


if __name__ == "__main__":
  absltest.main()
