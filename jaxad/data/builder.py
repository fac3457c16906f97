"""One tensorflow-datasets builder for every layout, cached as array_record.

`prepare` turns a `manifest.Manifest` into splits `normal`, `unlabeled` and
`test` under `CACHE_DIR/<name>-<hash>/`, where the hash covers the layout's
parameters and every input file's name, size and mtime: the same config
re-uses the prepared data, and any change prepares a new copy. Features are
`tfds.features.Tensor`s, which tfds writes as array_record without TensorFlow.
A manifest with masks adds a per-image "mask" (zeros for the train normals).

A file that cannot be decoded (or an abnormal image with an empty mask) is
an error naming it, during preparation, before any training. With
`data.skip_unreadable=true` (`Manifest.skip_unreadable`) it is left out
instead: the kept images are stored contiguously, the skipped ones are
recorded in the cache's metadata (so a re-used cache knows them too), the
returned builder's manifest lists only the kept images, and `prepare`
writes every skipped file, listing's and decoding's, to W/skipped.txt and
a warning.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from jaxad import sharding, storage
from jaxad.data import manifest as manifest_lib

# tfds cannot write a split without examples; an empty part (e.g. no
# unlabeled pool) is left out of the builder and read back as this.
EmptySource = tuple
SKIPPED_FILE = "skipped.txt"  # in the workdir: path<TAB>reason per line
# What a file that cannot be used raises while decoding; ImportError (a
# missing optional reader) is not one: no file could be read without it.
UNREADABLE = (manifest_lib.DataError, OSError)


class _Metadata(tfds.core.MetadataDict):
  """The cache's metadata ("skipped": [[part, name, path, reason], ...]);
  caches prepared before it was written have none."""

  def load_metadata(self, data_dir):
    if (epath.Path(data_dir) / "metadata.json").exists():
      super().load_metadata(data_dir)
    else:
      self.clear()


class OneClassDataset(tfds.core.GeneratorBasedBuilder):
  """The one-class splits of one manifest, as uint8 [S, S, C] images.

  Each example is {"image": [S, S, C] uint8, "label": int64 (0 normal,
  1 abnormal), "name": str, "index": int64 (position in the manifest part)},
  and for a manifest with masks "mask": [S, S] uint8 in {0, 1}. "index"
  counts the kept images: it equals the manifest position unless images
  were skipped (`skipped`).
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
      metadata=_Metadata(),
    )

  @property
  def skipped(self) -> list[tuple[str, str, str, str]]:
    """(part, name, path, reason) of each image left out while decoding."""
    return [tuple(x) for x in self.info.metadata.get("skipped", [])]

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager
    return {
      part: self._generate_examples(part)
      for part in manifest_lib.PARTS
      if self._manifest.parts[part]
    }

  def _generate_examples(self, part: str):
    m = self._manifest
    entries = m.parts[part]
    start = time.perf_counter()
    kept = 0
    for i, entry in enumerate(entries):
      try:
        image, mask = manifest_lib.decode_example(
          entry, m.image_size, m.channels, m.intensity, m.has_masks
        )
      except UNREADABLE as e:
        if not m.skip_unreadable:
          if type(e) in (manifest_lib.DataError, FileNotFoundError):
            if manifest_lib.SKIP_HINT not in str(e):
              raise type(e)(f"{e} (or {manifest_lib.SKIP_HINT})") from e
          raise
        self._skip(part, entry, f"{type(e).__name__}: {e}")
        continue
      example = {
        "image": image,
        "label": entry.label,
        "name": entry.name,
        "index": kept,
      }
      if mask is not None:
        example["mask"] = mask
      yield i, example
      kept += 1
      if (i + 1) % 1000 == 0:
        logging.info("  %s: decoded %d / %d", part, i + 1, len(entries))
    if not kept:  # tfds cannot write an empty split, nor could we use it
      _, _, path, reason = next(x for x in self.skipped if x[0] == part)
      raise manifest_lib.DataError(
        f"{m.name}: every one of the {len(entries)} {part} images was"
        f" skipped as unreadable (data.skip_unreadable=true); first: {path}:"
        f" {reason}"
      )
    logging.info(
      "Prepared %s: %d images (%d skipped) in %.1f s",
      part,
      kept,
      len(entries) - kept,
      time.perf_counter() - start,
    )

  def _skip(self, part: str, entry: manifest_lib.Entry, reason: str) -> None:
    path = entry.source if isinstance(entry.source, str) else entry.name
    record = self.info.metadata.setdefault("skipped", [])
    record.append([part, entry.name, path, reason])


def default_cache_dir(cache_dir: str = "") -> str:
  """`cache_dir`, else $JAXAD_DATA_DIR, else ~/.cache/jaxad/tfds."""
  if not cache_dir:
    cache_dir = os.environ.get("JAXAD_DATA_DIR", "") or os.path.join(
      "~", ".cache", "jaxad", "tfds"
    )
  return os.path.abspath(os.path.expanduser(cache_dir))


def prepare(
  manifest: manifest_lib.Manifest, cache_dir: str = "", workdir: str = ""
) -> OneClassDataset:
  """Prepares a manifest once (decode, resize, write array_record).

  Args:
    manifest: what to prepare.
    cache_dir: root of the cache ("" -> `default_cache_dir()`).
    workdir: the run's directory: with skipped files, W/skipped.txt lists
      them ("" -> not written; only the warning).

  Returns:
    The builder, ready for `split_source`; its `manifest` lists the images
    stored (without any skipped ones).

  Raises:
    FileNotFoundError, DataError: an image that cannot be decoded, an
      abnormal image with an empty mask (unless the manifest skips them).
    ImportError: a reader for the files is missing (pydicom for DICOM).
  """
  slug = re.sub(r"[^A-Za-z0-9_.]+", "_", manifest.name).strip("_")
  data_dir = os.path.join(
    default_cache_dir(cache_dir), f"{slug}-{manifest.cache_key()}"
  )
  # In a multi-process job the workers may share the cache (a shared disk,
  # a bucket): process 0 prepares, the others wait, then read its copy;
  # two writers would race to rename tfds's incomplete folder. A worker
  # whose cache is not shared prepares its own copy after the wait.
  if jax.process_index() == 0:
    builder = _prepare_here(manifest, data_dir)
  sharding.sync_processes(f"prepared {data_dir}")
  if jax.process_index() != 0:
    builder = _prepare_here(manifest, data_dir)
  skipped = builder.skipped
  if skipped:
    out = {(part, name) for part, name, _, _ in skipped}
    builder._manifest = dataclasses.replace(
      manifest,
      parts={
        p: tuple(e for e in v if (p, e.name) not in out)
        for p, v in manifest.parts.items()
      },
      skipped=manifest.skipped + tuple((f, r) for _, _, f, r in skipped),
    )
  report_skipped(builder.manifest, workdir)
  return builder


def _prepare_here(
  manifest: manifest_lib.Manifest, data_dir: str
) -> OneClassDataset:
  """The builder of `data_dir`, prepared first unless it already is."""
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


def report_skipped(manifest: manifest_lib.Manifest, workdir: str) -> None:
  """Warns of the manifest's skipped files and lists them in W/skipped.txt.

  Args:
    manifest: a prepared manifest (`OneClassDataset.manifest`).
    workdir: where skipped.txt goes ("" -> not written). Without skipped
      files, an earlier skipped.txt there is removed (it would be stale).
  """
  # Process 0 alone writes the workdir's files (every process warns).
  path = os.path.join(workdir, SKIPPED_FILE) if workdir else ""
  if jax.process_index():
    path = ""
  if not manifest.skipped:
    if path:
      storage.path(path).unlink(missing_ok=True)
    return
  if path:
    # One line per file: tabs and newlines in a reason would split it.
    storage.write_text(
      path,
      "".join(
        f"{file}\t{' '.join(reason.split())}\n"
        for file, reason in manifest.skipped
      ),
    )
  first, reason = manifest.skipped[0]
  logging.warning(
    "%s: skipped %d unreadable file(s) (data.skip_unreadable=true)%s; first:"
    " %s (%s)",
    manifest.name,
    len(manifest.skipped),
    f", listed in {path}" if path else "",
    first,
    reason,
  )


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
