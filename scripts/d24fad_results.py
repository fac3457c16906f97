r"""D²4FAD leave-one-dataset-out results on the real sets in ../shared/data.

For each target, trains once (episodes from every other set, minus a set
that shares the target's origin) and re-scores the trained model with
K = 2, 4 and 8 supports (`jaxad.evaluate --config.data.shots=K`: the
support set is an input, no retraining). Prints a markdown table of image
AUROC / AP and wall-clock, and writes it to ROOT/results.md.

  python scripts/d24fad_results.py --root /tmp/d24fad_results \
      [--targets pneumoniamnist,kermany,mtd,isic2017] [--train_shots 4] \
      [-- --config.data.image_size=64 ...]   # extra overrides, every run

Uses `configs/d24fad.py:shared,offline` (a RANDOM frozen teacher: not the
paper's setting, and labelled as such in the table).
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import time

# A source derived from the target (or the reverse) would leak it.
SAME_ORIGIN = {"pneumoniamnist": "kermany", "kermany": "pneumoniamnist"}
CONFIG = "configs/d24fad.py:shared,offline"


def _run(module: str, workdir: str, overrides: list[str], log: str) -> float:
  """Runs `python -m module`, its output to `log`; returns seconds."""
  cmd = [sys.executable, "-m", module, f"--config={CONFIG}"]
  cmd += [f"--workdir={workdir}", *overrides]
  print("$", " ".join(cmd), flush=True)
  start = time.perf_counter()
  with open(log, "w") as f:
    done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
  if done.returncode:
    sys.exit(f"{module} failed (exit {done.returncode}); see {log}")
  return time.perf_counter() - start


def eval_json(workdir: str, shots: int, since: float) -> dict:
  """The eval.json a `jaxad.evaluate` run with `data.shots=shots` wrote
  after `since` (time.time()): W's own for the trained K, else the one in
  W/eval_<name>-<hash>/ (another K is other data: jaxad.evaluate never
  writes it over the run's eval.json). Each folder's eval_config.json
  records the config it was scored with."""
  for folder in [workdir, *sorted(glob.glob(os.path.join(workdir, "eval_*")))]:
    config = os.path.join(folder, "eval_config.json")
    if not os.path.isfile(config) or os.path.getmtime(config) < since:
      continue
    with open(config) as f:
      if json.load(f)["data"]["shots"] != shots:
        continue
    with open(os.path.join(folder, "eval.json")) as f:
      return json.load(f)
  sys.exit(f"No eval.json with data.shots={shots} written in {workdir}")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--root", required=True, help="one workdir per target here")
  p.add_argument("--targets", default="pneumoniamnist,kermany,mtd,isic2017")
  p.add_argument("--train_shots", type=int, default=4)
  p.add_argument("--shots", default="2,4,8", help="K values scored")
  p.add_argument("overrides", nargs="*", help="--config.x=y for every run")
  args = p.parse_args()
  os.makedirs(args.root, exist_ok=True)
  rows = []
  for target in args.targets.split(","):
    workdir = os.path.join(args.root, target)
    common = [
      f"--config.data.target={target}",
      f"--config.data.exclude_sources={SAME_ORIGIN.get(target, '')}",
      *args.overrides,
    ]
    train_s = _run(
      "jaxad.train",
      workdir,
      [*common, f"--config.data.shots={args.train_shots}"],
      os.path.join(args.root, f"{target}.train.log"),
    )
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      steps = json.loads(f.readlines()[-1])["step"]
    for k in (int(k) for k in args.shots.split(",")):
      since = time.time()
      eval_s = _run(
        "jaxad.evaluate",
        workdir,
        [*common, f"--config.data.shots={k}"],
        os.path.join(args.root, f"{target}.eval{k}.log"),
      )
      result = eval_json(workdir, k, since)
      with open(os.path.join(workdir, f"eval_shots{k}.json"), "w") as f:
        json.dump(result, f, indent=2)
      s = result["scores"]["d24fad"]
      rows.append(
        f"| {target} | {SAME_ORIGIN.get(target, '-')} | {k} "
        f"| {s['auroc']:.3f} | {s['ap']:.3f} "
        f"| {result['num_normal']}/{result['num_abnormal']} "
        f"| {train_s:.0f} s ({steps} steps) | {eval_s:.0f} s |"
      )
      print(rows[-1], flush=True)
  table = "\n".join(
    [
      "| target | excluded source | K | AUROC | AP | test normal/abnormal"
      " | train wall-clock | re-score wall-clock |",
      "|---|---|---|---|---|---|---|---|",
      *rows,
    ]
  )
  with open(os.path.join(args.root, "results.md"), "w") as f:
    f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  main()
