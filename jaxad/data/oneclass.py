"""Host arrays for DDAD's one-class semi-supervised (OC-SSL) setting.

`load(config.data, workdir)` builds the manifest of the configured layout,
prepares it once through the tfds builder (cached as array_record) and reads
the three splits back through their data sources, so what is trained on is
exactly what is cached.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
from absl import logging

from jaxad.data import layouts
from jaxad.data import manifest as manifest_lib

if TYPE_CHECKING:  # tfds is imported only to prepare data, not to train on
  from jaxad.data import builder as builder_lib  # arrays (bench, GPU images)


@dataclasses.dataclass(frozen=True)
class OneClassData:
  """uint8 images for the one-class semi-supervised setting.

  Attributes:
    name: e.g. "embedded/kermany_cxr64", or the basename of data.root.
    normal: [N0, S, S, C] uint8 known normals (C = data.channels, 1 or 3).
    unlabeled: [NU, S, S, C] uint8 unlabeled pool (may be [0, S, S, C]).
    unlabeled_labels: [NU] int32 ground truth of the pool, for reporting only.
    test: [NT, S, S, C] uint8 test images, normals first.
    test_labels: [NT] int32, 0 normal, 1 abnormal.
    test_names: the NT test image names, in order.
    test_masks: [NT, S, S] uint8 pixel ground truth in {0, 1} (1 =
      anomalous), for layouts with masks; None for image-level datasets.
  """

  name: str
  normal: np.ndarray
  unlabeled: np.ndarray
  unlabeled_labels: np.ndarray
  test: np.ndarray
  test_labels: np.ndarray
  test_names: tuple[str, ...]
  test_masks: np.ndarray | None = None


def prepare(data: Any, workdir: str) -> builder_lib.OneClassDataset:
  """Builds the layout's manifest and prepares it (once; then cached).

  Args:
    data: the `data` config (format, root, image_size, channels, split
      parameters, cache_dir).
    workdir: the run's directory (a drawn split is kept in split.json there).

  Returns:
    The prepared tfds builder.
  """
  from jaxad.data import builder as builder_lib  # tfds: see the top

  manifest = layouts.build(data, workdir)
  return builder_lib.prepare(manifest, manifest_lib.get(data, "cache_dir", ""))


def load(data: Any, workdir: str) -> OneClassData:
  """Prepares (once, cached) and reads a layout into host arrays.

  Args:
    data: the `data` config; see `prepare`.
    workdir: the run's directory.

  Returns:
    The known normals, unlabeled pool and test split as [N, S, S, C] uint8,
    and the test masks where the layout has them.
  """
  from jaxad.data import builder as builder_lib  # tfds: see the top

  builder = prepare(data, workdir)
  normal = builder_lib.read_split(builder, "normal")
  unlabeled = builder_lib.read_split(builder, "unlabeled")
  test = builder_lib.read_split(builder, "test")
  out = OneClassData(
    name=builder.manifest.name,
    normal=normal["image"],
    unlabeled=unlabeled["image"],
    unlabeled_labels=unlabeled["label"],
    test=test["image"],
    test_labels=test["label"],
    test_names=test["name"],
    test_masks=test["mask"],
  )
  logging.info(
    "Loaded %s: %d known normals, %d unlabeled (%d abnormal), %d test"
    " (%d abnormal), images %s, %s",
    out.name,
    len(out.normal),
    len(out.unlabeled),
    int(out.unlabeled_labels.sum()),
    len(out.test),
    int(out.test_labels.sum()),
    out.test.shape[1:],
    "with masks" if out.test_masks is not None else "no masks",
  )
  return out


def synthetic(data: Any, num_images: int) -> OneClassData:
  """Seeded random data shaped like the `data` config's (for jaxad.bench).

  Returns:
    Known normals and test images [num_images, S, S, C] uint8 (S =
    data.image_size, C = data.channels or 1), an unlabeled pool of
    data.unlabeled_size, test labels alternating 0/1.
  """
  rng = np.random.default_rng(0)
  size = data.image_size
  shape = (size, size, manifest_lib.get(data, "channels", 1))
  unlabeled = manifest_lib.get(data, "unlabeled_size", 0)

  def images(n):
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8)

  return OneClassData(
    name="synthetic",
    normal=images(num_images),
    unlabeled=images(unlabeled),
    unlabeled_labels=np.zeros(unlabeled, np.int32),
    test=images(num_images),
    test_labels=np.arange(num_images, dtype=np.int32) % 2,
    test_names=tuple(f"synthetic/{i}" for i in range(num_images)),
  )
