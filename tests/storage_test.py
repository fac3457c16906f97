"""jaxad.storage on local paths: whole-file writes with the usual file
mode, `file://` URIs, and the error for a scheme without a file system."""

import os
import stat
import subprocess
import sys
import tempfile

from absl.testing import absltest

from jaxad import export, storage


class StorageTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()

  def test_files_get_the_mode_open_would_give(self):
    old = os.umask(0o022)
    self.addCleanup(os.umask, old)
    for write, data in (
      (storage.write_text, "x"),
      (storage.write_bytes, b"x"),
      (storage.append_line, "x"),
    ):
      path = os.path.join(self.tmp, "sub", write.__name__)
      write(path, data)
      self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o644, path)
    self.assertEqual(
      [n for n in os.listdir(os.path.join(self.tmp, "sub")) if "." in n], []
    )  # no temporary file left

  def test_file_uris_are_local_paths(self):
    path = os.path.join(self.tmp, "a.json")
    storage.write_json("file://" + path, {"a": 1})
    self.assertEqual(storage.read_text(path), '{\n "a": 1\n}')
    self.assertEqual(storage.absolute("file://" + path), path)
    self.assertIsNone(storage.read_text("file://" + path + ".missing"))

  def test_an_unreachable_scheme_is_named(self):
    with self.assertRaisesRegex(
      storage.UnreachableError, r"s3://b/run: s3:// paths need"
    ):
      storage.path("s3://b/run")

  def test_export_refuses_a_folder_before_any_work(self):
    with self.assertRaisesRegex(ValueError, r"is a folder: give the"):
      export.export(os.path.join(self.tmp, "no-run"), self.tmp + "/z/")
    self.assertFalse(os.path.exists(os.path.join(self.tmp, "z")))

  def test_predict_refuses_an_unreachable_output_before_loading(self):
    proc = subprocess.run(
      [
        sys.executable,
        "-m",
        "jaxad.predict",
        "--workdir",
        os.path.join(self.tmp, "no-run"),  # never read
        "--input",
        self.tmp,
        "--output",
        "s3://b/out",
      ],
      capture_output=True,
      text=True,
      timeout=300,
      env=os.environ | {"JAX_PLATFORMS": "cpu"},
    )
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertIn("error: s3://b/out: s3:// paths need", proc.stderr)
    self.assertNotIn("Traceback", proc.stderr)


if __name__ == "__main__":
  absltest.main()
