#!/usr/bin/env bash
# Runs one training job on every worker of a TPU VM (multi-host: each worker
# joins through jax.distributed.initialize(), enabled by JAXAD_DISTRIBUTED=1).
#   bash tpu_scripts/run.sh NAME=jaxad-v5e ZONE=us-west4-a \
#     CONFIG=configs/ddad.py:paper WORKDIR=gs://bucket/ddad ARGS="--config.data.root=..."
set -euo pipefail
for ARG in "$@"; do IFS='=' read -r KEY VALUE <<< "$ARG"; export "$KEY"="$VALUE"; done
: "${NAME:?NAME=...}" "${ZONE:?ZONE=...}" "${CONFIG:?CONFIG=...}" "${WORKDIR:?WORKDIR=...}"
ARGS="${ARGS:-}"
gcloud compute tpus tpu-vm ssh "$NAME" --worker=all --zone "$ZONE" --command \
  "cd ~/jaxad && JAXAD_DISTRIBUTED=1 ~/venv/bin/python3 -m jaxad.train --config $CONFIG --workdir $WORKDIR $ARGS"
