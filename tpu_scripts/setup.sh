#!/usr/bin/env bash
# Copies this checkout to every worker of a TPU VM and installs jaxad[tpu].
#   bash tpu_scripts/setup.sh NAME=jaxad-v5e ZONE=us-west4-a
set -euo pipefail
for ARG in "$@"; do IFS='=' read -r KEY VALUE <<< "$ARG"; export "$KEY"="$VALUE"; done
: "${NAME:?NAME=...}" "${ZONE:?ZONE=...}"
cd "$(dirname "$0")/.."
gcloud compute tpus tpu-vm scp --recurse --worker=all --zone "$ZONE" \
  pyproject.toml README.md jaxad configs "$NAME":~/jaxad/
gcloud compute tpus tpu-vm ssh "$NAME" --worker=all --zone "$ZONE" --command \
  "python3 -m venv ~/venv && ~/venv/bin/pip install -q -e '~/jaxad[tpu]'"
