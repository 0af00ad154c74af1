"""kbn_jax: the Keras 2.x V1 BatchNormalization layer for JAX and Flax.

`kbn_jax.functional` (the whole layer as a pure function) loads neither Flax nor optax; the
Flax front-ends and helpers load on first use.
"""

import importlib
from typing import Any

from kbn_jax import functional as functional

__version__ = "0.2.1"

__all__ = (
  "BatchNormalization",
  "diagnostics",
  "equinox",
  "flax_compat",
  "folding",
  "functional",
  "haiku",
  "keras_compat",
  "nnx",
  "torch_compat",
  "training",
)

_LAZY_MODULES = (
  "diagnostics",
  "equinox",
  "flax_compat",
  "folding",
  "haiku",
  "keras_compat",
  "nnx",
  "torch_compat",
  "training",
)


def __getattr__(name: str) -> Any:
  if name in _LAZY_MODULES:
    return importlib.import_module(f"kbn_jax.{name}")
  if name == "BatchNormalization":
    return importlib.import_module("kbn_jax.linen").BatchNormalization
  raise AttributeError(f"module 'kbn_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
