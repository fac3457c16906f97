#!/usr/bin/env bash
# Trains jaxad on a multi-GPU machine: one process per host, using all of
# the host's GPUs (the mesh's data/member axes span them).
#
#   scripts/multi_gpu.sh [--dry-run] STEP [KEY=VALUE ...]
#
# On a Compute Engine VM with GPUs, through gcloud: create, setup, data
# (copy DATA to the VM), run, logs (follow the log), wait (print it until
# training ends, exit with its status), fetch, delete, or all (create,
# setup, data when DATA is set, run, wait, fetch, delete).
# On the host this runs on (a GPU server, or each host of several):
# local-setup (a venv with jaxad[cuda]), local-run (jaxad.train in the
# foreground).
#
# Parameters are environment variables (a KEY=VALUE argument sets one):
#   VM_NAME       VM name (gcloud steps, required)
#   ZONE          e.g. us-central1-a (gcloud steps, required)
#   PROJECT       GCP project (default: gcloud's configured one)
#   MACHINE_TYPE  create (default g2-standard-48: 4 L4 GPUs; a2-highgpu-8g,
#                 a3-highgpu-8g: 8 A100 / H100)
#   ACCELERATOR   create: GPUs to attach where the machine type has none,
#                 e.g. type=nvidia-tesla-t4,count=4 (N1 machine types)
#   IMAGE_FAMILY  create (default common-cu129-ubuntu-2204-nvidia-580: an
#                 NVIDIA 580 driver, which CUDA 13 needs)
#   IMAGE_PROJECT create (default deeplearning-platform-release)
#   DISK_SIZE     create: boot disk (default 200GB)
#   SPOT=1        create: a Spot VM (may be preempted: re-run `run`, it
#                 resumes from the workdir's last checkpoint)
#   CUDA_EXTRA    setup: the jaxad extra (with gcs, for gs:// workdirs),
#                 cuda (CUDA 13, driver >= 580;
#                 default) or cuda12 (older drivers)
#   REPO_URL, REPO_REF  setup: git clone this repository (at this ref) on
#                 the VM; default: copy this checkout
#   PYTHON_VERSION  setup: Python of ~/venv (default 3.11)
#   CONFIG        e.g. configs/ddad.py:paper (run, local-run: required)
#   WORKDIR       run: gs://bucket/path, or a path on the VM;
#                 local-run: any path jaxad.train takes (required)
#   DATA          data: a gs:// folder copied to the VM (jaxad reads
#                 datasets from local folders), to DATA_DIR (default
#                 ~/jaxad-data/<DATA's last name>)
#   ARGS          run, local-run: more jaxad.train flags, e.g.
#                 "--config.data.root=~/jaxad-data/RSNA"
#   RESULTS       fetch: local folder (default workdirs/$VM_NAME)
#   FETCH_CHECKPOINTS=1  fetch: include WORKDIR/checkpoints
#   KEEP=1        all: do not delete the VM at the end
#   VENV          local-*: the virtual environment (default venv/ in this
#                 checkout)
#   PYTHON        local-setup: the Python that makes it (default python3)
#   NUM_HOSTS, HOST_ID, COORDINATOR  local-run on several hosts: the
#                 number of hosts, this host's index (0 .. NUM_HOSTS-1)
#                 and host 0's address:port, the same on every host; each
#                 host then joins one job (jax.distributed.initialize).
#
# --dry-run prints every command instead of running it (gcloud need not be
# installed).
set -euo pipefail
here="${BASH_SOURCE[0]%/*}"
[[ $here != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source=tpu_scripts/common.sh
source "$here/../tpu_scripts/common.sh"
# cd and pwd are shell builtins: --dry-run runs no other program.
JAXAD_REPO="$(cd "$here/.." && pwd)"

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

vm() {
  local verb="$1"
  shift
  run gcloud compute "$verb" "$@" --zone="$ZONE" "${PROJECT_FLAG[@]}"
}

step_create() {
  need VM_NAME ZONE
  local extra=()
  [[ -z ${ACCELERATOR:-} ]] || extra+=(--accelerator="$ACCELERATOR")
  if [[ ${SPOT:-0} == 1 ]]; then
    extra+=(--provisioning-model=SPOT --instance-termination-action=STOP)
  fi
  vm instances create "$VM_NAME" \
    --machine-type="${MACHINE_TYPE:-g2-standard-48}" \
    --image-family="${IMAGE_FAMILY:-common-cu129-ubuntu-2204-nvidia-580}" \
    --image-project="${IMAGE_PROJECT:-deeplearning-platform-release}" \
    --boot-disk-size="${DISK_SIZE:-200GB}" \
    --maintenance-policy=TERMINATE \
    --metadata=install-nvidia-driver=True "${extra[@]}"
}

step_setup() {
  need VM_NAME ZONE
  if [[ -z ${REPO_URL:-} ]]; then
    local tarball="${TMPDIR:-/tmp}/jaxad-src-$VM_NAME.tar.gz"
    pack_source "$tarball"
    vm scp "$tarball" "$VM_NAME:~/jaxad-src.tar.gz"
  fi
  vm ssh "$VM_NAME" --command="set -e; $(remote_fetch_source) && \
$(remote_python_setup "${CUDA_EXTRA:-cuda},gcs")"
}

step_data() {
  need VM_NAME ZONE DATA
  check_data
  vm ssh "$VM_NAME" --command="set -e; $(remote_stage_data)"
}

step_run() {
  need VM_NAME ZONE CONFIG WORKDIR
  vm ssh "$VM_NAME" --command="$(remote_train_command "")"
}

step_logs() {
  need VM_NAME ZONE
  vm ssh "$VM_NAME" --command="tail -n +1 -F ~/jaxad_train.log"
}

step_wait() {
  need VM_NAME ZONE
  vm ssh "$VM_NAME" --command="$(remote_wait_command)"
}

step_fetch() {
  need VM_NAME ZONE WORKDIR
  local results="${RESULTS:-workdirs/$VM_NAME}" exclude=()
  run mkdir -p "$results"
  if [[ $WORKDIR == gs://* ]]; then
    [[ ${FETCH_CHECKPOINTS:-0} == 1 ]] ||
      exclude+=(--exclude='checkpoints/.*')
    run gcloud storage rsync --recursive "${exclude[@]}" \
      "${PROJECT_FLAG[@]}" "$WORKDIR" "$results"
  else
    # A workdir on the VM (relative paths are under ~/jaxad, where `run`
    # starts): copy it whole.
    local remote="$WORKDIR"
    # shellcheck disable=SC2088  # ~ is the VM's home, expanded there
    [[ $remote == /* || $remote == "~"* ]] || remote="~/jaxad/$remote"
    vm scp --recurse "$VM_NAME:$remote" "$results"
  fi
}

step_delete() {
  need VM_NAME ZONE
  vm instances delete "$VM_NAME" --quiet
}

step_all() {
  need VM_NAME ZONE CONFIG WORKDIR
  check_data
  if [[ ${KEEP:-0} != 1 ]]; then
    # Delete the VM however the run ends (failure, Ctrl-C included).
    trap step_delete EXIT
  fi
  step_create
  step_setup
  [[ -z ${DATA:-} ]] || step_data
  step_run
  step_wait
  step_fetch
}

step_local-setup() {
  local venv="${VENV:-$JAXAD_REPO/venv}"
  run "${PYTHON:-python3}" -m venv "$venv"
  run "$venv/bin/pip" install -q --upgrade pip
  run cd "$JAXAD_REPO"
  run "$venv/bin/pip" install -q ".[${CUDA_EXTRA:-cuda},gcs]"
}

step_local-run() {
  need CONFIG WORKDIR
  local env=() args=()
  local hosts="${NUM_HOSTS:-1}"
  [[ $hosts =~ ^[1-9][0-9]*$ ]] || die "NUM_HOSTS=$hosts: a positive integer"
  if ((hosts > 1)); then
    need HOST_ID COORDINATOR
    if ! [[ $HOST_ID =~ ^[0-9]+$ ]] || ((HOST_ID >= hosts)); then
      die "HOST_ID=$HOST_ID: an integer in 0 .. $((hosts - 1))"
    fi
    # jaxad.sharding.initialize_distributed reads these (JAX reads the
    # coordinator's address itself).
    env=(JAXAD_DISTRIBUTED=1 "JAX_COORDINATOR_ADDRESS=$COORDINATOR"
      "JAXAD_NUM_PROCESSES=$hosts" "JAXAD_PROCESS_ID=$HOST_ID")
  fi
  [[ -z ${ARGS:-} ]] || read -r -a args <<<"$ARGS"
  run env "${env[@]}" "${VENV:-$JAXAD_REPO/venv}/bin/python" -m jaxad.train \
    --config="$CONFIG" --workdir="$WORKDIR" "${args[@]}"
}

parse_args "$@"
case "$STEP" in
  create | setup | data | run | logs | wait | fetch | delete | all)
    require_gcloud
    "step_$STEP"
    ;;
  local-setup | local-run) "step_$STEP" ;;
  *)
    die "unknown step '$STEP' (create, setup, data, run, logs, wait," \
      "fetch, delete, all, local-setup, local-run)"
    ;;
esac
