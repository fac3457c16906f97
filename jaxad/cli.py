"""Command-line flags shared by the entry points (train, evaluate, bench),
the configs shipped with jaxad by name, and one-line user errors."""

import contextlib
import logging as logging_std
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxad import config_checks, configlib, storage

# The configs shipped with jaxad: configs/ at the top of the repository,
# installed as jaxad/configs/ (pyproject.toml maps the one folder into the
# wheel). `--config ddad:smoke` names one.
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIRS = (
  os.path.join(_PACKAGE, "configs"),  # an installed jaxad (the wheel)
  os.path.join(os.path.dirname(_PACKAGE), "configs"),  # a checkout
)


def config_names() -> list[str]:
  """Names of the shipped configs (`ddad`, ...), from the first folder of
  `CONFIG_DIRS` that exists; [] when none does."""
  for folder in CONFIG_DIRS:
    if os.path.isdir(folder):
      return sorted(
        f[: -len(".py")]
        for f in os.listdir(folder)
        if f.endswith(".py") and not f.startswith(("_", "."))
      )
  return []


def resolve_config(spec: str) -> str:
  """A --config value as ml_collections reads it: `path.py[:args]`.

  A bare name (no "/" and no ".py" before the ":"), e.g. "ddad" or
  "ddad:smoke", names a config shipped with jaxad; anything else (e.g.
  "configs/ddad.py:smoke", "my_config.py") is a path, returned unchanged,
  as is a bare name that is an existing file.

  Raises:
    ValueError: a bare name that no shipped config has (the message lists
      them).
  """
  name, colon, arg = spec.partition(":")
  is_path = "/" in name or os.sep in name or name.endswith(".py") or not name
  if is_path or os.path.isfile(name):
    return spec
  for folder in CONFIG_DIRS:
    path = os.path.join(folder, f"{name}.py")
    if os.path.isfile(path):
      return f"{path}{colon}{arg}"
  raise ValueError(
    f"no config named {name!r}; shipped configs: {config_names()} (or give"
    " a file: --config path/to/config.py[:args])"
  )


class _ByNameParser(flags.ArgumentParser):
  """Wraps ml_collections' config-file parser: `resolve_config` first."""

  def __init__(self, inner: flags.ArgumentParser):
    self._inner = inner

  def parse(self, argument):
    return self._inner.parse(resolve_config(argument))

  def flag_type(self) -> str:
    return self._inner.flag_type()


# lock_config: a misspelt --config.key override is an error, not a new key.
CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "A shipped config by name, <method>[:arg1,arg2] (ddad, multiad, d24fad,"
  " ppad; e.g. ddad:smoke), or a config file, path/to/config.py[:args] "
  "(configs/ddad.py in the repository); override any key with "
  "--config.<key>=<value>. Every key is documented with a comment in the "
  "config file (configs/ddad.py, multiad.py, d24fad.py, ppad.py).",
  lock_config=True,
)
flags.FLAGS[CONFIG.name].parser = _ByNameParser(flags.FLAGS[CONFIG.name].parser)
WORKDIR = flags.DEFINE_string(
  "workdir", None, "Run directory: checkpoints, logs, eval.json."
)

# What `user_errors` prints as one line: mistakes in the command or config,
# whose message says what to change (not bugs: those keep their traceback).
USER_ERRORS = (
  config_checks.ConfigError,
  config_checks.ConfigPathError,
  configlib.ConfigMismatchError,
  storage.UnreachableError,
)


@contextlib.contextmanager
def user_errors(*extra: type[BaseException]):
  """Prints a user's mistake as `error: <message>` and exits with 2.

  Usable as a decorator of an entry point's `main`:

    @cli.user_errors()
    def main(argv): ...

  Args:
    *extra: more exception types to treat so (e.g. a data error type).

  Raises:
    SystemExit(2): on `USER_ERRORS` or `extra` (no traceback); anything
      else propagates unchanged.
  """
  try:
    yield
  except (*USER_ERRORS, *extra) as e:
    # One line: the messages name the key or file and what is allowed.
    message = " ".join(str(e).split("\n"))
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (`app.run`'s `flags_parser`), with a misspelt
  `--config.<key>=...` override printed as one line naming the key and
  the closest one, exit 2 (ml_collections raises it as an AttributeError
  while parsing, before `main` could catch it)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    # e.g. '\'shotz\'\nDid you mean "shots" instead of "shotz"?'
    key, _, hint = str(e).replace("\\n", " ").replace("'", "").partition(" ")
    key = key.strip('\\"')
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    print(
      f"error: unknown config key {key!r} in {overrides}. {hint}".strip(),
      file=sys.stderr,
      flush=True,
    )
    sys.exit(2)


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


def show_progress(enabled: bool = True) -> None:
  """From Python (a notebook), shows jaxad's progress lines as the CLI does.

  Outside `absl.app.run`, absl logs only warnings, so `jaxad.train.run`
  would be silent for minutes. This sets INFO (jaxad's progress, ETA and
  results table; the libraries' INFO noise dropped) on stderr, or with
  `enabled=False` back to warnings only.
  """
  if not enabled:
    logging.set_verbosity(logging.WARNING)
    return
  logging.set_verbosity(logging.INFO)
  root = logging_std.getLogger()
  if not root.handlers:  # Python's last-resort handler shows warnings only
    root.addHandler(logging_std.StreamHandler(sys.stderr))
  for handler in (*root.handlers, logging.get_absl_handler()):
    if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
      handler.addFilter(_DropLibraryInfo())
