"""Using a trained run: jaxad.load, TrainedModel.score/predict and
python -m jaxad.predict (files, folders, .npz, bad files, overlays).

One tiny DDAD run (configs/ddad.py:smoke) is trained per pytest process by
`trained_run()` and shared with tests/export_test.py.
"""

import atexit
import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from absl.testing import absltest
from PIL import Image

import jaxad
from configs import ddad as ddad_config
from jaxad import inference, predict, restore, train
from jaxad.data import npz_layouts

REPO = pathlib.Path(__file__).resolve().parents[1]
_RUN = {}


def trained_run() -> str:
  """W of configs/ddad.py:smoke trained on 2 of conftest's 8 fake devices
  (about a minute), once per process; removed when the process exits."""
  if "workdir" not in _RUN:
    tmp = tempfile.mkdtemp(prefix="jaxad-predict-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    config = ddad_config.get_config("smoke")
    config.mesh.data = 2
    config.data.cache_dir = os.path.join(tmp, "cache")
    workdir = os.path.join(tmp, "run")
    train.run(config, workdir)
    _RUN["workdir"] = workdir
  return _RUN["workdir"]


def embedded_test_images() -> tuple[np.ndarray, list[str]]:
  """The embedded set's raw test images (uint8 [N, 64, 64, 1]) and names."""
  with np.load(npz_layouts.EMBEDDED_PATH) as npz:
    return npz["test_images"], [str(n) for n in npz["test_names"]]


def save_png(path, pixels, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(pixels, mode).save(path)


def setUpModule():
  global MODEL, WORKDIR, DATA, TMP
  WORKDIR = trained_run()
  MODEL = jaxad.load(WORKDIR, mesh_data=2)
  DATA = MODEL.method.load_data(MODEL.config, WORKDIR)
  TMP = tempfile.mkdtemp(prefix="jaxad-predict-test-")


def tearDownModule():
  shutil.rmtree(TMP, ignore_errors=True)


def read_csv(path):
  with open(path, newline="") as f:
    return {row["file"]: row for row in csv.DictReader(f)}


class PredictTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    raw, names = embedded_test_images()
    cls.raw = raw
    # Where each raw test image is in the run's (decoded) test split.
    cls.index = [list(DATA.test_names).index(n) for n in names]
    cls.ref = np.load(os.path.join(WORKDIR, "scores.npz"))
    # A folder as a user's: every case the issue lists.
    cls.folder = os.path.join(TMP, "scans")
    gray = raw[0][..., 0]
    save_png(os.path.join(cls.folder, "gray.png"), gray)
    rgba = np.dstack([raw[1][..., 0]] * 3 + [np.full((64, 64), 200, np.uint8)])
    save_png(os.path.join(cls.folder, "rgba.png"), rgba, "RGBA")
    save_png(os.path.join(cls.folder, "upper.JPG"), raw[2][..., 0])
    save_png(
      os.path.join(cls.folder, "sub", "deeper", "nested.png"), raw[3][..., 0]
    )
    save_png(os.path.join(cls.folder, ".hidden.png"), raw[4][..., 0])
    save_png(
      os.path.join(cls.folder, ".cache", "in_hidden.png"), raw[5][..., 0]
    )
    with open(os.path.join(cls.folder, "corrupt.png"), "wb") as f:
      f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a header, no image
    with open(os.path.join(cls.folder, "notes.txt"), "w") as f:
      f.write("not an image")

  def ref_score(self, name, i):
    """evaluate's score of raw test image i (W/scores.npz)."""
    return float(self.ref[name][self.index[i]])

  def test_score_equals_evaluate_on_the_test_split(self):
    out = MODEL.score(DATA.test)
    maps = np.load(os.path.join(WORKDIR, "maps.npz"))
    self.assertEqual(set(out["scores"]), set(MODEL.score_names))
    for name in MODEL.score_names:
      np.testing.assert_allclose(
        out["scores"][name], self.ref[name], rtol=1e-6, atol=1e-7
      )
    for name in MODEL.map_names:
      self.assertEqual(out["maps"][name].shape, (len(DATA.test), 32, 32))
      np.testing.assert_array_equal(
        out["maps"][name].astype(np.float16), maps[name]
      )
    # Any N: one image, and a batch and a bit.
    one = MODEL.score(DATA.test[7:8])
    np.testing.assert_allclose(
      one["scores"]["r_dual"], self.ref["r_dual"][7:8], rtol=1e-6
    )

  def test_folder_every_readable_image_scored_bad_ones_listed(self):
    out = os.path.join(TMP, "out_folder")
    summary = predict.predict(MODEL, self.folder, out, overlays=True)
    rows = read_csv(os.path.join(out, "predictions.csv"))
    self.assertEqual(
      list(rows),  # sorted walk: a folder's files, then its subfolders
      [
        "corrupt.png",
        "gray.png",
        "rgba.png",
        "upper.JPG",
        "sub/deeper/nested.png",
      ],
    )
    self.assertEqual(
      [c for c in next(iter(rows.values()))][:4],
      ["file", "rec", "rec_abnormal", "rec_percentile"],
    )
    self.assertIn("DataError", rows["corrupt.png"]["error"])
    self.assertIn("corrupt.png", rows["corrupt.png"]["error"])
    self.assertEqual(rows["corrupt.png"]["r_dual"], "")
    for name in ("gray.png", "rgba.png", "upper.JPG", "sub/deeper/nested.png"):
      self.assertEqual(rows[name]["error"], "")
      for score in MODEL.score_names:
        self.assertTrue(np.isfinite(float(rows[name][score])))
    # Decoded as in training: a PNG of a test image (gray, or RGBA with
    # equal RGB) scores what evaluate gave that test image.
    for file, i in (
      ("gray.png", 0),
      ("rgba.png", 1),
      ("sub/deeper/nested.png", 3),
    ):
      for score in MODEL.score_names:
        self.assertAlmostEqual(
          float(rows[file][score]), self.ref_score(score, i), delta=1e-6
        )
    self.assertEqual(summary["images"], 5)
    self.assertEqual(summary["scored"], 4)
    self.assertEqual(summary["unreadable"], 1)
    self.assertEqual(summary["unreadable_files"][0]["file"], "corrupt.png")
    self.assertEqual(summary["other_files_not_scored"], 1)
    with open(os.path.join(out, "summary.json")) as f:
      self.assertEqual(json.load(f)["unreadable"], 1)
    with np.load(os.path.join(out, "maps.npz")) as maps:
      self.assertEqual(list(maps[predict.MAP_NAMES_KEY]), list(MODEL.map_names))
      self.assertEqual(
        sorted(set(maps.files) - {predict.MAP_NAMES_KEY}),
        sorted(set(rows) - {"corrupt.png"}),
      )
      self.assertEqual(maps["gray.png"].dtype, np.float16)
      self.assertEqual(maps["gray.png"].shape, (len(MODEL.map_names), 32, 32))
      # A map's mean is its image score (DDAD).
      self.assertAlmostEqual(
        float(maps["gray.png"][-1].astype(np.float32).mean()),
        float(rows["gray.png"]["r_dual"]),
        delta=1e-3,
      )
    overlays = os.path.join(out, "overlays")
    for name in ("gray.png", "rgba.png", "upper.JPG", "sub/deeper/nested.png"):
      with Image.open(os.path.join(overlays, name + ".png")) as im:
        self.assertGreater(im.size[0], 3 * im.size[1])  # 5 panels
    self.assertFalse(os.path.exists(os.path.join(overlays, "corrupt.png.png")))

  def test_single_file_and_npz(self):
    path = os.path.join(self.folder, "gray.png")
    rows = MODEL.predict(path, return_maps=True)
    self.assertEqual([r["file"] for r in rows], [path])
    self.assertAlmostEqual(
      rows[0]["inter"], self.ref_score("inter", 0), delta=1e-6
    )
    self.assertEqual(rows[0]["maps"]["inter"].shape, (32, 32))
    # An npz of raw (64x64) images is resized like files; "names" optional.
    npz = os.path.join(TMP, "batch.npz")
    np.savez(npz, images=self.raw[:5, :, :, 0])
    named = os.path.join(TMP, "named.npz")
    np.savez(named, images=self.raw[:5], names=np.array(list("abcde")))
    out = os.path.join(TMP, "out_npz")
    summary = predict.predict(MODEL, npz, out)
    self.assertEqual(summary["scored"], 5)
    rows = read_csv(os.path.join(out, "predictions.csv"))
    self.assertEqual(list(rows), [f"batch.npz[{i}]" for i in range(5)])
    for i in range(5):
      self.assertAlmostEqual(
        float(rows[f"batch.npz[{i}]"]["rec"]),
        self.ref_score("rec", i),
        delta=1e-6,
      )
    rows = MODEL.predict([named, self.folder])
    self.assertEqual([r["file"] for r in rows[:5]], list("abcde"))
    self.assertEqual(len(rows), 10)
    self.assertEqual(rows[5]["file"], os.path.join(self.folder, "corrupt.png"))

  def test_threshold_and_percentile_columns(self):
    stored = inference.read_thresholds(WORKDIR, MODEL.score_names)
    self.assertEqual(MODEL.threshold, stored)
    # Decisions and percentiles, with a known threshold and normals.
    saved = MODEL.threshold, MODEL.calibration
    scores = self.ref["intra"]
    t = float(np.median(scores))
    try:
      MODEL.threshold = {**MODEL.threshold, "intra": t, "rec": None}
      MODEL.calibration = {"intra": np.sort(scores[:100].astype(np.float32))}
      out = os.path.join(TMP, "out_threshold")
      summary = predict.predict(MODEL, self.folder, out)
    finally:
      MODEL.threshold, MODEL.calibration = saved
    rows = read_csv(os.path.join(out, "predictions.csv"))
    row = rows["gray.png"]
    self.assertEqual(
      row["intra_abnormal"], "1" if float(row["intra"]) > t else "0"
    )
    expected = 100 * np.mean(np.sort(scores[:100]) <= np.float32(row["intra"]))
    self.assertAlmostEqual(float(row["intra_percentile"]), expected, places=3)
    self.assertEqual(row["rec_abnormal"], "")
    self.assertEqual(row["rec_percentile"], "")
    self.assertEqual(rows["corrupt.png"]["intra_abnormal"], "")
    n_abnormal = sum(r["intra_abnormal"] == "1" for r in rows.values())
    self.assertEqual(summary["abnormal"]["intra"], n_abnormal)
    self.assertIsNone(summary["abnormal"]["rec"])
    # eval.json's "calibrated" block, when evaluate wrote one.
    fake = os.path.join(TMP, "fake_run")
    os.makedirs(fake)
    with open(os.path.join(fake, "eval.json"), "w") as f:
      json.dump(
        {"scores": {"a": {"calibrated": {"threshold": 0.25}}, "b": {}}}, f
      )
    self.assertEqual(
      inference.read_thresholds(fake, ["a", "b", "c"]),
      {"a": 0.25, "b": None, "c": None},
    )
    np.savez(
      os.path.join(fake, "calibration_scores.npz"),
      a=np.array([3, 1, 2], np.float32),
      names=np.array(["x", "y", "z"]),
    )
    cal = inference.read_calibration_scores(fake, ["a", "b"])
    self.assertEqual(list(cal), ["a"])
    np.testing.assert_array_equal(
      inference.percentile(cal["a"], [0.5, 1, 2.5, 9]),
      [0, 100 / 3, 200 / 3, 100],
    )

  def test_wrong_input_is_a_clear_error(self):
    with self.assertRaisesRegex(ValueError, r"uint8 \[N, 32, 32, 1\].*float32"):
      MODEL.score(DATA.test.astype(np.float32))
    with self.assertRaisesRegex(
      ValueError, r"uint8 \[N, 32, 32, 1\].*64, 64, 1"
    ):
      MODEL.score(self.raw[:2])
    with self.assertRaisesRegex(ValueError, r"images\[\.\.\., None\]"):
      MODEL.score(DATA.test[:2, :, :, 0])
    with self.assertRaisesRegex(ValueError, "empty"):
      MODEL.score(DATA.test[:0])
    bad = os.path.join(TMP, "float.npz")
    np.savez(bad, images=np.zeros((2, 8, 8), np.float32))
    with self.assertRaisesRegex(ValueError, r"float.npz.*float32.*uint8"):
      MODEL.predict(bad)
    with self.assertRaisesRegex(FileNotFoundError, "nope"):
      MODEL.predict(os.path.join(TMP, "nope"))
    empty = os.path.join(TMP, "empty")
    os.makedirs(os.path.join(empty, "sub"))
    with self.assertRaisesRegex(ValueError, "No image in"):
      predict.predict(MODEL, empty, os.path.join(TMP, "out_empty"))
    with self.assertRaisesRegex(FileNotFoundError, "config.json"):
      jaxad.load(empty)
    with self.assertRaisesRegex(ValueError, "multiple of the 2 devices"):
      jaxad.load(WORKDIR, batch_size=3, mesh_data=2)

  def test_readme_api_example(self):
    # The README's "Using a trained model" example, exactly as it is there,
    # with its placeholder workdir and folder pointed at this test's.
    readme = os.path.join(
      os.path.dirname(os.path.dirname(__file__)), "README.md"
    )
    with open(readme) as f:
      text = f.read()
    marker = "From Python (`tests/predict_test.py` runs this example):"
    block = text.split(marker, 1)[1].split("```python\n", 1)[1]
    block = block.split("```", 1)[0]
    placeholder = 'workdir, folder = "W", "scans/"'
    self.assertIn(placeholder, block)
    block = block.replace(
      placeholder, f"workdir, folder = {WORKDIR!r}, {self.folder!r}"
    )
    scope = {}
    exec(compile(block, "README.md example", "exec"), scope)
    out, name, s = scope["out"], scope["name"], scope["s"]
    self.assertEqual(out["scores"][name].shape, (2,))
    self.assertEqual(out["maps"][name].shape, (2, s, s))

  def predict_cli(self, folder: str, out: str) -> subprocess.CompletedProcess:
    return subprocess.run(
      [
        sys.executable,
        "-m",
        "jaxad.predict",
        "--workdir",
        WORKDIR,
        "--input",
        folder,
        "--output",
        out,
        "--batch_size",
        "8",
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
    )

  def test_command_line_fails_when_no_input_can_be_read(self):
    folder = os.path.join(TMP, "all_corrupt")
    os.makedirs(folder)
    for name in ("a.png", "b.png"):
      with open(os.path.join(folder, name), "wb") as f:
        f.write(b"not an image")
    out = os.path.join(TMP, "out_all_corrupt")
    proc = self.predict_cli(folder, out)
    self.assertEqual(proc.returncode, 1, proc.stderr[-3000:])
    self.assertIn("error: none of the 2 images could be read", proc.stderr)
    self.assertLen(read_csv(os.path.join(out, "predictions.csv")), 2)

  def test_command_line(self):
    out = os.path.join(TMP, "out_cli")
    proc = self.predict_cli(self.folder, out)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("Scored 4/5 images", proc.stderr)
    self.assertIn("1 unreadable", proc.stderr)
    self.assertIn("images/s", proc.stderr)
    rows = read_csv(os.path.join(out, "predictions.csv"))
    self.assertEqual(len(rows), 5)
    self.assertAlmostEqual(
      float(rows["gray.png"]["rec"]), self.ref_score("rec", 0), delta=1e-6
    )


class RunDirTest(absltest.TestCase):
  """A re-score folder W/eval_<name>-<hash>/ is scored with W's checkpoint
  (jaxad.load(W/eval_...) for D²4FAD with another K, say)."""

  def test_run_dir(self):
    w = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, w, ignore_errors=True)
    folder = os.path.join(w, "eval_kermany-0123abcd")
    os.makedirs(folder)
    for path in (f"{w}/config.json", f"{folder}/eval_config.json"):
      pathlib.Path(path).write_text('{"seed": 0}')
    self.assertEqual(restore.run_dir(w), w)
    self.assertEqual(restore.run_dir(folder), w)
    self.assertEqual(restore.run_dir(folder + "/"), w)
    os.remove(f"{w}/config.json")  # no run above: the folder itself
    self.assertEqual(restore.run_dir(folder), folder)
    other = os.path.join(w, "mine")  # not named as jaxad.evaluate names
    os.makedirs(other)
    pathlib.Path(f"{other}/eval_config.json").write_text('{"seed": 0}')
    pathlib.Path(f"{w}/config.json").write_text('{"seed": 0}')
    self.assertEqual(restore.run_dir(other), other)


if __name__ == "__main__":
  absltest.main()
