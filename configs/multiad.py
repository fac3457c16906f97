r"""Multi-AD (Rahmaniar et al., Pattern Recognition 172 (2026) 112486,
arXiv 2602.05426): SE/dilated student distilled from a frozen ImageNet
ResNet teacher, level-4 feature discriminator, multi-scale cosine maps.
No official code exists; the reconstruction and its [INFERRED] choices are
in ../shared/docs/METHODS.md section 4 (each is a key below).

Paper (abstract): mean image / pixel AUROC 81.4 / 97.0 on BMAD's brain MRI,
liver CT and retinal OCT, 99.6 / 98.4 on MVTec AD. Not yet reproduced here:
that needs the pretrained teacher and a GPU (256x256, 150 epochs).

The default is the paper's setting, and it needs the ImageNet teacher:
download torchvision's resnet50 (Fig. 2)
  https://download.pytorch.org/models/resnet50-0676ba61.pth
or wide_resnet50_2 (Med-AD's width; add --config.model.variant=...)
  https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth
and pass it:
  python -m jaxad.train --config configs/multiad.py --workdir W \
      --config.model.teacher_weights=/path/resnet50-0676ba61.pth \
      --config.data.format=bmad --config.data.root=/data/BMAD/Brain
  python -m jaxad.train --config configs/multiad.py --workdir W \
      --config.model.teacher_weights=... --config.data.channels=3 \
      --config.data.format=mvtec --config.data.root=/data/mvtec \
      --config.data.category=bottle
Without it, training stops and says so.

Offline (no download, CPU-sized; a RANDOM frozen teacher, logged as a
warning: runnable anywhere, but not the paper's setting and not its
results): `:offline` sets teacher_weights=random, 128x128 input and 3
epochs. The training step runs at about 5 images/s there on a 2-core CPU
(below 128x128, layer4 maps of 2x2 make XLA CPU's convolutions very slow).
The default dataset is the embedded Kermany CXR set:
  python -m jaxad.train --config configs/multiad.py:offline --workdir W
Measured with a random teacher on the 2-core CPU (README "Multi-AD"):
image AUROC 0.522, pixel AUROC 0.574, AUPRO 0.214 in 581 s on
  python -m jaxad.train --config configs/multiad.py:offline --workdir W \
      --config.data.format=mtd \
      --config.data.root=../shared/data/magnetic_tile_defects \
      --config.data.skip_unreadable=True
(measured before defect images with empty masks were refused: MTD has 4,
in MT_Uneven, which skip_unreadable now leaves out, in W/skipped.txt)
and image AUROC 0.696 in 885 s on
  python -m jaxad.train --config configs/multiad.py:offline --workdir W \
      --config.data.format=folders \
      --config.data.root=../shared/data/kermany_cxr_224

Config arguments (`configs/multiad.py:arg1,arg2`): `offline` (above),
`smoke` (a tiny ResNet-18-shaped pair with one block per stage, 32x32,
random teacher, 1 epoch: a quick check for CI).
"""

import ml_collections as mlc

from jaxad import configlib


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  arg = configlib.parse_arg(arg, offline=False, smoke=False)
  c = mlc.ConfigDict()
  c.method = "multiad"
  c.seed = 0  # init of student, D (and a random teacher), data order
  c.epochs = 150  # over the known normals; Med-AD's value [INFERRED]

  c.data = dict(
    # embedded | medad | folders | medmnist | mvtec | bmad | mtd
    format="embedded",
    root="",  # dataset folder (medmnist: the .npz file)
    image_size=256,  # S x S input; 256 gives the 64/32/16/8 maps of Fig. 5
    # Decoded channels: 1 (grayscale, repeated to 3 for the teacher inside
    # the step) or 3 (RGB, e.g. MVTec AD's colour categories).
    channels=1,
    category="",  # mvtec: the category folder (e.g. "bottle")
    test_normal_fraction=0.2,  # mtd: MT_Free images held out for the test
    normal_class="NORMAL",  # folders: the normal class folder name
    normal_label=0,  # medmnist: the normal class label
    # Multi-AD is unsupervised: it trains on the known normals only, so no
    # train image goes to an unlabeled pool (the embedded set ships one;
    # it is unused).
    unlabeled_size=0,
    anomaly_rate=0.6,  # abnormal share of a pool, if unlabeled_size > 0
    split_seed=0,  # folders/medmnist/mtd: seed of the drawn split
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
    # resnet50 (Fig. 2) | wide_resnet50_2 (Med-AD's code) | any other of
    # jaxad.models.resnet.VARIANTS; teacher and student share it.
    variant="resnet50",
    num_blocks=(),  # blocks per stage; () = the variant's (3, 4, 6, 3)
    # The frozen teacher: a torchvision checkpoint (.pth / .safetensors)
    # of `variant`, or "random" (not the paper's setting; see above).
    teacher_weights="random" if (arg.offline or arg.smoke) else "",
    teacher_se="none",  # [INFERRED] (a): the plain pretrained network
    teacher_dilation=(1, 1, 1, 1),  # [INFERRED] the exact pretrained network
    se="pre_add",  # student SE: pre_add (SE-ResNet, [INFERRED]) | post_add
    se_reduction=16,  # SE ratio r [INFERRED]
    se_stem=True,  # SE on the student's stem output (Fig. 2)
    student_dilation=(1, 2, 4, 8),  # per stage, strides kept (Fig. 2)
    disc_channels=(128, 256, 512, 1024),  # D's conv widths (Fig. 3)
    disc_slope=0.2,  # D's LeakyReLU slope [INFERRED]
    disc_dropout=0.3,  # D's dropout before the linear layer [INFERRED]
    disc_normalized=True,  # D reads channel-normalised F_N4 [INFERRED]
  )
  # L_S = L_KD + adv_weight * BCE(D(F_S4), 1); 0 = Med-AD (inert D).
  c.loss = dict(adv_weight=0.1)  # [INFERRED]; sweep {0, 0.01, 0.1, 1}
  # Adam with coupled L2 (PyTorch's weight_decay), no schedule: Med-AD's
  # values [INFERRED], for the student and for D.
  c.optim = dict(
    lr=0.004,
    weight_decay=1e-4,
    disc_lr=0.004,
    disc_weight_decay=1e-4,
    b1=0.9,
    b2=0.999,
  )
  c.train = dict(
    batch_size=16,  # Med-AD's batch
    log_every=20,  # steps between progress lines (one host sync each)
    checkpoint_every=200,  # steps between checkpoints
    # Steps per jitted call (scanned; unrolled on CPU). >1 keeps Python out
    # of the loop where dispatch dominates (GPU/TPU): measure with
    # jaxad.bench. The same maths for any value (equal up to float
    # rounding: XLA compiles the fused steps differently).
    steps_per_call=1,
  )
  c.score = dict(
    fusion="product",  # product (Med-AD's "mul") | sum of the level maps
    # Gaussian smoothing of the fused map: sigma 0.5 with a 5x5 kernel is
    # Med-AD's [INFERRED]; 4 is STPM/RD4AD's convention.
    sigma=0.5,
    kernel_size=0,  # odd width, 0 = 2 * int(4 sigma + 0.5) + 1 (5, or 33)
  )
  c.eval = dict(
    batch_size=32,
    # Known normals held out from training, a seeded (data.split_seed)
    # fraction recorded in W/split.json: their scores
    # alone set the decision threshold (eval.json "calibrated").
    calibration_fraction=0.1,
    # Share of those normals at or below the threshold; another value
    # re-scores (jaxad.evaluate) without retraining.
    target_specificity=0.95,
  )
  c.mesh = dict(data=-1, member=1)  # data axis devices (-1 = all); member: 1

  if arg.offline:
    c.data.image_size = 128
    c.epochs = 3
  if arg.smoke:
    c.epochs = 1
    c.data.image_size = 32
    c.model.update(
      variant="resnet18",
      num_blocks=(1, 1, 1, 1),
      # Basic blocks (ResNet-18) take no dilation, as torchvision.
      student_dilation=(1, 1, 1, 1),
      disc_channels=(16, 16, 16, 16),
    )
    c.train.update(batch_size=8, log_every=5)
    c.eval.batch_size = 16
  return c
