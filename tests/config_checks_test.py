"""Impossible configs are refused by the method's check_config, before any
data or compute, naming the key, the value and what is allowed (issue 15,
"Configs checked before any compute"); valid configs still pass.

Each case was a late failure or a silent wrong run before: e.g. epochs=-1
exited 0 with untrained AEs, data.root without data.format trained on the
embedded set, num_members=1 gave NaN after 75 s, batch_size=0 a
ZeroDivisionError after 20 s.
"""

import os
import pathlib
import shutil
import tempfile
import time
import unittest
import zipfile

import numpy as np
from absl.testing import absltest, parameterized

from configs import d24fad as d24fad_config
from configs import ddad as ddad_config
from configs import multiad as multiad_config
from configs import ppad as ppad_config
from jaxad import bench, config_checks, methods, restore, train
from jaxad.config_checks import ConfigError, ConfigPathError

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
TINY_CLIP = SHARED / "golden" / "clip_vit_tiny_random.pt"
CONFIGS = {
  "ddad": ddad_config,
  "multiad": multiad_config,
  "d24fad": d24fad_config,
  "ppad": ppad_config,
}


def config(name: str, arg: str | None = "smoke", **overrides):
  """configs/<name>.py:<arg> with dotted-key overrides; PPAD on a random
  ViT-B/32 CLIP (224 px, no file needed) unless overridden."""
  c = CONFIGS[name].get_config(arg)
  if name == "ppad":
    c.model.update(clip_weights="random", clip_arch="ViT-B/32")
    c.data.image_size = 224
  c.update_from_flattened_dict(overrides)
  return c


def check(c) -> None:
  methods.get(c.method).check_config(c)


class TempDirTestCase(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

  def path(self, *names):
    return os.path.join(self.tmp, *names)


class ValidConfigsPassTest(parameterized.TestCase):
  @parameterized.parameters(
    ("ddad", None),
    ("ddad", "smoke"),
    ("ddad", "paper"),
    ("multiad", "smoke"),
    ("multiad", "offline"),
    ("d24fad", "smoke"),
    ("ppad", "smoke"),
    ("ppad", "offline"),
    ("ppad", "smoke,zero_shot"),
  )
  def test_shipped_configs_pass(self, name, arg):
    check(config(name, arg))

  def test_edge_values_pass(self):
    check(config("ddad", **{"data.image_size": 16, "model.num_members": 2}))
    check(config("ddad", **{"refine.enabled": False, "refine.epochs": 0}))
    check(config("ddad", **{"eval.target_specificity": 1.0}))
    check(config("ddad", **{"eval.calibration_fraction": 0.0}))
    # Multi-AD takes any size (layer4 is ceil(S / 32) wide).
    check(config("multiad", **{"data.image_size": 50}))
    # D²4FAD: ceil(S / 4) a multiple of 8; 30 -> 8.
    check(config("d24fad", **{"data.image_size": 30}))
    # Not trained: zero-shot needs no epoch.
    check(config("ppad", "smoke,zero_shot", epochs=0))


# (method, config arg, overrides, regex of the message); every message
# starts with config.<key>=<value>.
REFUSED = (
  # epochs
  ("ddad", "smoke", {"epochs": -1}, r"config\.epochs=-1: .*>= 1.*DDAD"),
  ("ddad", "smoke", {"epochs": 0}, r"config\.epochs=0: .*>= 1"),
  ("multiad", "smoke", {"epochs": 0}, r"config\.epochs=0: .*>= 1"),
  ("d24fad", "smoke", {"epochs": 0}, r"config\.epochs=0: .*>= 1"),
  ("ppad", "smoke", {"epochs": 0}, r"config\.epochs=0: .*>= 1"),
  ("ppad", "smoke,zero_shot", {"epochs": -1}, r"config\.epochs=-1: .*>= 0"),
  (
    "ddad",
    "smoke",
    {"refine.epochs": 0},
    r"config\.refine\.epochs=0: .*>= 1 with refine\.enabled=True",
  ),
  # batch sizes, every method and every batch key
  ("ddad", "smoke", {"train.batch_size": 0}, r"config\.train\.batch_size=0"),
  ("ddad", "smoke", {"eval.batch_size": 0}, r"config\.eval\.batch_size=0"),
  ("ddad", "smoke", {"refine.batch_size": 0}, r"config\.refine\.batch_size=0"),
  ("multiad", "smoke", {"train.batch_size": 0}, r"config\.train\.batch_size"),
  ("d24fad", "smoke", {"eval.batch_size": -2}, r"config\.eval\.batch_size=-2"),
  ("ppad", "smoke", {"train.batch_size": 0}, r"config\.train\.batch_size=0"),
  # steps
  ("ddad", "smoke", {"train.log_every": 0}, r"config\.train\.log_every=0"),
  (
    "multiad",
    "smoke",
    {"train.checkpoint_every": 0},
    r"config\.train\.checkpoint_every=0",
  ),
  ("ppad", "smoke", {"train.steps_per_call": 0}, r"steps_per_call=0"),
  # DDAD's members, networks, refinement
  (
    "ddad",
    "smoke",
    {"model.num_members": 1},
    r"config\.model\.num_members=1: DDAD's intra-discrepancy needs K >= 2",
  ),
  ("ddad", "smoke", {"refine.inputs": "foo"}, r"refine\.inputs.*'foo'"),
  ("ddad", "smoke", {"model.backbone": "vae"}, r"model\.backbone='vae'"),
  ("ddad", "smoke", {"model.latent_size": 0}, r"model\.latent_size=0"),
  ("ddad", "smoke", {"model.width": 0.01}, r"model\.width=0\.01"),
  ("ddad", "smoke", {"model.upsample": "nearest"}, r"model\.upsample"),
  (
    "ddad",
    "smoke",
    {"model.backbone": "memae", "model.memory_slots": 0},
    r"model\.memory_slots=0",
  ),
  ("ddad", "smoke", {"model.compute_dtype": "int8"}, r"compute_dtype"),
  # image sizes: each method's real constraint
  (
    "ddad",
    "smoke",
    {"data.image_size": 50},
    r"config\.data\.image_size=50: must be a multiple of 16",
  ),
  ("ddad", "smoke", {"data.image_size": 0}, r"config\.data\.image_size=0"),
  (
    "d24fad",
    "smoke",
    {"data.image_size": 50},
    r"config\.data\.image_size=50: ceil\(image_size / 4\) must be a multiple"
    r" of 8",
  ),
  (
    "d24fad",
    "smoke",
    {"data.image_size": 36},
    r"config\.data\.image_size=36",
  ),
  (
    "ppad",
    "smoke",
    {"data.image_size": 64},
    r"config\.data\.image_size=64: this CLIP \(random ViT-B/32\) takes 224 px",
  ),
  # learning rates, optimizer constants, loss weights
  ("ddad", "smoke", {"optim.lr": -1.0}, r"config\.optim\.lr=-1\.0: .*> 0"),
  ("ddad", "smoke", {"refine.lr": 0.0}, r"config\.refine\.lr=0\.0"),
  ("multiad", "smoke", {"optim.disc_lr": 0.0}, r"config\.optim\.disc_lr=0"),
  ("d24fad", "smoke", {"optim.lr": float("nan")}, r"config\.optim\.lr=nan"),
  ("ppad", "smoke", {"optim.lr": -1e-3}, r"config\.optim\.lr=-0\.001"),
  ("ddad", "smoke", {"optim.b1": 1.5}, r"config\.optim\.b1=1\.5: .*\[0, 1\)"),
  ("ppad", "smoke", {"optim.momentum": 1.0}, r"config\.optim\.momentum=1"),
  (
    "multiad",
    "smoke",
    {"optim.weight_decay": -1e-4},
    r"config\.optim\.weight_decay",
  ),
  ("multiad", "smoke", {"loss.adv_weight": -0.1}, r"loss\.adv_weight=-0\.1"),
  # fractions
  (
    "ddad",
    "smoke",
    {"eval.calibration_fraction": -0.1},
    r"config\.eval\.calibration_fraction=-0\.1: must be in \[0, 1\)",
  ),
  (
    "multiad",
    "smoke",
    {"eval.calibration_fraction": 1.0},
    r"config\.eval\.calibration_fraction=1\.0",
  ),
  (
    "ppad",
    "smoke",
    {"eval.target_specificity": 1.5},
    r"config\.eval\.target_specificity=1\.5: must be in \(0, 1\]",
  ),
  (
    "d24fad",
    "smoke",
    {"eval.target_specificity": 0.0},
    r"config\.eval\.target_specificity=0\.0",
  ),
  (
    "ddad",
    "smoke",
    {"data.anomaly_rate": 1.5},
    r"config\.data\.anomaly_rate=1\.5: must be in \[0, 1\]",
  ),
  (
    "multiad",
    "smoke",
    {"data.test_normal_fraction": 1.0},
    r"data\.test_normal_fraction=1\.0",
  ),
  ("ppad", "smoke", {"train.sas_probability": 2.0}, r"sas_probability=2\.0"),
  # the embedded set
  (
    "ddad",
    "smoke",
    {"data.anomaly_rate": 0.3},
    r"config\.data\.anomaly_rate=0\.3: the embedded set's unlabeled pool is"
    r" fixed \(500 images, 300 abnormal\), so only 0\.6",
  ),
  (
    "ddad",
    "smoke",
    {"data.root": "/data/medmnist.npz"},
    r"config\.data\.root='/data/medmnist\.npz': set, but"
    r" data\.format='embedded'.*data\.format.*medmnist for an \.npz",
  ),
  (
    "multiad",
    "smoke",
    {"data.root": "/data/x"},
    r"config\.data\.root='/data/x': set, but data\.format='embedded'",
  ),
  # other data keys
  (
    "ddad",
    "smoke",
    {"data.format": "foo"},
    r"config\.data\.format='foo': must be one of \['embedded', 'medad'",
  ),
  ("ddad", "smoke", {"data.split_seed": -1}, r"data\.split_seed=-1: .*>= 0"),
  ("ddad", "smoke", {"data.unlabeled_size": -5}, r"unlabeled_size=-5"),
  ("ppad", "smoke", {"data.shots": 0}, r"config\.data\.shots=0"),
  ("multiad", "smoke", {"data.channels": 2}, r"config\.data\.channels=2"),
  # Multi-AD's networks and score
  ("multiad", "smoke", {"score.sigma": 0.0}, r"config\.score\.sigma=0\.0"),
  ("multiad", "smoke", {"score.kernel_size": 4}, r"score\.kernel_size.*4"),
  ("multiad", "smoke", {"model.variant": "resnet9"}, r"model\.variant"),
  ("multiad", "smoke", {"model.se": "inside"}, r"config\.model\.se='inside'"),
  (
    "multiad",
    "smoke",
    {"model.student_dilation": (1, 2, 4, 8)},
    r"model\.student_dilation=\(1, 2, 4, 8\): basic blocks \(resnet18\)",
  ),
  ("multiad", "smoke", {"model.num_blocks": (1, 1)}, r"model\.num_blocks"),
  ("multiad", "smoke", {"model.disc_dropout": 1.0}, r"disc_dropout=1\.0"),
  # D²4FAD's networks and score
  (
    "d24fad",
    "smoke",
    {"model.variant": "resnet18"},
    r"config\.model\.variant='resnet18': a bottleneck ResNet",
  ),
  ("d24fad", "smoke", {"model.decoder_blocks": (1, 1)}, r"decoder_blocks"),
  ("d24fad", "smoke", {"score.sigma": -4.0}, r"config\.score\.sigma=-4\.0"),
  ("d24fad", "smoke", {"data.shots": 0}, r"config\.data\.shots=0"),
)


class RefusedTest(TempDirTestCase):
  @parameterized.parameters(*REFUSED)
  def test_refused_naming_key_and_value(self, name, arg, overrides, regex):
    c = config(name, arg, **overrides)
    start = time.perf_counter()
    with self.assertRaisesRegex(ConfigError, regex):
      check(c)
    self.assertLess(time.perf_counter() - start, 1.0)

  @parameterized.parameters(
    ("ddad", {"epochs": -1}, r"config\.epochs=-1"),
    ("ddad", {"data.root": "/somewhere"}, r"config\.data\.root='/somewhere'"),
    ("ddad", {"model.num_members": 1}, r"config\.model\.num_members=1"),
    ("multiad", {"train.batch_size": 0}, r"config\.train\.batch_size=0"),
    ("d24fad", {"data.image_size": 50}, r"config\.data\.image_size=50"),
  )
  def test_entry_points_refuse_before_any_data_or_compute(
    self, name, overrides, regex
  ):
    c = config(name, **overrides)
    c.data.cache_dir = self.path("cache")
    for run in (
      lambda: train.run(c, self.path("w")),
      lambda: restore.trained(c, self.path("w")),
      lambda: bench.run(c, self.path("w")),
    ):
      start = time.perf_counter()
      with self.assertRaisesRegex(ConfigError, regex):
        run()
      self.assertLess(time.perf_counter() - start, 2.0)
    # Nothing written: no workdir, no prepared data.
    self.assertFalse(os.path.exists(self.path("w")))
    self.assertFalse(os.path.exists(self.path("cache")))

  def test_method_errors_become_config_errors(self):
    # A check's plain ValueError / FileNotFoundError (e.g. the teacher's)
    # is a ConfigError / ConfigPathError, which the CLI prints as one line.
    c = config("multiad", **{"model.teacher_weights": ""})
    with self.assertRaisesRegex(ConfigError, "teacher_weights is empty"):
      check(c)
    c.model.teacher_weights = self.path("missing.pth")
    with self.assertRaisesRegex(ConfigPathError, "missing.pth"):
      check(c)

  def test_missing_unlabeled_dir(self):
    c = config("ddad", **{"data.format": "folders", "data.root": self.tmp})
    c.data.unlabeled_dir = self.path("pool")  # the key, where configs lack it
    with self.assertRaisesRegex(
      ConfigPathError, r"config\.data\.unlabeled_dir='.*pool': no such folder"
    ):
      check(c)
    os.makedirs(self.path("pool"))
    check(c)


@unittest.skipUnless(TINY_CLIP.is_file(), f"{TINY_CLIP} absent (../shared)")
class ClipFileTest(absltest.TestCase):
  def test_image_size_is_read_from_the_clip_file(self):
    c = ppad_config.get_config("smoke")  # the tiny CLIP: 64 px
    c.model.clip_weights = str(TINY_CLIP)
    check(c)
    c.data.image_size = 32
    with self.assertRaisesRegex(
      ConfigError, r"config\.data\.image_size=32: this CLIP .* takes 64 px"
    ):
      check(c)


class DataRootTest(TempDirTestCase):
  """data.format / data.root, and .npz roots that are not .npz files."""

  def medmnist(self, root, name="ddad"):
    return config(name, **{"data.format": "medmnist", "data.root": root})

  def test_a_valid_npz_file_or_folder_passes(self):
    np.savez(self.path("pneumonia.npz"), train_images=np.zeros((2, 4, 4)))
    check(self.medmnist(self.path("pneumonia.npz")))
    check(self.medmnist(self.tmp))  # a folder holding exactly one
    # An empty or missing root is the data layer's to name.
    check(self.medmnist(self.path("absent.npz")))
    check(config("ppad", "offline"))  # data.root="": bench's synthetic data

  @parameterized.named_parameters(
    ("pickle", b"\x80\x04\x95", r"starts with b'\\x80\\x04\\x95"),
    ("npy", b"\x93NUMPY\x01\x00", r"starts with b'\\x93NUM'"),
    ("text", b"version https://git-lfs", r"starts with b'vers'"),
    ("empty", b"", r"starts with b''"),
  )
  def test_not_an_npz(self, content, regex):
    with open(self.path("data.npz"), "wb") as f:
      f.write(content)
    with self.assertRaisesRegex(
      ConfigError,
      r"config\.data\.root='.*data\.npz': must be an \.npz file \(a zip of"
      r" \.npy arrays.*" + regex,
    ):
      check(self.medmnist(self.path("data.npz")))

  def test_a_zip_without_arrays_or_truncated(self):
    with zipfile.ZipFile(self.path("a.npz"), "w") as z:
      z.writestr("notes.txt", "hello")
    with self.assertRaisesRegex(ConfigError, r"holds \['notes\.txt'\]"):
      check(self.medmnist(self.path("a.npz")))
    np.savez(self.path("b.npz"), x=np.arange(1000))
    with open(self.path("b.npz"), "r+b") as f:
      f.truncate(40)  # a cut download: the zip's directory is gone
    with self.assertRaisesRegex(ConfigError, r"b\.npz.*broken zip"):
      check(self.medmnist(self.path("b.npz")))

  def test_a_folder_must_hold_exactly_one_npz(self):
    for n in ("a.npz", "b.npz"):
      np.savez(self.path(n), x=np.zeros(2))
    with self.assertRaisesRegex(
      ConfigError, r"config\.data\.root='.*': a folder holding 2 \.npz files"
    ):
      check(self.medmnist(self.tmp))

  def test_a_file_for_a_folder_layout(self):
    np.savez(self.path("x.npz"), x=np.zeros(2))
    with self.assertRaisesRegex(
      ConfigError,
      r"config\.data\.root='.*x\.npz': a file, but data\.format='folders'"
      r" reads a folder.*use medmnist",
    ):
      c = config("ddad", **{"data.format": "folders"})
      c.data.root = self.path("x.npz")
      check(c)

  def test_members_must_split_evenly_over_the_member_axis(self):
    c = config("ddad", "paper", **{"mesh.member": 2})  # K = 3
    with self.assertRaisesRegex(
      ConfigError,
      r"config\.model\.num_members=3 must be divisible by"
      r" config\.mesh\.member=2",
    ):
      check(c)

  def test_a_bucket_data_root_is_refused(self):
    c = config("ddad", **{"data.format": "medad"})
    c.data.root = "gs://bucket/Med-AD/RSNA"
    with self.assertRaisesRegex(
      ConfigError,
      r"config\.data\.root='gs://bucket/Med-AD/RSNA': a URI, but datasets"
      r" are read from a local folder.*DATA=",
    ):
      check(c)

  def test_d24fad_source_entries(self):
    with open(self.path("bad.npz"), "wb") as f:
      f.write(b"not a zip")
    c = config("d24fad")
    c.data.sources = [
      dict(format="medmnist", root=self.path("bad.npz"), name="bad"),
      *c.data.sources,
    ]
    with self.assertRaisesRegex(
      ConfigError,
      r"config\.data\.sources\['bad'\]\.root='.*bad\.npz': must be an \.npz",
    ):
      check(c)


class SharedChecksTest(absltest.TestCase):
  def test_check_number_messages(self):
    with self.assertRaisesRegex(ConfigError, r"^config\.k=1\.5: must be in"):
      config_checks.check_number("k", 1.5, 0.0, 1.0)
    with self.assertRaisesRegex(ConfigError, r"must be a number > 0"):
      config_checks.check_number("k", 0, 0.0, low_open=True)
    with self.assertRaisesRegex(ConfigError, r"config\.k=True"):
      config_checks.check_int("k", True, 1)  # a bool is not a count
    config_checks.check_number("k", 1, 0.0, 1.0)
    config_checks.check_int("k", np.int64(3), 1)

  def test_error_types(self):
    self.assertTrue(issubclass(ConfigError, ValueError))
    self.assertTrue(issubclass(ConfigPathError, FileNotFoundError))


if __name__ == "__main__":
  absltest.main()
