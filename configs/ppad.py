r"""PPAD (position-guided prompt learning on a frozen medical CLIP,
METHODS.md 3): 64 seeded normal shots, SAS lesions, prompts trained for 100
SGD steps; scored over five lung regions.

The paper's setting needs the CheXzero CLIP (ViT-B/32 fine-tuned on
MIMIC-CXR; https://github.com/rajpurkarlab/CheXzero, README: model
weights) and ZhangLab (Kermany, here in ../shared/data/kermany_cxr_224):
  python -m jaxad.train --config configs/ppad.py --workdir W \
      --config.model.clip_weights=/path/best_64_0.0001_original_35000_0.864.pt \
      --config.data.format=folders --config.data.root=/data/zhanglab
The CheXzero zero-shot baseline (no training, no checkpoint):
  python -m jaxad.evaluate --config configs/ppad.py:zero_shot --workdir W \
      --config.model.clip_weights=... --config.data.format=folders \
      --config.data.root=/data/zhanglab
A released PPAD prompt checkpoint, scored without training:
  python -m jaxad.evaluate --config configs/ppad.py --workdir W \
      --config.model.clip_weights=... \
      --config.model.prompts_checkpoint=PPAD_ZhangLab_....pt ...

Config arguments (`configs/ppad.py:arg1,arg2`): `paper` (the default:
the paper's 64 shots, 100 steps, 224 px), `zero_shot` (above), `offline`
(a RANDOM ViT-B/32-sized CLIP, logged: runnable without downloads, e.g.
for `jaxad.bench`; not the paper's setting and not its results), `smoke`
(the TINY random CLIP of ../shared/golden at 64 px, 16 shots, 3 epochs
of 2 steps, on ../shared/data's Kermany set: a quick check whose AUROC
means nothing; skipped by the tests when ../shared is absent).
"""

import os

import ml_collections as mlc

from jaxad import configlib

SHARED = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared"
)


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  arg = configlib.parse_arg(
    arg, paper=False, zero_shot=False, offline=False, smoke=False
  )
  c = mlc.ConfigDict()
  c.method = "ppad"
  c.seed = 0  # prompt init, region and SAS draws
  c.epochs = 100  # over the shots; 64 shots / batch 64 = 1 step per epoch

  c.data = dict(
    format="folders",  # any one-class layout (folders, medmnist, medad, ...)
    root="",  # folders: ROOT/{train,test}/<class>/*
    normal_class="NORMAL",  # folders: the normal class folder name
    normal_label=0,  # medmnist: the normal class label
    unlabeled_size=0,  # PPAD uses no unlabeled pool
    anomaly_rate=0.0,
    split_seed=0,
    shots=64,  # K normal training images (the paper's 64)
    shot_seed=0,  # seed of the K-shot draw (W/shots.json)
    image_size=224,  # must be the CLIP's input size
    channels=1,  # grayscale, stacked to RGB for the CLIP (as the original)
    cache_dir="",  # prepared datasets; "" = $JAXAD_DATA_DIR or ~/.cache/jaxad
    # >8-bit, float and DICOM pixels to uint8: "auto" (a DICOM's window,
    # else per-image min-max) | "minmax" | "window:LOW,HIGH" (fixed)
    intensity="auto",
    # Leave unreadable/undecodable images (and defect images with empty
    # masks) out, listed in W/skipped.txt, instead of refusing the data.
    skip_unreadable=False,
    # Keep images found in two splits (a warning) instead of refusing.
    allow_duplicates=False,
  )
  c.model = dict(
    mode="zero_shot" if arg.zero_shot else "ppad",  # ppad | zero_shot
    # The frozen CLIP: a state dict in OpenAI's key layout (.pt or
    # .safetensors), or "random" (a seeded random CLIP of clip_arch: not
    # the paper's setting, logged). Empty: refused, naming CheXzero.
    clip_weights="random" if arg.offline else "",
    clip_arch="ViT-B/32",  # for "random": ViT-B/32 | ViT-B/16 | ViT-L/14
    # Round the projections to fp16 as OpenAI's build_model does, so the
    # float32 towers compute with the original's exact weights.
    clip_fp16_round=True,
    compute_dtype="float32",  # frozen towers: float32 | bfloat16
    prompts_checkpoint="",  # a released PPAD prompt file: scored, not trained
    classnames=("normal", "pneumonia"),  # for every dataset, as the original
  )
  c.optim = dict(lr=1e-3, momentum=0.9)  # SGD, cosine decay over the run
  c.train = dict(
    batch_size=64,  # shots per step
    sas_probability=0.5,  # chance a training image gets a SAS lesion
    log_every=10,
    checkpoint_every=50,
    steps_per_call=1,
  )
  c.score = dict(
    fusion_threshold=0.8,  # max over regions above it, else the mean
    decision_threshold=0.5,  # F1 / accuracy in eval.json (the paper's)
  )
  c.eval = dict(
    batch_size=64,
    # Known normals that are not among the K shots, held out (a seeded,
    # data.split_seed, fraction recorded in W/split.json): their scores
    # alone set the decision threshold (eval.json "calibrated").
    calibration_fraction=0.1,
    # Share of those normals at or below the threshold; another value
    # re-scores (jaxad.evaluate) without retraining.
    target_specificity=0.95,
  )
  c.mesh = dict(data=-1, member=1)

  if arg.smoke:
    c.epochs = 3
    c.data.update(
      root=os.path.join(SHARED, "data", "kermany_cxr_224"),
      image_size=64,
      shots=16,
    )
    c.model.clip_weights = os.path.join(
      SHARED, "golden", "clip_vit_tiny_random.pt"
    )
    c.train.update(batch_size=8, log_every=1)
    c.eval.batch_size = 32
  return c
