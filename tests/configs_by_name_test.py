"""The configs ship in the wheel and resolve by name (issue 14): configs/
stays at the top of the repository (`--config configs/ddad.py`), the
wheel installs the same files as jaxad/configs/, and `--config ddad:smoke`
finds them in an installed jaxad; user mistakes print one line."""

import filecmp
import glob
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import tomllib
import zipfile

from absl import flags
from absl.testing import absltest

from jaxad import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["d24fad", "ddad", "multiad", "ppad"]


class TempDirTestCase(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)


class ResolveTest(TempDirTestCase):
  def test_a_bare_name_is_the_shipped_config(self):
    self.assertEqual(cli.config_names(), NAMES)
    for name in NAMES:
      path = cli.resolve_config(name)
      self.assertTrue(os.path.samefile(path, f"{REPO}/configs/{name}.py"))
    path, _, arg = cli.resolve_config("ddad:smoke,paper").partition(":")
    self.assertTrue(os.path.samefile(path, f"{REPO}/configs/ddad.py"))
    self.assertEqual(arg, "smoke,paper")

  def test_paths_are_unchanged(self):
    for spec in (
      "configs/ddad.py",
      "configs/ddad.py:smoke",
      "my.py:a=1",
      "/abs/path/ppad.py",
      "sub/dir/ddad",
    ):
      self.assertEqual(cli.resolve_config(spec), spec)
    # A bare name that is a file in the working directory stays that file.
    local = os.path.join(self.tmp, "ddad")
    with open(local, "w") as f:
      f.write("")
    cwd = os.getcwd()
    os.chdir(self.tmp)
    self.addCleanup(os.chdir, cwd)
    self.assertEqual(cli.resolve_config("ddad:smoke"), "ddad:smoke")

  def test_an_unknown_name_lists_the_shipped_ones(self):
    with self.assertRaisesRegex(
      ValueError,
      r"no config named 'ddda'; shipped configs: \['d24fad', 'ddad',"
      r" 'multiad', 'ppad'\]",
    ):
      cli.resolve_config("ddda:smoke")

  def test_the_config_flag_parses_a_name(self):
    # The flag's parser, without setting the process-wide flag value.
    parser = flags.FLAGS[cli.CONFIG.name].parser
    by_name = parser.parse("ddad:smoke")
    by_path = parser.parse(f"{REPO}/configs/ddad.py:smoke")
    self.assertEqual(by_name.to_dict(), by_path.to_dict())
    self.assertEqual((by_name.method, by_name.data.image_size), ("ddad", 32))
    self.assertTrue(by_name.is_locked)  # a misspelt override is an error


SCRIPT = textwrap.dedent(
  """
  from absl import app
  from jaxad import cli, methods

  @cli.user_errors()
  def main(argv):
    c = cli.CONFIG.value
    methods.get(c.method).check_config(c)
    print("ok", c.method, c.data.image_size, c.epochs)

  app.run(main)
  """
)


class CommandLineTest(TempDirTestCase):
  def run_script(self, *args, env=None):
    script = os.path.join(self.tmp, "entry.py")
    with open(script, "w") as f:
      f.write(SCRIPT)
    return subprocess.run(
      [sys.executable, script, *args],
      cwd=self.tmp,  # no configs/ here: the name must not need one
      capture_output=True,
      text=True,
      timeout=120,
      env=env,
    )

  def test_by_name_and_one_line_errors(self):
    ok = self.run_script("--config=ddad:smoke", "--config.epochs=2")
    self.assertEqual(ok.returncode, 0, ok.stderr)
    self.assertEqual(ok.stdout.split(), ["ok", "ddad", "32", "2"])
    bad = self.run_script("--config=ddad:smoke", "--config.epochs=-1")
    self.assertEqual(bad.returncode, 2, bad.stderr)
    self.assertNotIn("Traceback", bad.stderr)
    self.assertEqual(
      bad.stderr.strip().splitlines()[-1],
      "error: config.epochs=-1: must be an integer >= 1 (DDAD trains for"
      " this many epochs)",
    )
    unknown = self.run_script("--config=nope")
    self.assertNotEqual(unknown.returncode, 0)
    self.assertIn("no config named 'nope'", unknown.stderr)
    self.assertNotIn("Traceback", unknown.stderr)


def _pyproject() -> dict:
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


class PackagingTest(TempDirTestCase):
  def test_package_list_holds_every_folder_and_the_configs(self):
    # `packages` is listed (find cannot map configs/): it must hold every
    # folder of jaxad/, as find would, or the wheel misses modules.
    setuptools = _pyproject()["tool"]["setuptools"]
    self.assertEqual(setuptools["package-dir"], {"jaxad.configs": "configs"})
    folders = {
      os.path.relpath(d, REPO).replace(os.sep, ".")
      for d, _, _ in os.walk(os.path.join(REPO, "jaxad"))
      if os.path.basename(d) != "__pycache__"
    }
    self.assertEqual(set(setuptools["packages"]), folders | {"jaxad.configs"})

  def build_wheel(self) -> str:
    """The wheel of a copy of the tree (no build/ or egg-info of ours)."""
    src = os.path.join(self.tmp, "src")
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for part in ("jaxad", "configs"):
      shutil.copytree(os.path.join(REPO, part), f"{src}/{part}", ignore=skip)
    for name in ("pyproject.toml", "README.md"):
      shutil.copy(os.path.join(REPO, name), src)
    # PEP 639's license string needs setuptools >= 77; with an older one
    # here, pip builds in isolation (it needs the package index then).
    version = importlib.metadata.version("setuptools")
    local = int(version.split(".")[0]) >= 77
    out = os.path.join(self.tmp, "wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", src, "--no-deps", "-w", out]
    result = subprocess.run(
      cmd + (["--no-build-isolation"] if local else []),
      capture_output=True,
      text=True,
      timeout=240,
    )
    if result.returncode and not local:
      self.skipTest(
        f"setuptools {version} < 77 here and no isolated build: "
        + result.stderr.strip()[-300:]
      )
    self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    (wheel,) = glob.glob(os.path.join(out, "jaxad-*.whl"))
    return wheel

  def test_the_wheel_ships_the_configs_and_resolves_names(self):
    wheel = self.build_wheel()
    site = os.path.join(self.tmp, "site")
    with zipfile.ZipFile(wheel) as z:
      z.extractall(site)
    for name in NAMES:  # the same files as configs/
      self.assertTrue(
        filecmp.cmp(
          f"{site}/jaxad/configs/{name}.py",
          f"{REPO}/configs/{name}.py",
          shallow=False,
        ),
        name,
      )
    # The installed jaxad (the unpacked wheel first on the path, run away
    # from the checkout) resolves a name to its own jaxad/configs/.
    code = (
      "import jaxad; from absl import flags; from jaxad import cli;"
      "c = flags.FLAGS['config'].parser.parse('ddad:smoke');"
      "print(jaxad.__file__); print(cli.resolve_config('ddad:smoke'));"
      "print(c.method, c.data.image_size)"
    )
    env = {**os.environ, "PYTHONPATH": site}
    run = subprocess.run(
      [sys.executable, "-c", code],
      cwd=self.tmp,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
    )
    self.assertEqual(run.returncode, 0, run.stderr[-2000:])
    package, resolved, loaded = run.stdout.strip().splitlines()[-3:]
    self.assertEqual(package, f"{site}/jaxad/__init__.py")
    self.assertEqual(resolved, f"{site}/jaxad/configs/ddad.py:smoke")
    self.assertEqual(loaded, "ddad 32")


if __name__ == "__main__":
  absltest.main()
