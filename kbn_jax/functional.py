"""Pure, jit-able batch normalization, free of Flax and optax.

The whole layer is one function, `batch_normalization`, over plain pytrees: a `BatchNormConfig`
(validated and hashable, so a static argument), ``params`` (``gamma``/``beta``) and ``stats``
(the moving statistics) in, the output and the new statistics out. `init_variables` creates
them. It is the exact, fast layer that `kbn_jax.BatchNormalization` (linen) and the NNX,
Equinox and Haiku front-ends wrap:

  >>> import jax, jax.numpy as jnp
  >>> from kbn_jax import functional
  >>> config = functional.BatchNormConfig(momentum=0.9)
  >>> x = jnp.arange(8.0).reshape(4, 2)
  >>> params, stats = functional.init_variables(config, jax.random.key(0), x.shape)
  >>> y, stats = functional.batch_normalization(x, params, stats, config, training=True)
  >>> stats["moving_mean"]
  Array([0.3, 0.4], dtype=float32)

The building blocks the layer is made of are public too: `moments` (two-pass, across devices
with one collective, closed-form derivatives), `normalize` (Keras's two arithmetic forms),
`update_moving_average` (each library's rounding), `renorm_correction`, and Keras's ghost-batch
reshaping. Configuration arguments (axes, `axis_name`, flags) must be static under `jax.jit`.
"""

import importlib
import warnings
from collections.abc import Sequence
from typing import Any

import jax

from kbn_jax._config import BatchNormConfig as BatchNormConfig
from kbn_jax._layer import batch_normalization as batch_normalization
from kbn_jax._layer import merge_ghost_batches as merge_ghost_batches
from kbn_jax._layer import split_ghost_batches as split_ghost_batches
from kbn_jax._moments import moments as moments
from kbn_jax._moving_averages import update_moving_average as update_moving_average
from kbn_jax._normalize import normalize as normalize
from kbn_jax._normalize import renorm_correction as renorm_correction
from kbn_jax._variables import init_variables as init_variables
from kbn_jax._variables import keras_param_shape as keras_param_shape
from kbn_jax._variables import param_names as param_names
from kbn_jax._variables import regularization_penalties as regularization_penalties
from kbn_jax._variables import stat_names as stat_names

__all__ = (
  "BatchNormConfig",
  "batch_normalization",
  "init_variables",
  "keras_param_shape",
  "merge_ghost_batches",
  "moments",
  "normalize",
  "param_names",
  "regularization_penalties",
  "renorm_correction",
  "split_ghost_batches",
  "stat_names",
  "update_moving_average",
)

# Names removed from this face in 0.2.0: they keep working, with a DeprecationWarning, until
# 0.3.0. Each maps to its private home.
_DEPRECATED = {
  "AxisIndexGroups": ("kbn_jax._moments", "AxisIndexGroups"),
  "AxisName": ("kbn_jax._moments", "AxisName"),
  "batch_moments": ("kbn_jax.functional", "_batch_moments"),
  "bessel_correction": ("kbn_jax._moving_averages", "bessel_correction"),
  "compose_affine": ("kbn_jax._normalize", "compose_affine"),
  "device_group_moments": ("kbn_jax._moments", "device_group_moments"),
  "merge_partial_moments": ("kbn_jax._moments", "merge_partial_moments"),
  "normalize_batch": ("kbn_jax._normalize", "closed_form_normalize"),
  "partial_moments": ("kbn_jax._moments", "partial_moments"),
  "promote_dtypes": ("kbn_jax._moments", "promote_dtypes"),
  "reduction_dtype": ("kbn_jax._moments", "reduction_dtype"),
  "update_moving_average_keras3": ("kbn_jax._moving_averages", "_keras3"),
  "update_moving_average_torch": ("kbn_jax._moving_averages", "_torch"),
}


def _batch_moments(
  x: jax.typing.ArrayLike,
  reduction_axes: Sequence[int],
  *,
  axis_name: Any = None,
  axis_index_groups: Any = None,
) -> tuple[jax.Array, jax.Array]:
  """The 0.1 `batch_moments`: `moments` with the reduced axes kept."""
  return moments(
    x, reduction_axes, axis_name=axis_name, axis_index_groups=axis_index_groups, keepdims=True
  )


def __getattr__(name: str) -> Any:
  if name in _DEPRECATED:
    module, attribute = _DEPRECATED[name]
    warnings.warn(
      f"`kbn_jax.functional.{name}` is deprecated and will be removed in kbn_jax 0.3.0; it is "
      "an internal building block (see the CHANGELOG for what to use instead).",
      DeprecationWarning,
      stacklevel=2,
    )
    return getattr(importlib.import_module(module), attribute)
  raise AttributeError(f"module 'kbn_jax.functional' has no attribute {name!r}")
