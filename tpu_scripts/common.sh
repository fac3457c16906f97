# shellcheck shell=bash
# Helpers sourced by tpu_scripts/tpu.sh and scripts/multi_gpu.sh: arguments,
# --dry-run, checks. Not meant to be run on its own.
#
# Every parameter is an environment variable; `KEY=VALUE` arguments set
# (and export) one for this run. With --dry-run every command (gcloud,
# ssh'd remote commands, local ones) is printed, quoted for a shell, and
# nothing is run: gcloud need not be installed.

DRY_RUN=0
STEP=""

die() {
  echo "${0##*/}: $*" >&2
  exit 2
}

# parse_args [--dry-run] STEP [KEY=VALUE ...]
parse_args() {
  local arg
  for arg in "$@"; do
    case "$arg" in
      --dry-run) DRY_RUN=1 ;;
      -h | --help)
        usage
        exit 0
        ;;
      *=*)
        local key="${arg%%=*}"
        [[ $key =~ ^[A-Z_][A-Z0-9_]*$ ]] ||
          die "bad parameter name in '$arg' (want KEY=VALUE, KEY in capitals)"
        export "$key=${arg#*=}"
        ;;
      -*) die "unknown option '$arg' (only --dry-run and --help)" ;;
      *)
        [[ -z $STEP ]] || die "one step at a time: got '$STEP' and '$arg'"
        STEP="$arg"
        ;;
    esac
  done
  [[ -n $STEP ]] || {
    usage >&2
    exit 2
  }
  if [[ -n ${PROJECT:-} ]]; then
    PROJECT_FLAG=(--project="$PROJECT")
  fi
}

# need VAR...: each must be set and non-empty.
need() {
  local var
  for var in "$@"; do
    [[ -n ${!var:-} ]] || die "$var is not set (export $var=... or pass $var=...)"
  done
}

# quote ARG: ARG as one shell word (bare when it needs no quotes).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# print_command ARG...: the command as one copy-pastable line.
print_command() {
  local arg line=""
  for arg in "$@"; do
    line+="$(quote "$arg") "
  done
  printf '%s\n' "${line% }"
}

# run ARG...: runs the command, or prints it under --dry-run.
run() {
  if ((DRY_RUN)); then
    print_command "$@"
  else
    "$@"
  fi
}

# require_gcloud: gcloud must be installed (not checked under --dry-run).
require_gcloud() {
  ((DRY_RUN)) || command -v gcloud >/dev/null ||
    die "gcloud not found: install the Google Cloud CLI (or use --dry-run)"
}

# PROJECT_FLAG: (--project=$PROJECT) when PROJECT is set, else () and
# gcloud's configured project. Set by parse_args.
# shellcheck disable=SC2034  # read by the scripts that source this file
PROJECT_FLAG=()

# remote_python_setup EXTRA: the remote shell commands that make ~/venv
# (Python >= 3.11 from uv, as the images ship an older one) and install
# this checkout with `pip install '.[EXTRA]'` from ~/jaxad.
remote_python_setup() {
  local python="${PYTHON_VERSION:-3.11}"
  printf '%s' "export PATH=\"\$HOME/.local/bin:\$PATH\" && "
  printf '%s' "(command -v uv >/dev/null || "
  printf '%s' "curl -LsSf https://astral.sh/uv/install.sh | sh) && "
  printf '%s' "uv venv --seed --clear --python $python ~/venv && "
  printf '%s' "cd ~/jaxad && ~/venv/bin/pip install -q '.[$1]'"
}

# remote_fetch_source: remote commands that put the code in ~/jaxad: a
# `git clone` of REPO_URL (at REPO_REF) when set, else the tarball that
# pack_source made and the caller copied to ~/jaxad-src.tar.gz.
remote_fetch_source() {
  printf '%s' "rm -rf ~/jaxad && "
  if [[ -n ${REPO_URL:-} ]]; then
    printf '%s' "git clone --depth 1"
    [[ -z ${REPO_REF:-} ]] || printf ' --branch %s' "$(quote "$REPO_REF")"
    printf ' %s ~/jaxad' "$(quote "$REPO_URL")"
  else
    printf '%s' "mkdir -p ~/jaxad && tar -xzf ~/jaxad-src.tar.gz -C ~/jaxad"
  fi
}

# pack_source TARBALL: this checkout's ($JAXAD_REPO) files (tracked and untracked, not
# ignored: no venv, no build outputs) into TARBALL.
pack_source() {
  local repo="$JAXAD_REPO" list="${1%.tar.gz}.files"
  if ((DRY_RUN)); then
    print_command git -C "$repo" ls-files -z --cached --others \
      --exclude-standard
    echo "  > $list"
  else
    git -C "$repo" ls-files -z --cached --others --exclude-standard >"$list"
  fi
  run tar -czf "$1" -C "$repo" --null -T "$list"
}

# remote_stage_data: remote commands that copy DATA (a gs:// folder) to
# DATA_DIR (default ~/jaxad-data/<DATA's last name>) on the machine: jaxad
# reads datasets from local folders (workdirs may be gs://, data roots
# not). rsync: a second run copies only what changed.
remote_stage_data() {
  local name="${DATA%/}" dest
  name="${name##*/}"
  # Quoted for the remote shell, but for a leading ~/ that it expands.
  # shellcheck disable=SC2088  # ~ is the machine's home, expanded there
  case "${DATA_DIR:-}" in
    "") dest="~/jaxad-data/$(quote "$name")" ;;
    "~/"*) dest="~/$(quote "${DATA_DIR#"~/"}")" ;;
    *) dest="$(quote "$DATA_DIR")" ;;
  esac
  printf '%s' "mkdir -p $dest && "
  printf '%s' "gcloud storage rsync --recursive $(quote "$DATA") $dest"
}

# check_data: DATA, when set, must be a gs:// folder.
check_data() {
  [[ -z ${DATA:-} || $DATA == gs://* ]] ||
    die "DATA=$DATA: a gs:// folder to copy to every machine (or unset it" \
      "and put the data there yourself)"
}

# remote_train_command: the remote commands that start
# `python -m jaxad.train` in the background (it outlives the ssh session),
# output in ~/jaxad_train.log, exit status in ~/jaxad_train.status. $1:
# environment assignments for the process (may be empty).
remote_train_command() {
  local flags
  flags="--config=$(quote "$CONFIG") --workdir=$(quote "$WORKDIR")"
  printf '%s' "cd ~/jaxad && rm -f ~/jaxad_train.status && "
  # HUP ignored by the subshell and what it runs: training outlives ssh.
  printf '%s' "(trap '' HUP; ${1:+$1 }"
  printf '%s' "PYTHONUNBUFFERED=1 ~/venv/bin/python -m jaxad.train $flags"
  printf '%s' "${ARGS:+ $ARGS}; echo \$? > ~/jaxad_train.status)"
  printf '%s' " > ~/jaxad_train.log 2>&1 < /dev/null &"
}

# remote_wait_command: remote commands that print ~/jaxad_train.log until
# training ends, then exit with its status (1 when the process died without
# writing one: killed, or the machine restarted).
remote_wait_command() {
  printf '%s' "tail -n +1 -F ~/jaxad_train.log & t=\$!; "
  # [.]: the pattern does not match this command's own text.
  printf '%s' "while [ ! -f ~/jaxad_train.status ] && "
  printf '%s' "pgrep -f 'python -m jaxad[.]train' >/dev/null; do sleep 10; done; "
  printf '%s' "sleep 2; kill \$t; "
  printf '%s' "[ -f ~/jaxad_train.status ] || "
  printf '%s' "{ echo 'jaxad.train ended without an exit status' >&2; exit 1; }; "
  printf '%s' "exit \"\$(cat ~/jaxad_train.status)\""
}
