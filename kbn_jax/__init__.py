"""kbn_jax: the Keras 2.x V1 BatchNormalization layer for JAX and Flax."""

from kbn_jax import diagnostics as diagnostics
from kbn_jax import folding as folding
from kbn_jax import functional as functional
from kbn_jax import keras_compat as keras_compat
from kbn_jax import training as training
from kbn_jax.layers import BatchNormalization as BatchNormalization

__version__ = "0.1.0"

__all__ = (
  "BatchNormalization",
  "diagnostics",
  "folding",
  "functional",
  "keras_compat",
  "training",
)
