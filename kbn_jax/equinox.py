"""`kbn_jax.equinox.BatchNormalization`: the layer as an Equinox Module.

A thin shell over the pure layer, like the linen and NNX Modules, so every front-end gives the
same numbers. Parameters ``gamma`` and ``beta`` are array fields (trained by ``eqx.filter_grad``);
the statistics live in an ``eqx.nn.State`` behind ``state_index``, as for ``eqx.nn.BatchNorm``.
The mode is the ``inference`` field, which ``eqx.nn.inference_mode`` flips.

**Per example or batched.** With an `axis_name`, the layer is called the Equinox way, on ONE
example under ``jax.vmap(..., axis_name=axis_name)`` (as ``eqx.nn.BatchNorm``), and its `axis`
counts the example's axes (``axis=0`` for channel-first ``(C, H, W)`` examples). Without one, it
is called on the whole batch (batch on axis 0, `axis` as in Keras). ``per_example=False`` with an
`axis_name` keeps the batched call and reduces across devices (inside ``jax.shard_map``). Both
calls choose Keras's rank-dependent path by the rank of the batch, so they give the same outputs,
gradients and statistics.

Example::

  >>> import equinox as eqx
  >>> import jax
  >>> import jax.numpy as jnp
  >>> import kbn_jax.equinox
  >>> layer, state = eqx.nn.make_with_state(kbn_jax.equinox.BatchNormalization)(
  ...   2, "batch", momentum=0.9
  ... )
  >>> x = jnp.arange(8.0).reshape(4, 2)
  >>> call = jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
  >>> y, state = call(x, state)                        # training: batch statistics
  >>> state.get(layer.state_index)["moving_mean"]
  Array([0.3, 0.4], dtype=float32)
  >>> layer = eqx.nn.inference_mode(layer)
  >>> y, state = jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
  ...   x, state
  ... )                                                # inference: nothing changes
  >>> state.get(layer.state_index)["moving_mean"]
  Array([0.3, 0.4], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax

from kbn_jax import _layer, _variables
from kbn_jax._config import BatchNormConfig, add_config_views, from_front_end_arguments

EQUINOX = _layer.Hints(
  training_hint=(
    "call the model under `eqx.filter_jit` (which keeps Python bools static) and switch modes "
    "with `eqx.nn.inference_mode`"
  ),
  missing_hint="pass the `state` that `eqx.nn.make_with_state` returned (then each call's).",
  feature_hint=(
    "Construct the layer with `num_features` equal to the input's feature size(s), or feed "
    "inputs whose feature axes match `num_features`."
  ),
  mapping_hint="`jax.vmap(..., axis_name=...)` per example (or `jax.shard_map`, `jax.pmap`)",
)


_OWN_ARGUMENTS = "num_features, axis_name, inference, per_example, key"


def _traced_inference(value: Any) -> str:
  return (
    f"`inference`={value!r} is traced, but it must be a Python bool: it selects the "
    f"computation, so it is static: {EQUINOX.training_hint} (plain `jax.jit` traces the field)."
  )


_PER_EXAMPLE_NEEDS_AXIS_NAME = (
  "`per_example=True` needs `axis_name`, the name of the `jax.vmap` axis that maps the batch "
  "away: pass e.g. `axis_name='batch'` and call the layer under `jax.vmap(..., "
  "axis_name='batch')`."
)


def _per_example_ghosts(virtual_batch_size: int) -> str:
  return (
    f"`virtual_batch_size`={virtual_batch_size} splits the batch into Keras's strided ghost "
    "batches, which a per-example call under `jax.vmap` cannot see: construct the layer without "
    "`axis_name` (or with `per_example=False`) and call it on the whole batch."
  )


def _needs_key(names: list[str]) -> str:
  return (
    f"The initializers of {names} draw random numbers: pass `key=jax.random.key(0)` (any PRNG "
    "key) to kbn_jax.equinox.BatchNormalization."
  )


class BatchNormalization(eqx.nn.StatefulLayer):
  """Keras 2.x ``BatchNormalization`` (V1 by default) as an Equinox Module.

  Attributes:
    gamma: the scale (``None`` with ``scale=False``), in the feature shape.
    beta: the offset (``None`` with ``center=False``), in the feature shape.
    state_index: where the statistics live in the ``eqx.nn.State``: a dict of
      ``moving_mean``, ``moving_variance`` (and renorm's, and PyTorch's counter).
    inference: the mode; ``eqx.nn.inference_mode`` sets it.
    config: the layer's `kbn_jax.functional.BatchNormConfig` (static).
    per_example: whether the layer is called on one example under ``jax.vmap`` (static).
    num_features: the feature shape (static).
  """

  gamma: jax.Array | None
  beta: jax.Array | None
  state_index: eqx.nn.StateIndex
  inference: bool
  config: BatchNormConfig = eqx.field(static=True)
  per_example: bool = eqx.field(static=True)
  num_features: tuple[int, ...] = eqx.field(static=True)

  def __init__(
    self,
    num_features: int | Sequence[int],
    axis_name: Hashable | Sequence[Hashable] | None = None,
    *,
    inference: bool = False,
    per_example: bool | None = None,
    key: jax.Array | None = None,
    **kwargs: Any,
  ):
    """Builds the layer; use ``eqx.nn.make_with_state(BatchNormalization)(...)``.

    Args:
      num_features: the feature size (an int), or a tuple of sizes, one per axis of `axis`.
      axis_name: the ``jax.vmap`` axis name of a per-example call (as for ``eqx.nn.BatchNorm``),
        possibly with device axes (a tuple); None (default) for a batched call.
      inference: False (default) normalizes with batch statistics and updates the statistics;
        True uses the moving statistics.
      per_example: whether calls see one example; default: True exactly when `axis_name` is set.
      key: PRNG key for random initializers (the defaults draw none).
      **kwargs: axis, momentum, epsilon, center, scale, the initializers, regularizers and
        constraints, renorm, renorm_clipping, renorm_momentum, fused, trainable,
        virtual_batch_size, adjustment, axis_index_groups, dtype, param_dtype, semantics,
        ghost_batch_scope: as for the linen `kbn_jax.BatchNormalization` (Keras's names and
        defaults). With `per_example`, `axis` counts the axes of one example.
    """
    config = from_front_end_arguments(
      kwargs, layer="kbn_jax.equinox.BatchNormalization", also=_OWN_ARGUMENTS, axis_name=axis_name
    )
    _layer.check_optional_bool("inference", inference)
    _layer.check_optional_bool("per_example", per_example)
    per_example = axis_name is not None if per_example is None else per_example
    if per_example and axis_name is None:
      raise ValueError(_PER_EXAMPLE_NEEDS_AXIS_NAME)
    if per_example and config.virtual_batch_size is not None:
      raise ValueError(_per_example_ghosts(config.virtual_batch_size))
    shape = _variables.checked_num_features(num_features, config)
    names = _variables.param_names(config) + _variables.stat_names(config)
    random = [name for name in names if _variables.initializer_needs_key(config, name)]
    if random and key is None:
      raise ValueError(_needs_key(random))
    keys = dict(zip(random, jax.random.split(key, len(random)), strict=True)) if random else {}
    proxy = _variables.proxy_input_shape(config, shape)
    values = {name: _variables.initial_value(config, name, keys.get(name), proxy) for name in names}
    self.gamma = values.get("gamma")
    self.beta = values.get("beta")
    self.state_index = eqx.nn.StateIndex(
      {name: values[name] for name in _variables.stat_names(config)}
    )
    self.inference = inference
    self.config = config
    self.per_example = per_example
    self.num_features = shape

  @jax.named_scope("kbn_jax.equinox.BatchNormalization")
  def __call__(
    self,
    x: jax.typing.ArrayLike,
    state: eqx.nn.State,
    *,
    key: jax.Array | None = None,
    inference: bool | None = None,
    mask: jax.typing.ArrayLike | None = None,
    renorm_clipping: Mapping[str, jax.typing.ArrayLike] | None = None,
  ) -> tuple[jax.Array, eqx.nn.State]:
    """Normalizes `x`.

    Args:
      x: one example (per-example layers, under ``jax.vmap``) or a batch (batch on axis 0).
      state: the ``eqx.nn.State`` holding the statistics.
      key: PRNG key for an `adjustment` that takes one; otherwise ignored.
      inference: overrides the ``inference`` field for this call when not None.
      mask: optional ``x.shape[:-1]`` weights for padding-aware moments; masked-out positions
        must hold finite values.
      renorm_clipping: optional per-call (possibly traced) clipping bounds.

    Returns:
      ``(y, state)``: the normalized array and the state with the statistics after the call.
    """
    inference = self.inference if inference is None else inference
    if isinstance(inference, jax.core.Tracer):
      raise TypeError(_traced_inference(inference))
    _layer.check_optional_bool("inference", inference)
    params = {"gamma": self.gamma, "beta": self.beta}
    y, stats = _layer.run(
      x,
      {name: params[name] for name in _variables.param_names(self.config)},
      state.get(self.state_index),
      self.config,
      training=not inference,
      per_example=self.per_example,
      mask=mask,
      renorm_clipping=renorm_clipping,
      adjustment_key=key,
      hints=EQUINOX,
    )
    return y, state.set(self.state_index, stats)


add_config_views(BatchNormalization)  # read-only views of the configuration, as on linen

__all__ = ("BatchNormalization",)
