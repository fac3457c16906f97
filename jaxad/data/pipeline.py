"""grain pipelines over the prepared tfds splits (for data that must stream).

`oneclass.load` suits datasets that fit in host (and device) memory; larger
ones stream: `data_source` gives the random-access array_record source of a
split and `grain_batches` turns any such source into shuffled, static-shape
batches, sliced per process for multi-host runs.
"""

from __future__ import annotations

import collections.abc
from typing import Any

import grain
import numpy as np

from jaxad.data import builder as builder_lib
from jaxad.data import oneclass


def data_source(data: Any, workdir: str, split: str) -> Any:
  """The tfds array_record data source of one split.

  Args:
    data: the `data` config (see `oneclass.prepare`).
    workdir: the run's directory.
    split: "normal", "unlabeled" or "test".

  Returns:
    A sequence of {"image": [S, S, C] uint8, "label": int64, "name": bytes,
    "index": int64}, plus "mask": [S, S] uint8 for layouts with masks
    (empty tuple for a split without examples).
  """
  return builder_lib.split_source(oneclass.prepare(data, workdir), split)


class FakeSource(collections.abc.Sequence):
  """Random images with the same element structure, for tests and smoke runs.

  Args:
    num: number of examples.
    image_size: side S of the [S, S, 1] uint8 images.
    seed: the images are a function of (seed, index).
    anomaly_every: every k-th example is labelled abnormal (0: none).
  """

  def __init__(
    self, num: int, image_size: int, *, seed: int = 0, anomaly_every: int = 0
  ):
    self._num = num
    self._size = image_size
    self._seed = seed
    self._every = anomaly_every

  def __len__(self) -> int:
    return self._num

  def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
    if not 0 <= index < self._num:
      raise IndexError(index)
    rng = np.random.default_rng((self._seed, index))
    size = (self._size, self._size, 1)
    label = int(self._every > 0 and index % self._every == self._every - 1)
    return {
      "image": rng.integers(0, 256, size, dtype=np.uint8),
      "label": np.int64(label),
      "name": f"fake/{index:05d}".encode(),
      "index": np.int64(index),
    }


def grain_batches(
  source: Any,
  *,
  batch_size: int,
  seed: int,
  shuffle: bool = True,
  num_epochs: int | None = None,
  drop_remainder: bool = True,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.IterDataset:
  """Batches of a random-access source, sliced for this process.

  Args:
    source: anything with `__len__` and `__getitem__` returning dicts of
      numpy values (e.g. `data_source(...)` or `FakeSource`).
    batch_size: examples per batch on this process.
    seed: shuffle seed; each epoch is shuffled differently.
    shuffle: whether to shuffle (off for evaluation, to keep file order).
    num_epochs: epochs to repeat for (None: forever).
    drop_remainder: drop a last partial batch, so that every batch has the
      same shape and the step compiles once.
    process_index: this process's index (`jax.process_index()`).
    process_count: number of processes (`jax.process_count()`).

  Returns:
    An iterable of {"image": [B, S, S, 1] uint8, "label": [B] int64,
    "name": [B] bytes, "index": [B] int64} numpy dicts.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if not 0 <= process_index < process_count:
    raise ValueError(
      f"process_index {process_index} not in [0, {process_count})"
    )
  ds = grain.MapDataset.source(source)
  # Slice before shuffling: each process reads a disjoint, fixed shard, and
  # the shared seed gives every process the same epoch structure.
  ds = ds[process_index::process_count]
  total = len(ds) * (num_epochs or 1)
  if not len(ds) or (drop_remainder and num_epochs and total < batch_size):
    raise ValueError(
      f"The source has {len(ds)} examples on process {process_index}: too"
      f" few for one batch of {batch_size} in {num_epochs} epoch(s)"
    )
  if shuffle:
    ds = ds.seed(seed).shuffle()
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  return ds.to_iter_dataset()
