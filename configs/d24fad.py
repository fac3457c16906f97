r"""D²4FAD (dual distillation for few-shot anomaly detection; METHODS.md 2).

Cross-dataset few-shot: the decoder and learn-to-weight train on episodes
from every *source* dataset (a query and K supports of the same dataset);
the *target* is never trained on and is scored with K support images of
its own training normals (a fixed `med-kshot` folder when the layout has
one, else a seeded draw recorded in W/split.json). Paper setting (needs the
ImageNet teacher, https://download.pytorch.org/models/
wide_resnet50_2-95faca4d.pth):
  python -m jaxad.train --config configs/d24fad.py:paper --workdir W \
      --config.model.teacher_weights=/path/wide_resnet50_2-95faca4d.pth \
      --config.data.root=/data/medfsad --config.data.target=RSNA \
      --config.data.shots=4
Re-scoring the same model with another K (no retraining):
  python -m jaxad.evaluate --config configs/d24fad.py:paper --workdir W \
      ... --config.data.shots=8

Config arguments (`configs/d24fad.py:arg1,arg2`): `paper` (70 epochs,
128 px, batch 16), `offline` (a RANDOM frozen teacher, logged: runnable
without downloads, not the paper's setting), `shared` (the four real
sets of ../shared/data as entries, target pneumoniamnist by default,
kermany excluded as its origin; pick another with
`--config.data.target=... --config.data.exclude_sources=...`), `smoke`
(a 1-block ResNet-50-shaped teacher and decoder at 32 px on three of
those sets, random teacher: a quick check; skipped by the tests when
../shared is absent).
"""

import os

import ml_collections as mlc

from jaxad import configlib

SHARED_DATA = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"
)


def _shared_sources(*names: str) -> tuple[dict, ...]:
  """`data.sources` entries for the real sets in ../shared/data (DATA.md)."""
  entries = {
    "pneumoniamnist": dict(
      format="medmnist",
      root=os.path.join(
        SHARED_DATA, "pneumoniamnist_balanced_28", "pneumoniamnist.npz"
      ),
    ),
    "kermany": dict(
      format="folders", root=os.path.join(SHARED_DATA, "kermany_cxr_224")
    ),
    "mtd": dict(
      format="mtd",
      root=os.path.join(SHARED_DATA, "magnetic_tile_defects"),
      # 4 MT_Uneven defect images have empty masks: left out, as logged.
      skip_unreadable=True,
    ),
    "isic2017": dict(
      format="folders",
      root=os.path.join(SHARED_DATA, "isic2017_256"),
      normal_class="nevus",
    ),
  }
  return tuple(dict(entries[n], name=n) for n in names)


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  arg = configlib.parse_arg(
    arg, paper=False, offline=False, smoke=False, shared=False
  )
  c = mlc.ConfigDict()
  c.method = "d24fad"
  c.seed = 0  # init of decoder and L2W, episode draws
  c.epochs = 70  # over the sources' training pool (the paper's)

  c.data = dict(
    # D²4FAD's layout: ROOT/<dataset>/train/good, ROOT/<dataset>/test/<good|
    # other>, optional ROOT/med-kshot/<T>/train/shot<K>/good<K>/; every
    # dataset folder but the target is a source. "" = use `sources` only.
    root="",
    # More sources (or the target) in jaxad's other layouts: a tuple of
    # {"format", "root", "name", ...} dicts or "format=...,root=..."
    # strings (jaxad.data.fewshot); a tuple, so that the command line can
    # set it: --config.data.sources="('format=folders,root=/d,name=x',)".
    sources=(),
    target="",  # the dataset scored (never trained on)
    shots=4,  # K supports per query (training) and for the target (test)
    # The target's supports: "auto" (a fixed med-kshot folder when there
    # is one, else a draw), "fixed" or "drawn".
    support="auto",
    support_root="",  # another fixed-support root for the target
    support_seed=0,  # seed of a drawn support set (W/split.json)
    # A new query/support pairing every epoch; False = drawn once, as the
    # original (whose shuffle_dataset() is never called).
    resample_supports=True,
    # At most this many training normals per source (a seeded subset), for
    # quick runs; 0 = all of them, as the original.
    max_source_images=0,
    # Entries not trained on, comma-separated names: a source that shares
    # an origin with the target would leak it (PneumoniaMNIST is derived
    # from the Kermany images).
    exclude_sources="",
    image_size=128,
    channels=3,  # RGB, as the original
    cache_dir="",  # prepared datasets; "" = $JAXAD_DATA_DIR or ~/.cache/jaxad
    # >8-bit, float and DICOM pixels to uint8: "auto" (a DICOM's window,
    # else per-image min-max) | "minmax" | "window:LOW,HIGH" (fixed)
    intensity="auto",
    # Keep images found in two splits (a warning) instead of refusing.
    allow_duplicates=False,
  )
  c.model = dict(
    variant="wide_resnet50_2",  # the frozen teacher (torchvision layout)
    teacher_blocks=(),  # blocks per teacher stage; () = the variant's
    # The frozen teacher's torchvision checkpoint, or "random" (not the
    # paper's setting; see `offline`). Empty: training refuses to start.
    teacher_weights="random" if (arg.offline or arg.smoke) else "",
    decoder_blocks=(3, 4, 6),  # de-WRN-50-2 stages 1..3
    width_per_group=128,  # 128: the Wide-ResNet mirror; 64: ResNet-50
    # BatchNorm of the K+1 slices. "parallel" (default): the original's
    # maths (each slice its own batch statistics, K+1 running updates,
    # golden-checked) with the slices side by side; "sequential": one slice
    # after the other, as the original runs them (a scan: 2.7x slower per
    # step on a CPU, README); "fast": one batch for all, not the original.
    bn_mode="parallel",
    # Keep the frozen teacher's layer4 of every training-pool image on each
    # device, computed once per run (h*w*2048 float32: 128 KB per image at
    # 128 px), so a step encodes its B queries only, not their K supports
    # too (the same values up to float rounding; README). False: encode
    # all (K+1)*B images every step, as the original, for pools too big.
    teacher_cache=True,
  )
  c.optim = dict(lr=1e-4, b1=0.5, b2=0.999)  # Adam, no decay/schedule
  c.train = dict(
    batch_size=16,  # queries per step (each with K supports)
    log_every=20,
    checkpoint_every=200,
    # Two steps per jitted call (unrolled on a CPU, scanned elsewhere):
    # on the 2-core CPU 1.29-1.34x faster per step than one (README), as
    # XLA maps and zero-fills the step's buffers once per call, not per
    # step. The smoke run keeps 1 (half the compile time).
    steps_per_call=2,
  )
  c.score = dict(sigma=4.0)  # Gaussian on each map (scipy, truncate 4)
  c.eval = dict(
    batch_size=16,
    # A seeded (data.split_seed) fraction of the target's training normals,
    # never its supports, recorded in W/split.json: their scores alone set
    # the decision threshold (eval.json "calibrated").
    calibration_fraction=0.1,
    # Share of those normals at or below the threshold; another value
    # re-scores (jaxad.evaluate) without retraining.
    target_specificity=0.95,
  )
  c.mesh = dict(data=-1, member=1)

  if arg.shared:  # the real sets in ../shared/data, every one an entry
    c.data.sources = _shared_sources(
      "pneumoniamnist", "kermany", "mtd", "isic2017"
    )
    c.data.target = "pneumoniamnist"
    c.data.exclude_sources = "kermany"  # PneumoniaMNIST's origin
  if arg.smoke:
    c.epochs = 1
    c.data.update(
      image_size=32,
      shots=2,
      max_source_images=96,
      target="pneumoniamnist",
      sources=_shared_sources("pneumoniamnist", "mtd", "isic2017"),
      exclude_sources="",
    )
    c.model.update(
      variant="resnet50",
      teacher_blocks=(1, 1, 1, 1),
      decoder_blocks=(1, 1, 1),
      width_per_group=64,
    )
    c.train.update(batch_size=8, log_every=5, steps_per_call=1)
    c.eval.batch_size = 32
  return c
