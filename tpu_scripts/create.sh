#!/usr/bin/env bash
# Creates a Cloud TPU VM (all workers).
#   bash tpu_scripts/create.sh NAME=jaxad-v5e ZONE=us-west4-a ACCEL=v5litepod-8
set -euo pipefail
for ARG in "$@"; do IFS='=' read -r KEY VALUE <<< "$ARG"; export "$KEY"="$VALUE"; done
: "${NAME:?NAME=...}" "${ZONE:?ZONE=...}" "${ACCEL:?ACCEL=... e.g. v5litepod-8}"
VERSION="${VERSION:-v2-alpha-tpuv5-lite}"
gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" \
  --accelerator-type "$ACCEL" --version "$VERSION"
