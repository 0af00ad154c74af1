"""`kbn_jax.haiku.BatchNormalization`: the layer as a Haiku Module.

A thin shell over the pure layer, like the linen and NNX Modules, so every front-end gives the
same numbers. Inside ``hk.transform_with_state``, each instance owns its parameters (``gamma``,
``beta``: ``hk.get_parameter``) and statistics (``moving_mean``, ``moving_variance``, with renorm
``moving_stddev``, ``renorm_mean``, ``renorm_stddev``, with ``semantics="torch"``
``num_batches_tracked``: ``hk.get_state``) in its own scope, e.g. ``batch_normalization_1``.
They are created at ``init`` from the first input (feature sizes and Keras's parameter shape).

Example::

  >>> import haiku as hk
  >>> import jax.numpy as jnp
  >>> import kbn_jax.haiku
  >>> f = hk.transform_with_state(
  ...   lambda x, is_training: kbn_jax.haiku.BatchNormalization(momentum=0.9)(x, is_training)
  ... )
  >>> x = jnp.arange(8.0).reshape(4, 2)
  >>> params, state = f.init(None, x, is_training=True)
  >>> y, state = f.apply(params, state, None, x, is_training=True)
  >>> state["batch_normalization"]["moving_mean"]
  Array([0.3, 0.4], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from kbn_jax import _layer, _variables
from kbn_jax._config import add_config_views, from_front_end_arguments

HAIKU = _layer.Hints(
  training_hint=(
    "jit the step with `static_argnames=('is_training',)` (e.g. "
    "`jax.jit(f.apply, static_argnames='is_training')`), or jit one function for training and "
    "one for inference"
  ),
  missing_hint="pass the `params` and `state` that `f.init` returned (then each apply's state).",
  feature_hint=(
    "Re-run `f.init` with an input of this feature size, or feed inputs of the size used at init."
  ),
  mapping_hint="`jax.shard_map` or `jax.pmap` (or `jax.vmap`)",
)


def _traced_is_training(value: Any) -> str:
  return (
    f"`is_training`={value!r} is traced, but it must be a Python bool: it selects the "
    f"computation, so it is static: {HAIKU.training_hint}."
  )


class BatchNormalization(hk.Module):
  """Keras 2.x ``BatchNormalization`` (V1 by default) as a Haiku Module.

  Args:
    name: the module name (default ``batch_normalization``, numbered per instance by Haiku).
    **kwargs: axis, momentum, epsilon, center, scale, the initializers, regularizers and
      constraints, renorm, renorm_clipping, renorm_momentum, fused, trainable,
      virtual_batch_size, adjustment, axis_name, axis_index_groups, dtype, param_dtype,
      semantics, ghost_batch_scope: as for the linen `kbn_jax.BatchNormalization` (Keras's names
      and defaults). `axis_name` plays the role of ``hk.BatchNorm``'s ``cross_replica_axis``.

  Random initializers draw from ``hk.next_rng_key()`` at init (pass a key to ``f.init``).
  """

  def __init__(self, name: str | None = None, **kwargs: Any):
    config = from_front_end_arguments(kwargs, layer="kbn_jax.haiku.BatchNormalization", also="name")
    super().__init__(name=name)
    self.config = config

  def __call__(
    self,
    inputs: jax.typing.ArrayLike,
    is_training: bool,
    mask: jax.typing.ArrayLike | None = None,
    *,
    renorm_clipping: Mapping[str, jax.typing.ArrayLike] | None = None,
  ) -> jax.Array:
    """Normalizes `inputs`; a training call updates this module's state.

    Args:
      inputs: array with the batch on axis 0 and features on `axis`.
      is_training: Python bool: batch statistics and statistic updates, or inference.
      mask: optional ``inputs.shape[:-1]`` weights for padding-aware moments; masked-out
        positions must hold finite values.
      renorm_clipping: optional per-call (possibly traced) clipping bounds.

    Returns:
      The normalized array.
    """
    if isinstance(is_training, jax.core.Tracer):
      raise TypeError(_traced_is_training(is_training))
    config = self.config
    input_shape = jnp.shape(inputs)
    shape = _variables.feature_shape(config, input_shape)
    self._check_stored_parameters(shape)

    def variable(name: str):
      def init(shape, dtype):
        del shape, dtype  # the core's initial value has both (`get_state` needs placeholders)
        key = hk.next_rng_key() if _variables.initializer_needs_key(config, name) else None
        return _variables.initial_value(config, name, key, input_shape)

      return init

    params = {
      name: hk.get_parameter(name, shape, config.param_dtype, init=variable(name))
      for name in _variables.param_names(config)
    }
    names = _variables.stat_names(config)
    stats = {name: hk.get_state(name, (), init=variable(name)) for name in names}
    initializing = hk.running_init()  # as linen: no collectives and no update at init
    key = None
    if is_training and _variables.adjustment_takes_key(config):
      key = hk.next_rng_key()
    y, new_stats = _layer.run(
      inputs,
      params,
      stats,
      config,
      training=is_training,
      mask=mask,
      renorm_clipping=renorm_clipping,
      adjustment_key=key,
      axis_name=None if initializing else config.axis_name,
      hints=HAIKU,
    )
    if not initializing:
      for name in names:
        hk.set_state(name, new_stats[name])
    return y

  def _check_stored_parameters(self, shape: tuple[int, ...]) -> None:
    """Raises in Haiku's words when stored parameters were made for other feature sizes."""
    for full_name, value in self.params_dict().items():
      _layer.check_feature_shape(full_name, jnp.shape(value), shape, HAIKU.feature_hint)


add_config_views(BatchNormalization)  # read-only views of the configuration, as on linen

__all__ = ("BatchNormalization",)
