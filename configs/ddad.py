r"""DDAD-ASR (Cai et al., MedIA 2023, https://doi.org/10.1016/j.media.2023.102794).

Dual-distribution discrepancy: K=3 NDM + K=3 UDM reconstruction AEs, trained
together in one jitted program; scores rec / intra / inter (METHODS.md 1);
then the ASR-Net refinement stage, score r_dual (or r_intra).

The default trains on the embedded Kermany CXR subset (64x64) for a few epochs
so it finishes in minutes on a laptop CPU; the paper trains 250 epochs (AEs)
and 100 (ASR-Net):
  python -m jaxad.train --config configs/ddad.py --workdir /tmp/ddad
  python -m jaxad.train --config configs/ddad.py:paper --workdir W \
      --config.data.format=medad --config.data.root=/data/Med-AD/RSNA
  python -m jaxad.train --config configs/ddad.py:smoke --workdir /tmp/smoke
Measured results (README "Results") are listed with their commands.

Config arguments (`configs/ddad.py:arg1,arg2`): `paper` (250 + 100
epochs, refinement on, 4 steps per jitted call), `smoke` (2 members,
32x32, batch 32, 1 epoch each stage: a quick check).
"""

import ml_collections as mlc

from jaxad import configlib


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  arg = configlib.parse_arg(arg, paper=False, smoke=False)
  c = mlc.ConfigDict()
  c.method = "ddad"
  c.seed = 0  # init, data order of every member: same seed = same run
  # Training epochs of every ensemble member over its own training set
  # (the UDM set is larger, so it takes more steps). Paper: 250.
  c.epochs = 250 if arg.paper else 30

  c.data = dict(
    format="embedded",  # embedded | medad | folders | medmnist
    root="",  # medad/folders: dataset folder; medmnist: the .npz file
    image_size=64,  # images are resized to image_size x image_size, gray
    normal_class="NORMAL",  # folders: the normal class folder name
    normal_label=0,  # medmnist: the normal class label
    unlabeled_size=1000,  # unlabeled pool size (medad: the original extra_data)
    anomaly_rate=0.6,  # fraction of abnormal images in the unlabeled pool
    split_seed=0,  # folders/medmnist: seed of the known/unlabeled draw
    cache_dir="",  # prepared datasets; "" = $JAXAD_DATA_DIR or ~/.cache/jaxad
    # >8-bit, float and DICOM pixels to uint8: "auto" (a DICOM's window,
    # else per-image min-max) | "minmax" | "window:LOW,HIGH" (fixed)
    intensity="auto",
    # Leave unreadable/undecodable images (and defect images with empty
    # masks) out, listed in W/skipped.txt, instead of refusing the data.
    skip_unreadable=False,
    # A folder of unlabeled images: the real unlabeled pool, as it is
    # (medad/folders/medmnist); unlabeled_size and anomaly_rate are then
    # not used. "" = the pool is drawn from the labelled train set.
    unlabeled_dir="",
    # Keep images found in two splits (a warning) instead of refusing.
    allow_duplicates=False,
  )
  c.model = dict(
    backbone="ae",  # ae | aeu (AE-U) | memae (MemAE)
    num_members=3,  # K per module (NDM and UDM)
    latent_size=16,  # `ls` in the paper
    width=1.0,  # `mp` width multiplier
    memory_slots=25,  # memae only
    entropy_weight=0.0002,  # memae only: weight of the attention entropy
    # Transposed convs as "subpixel" (3x3 conv + depth-to-space, fast on
    # CPU) or "direct"; the same maths and parameters either way.
    upsample="subpixel",
    # Compute dtype of the AEs and the ASR-Net: "float32" or "bfloat16"
    # (GPU/TPU; parameters, BatchNorm statistics and losses stay float32).
    # Its measured effect on AUROC is in the README (Throughput).
    compute_dtype="float32",
  )
  c.optim = dict(lr=5e-4, b1=0.5, b2=0.999)  # Adam, no decay, no schedule
  c.train = dict(
    batch_size=64,
    # Members: "unroll" (Python loop inside one jit; fastest on XLA CPU),
    # "vmap" (grouped convs; GPU/TPU), or "auto" (by backend).
    member_strategy="auto",
    log_every=20,  # steps between progress lines (one host sync each)
    checkpoint_every=200,  # steps between checkpoints
    # Steps per jitted call (scanned; unrolled on CPU). >1 keeps Python out
    # of the loop where dispatch dominates (GPU/TPU): measure with
    # jaxad.bench. The same maths for any value (equal up to float
    # rounding: XLA compiles the fused steps differently).
    # :paper uses 4: on the 2-core CPU it cut the loop's s/step by 11%
    # (ensembles) to 25% for ~1 min more compile per phase (README).
    steps_per_call=4 if arg.paper else 1,
  )
  # DDAD-ASR's refinement stage (METHODS.md 1.8): an ASR-Net trained on the
  # ensembles' discrepancy maps of synthetic anomalies, after the ensembles,
  # in the same run. Paper: 100 epochs, batch 8, Adam(1e-4, betas
  # 0.5/0.999) with coupled weight decay 1e-4.
  c.refine = dict(
    # On with :paper; off in the quick default, where 8 ASR epochs on the
    # embedded set scored below inter-discrepancy (README "Results").
    enabled=arg.paper,
    inputs="dual",  # "dual" = [inter, intra] (R_dual) | "intra" (R_intra)
    epochs=100 if arg.paper else 8,  # over the known normals
    batch_size=8,
    lr=1e-4,
    b1=0.5,
    b2=0.999,
    weight_decay=1e-4,
  )
  c.eval = dict(
    batch_size=64,
    # Known normals held out from training, a seeded (data.split_seed)
    # fraction recorded in W/split.json: their scores
    # alone set the decision threshold (eval.json "calibrated").
    calibration_fraction=0.1,
    # Share of those normals at or below the threshold; another value
    # re-scores (jaxad.evaluate) without retraining.
    target_specificity=0.95,
  )
  # Devices on the data axis (-1 = all left) and on the member axis (the
  # K members split over mesh.member device groups; K % member == 0).
  c.mesh = dict(data=-1, member=1)

  if arg.smoke:
    c.epochs = 1
    # 32x32: every step and score 4x cheaper than the default's 64x64, so
    # that the conformance test's several runs stay quick on a CPU.
    c.data.image_size = 32
    c.refine.update(enabled=True, epochs=1)
    c.model.num_members = 2
    c.train.batch_size = 32
    c.train.log_every = 5
    c.eval.batch_size = 64
  return c
