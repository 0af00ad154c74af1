"""Parsing of Keras object identifiers: a name, or a serialized ``{"class_name", "config"}``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any


def snake_case(name: str) -> str:
  """``"GlorotUniform"`` -> ``"glorot_uniform"``, ``"L1L2"`` -> ``"l1l2"``."""
  return re.sub(r"(?<=[a-z])(?=[A-Z])", "_", name).lower()


def parse(identifier: str | Mapping[str, Any], *, argument: str) -> tuple[str, dict[str, Any]]:
  """Splits a Keras identifier into a lower snake-case class name and its config.

  Accepts every serialized form Keras produces: a name (``"he_normal"``), the legacy
  ``{"class_name": "HeNormal", "config": {...}}`` and the Keras >= 2.13 form with ``module`` and
  ``registered_name`` keys (ignored).

  Args:
    identifier: a string or a config dict.
    argument: the constructor argument being parsed, for error messages.

  Returns:
    ``(name, config)``.

  Raises:
    TypeError: for anything else.
  """
  if isinstance(identifier, str):
    return snake_case(identifier), {}
  if isinstance(identifier, Mapping) and "class_name" in identifier:
    config = dict(identifier.get("config") or {})
    return snake_case(str(identifier["class_name"])), config
  raise TypeError(
    f"`{argument}`={identifier!r} is not a Keras name, a Keras config dict "
    '(e.g. {"class_name": "Constant", "config": {"value": 0.5}}) or a callable.'
  )


def unknown(argument: str, identifier: Any, known: Mapping[str, Any]) -> ValueError:
  """The error for a name that is not supported, listing the supported ones."""
  return ValueError(
    f"Unknown {argument.split('_')[-1]} for `{argument}`: {identifier!r}. Supported: "
    f"{sorted(known)}, a Keras config dict of one of them, or a callable."
  )


def pick(config: Mapping[str, Any], argument: str, allowed: Mapping[str, Any]) -> dict[str, Any]:
  """Returns the config's known keys over `allowed` defaults; rejects unknown keys.

  ``seed`` and ``dtype`` (present in TF1 and seeded initializer configs) are accepted and dropped.
  """
  extra = set(config) - set(allowed) - {"seed", "dtype"}
  if extra:
    raise ValueError(
      f"`{argument}` config has unsupported keys {sorted(extra)}; allowed: {sorted(allowed)}."
    )
  return {key: config.get(key, default) for key, default in allowed.items()}
