"""`kbn_jax.nnx.BatchNormalization`: the layer as a Flax NNX Module.

A thin shell over `kbn_jax.functional.batch_normalization`, like the linen Module, so both
front-ends give the same numbers by construction. Parameters are ``nnx.Param`` attributes
(``gamma``, ``beta``) and statistics ``nnx.BatchStat`` attributes (``moving_mean``,
``moving_variance``, with renorm ``moving_stddev``, ``renorm_mean``, ``renorm_stddev``, with
``semantics="torch"`` ``num_batches_tracked``), all in the feature shape.

The mode follows NNX: ``use_running_average`` (default False: training, as for
``nnx.BatchNorm``) is set by ``model.train()`` / ``model.eval()`` and ``nnx.view``; a call's
``training`` overrides it.

Example::

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import kbn_jax.nnx
  >>> layer = kbn_jax.nnx.BatchNormalization(2, momentum=0.9, rngs=nnx.Rngs(0))
  >>> y = layer(jnp.arange(8.0).reshape(4, 2))          # training: batch statistics
  >>> layer.moving_mean[...]
  Array([0.3, 0.4], dtype=float32)
  >>> layer.eval()
  >>> y = layer(jnp.arange(8.0).reshape(4, 2))          # inference: nothing changes
  >>> layer.moving_mean[...]
  Array([0.3, 0.4], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kbn_jax import _keras_config, _layer, _variables
from kbn_jax._config import FIELD_NAMES, add_config_views, from_front_end_arguments

NNX = _layer.Hints(
  training_hint=(
    "use `model.train()` / `model.eval()` (or `nnx.view`) instead, or mark the argument that "
    "carries it static (`nnx.jit(..., static_argnames=...)` or `static_argnums`)"
  ),
  missing_hint="the NNX module creates them; do not delete its attributes.",
  feature_hint=(
    "Construct the layer with `num_features` equal to the input's feature size(s), or feed "
    "inputs whose feature axes match `num_features`."
  ),
  mapping_hint="`jax.shard_map` or `nnx.shard_map` (or `nnx.pmap`/`nnx.vmap`)",
)


class BatchNormalization(nnx.Module):
  """Keras 2.x ``BatchNormalization`` (V1 by default) as a Flax NNX Module.

  Args:
    num_features: the feature size (an int), or a tuple of sizes, one per axis of `axis`.
    **kwargs: axis, momentum, epsilon, center, scale, beta_initializer, gamma_initializer,
      moving_mean_initializer, moving_variance_initializer, beta_regularizer,
      gamma_regularizer, beta_constraint, gamma_constraint, renorm, renorm_clipping,
      renorm_momentum, fused, trainable, virtual_batch_size, adjustment, axis_name,
      axis_index_groups, dtype, param_dtype, semantics, ghost_batch_scope: as for the linen
      `kbn_jax.BatchNormalization` (Keras's names and defaults).
    use_running_average: the mode: False (default, as ``nnx.BatchNorm``) normalizes with batch
      statistics and updates the statistics; True uses the moving statistics. ``model.train()``
      and ``model.eval()`` set it.
    rngs: ``nnx.Rngs`` for random initializers (and, under the stream ``adjustment``, for an
      `adjustment` that takes a ``key``).

  Initializers are called with Keras's parameter shape for the smallest input rank that holds
  the feature axes (so fan-based initializers see Keras's fans) and stored in the feature shape.
  """

  def __init__(
    self,
    num_features: int | Sequence[int],
    *,
    use_running_average: bool = False,
    rngs: nnx.Rngs,
    **kwargs: Any,
  ):
    config = from_front_end_arguments(
      kwargs,
      layer="kbn_jax.nnx.BatchNormalization",
      also="num_features, use_running_average, rngs",
    )
    _layer.check_optional_bool("use_running_average", use_running_average)
    shape = _variables.checked_num_features(num_features, config)
    self.config = config
    self.num_features = shape
    self.use_running_average = use_running_average
    input_shape = _variables.proxy_input_shape(config, shape)
    for name in _variables.param_names(config):
      key = rngs.params() if _variables.initializer_needs_key(config, name) else None
      setattr(self, name, nnx.Param(_variables.initial_value(config, name, key, input_shape)))
    for name in _variables.stat_names(config):
      needs_key = name != "num_batches_tracked" and _variables.initializer_needs_key(config, name)
      key = rngs.params() if needs_key else None
      value = _variables.initial_value(config, name, key, input_shape)
      setattr(self, name, nnx.BatchStat(value))
    self.adjustment_rngs = rngs if _variables.adjustment_takes_key(config) else None

  @classmethod
  def from_keras_config(
    cls,
    config: Mapping[str, Any],
    *,
    num_features: int | Sequence[int],
    rngs: nnx.Rngs,
    **kwargs: Any,
  ) -> BatchNormalization:
    """Builds the layer from a Keras ``get_config()`` dict; keyword arguments as for
    `kbn_jax.keras_compat.from_keras_config` (e.g. ``semantics="keras_v2"``)."""
    kwargs = _keras_config.config_kwargs(config, fields=FIELD_NAMES, **kwargs)
    return cls(num_features, rngs=rngs, **kwargs)

  @classmethod
  def from_linen(
    cls,
    layer: Any,
    variables: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    num_features: int | Sequence[int] | None = None,
    rngs: nnx.Rngs | None = None,
  ) -> BatchNormalization:
    """The NNX twin of a linen `kbn_jax.BatchNormalization`, with its variables if given.

    Args:
      layer: the linen Module.
      variables: its variables (``{"params": ..., "batch_stats": ...}``); they give the feature
        shape. Without them, `num_features` is needed and the initializers run.
      num_features: the feature shape, when `variables` are not given.
      rngs: for random initializers (default ``nnx.Rngs(0)``).
    """
    if variables is not None:
      num_features = tuple(jnp.shape(variables["batch_stats"]["moving_mean"]))
    if num_features is None:
      raise ValueError("Pass `variables` or `num_features` to BatchNormalization.from_linen.")
    config = layer.config
    mode = getattr(layer, "use_running_average", None)
    kwargs = {name: getattr(config, name) for name in FIELD_NAMES}
    module = cls(
      num_features,
      use_running_average=bool(mode) if mode is not None else False,
      rngs=rngs or nnx.Rngs(0),
      **kwargs,
    )
    if variables is not None:
      module.load_variables(variables)
    return module

  def set_view(self, use_running_average: bool | None = None) -> None:
    """Sets the mode for ``nnx.view`` (as ``nnx.BatchNorm`` does).

    Args:
      use_running_average: True for inference, False for training; None leaves it.
    """
    if use_running_average is not None:
      _layer.check_optional_bool("use_running_average", use_running_average)
      self.use_running_average = use_running_average

  def load_variables(self, variables: Mapping[str, Mapping[str, Any]]) -> None:
    """Sets the parameters and statistics from linen-style ``{"params", "batch_stats"}``."""
    for collection, names in (
      ("params", _variables.param_names(self.config)),
      ("batch_stats", _variables.stat_names(self.config)),
    ):
      values = variables.get(collection, {})
      for name in names:
        if name not in values:
          raise ValueError(f"`variables['{collection}']` lacks `{name}`, which this layer has.")
        expected = () if name == "num_batches_tracked" else self.num_features
        _layer.check_feature_shape(name, jnp.shape(values[name]), expected, NNX.feature_hint)
        current = getattr(self, name)
        current.set_value(jnp.asarray(values[name], current.get_value().dtype))

  def linen_variables(self) -> dict[str, dict[str, jax.Array]]:
    """The linen-style ``{"params": ..., "batch_stats": ...}`` of this layer."""
    params = {name: getattr(self, name).get_value() for name in _variables.param_names(self.config)}
    stats = {name: getattr(self, name).get_value() for name in _variables.stat_names(self.config)}
    return {"params": params, "batch_stats": stats} if params else {"batch_stats": stats}

  def to_keras_config(self) -> dict[str, Any]:
    """A config dict that ``tf_keras``'s V1 ``BatchNormalization.from_config`` accepts."""
    return _keras_config.to_keras(self.config)

  def __call__(
    self,
    x: jax.typing.ArrayLike,
    training: bool | None = None,
    mask: jax.typing.ArrayLike | None = None,
    *,
    renorm_clipping: Mapping[str, jax.typing.ArrayLike] | None = None,
  ) -> jax.Array:
    """Normalizes `x`.

    Args:
      x: array with the batch on axis 0 and features on `axis`.
      training: Python bool overriding the module's mode for this call; None (default) uses
        ``not use_running_average``.
      mask: optional ``x.shape[:-1]`` weights for padding-aware moments; masked-out positions
        must hold finite values.
      renorm_clipping: optional per-call (possibly traced) clipping bounds.

    Returns:
      The normalized array.
    """
    config = self.config
    if training is None:
      training = not self.use_running_average
    training = _layer.check_training(training, NNX)
    adjustment_key = None
    if training and self.adjustment_rngs is not None:
      adjustment_key = self.adjustment_rngs.adjustment()
    names = _variables.stat_names(config)
    y, new_stats = _layer.run(
      x,
      {name: getattr(self, name).get_value() for name in _variables.param_names(config)},
      {name: getattr(self, name).get_value() for name in names},
      config,
      training=training,
      mask=mask,
      renorm_clipping=renorm_clipping,
      adjustment_key=adjustment_key,
      hints=NNX,
    )
    if _layer.updates_statistics(config, training):
      for name in names:
        getattr(self, name).set_value(new_stats[name])
    return y


add_config_views(BatchNormalization)  # read-only views of the configuration, as on linen

__all__ = ("BatchNormalization",)
