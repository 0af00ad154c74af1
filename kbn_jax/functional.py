"""Pure, jit-able batch normalization, free of Flax and optax.

The whole layer is one function, `batch_normalization`, over plain pytrees: a `BatchNormConfig`
(validated and hashable, so a static argument), ``params`` (``gamma``/``beta``) and ``stats``
(the moving statistics) in, the output and the new statistics out. `init_variables` creates
them. It is the exact, fast layer that `kbn_jax.BatchNormalization` (linen) and
`kbn_jax.nnx.BatchNormalization` wrap, usable from raw JAX, Equinox or Haiku:

  >>> import jax, jax.numpy as jnp
  >>> from kbn_jax import functional
  >>> config = functional.BatchNormConfig(momentum=0.9)
  >>> x = jnp.arange(8.0).reshape(4, 2)
  >>> params, stats = functional.init_variables(config, jax.random.key(0), x.shape)
  >>> y, stats = functional.batch_normalization(x, params, stats, config, training=True)
  >>> stats["moving_mean"]
  Array([0.3, 0.4], dtype=float32)

The building blocks are public too: `moments` (two-pass, across devices with one collective),
`normalize` (Keras's two arithmetic forms), `update_moving_average`, `renorm_correction`,
ghost-batch reshaping, and the training kernels with closed-form derivatives `batch_moments` and
`normalize_batch`. Configuration arguments (axes, `axis_name`, flags) must be static under
`jax.jit`.
"""

from kbn_jax._batch_norm import batch_normalization as batch_normalization
from kbn_jax._batch_norm import init_variables as init_variables
from kbn_jax._batch_norm import keras_param_shape as keras_param_shape
from kbn_jax._batch_norm import param_names as param_names
from kbn_jax._batch_norm import regularization_penalties as regularization_penalties
from kbn_jax._batch_norm import stat_names as stat_names
from kbn_jax._config import BatchNormConfig as BatchNormConfig
from kbn_jax._fast_train import batch_moments as batch_moments
from kbn_jax._fast_train import normalize_batch as normalize_batch
from kbn_jax._math import AxisIndexGroups as AxisIndexGroups
from kbn_jax._math import AxisName as AxisName
from kbn_jax._math import bessel_correction as bessel_correction
from kbn_jax._math import compose_affine as compose_affine
from kbn_jax._math import device_group_moments as device_group_moments
from kbn_jax._math import merge_ghost_batches as merge_ghost_batches
from kbn_jax._math import merge_partial_moments as merge_partial_moments
from kbn_jax._math import moments as moments
from kbn_jax._math import normalize as normalize
from kbn_jax._math import partial_moments as partial_moments
from kbn_jax._math import promote_dtypes as promote_dtypes
from kbn_jax._math import reduction_dtype as reduction_dtype
from kbn_jax._math import renorm_correction as renorm_correction
from kbn_jax._math import split_ghost_batches as split_ghost_batches
from kbn_jax._math import update_moving_average as update_moving_average
from kbn_jax._math import update_moving_average_keras3 as update_moving_average_keras3
from kbn_jax._math import update_moving_average_torch as update_moving_average_torch
