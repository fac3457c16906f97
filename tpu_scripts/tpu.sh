#!/usr/bin/env bash
# Trains jaxad on a Cloud TPU VM or pod slice: every worker runs the same
# `python -m jaxad.train` (JAXAD_DISTRIBUTED=1: each joins the job through
# jax.distributed.initialize()), writing to one gs:// workdir.
#
#   tpu_scripts/tpu.sh [--dry-run] STEP [KEY=VALUE ...]
#
# Steps: create, setup, data (copy DATA to every worker), run, logs (follow
# a worker's log), wait (print it until training ends, exit with its
# status), fetch, delete, or all (create, setup, data when DATA is set,
# run, wait, fetch, delete).
# Parameters are environment variables (a KEY=VALUE argument sets one):
#   TPU_NAME      TPU VM name (required)
#   ZONE          e.g. us-west4-a (required)
#   PROJECT       GCP project (default: gcloud's configured one)
#   ACCELERATOR   e.g. v5litepod-8 (one host), v5litepod-16 (4 hosts);
#                 create (required)
#   RUNTIME_VERSION  TPU software version (default v2-alpha-tpuv5-lite)
#   SPOT=1        a Spot TPU (cheaper, may be preempted: re-run `run`, it
#                 resumes from the workdir's last checkpoint)
#   REPO_URL, REPO_REF  setup: git clone this repository (at this ref) on
#                 the workers; default: copy this checkout (tracked and
#                 untracked files that git does not ignore)
#   PYTHON_VERSION  setup: Python of ~/venv (default 3.11)
#   CONFIG        e.g. configs/ddad.py:paper (run, required)
#   WORKDIR       gs://bucket/path (run and fetch, required): every worker
#                 reads and writes the same run there
#   DATA          data: a gs:// folder copied to every worker (jaxad reads
#                 datasets from local folders), to DATA_DIR (default
#                 ~/jaxad-data/<DATA's last name>)
#   ARGS          run: more jaxad.train flags, e.g.
#                 "--config.data.root=~/jaxad-data/RSNA --config.mesh.member=2"
#   RESULTS       fetch: local folder (default workdirs/$TPU_NAME)
#   FETCH_CHECKPOINTS=1  fetch: include WORKDIR/checkpoints
#   WORKER        logs, wait: the worker whose log to print (default 0)
#   KEEP=1        all: do not delete the TPU VM at the end
#
# --dry-run prints every command (gcloud, and the commands run on the
# workers) instead of running it; gcloud need not be installed.
set -euo pipefail
here="${BASH_SOURCE[0]%/*}"
[[ $here != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source=tpu_scripts/common.sh
source "$here/common.sh"
# cd and pwd are shell builtins: --dry-run runs no other program.
JAXAD_REPO="$(cd "$here/.." && pwd)"

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

tpu() {
  local verb="$1"
  shift
  run gcloud compute tpus tpu-vm "$verb" "$TPU_NAME" --zone="$ZONE" \
    "${PROJECT_FLAG[@]}" "$@"
}

step_create() {
  need TPU_NAME ZONE ACCELERATOR
  local extra=()
  [[ ${SPOT:-0} != 1 ]] || extra+=(--spot)
  tpu create --accelerator-type="$ACCELERATOR" \
    --version="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}" "${extra[@]}"
}

step_setup() {
  need TPU_NAME ZONE
  if [[ -z ${REPO_URL:-} ]]; then
    local tarball="${TMPDIR:-/tmp}/jaxad-src-$TPU_NAME.tar.gz"
    pack_source "$tarball"
    run gcloud compute tpus tpu-vm scp "$tarball" \
      "$TPU_NAME:~/jaxad-src.tar.gz" --worker=all --zone="$ZONE" \
      "${PROJECT_FLAG[@]}"
  fi
  tpu ssh --worker=all \
    --command="set -e; $(remote_fetch_source) && $(remote_python_setup tpu)"
}

step_data() {
  need TPU_NAME ZONE DATA
  check_data
  tpu ssh --worker=all --command="set -e; $(remote_stage_data)"
}

check_workdir() {
  need WORKDIR
  [[ $WORKDIR == gs://* ]] ||
    die "WORKDIR=$WORKDIR: every worker must write to the same run, so" \
      "it must be a gs:// path (e.g. WORKDIR=gs://my-bucket/ddad)"
}

step_run() {
  need TPU_NAME ZONE CONFIG
  check_workdir
  tpu ssh --worker=all \
    --command="$(remote_train_command JAXAD_DISTRIBUTED=1)"
}

step_logs() {
  need TPU_NAME ZONE
  tpu ssh --worker="${WORKER:-0}" --command="tail -n +1 -F ~/jaxad_train.log"
}

step_wait() {
  need TPU_NAME ZONE
  tpu ssh --worker="${WORKER:-0}" --command="$(remote_wait_command)"
}

step_fetch() {
  need TPU_NAME
  check_workdir
  local results="${RESULTS:-workdirs/$TPU_NAME}" exclude=()
  [[ ${FETCH_CHECKPOINTS:-0} == 1 ]] || exclude+=(--exclude='checkpoints/.*')
  run mkdir -p "$results"
  run gcloud storage rsync --recursive "${exclude[@]}" "${PROJECT_FLAG[@]}" \
    "$WORKDIR" "$results"
}

step_delete() {
  need TPU_NAME ZONE
  tpu delete --quiet
}

step_all() {
  need TPU_NAME ZONE ACCELERATOR CONFIG
  check_workdir
  check_data
  if [[ ${KEEP:-0} != 1 ]]; then
    # Delete the TPU VM however the run ends (failure, Ctrl-C included).
    trap step_delete EXIT
  fi
  step_create
  step_setup
  [[ -z ${DATA:-} ]] || step_data
  step_run
  step_wait
  step_fetch
}

parse_args "$@"
case "$STEP" in
  create | setup | data | run | logs | wait | fetch | delete | all)
    require_gcloud
    "step_$STEP"
    ;;
  *)
    die "unknown step '$STEP'" \
      "(create, setup, data, run, logs, wait, fetch, delete, all)"
    ;;
esac
