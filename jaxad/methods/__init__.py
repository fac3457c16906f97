"""The methods: one package each, talking to jaxad through `api.Method`."""

import importlib

from jaxad.methods import api

NAMES = ("ddad", "multiad", "d24fad", "ppad")


def get(name: str) -> api.Method:
  """The `METHOD` of package `jaxad.methods.<name>`, checked.

  Raises:
    ValueError: an unknown method name (naming the known ones).
    TypeError: the package's METHOD lacks a member of the contract.
  """
  if name not in NAMES:
    raise ValueError(
      f"config.method={name!r} is not one of {NAMES} (a new method is "
      "added there, in jaxad/methods/__init__.py)"
    )
  method = importlib.import_module(f"jaxad.methods.{name}").METHOD
  api.check_method(method, name)
  return method
