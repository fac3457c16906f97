r"""Builds jaxad/data/embedded/kermany_cxr64.npz from the Kermany CXR folders.

The arrays come from the `folders` layout of `jaxad.data` (the same code a
user's run takes: seeded OC-SSL draw, grayscale, bilinear resize to 64x64,
tfds cache), so the embedded set is exactly what that layout produces. Only
the known normals are then cut to a seeded subset, to keep the file small.

  python scripts/make_embedded.py \
    --src ../shared/data/kermany_cxr_224 \
    --out jaxad/data/embedded/kermany_cxr64.npz
"""

from __future__ import annotations

import json
import os
import tempfile

import ml_collections
import numpy as np
from absl import app, flags, logging

from jaxad.data import oneclass

_SRC = flags.DEFINE_string(
  "src", "../shared/data/kermany_cxr_224", "Kermany train/ test/ folders."
)
_OUT = flags.DEFINE_string(
  "out", "jaxad/data/embedded/kermany_cxr64.npz", "Output .npz."
)
_NUM_NORMAL = flags.DEFINE_integer("num_normal", 500, "Known normals kept.")
_UNLABELED = flags.DEFINE_integer("unlabeled_size", 500, "Unlabeled pool.")
_RATE = flags.DEFINE_float("anomaly_rate", 0.6, "Abnormal share of the pool.")
_SEED = flags.DEFINE_integer("seed", 0, "Split seed (draw and subset).")
_SIZE = flags.DEFINE_integer("image_size", 64, "Output side.")


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.INFO)
  data = ml_collections.ConfigDict(
    {
      "format": "folders",
      "root": _SRC.value,
      "image_size": _SIZE.value,
      "normal_class": "NORMAL",
      "normal_label": 0,
      "unlabeled_size": _UNLABELED.value,
      "anomaly_rate": _RATE.value,
      "split_seed": _SEED.value,
      "cache_dir": "",
    }
  )
  with tempfile.TemporaryDirectory() as tmp:
    data.cache_dir = os.path.join(tmp, "cache")
    workdir = os.path.join(tmp, "work")
    ds = oneclass.load(data, workdir)
    with open(os.path.join(workdir, "split.json")) as f:
      split = json.load(f)
  known = split["normal"]
  if len(known) != len(ds.normal):
    raise AssertionError("split.json and the loaded normals disagree")
  if _NUM_NORMAL.value > len(known):
    raise ValueError(
      f"--num_normal={_NUM_NORMAL.value}, but the draw leaves only"
      f" {len(known)} known normals"
    )
  # A seeded subset, kept in file order.
  rng = np.random.default_rng(_SEED.value)
  keep = np.sort(rng.choice(len(known), _NUM_NORMAL.value, replace=False))
  unlabeled_names = split["unlabeled"]["0"] + split["unlabeled"]["1"]
  meta = {
    "source": "Kermany et al., Cell 2018, doi:10.17632/rscbjbr9sj (CC BY 4.0)",
    "layout": "folders",
    "image_size": _SIZE.value,
    "unlabeled_size": _UNLABELED.value,
    "anomaly_rate": _RATE.value,
    "split_seed": _SEED.value,
    "num_normal": _NUM_NORMAL.value,
  }
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  np.savez_compressed(
    _OUT.value,
    normal_images=ds.normal[keep],
    normal_names=np.array([known[i] for i in keep], np.str_),
    unlabeled_images=ds.unlabeled,
    unlabeled_labels=ds.unlabeled_labels.astype(np.uint8),
    unlabeled_names=np.array(unlabeled_names, np.str_),
    test_images=ds.test,
    test_labels=ds.test_labels.astype(np.uint8),
    test_names=np.array(ds.test_names, np.str_),
    meta=np.array(json.dumps(meta, sort_keys=True)),
  )
  logging.info(
    "Wrote %s (%.2f MB): %d known normals, %d unlabeled (%d abnormal),"
    " %d test (%d abnormal)",
    _OUT.value,
    os.path.getsize(_OUT.value) / 1e6,
    len(keep),
    len(ds.unlabeled),
    int(ds.unlabeled_labels.sum()),
    len(ds.test),
    int(ds.test_labels.sum()),
  )


if __name__ == "__main__":
  app.run(main)
