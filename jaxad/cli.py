"""Command-line flags shared by the entry points (train, evaluate, bench)."""

import logging as logging_std

from absl import flags, logging
from ml_collections import config_flags

# lock_config: a misspelt --config.key override is an error, not a new key.
CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file, configs/<method>.py[:arg1,arg2]; override any key with"
  " --config.<key>=<value>. Every key is documented with a comment in the"
  " config file (configs/ddad.py, multiad.py, d24fad.py, ppad.py).",
  lock_config=True,
)
WORKDIR = flags.DEFINE_string(
  "workdir", None, "Run directory: checkpoints, logs, eval.json."
)


class _DropLibraryInfo(logging_std.Filter):
  """Drops INFO lines of orbax (dozens per checkpoint) and tfds."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    noisy = (
      "/orbax/" in record.pathname or "/tensorflow_datasets/" in record.pathname
    )
    return record.levelno >= logging_std.WARNING or not noisy


def setup_logging() -> None:
  """Keeps the console to jaxad's own progress lines and warnings."""
  logging.get_absl_handler().addFilter(_DropLibraryInfo())
