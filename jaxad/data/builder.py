"""One tensorflow-datasets builder for every layout, cached as array_record.

`prepare` turns a `manifest.Manifest` into splits `normal`, `unlabeled` and
`test` under `CACHE_DIR/<name>-<hash>/`, where the hash covers the layout's
parameters and every input file's name, size and mtime: the same config
re-uses the prepared data, and any change prepares a new copy. Features are
`tfds.features.Tensor`s, which tfds writes as array_record without TensorFlow.
A manifest with masks adds a per-image "mask" (zeros for the train normals).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from jaxad.data import manifest as manifest_lib

# tfds cannot write a split without examples; an empty part (e.g. no
# unlabeled pool) is left out of the builder and read back as this.
EmptySource = tuple


class OneClassDataset(tfds.core.GeneratorBasedBuilder):
  """The one-class splits of one manifest, as uint8 [S, S, C] images.

  Each example is {"image": [S, S, C] uint8, "label": int64 (0 normal,
  1 abnormal), "name": str, "index": int64 (position in the manifest part)},
  and for a manifest with masks "mask": [S, S] uint8 in {0, 1}.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}

  def __init__(self, *, manifest: manifest_lib.Manifest, **kwargs: Any):
    self._manifest = manifest
    super().__init__(**kwargs)

  @property
  def manifest(self) -> manifest_lib.Manifest:
    """The manifest this builder prepares."""
    return self._manifest

  def _info(self) -> tfds.core.DatasetInfo:
    size, channels = self._manifest.image_size, self._manifest.channels
    features = {
      "image": tfds.features.Tensor(
        shape=(size, size, channels), dtype=np.uint8
      ),
      "label": tfds.features.Tensor(shape=(), dtype=np.int64),
      "name": tfds.features.Tensor(shape=(), dtype=np.str_),
      "index": tfds.features.Tensor(shape=(), dtype=np.int64),
    }
    if self._manifest.has_masks:
      # zlib: masks are mostly zeros (all zeros for normals).
      features["mask"] = tfds.features.Tensor(
        shape=(size, size),
        dtype=np.uint8,
        encoding=tfds.features.Encoding.ZLIB,
      )
    return tfds.core.DatasetInfo(
      builder=self,
      description=f"jaxad one-class splits of {self._manifest.name}",
      features=tfds.features.FeaturesDict(features),
      # Keys are the manifest positions, so records are stored in order.
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager
    return {
      part: self._generate_examples(part)
      for part in manifest_lib.PARTS
      if self._manifest.parts[part]
    }

  def _generate_examples(self, part: str):
    entries = self._manifest.parts[part]
    size, channels = self._manifest.image_size, self._manifest.channels
    start = time.perf_counter()
    for i, entry in enumerate(entries):
      example = {
        "image": manifest_lib.decode(entry, size, channels),
        "label": entry.label,
        "name": entry.name,
        "index": i,
      }
      if self._manifest.has_masks:
        example["mask"] = manifest_lib.decode_mask(entry, size)
      yield i, example
      if (i + 1) % 1000 == 0:
        logging.info("  %s: decoded %d / %d", part, i + 1, len(entries))
    logging.info(
      "Prepared %s: %d images in %.1f s",
      part,
      len(entries),
      time.perf_counter() - start,
    )


def default_cache_dir(cache_dir: str = "") -> str:
  """`cache_dir`, else $JAXAD_DATA_DIR, else ~/.cache/jaxad/tfds."""
  if not cache_dir:
    cache_dir = os.environ.get("JAXAD_DATA_DIR", "") or os.path.join(
      "~", ".cache", "jaxad", "tfds"
    )
  return os.path.abspath(os.path.expanduser(cache_dir))


def prepare(
  manifest: manifest_lib.Manifest, cache_dir: str = ""
) -> OneClassDataset:
  """Prepares a manifest once (decode, resize, write array_record).

  Args:
    manifest: what to prepare.
    cache_dir: root of the cache ("" -> `default_cache_dir()`).

  Returns:
    The builder, ready for `split_source`.
  """
  slug = re.sub(r"[^A-Za-z0-9_.]+", "_", manifest.name).strip("_")
  data_dir = os.path.join(
    default_cache_dir(cache_dir), f"{slug}-{manifest.cache_key()}"
  )
  builder = OneClassDataset(
    manifest=manifest, data_dir=data_dir, file_format="array_record"
  )
  counts = {p: len(v) for p, v in manifest.parts.items()}
  info_file = os.path.join(builder.data_dir, "dataset_info.json")
  if os.path.exists(info_file):
    logging.info("Using cached %s %s: %s", manifest.name, counts, data_dir)
    return builder
  logging.info("Preparing %s %s into %s", manifest.name, counts, data_dir)
  start = time.perf_counter()
  tfds.disable_progress_bar()
  builder.download_and_prepare(
    download_dir=os.path.join(data_dir, "downloads"),
  )
  logging.info(
    "Prepared %s in %.1f s", manifest.name, time.perf_counter() - start
  )
  return builder


def split_source(builder: OneClassDataset, split: str) -> Any:
  """The random-access data source of one prepared split.

  Args:
    builder: a prepared builder.
    split: "normal", "unlabeled" or "test".

  Returns:
    A sequence of example dicts (tfds `ArrayRecordDataSource`; an empty
    tuple for a split without examples).
  """
  if split not in manifest_lib.PARTS:
    raise ValueError(
      f"Unknown split {split!r}; expected one of {manifest_lib.PARTS}"
    )
  if split not in builder.info.splits:
    return EmptySource()
  return builder.as_data_source(split)


def read_split(builder: OneClassDataset, split: str) -> dict[str, Any]:
  """Reads a whole split into host arrays, in manifest order.

  Args:
    builder: a prepared builder.
    split: "normal", "unlabeled" or "test".

  Returns:
    {"image": [N, S, S, C] uint8, "label": [N] int32, "name": tuple of N
    str, "mask": [N, S, S] uint8 in {0, 1}, or None without masks}.
  """
  source = split_source(builder, split)
  records = (
    list(source.__getitems__(list(range(len(source))))) if source else []
  )
  # Records are stored in key order, but sort by the stored index anyway so
  # that the order does not hinge on tfds's writer.
  records.sort(key=lambda r: int(r["index"]))
  if [int(r["index"]) for r in records] != list(range(len(records))):
    raise manifest_lib.DataError(
      f"Corrupt cache {builder.data_dir}: split {split!r} indices are not"
      " 0..N-1; delete that folder to re-prepare"
    )
  features = builder.info.features

  def stack(key):
    shape = features[key].shape
    if not records:
      return np.zeros((0, *shape), np.uint8)
    return np.stack([r[key] for r in records])

  return {
    "image": stack("image"),
    "mask": stack("mask") if "mask" in features else None,
    "label": np.array([r["label"] for r in records], np.int32),
    "name": tuple(
      r["name"].decode() if isinstance(r["name"], bytes) else str(r["name"])
      for r in records
    ),
  }
