"""Helpers for config files: `get_config(arg)` argument parsing and checks."""

import ml_collections as mlc


def parse_arg(arg: str | None, **defaults) -> mlc.ConfigDict:
  """Parses a config-file argument such as `"dataset=kermany,smoke"`.

  `configs/<method>.py:smoke` passes "smoke" as `arg`. Each comma-separated item
  is `key=value` or a bare `key` (meaning True). Only keys given in
  `defaults` are accepted; values take the type of their default.

  Raises:
    ValueError: on an unknown key, naming the known ones.
  """
  result = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(
        f"Unknown config argument {key!r} in {arg!r}; known: {sorted(defaults)}"
      )
    default = defaults[key]
    if not eq:
      result[key] = True
    elif isinstance(default, bool):
      result[key] = value.lower() in ("1", "true", "yes")
    else:
      result[key] = type(default)(value)
  return mlc.ConfigDict(result)
