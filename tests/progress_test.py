"""From Python (a notebook), jaxad shows the CLI's progress lines."""

import subprocess
import sys

from absl.testing import absltest

SCRIPT = """
import sys
from jaxad import cli
from absl import logging
cli.show_progress(sys.argv[1] == "on")
logging.info("jaxad-progress-line")
logging.warning("jaxad-warning-line")
"""


def run(mode: str) -> str:
  out = subprocess.run(
    [sys.executable, "-c", SCRIPT, mode],
    capture_output=True,
    text=True,
    timeout=120,
    check=True,
  )
  return out.stderr


class ShowProgressTest(absltest.TestCase):
  def test_info_lines_shown_once_and_silenced_on_request(self):
    on = run("on")
    self.assertEqual(on.count("jaxad-progress-line"), 1)  # no double handler
    off = run("off")
    self.assertNotIn("jaxad-progress-line", off)
    self.assertIn("jaxad-warning-line", off)  # warnings always show


if __name__ == "__main__":
  absltest.main()
