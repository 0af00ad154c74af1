"""`BatchNormalization`: the Keras 2.x V1 layer as a `flax.linen` Module.

The Module is a thin shell. It validates its configuration, creates the variables, calls
`kbn_jax.functional` and writes the moving statistics to the ``batch_stats`` collection.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from kbn_jax import (
  _fast_train,
  _validation,
  constraints,
  functional,
  initializers,
  regularizers,
)

_FUSED_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


class BatchNormalization(nn.Module):
  """Keras 2.x ``BatchNormalization`` in its V1 form (``tf.compat.v1`` semantics).

  In training (``training=True``) the input is normalized with the statistics of the batch and
  the moving statistics in ``batch_stats`` are updated; in inference (the default) the moving
  statistics are used and nothing changes:

  .. math::
    y = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}} \\gamma + \\beta, \\qquad
    m \\leftarrow m - (m - \\mu_B)(1 - \\text{momentum}).

  Example::

    >>> import jax, jax.numpy as jnp, kbn_jax
    >>> layer = kbn_jax.BatchNormalization(momentum=0.9)
    >>> x = jnp.arange(8.0).reshape(4, 2)
    >>> variables = layer.init(jax.random.key(0), x)
    >>> y, updates = layer.apply(variables, x, training=True, mutable=["batch_stats"])
    >>> updates["batch_stats"]["moving_mean"]
    Array([0.3, 0.4], dtype=float32)

  Attributes:
    axis: feature axis or axes (int or list/tuple of ints, negative allowed); every other axis
      is reduced over.
    momentum: weight of the old value in the moving averages, in [0, 1].
    epsilon: added to the variance, >= 0.
    center: add the learned offset ``beta``.
    scale: multiply by the learned ``gamma``.
    beta_initializer, gamma_initializer, moving_mean_initializer, moving_variance_initializer:
      Keras names or config dicts, or JAX initializers ``(key, shape, dtype) -> Array``. They are
      called with Keras's parameter shape (so fan-based initializers see Keras's fans), and the
      result is stored with the feature shape.
    beta_regularizer, gamma_regularizer: Keras regularizer names/configs or callables. When the
      ``losses`` collection is mutable, the penalties are sown there (``gamma_regularizer``,
      ``beta_regularizer``) in training calls.
    beta_constraint, gamma_constraint: Keras constraint names/configs or callables, applied by
      `kbn_jax.training.constrain_params` after each optimizer step (as Keras applies them).
    renorm: use Batch Renormalization (Ioffe, 2017).
    renorm_clipping: dict with optional keys ``rmax``, ``rmin``, ``dmax``; missing keys do not
      clip. Values may also be given per call, traced, through ``__call__``.
    renorm_momentum: momentum of the renorm statistics.
    fused: ``None``/``True`` use Keras's fused-kernel semantics where V1 would fuse (rank 4 with
      axis 1 or 3, rank 5 with axis 1 or 4, no renorm, ghost batch or adjustment, 16/32-bit
      compute), falling back silently otherwise; ``False`` never. A fused layer moves
      ``moving_variance`` toward the Bessel-corrected (unbiased) batch variance.
    trainable: V1 semantics: when False, ``training=True`` still normalizes with batch statistics
      but the moving statistics are not updated; use `kbn_jax.training.freeze_non_trainable`
      to keep the optimizer off ``gamma``/``beta``.
    virtual_batch_size: ghost batch size (Hoffer et al., 2017) with Keras's strided layout.
    adjustment: ``adjustment(shape) -> (scale, bias)``, called in training with the input's shape
      as a tuple; if it takes a ``key`` keyword, it receives ``self.make_rng("adjustment")``.
    axis_name: mapped axis name(s) (``pmap``/``shard_map``) over which batch statistics are
      computed, making them the statistics of the whole global batch.
    axis_index_groups: optional partition of the ``axis_name`` indices into groups that each
      compute their own statistics.
    dtype: compute and output dtype (inputs are cast to it); ``None`` promotes the input and
      parameter dtypes. Keras's ``"mixed_float16"``/``"mixed_bfloat16"`` mean float16/bfloat16.
    param_dtype: dtype of ``gamma`` and ``beta``; moving statistics are kept in at least float32.
  """

  axis: int | Sequence[int] = -1
  momentum: float = 0.99
  epsilon: float = 1e-3
  center: bool = True
  scale: bool = True
  beta_initializer: Any = "zeros"
  gamma_initializer: Any = "ones"
  moving_mean_initializer: Any = "zeros"
  moving_variance_initializer: Any = "ones"
  beta_regularizer: Any = None
  gamma_regularizer: Any = None
  beta_constraint: Any = None
  gamma_constraint: Any = None
  renorm: bool = False
  renorm_clipping: Mapping[str, float] | None = None
  renorm_momentum: float = 0.99
  fused: bool | None = None
  trainable: bool = True
  virtual_batch_size: int | None = None
  adjustment: Callable[..., tuple[Any, Any]] | None = None
  axis_name: Any = None
  axis_index_groups: Any = None
  dtype: DTypeLike | None = None
  param_dtype: DTypeLike = jnp.float32

  def __post_init__(self):
    _validation.canonicalize_axis(self.axis)
    _validation.check_config(
      momentum=self.momentum,
      epsilon=self.epsilon,
      renorm=self.renorm,
      renorm_clipping=self.renorm_clipping,
      renorm_momentum=self.renorm_momentum,
      fused=self.fused,
      virtual_batch_size=self.virtual_batch_size,
      adjustment=self.adjustment,
      flags={
        "center": self.center,
        "scale": self.scale,
        "renorm": self.renorm,
        "trainable": self.trainable,
      },
    )
    _validation.check_axis_index_groups(self.axis_index_groups, self.virtual_batch_size)
    for name in _INITIALIZER_ARGS:
      initializers.get(getattr(self, name), argument=name)
    for name in _REGULARIZER_ARGS:
      regularizers.get(getattr(self, name), argument=name)
    for name in _CONSTRAINT_ARGS:
      constraints.get(getattr(self, name), argument=name)
    for name in _HASHABLE_CONFIG_ARGS:  # after validation, so errors show the values as given
      object.__setattr__(self, name, _validation.freeze(getattr(self, name)))
    dtype = _validation.canonicalize_dtype(self.dtype, argument="dtype", allow_policy=True)
    param_dtype = _validation.canonicalize_dtype(self.param_dtype, argument="param_dtype")
    object.__setattr__(self, "dtype", dtype)
    object.__setattr__(self, "param_dtype", param_dtype)
    super().__post_init__()

  @classmethod
  def from_keras_config(cls, config: Mapping[str, Any], **kwargs: Any) -> BatchNormalization:
    """Builds the layer from a Keras ``get_config()`` dict; keyword arguments go to
    `kbn_jax.keras_compat.from_keras_config` (e.g. ``axis_name="batch"``, ``keep_name=True``)."""
    from kbn_jax import keras_compat  # noqa: PLC0415 (keras_compat imports this module)

    return keras_compat.from_keras_config(config, cls, **kwargs)

  def to_keras_config(self) -> dict[str, Any]:
    """A config dict that ``tf_keras``'s V1 ``BatchNormalization.from_config`` accepts."""
    from kbn_jax import keras_compat  # noqa: PLC0415

    return keras_compat.to_keras_config(self)

  @nn.compact
  def __call__(
    self,
    inputs: jax.typing.ArrayLike,
    training: bool = False,
    mask: jax.typing.ArrayLike | None = None,
    *,
    renorm_clipping: Mapping[str, jax.typing.ArrayLike] | None = None,
  ) -> jax.Array:
    """Normalizes `inputs`.

    Args:
      inputs: array with the batch on axis 0 (ghost batches) and features on `axis`. It is cast
        to `dtype` when that is set, and integer or boolean inputs to float, as Keras does.
      training: Python bool (static): batch statistics and moving-average updates (requires
        ``mutable=["batch_stats"]`` unless ``trainable=False``), or moving statistics.
      mask: optional ``inputs.shape[:-1]`` weights for padding-aware moments (Keras >= 2.12);
        ignored with a warning on fused configurations, as in Keras.
      renorm_clipping: optional per-call clipping bounds (may be traced, e.g. a warm-up
        schedule under ``jit``); they override the attribute of the same name.

    Returns:
      The normalized array, of dtype `dtype` or the promotion of input and parameter dtypes.
    """
    training = _validation.check_training(training)
    x = jnp.asarray(inputs)
    if self.dtype is not None or not jnp.issubdtype(x.dtype, jnp.inexact):
      # Keras casts inputs to the layer's compute dtype first (as Flax layers cast to `dtype`).
      x = x.astype(self.dtype or self.param_dtype)
    axes = _validation.normalize_axes(_validation.canonicalize_axis(self.axis), x.ndim)
    feature_axes = tuple(sorted(axes))
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    if self.virtual_batch_size is not None:
      _validation.check_ghost_batch_axes(axes)
    out_dtype = jnp.dtype(self.dtype or functional.promote_dtypes(x.dtype, self.param_dtype))
    fused = self._fused(axes, x.ndim, out_dtype)
    mask = self._checked_mask(mask, x, fused)
    keras_shape = _keras_param_shape(
      feature_axes, x.shape, ghost=self.virtual_batch_size is not None
    )
    variables = self._variables(feature_shape, keras_shape)
    gamma, beta = variables.get("gamma"), variables.get("beta")

    compute_dtype = functional.reduction_dtype(x.dtype)
    x = x.astype(compute_dtype)
    if not training:
      # Keras's ghost-batch inference reshape is elementwise, so it is skipped.
      y = functional.normalize(
        x,
        _broadcast(variables["moving_mean"].value, feature_axes, x.ndim),
        _broadcast(variables["moving_variance"].value, feature_axes, x.ndim),
        scale=_broadcast(gamma, feature_axes, x.ndim),
        offset=_broadcast(beta, feature_axes, x.ndim),
        epsilon=self.epsilon,
        subtract_mean_first=fused,
      )
      return y.astype(out_dtype)

    self._check_can_update()
    self._sow_penalties(gamma, beta, keras_shape)
    y = self._train(x, mask, variables, feature_axes, feature_shape, fused, renorm_clipping)
    return y.astype(out_dtype)

  def _train(self, x, mask, variables, feature_axes, feature_shape, fused, renorm_clipping):
    """Training-mode normalization and moving-statistic updates."""
    batch_size = x.shape[0]
    # Elements per channel; 0 for an empty batch or an empty reduced axis. Keras turns the
    # moving statistics into NaN then (spec section 4.4); we skip the step: the statistics stay,
    # and the (empty) output depends on no parameter, so its gradients are 0, not NaN.
    count = math.prod(size for a, size in enumerate(x.shape) if a not in feature_axes)
    if count == 0:
      return jnp.zeros(x.shape, x.dtype)
    syncing = self.axis_name is not None and not self.is_initializing()
    if syncing:
      _check_axis_name_bound(self.axis_name)
    ghost = self.virtual_batch_size is not None
    ghost_spans_devices = ghost and syncing and batch_size < self.virtual_batch_size
    split = ghost and not ghost_spans_devices
    if split:
      _validation.check_ghost_batch_size(self.virtual_batch_size, batch_size)
      x = functional.split_ghost_batches(x, self.virtual_batch_size)
      feature_axes = tuple(a + 1 for a in feature_axes)
    ndim = x.ndim
    reduction_axes = tuple(
      a for a in range(ndim) if a not in feature_axes and not (split and a == 1)
    )
    scale = _broadcast(variables.get("gamma"), feature_axes, ndim)
    offset = _broadcast(variables.get("beta"), feature_axes, ndim)
    if self.adjustment is not None:
      adjust_scale, adjust_bias = self._adjustment(x.shape)
      scale, offset = functional.compose_affine(adjust_scale, adjust_bias, scale, offset)

    mean, variance, batch_mean, batch_variance = self._batch_moments(
      x, mask, reduction_axes, syncing=syncing, split=split, spans_devices=ghost_spans_devices
    )
    batch_mean = batch_mean.reshape(feature_shape)
    batch_variance = batch_variance.reshape(feature_shape)

    update = self.trainable and not self.is_initializing()
    if self.renorm:
      r, d = self._renorm(batch_mean, batch_variance, variables, renorm_clipping, update)
      scale, offset = functional.compose_affine(
        _broadcast(r, feature_axes, ndim), _broadcast(d, feature_axes, ndim), scale, offset
      )
    if update:
      self._update_moving_statistics(variables, batch_mean, batch_variance, fused, count)
    fast = (
      mask is None
      and not ghost_spans_devices
      and _fast_train.is_per_channel(scale, reduction_axes, ndim)
      and _fast_train.is_per_channel(offset, reduction_axes, ndim)
    )
    if fast:  # closed-form backward; r, d and the adjustment are folded into scale and offset
      kernel_axis_name = self.axis_name if syncing and not split else None
      y = _fast_train.normalize_batch(
        x,
        mean,
        variance,
        scale,
        offset,
        reduction_axes=reduction_axes,
        epsilon=self.epsilon,
        subtract_mean_first=fused,
        axis_name=kernel_axis_name,
        axis_index_groups=self.axis_index_groups if kernel_axis_name is not None else None,
      )
    else:
      y = functional.normalize(
        x,
        mean,
        variance,
        scale=scale,
        offset=offset,
        epsilon=self.epsilon,
        subtract_mean_first=fused,
      )
    return functional.merge_ghost_batches(y) if split else y

  def _batch_moments(self, x, mask, reduction_axes, *, syncing, split, spans_devices):
    """Returns the moments that normalize ``x`` and the ones the moving averages move toward.

    They differ with ghost batches: each ghost batch is normalized by its own moments, and the
    moving statistics move toward their mean over every ghost batch (of every device).
    """
    if spans_devices:
      return functional.device_group_moments(
        x,
        reduction_axes,
        axis_name=self.axis_name,
        group_size=self._ghost_group_size(x.shape[0]),
      )
    if split:
      mean, variance = _fast_train.batch_moments(x, reduction_axes)
      batch_mean = jnp.mean(mean, axis=1, keepdims=True)
      batch_variance = jnp.mean(variance, axis=1, keepdims=True)
      if syncing:  # one collective; the normalization itself needs none
        batch_mean, batch_variance = jax.lax.pmean(
          jnp.stack([batch_mean, batch_variance]), self.axis_name
        )
      return mean, variance, batch_mean, batch_variance
    axis_name = self.axis_name if syncing else None
    if mask is None:
      mean, variance = _fast_train.batch_moments(
        x, reduction_axes, axis_name=axis_name, axis_index_groups=self.axis_index_groups
      )
    else:
      mean, variance = functional.moments(
        x,
        reduction_axes,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=self.axis_index_groups,
        keepdims=True,
      )
    return mean, variance, mean, variance

  def _ghost_group_size(self, batch_size: int) -> int:
    """Devices per virtual batch when the per-device batch is smaller than the ghost batch."""
    vbs = self.virtual_batch_size
    devices = jax.lax.axis_size(self.axis_name)
    group_size = vbs // batch_size if batch_size else 0
    if batch_size == 0 or vbs % batch_size or devices % group_size:
      raise ValueError(
        f"`virtual_batch_size`={vbs} spans several devices because the per-device batch is "
        f"{batch_size}: the per-device batch must divide it and the number of devices "
        f"per virtual batch ({vbs}/{batch_size}) must divide the {devices} devices of "
        f"`axis_name`={self.axis_name!r}. Choose a per-device batch that divides {vbs}."
      )
    return group_size

  def _renorm(self, batch_mean, batch_variance, variables, renorm_clipping, update):
    """Returns ``(r, d)`` from the pre-update renorm statistics, then updates those."""
    clipping = dict(self.renorm_clipping or {})
    if renorm_clipping is not None:
      _validation.check_renorm_clipping_keys(renorm_clipping)
      clipping.update(renorm_clipping)
    renorm_mean, renorm_stddev = variables["renorm_mean"], variables["renorm_stddev"]
    r, d = functional.renorm_correction(
      batch_mean,
      batch_variance,
      renorm_mean.value,
      renorm_stddev.value,
      epsilon=self.epsilon,
      rmin=clipping.get("rmin"),
      rmax=clipping.get("rmax"),
      dmax=clipping.get("dmax"),
    )
    if update:
      stddev = jnp.sqrt(batch_variance + jnp.asarray(self.epsilon, batch_variance.dtype))
      renorm_mean.value = functional.update_moving_average(
        renorm_mean.value, batch_mean, self.renorm_momentum
      )
      renorm_stddev.value = functional.update_moving_average(
        renorm_stddev.value, stddev, self.renorm_momentum
      )
    return r, d

  def _update_moving_statistics(self, variables, batch_mean, batch_variance, fused, count):
    """Keras's updates: mean first, then (renorm's stddev and) variance."""
    moving_mean = variables["moving_mean"]
    moving_variance = variables["moving_variance"]
    moving_mean.value = functional.update_moving_average(
      moving_mean.value, jax.lax.stop_gradient(batch_mean), self.momentum
    )
    batch_variance = jax.lax.stop_gradient(batch_variance)
    if self.renorm:
      # Keras averages the stddev and overwrites the variance from it (spec section 3.6).
      moving_stddev = variables["moving_stddev"]
      eps = jnp.asarray(self.epsilon, batch_variance.dtype)
      moving_stddev.value = functional.update_moving_average(
        moving_stddev.value, jnp.sqrt(batch_variance + eps), self.momentum
      )
      moving_variance.value = jax.nn.relu(jnp.square(moving_stddev.value) - eps)
      return
    if fused:
      count *= self._device_count()
      batch_variance = functional.bessel_correction(batch_variance, count)
    moving_variance.value = functional.update_moving_average(
      moving_variance.value, batch_variance, self.momentum
    )

  def _device_count(self) -> int:
    """How many devices' batches the synchronized statistics cover (1 without `axis_name`)."""
    if self.axis_name is None or self.is_initializing():
      return 1
    if self.axis_index_groups is not None:
      return len(self.axis_index_groups[0])
    return jax.lax.axis_size(self.axis_name)

  def _fused(self, axes: tuple[int, ...], ndim: int, compute_dtype: jnp.dtype) -> bool:
    """Keras V1's fused resolution (spec section 2, step 3), decided on normalized axes."""
    if self.fused is False:
      return False
    fusable_axes = {4: (1, 3), 5: (1, 4)}.get(ndim, ())
    return (
      len(axes) == 1
      and axes[0] in fusable_axes
      and not self.renorm
      and self.virtual_batch_size is None
      and self.adjustment is None
      and jnp.dtype(compute_dtype) in _FUSED_DTYPES
    )

  def _checked_mask(self, mask, x, fused):
    if mask is None:
      return None
    if fused:
      warnings.warn(
        "Masking is not supported with `fused=True`; the mask is ignored (as in Keras). "
        "Pass fused=False to use padding-aware moments.",
        stacklevel=3,
      )
      return None
    if self.virtual_batch_size is not None:
      raise ValueError("`mask` cannot be combined with `virtual_batch_size`; drop one of them.")
    mask = jnp.asarray(mask)
    _validation.check_mask_shape(mask.shape, x.shape)
    return mask

  def _check_can_update(self):
    if (
      self.trainable
      and not self.is_initializing()
      and not self.is_mutable_collection("batch_stats")
    ):
      raise ValueError(
        "`training=True` updates the moving statistics, so the 'batch_stats' collection must "
        "be mutable: call `layer.apply(variables, x, training=True, "
        "mutable=['batch_stats'])` and keep the returned updates (or construct the layer "
        "with `trainable=False` to freeze them)."
      )

  def _sow_penalties(self, gamma, beta, keras_shape):
    """Sows Keras's weight penalties, once per weight however often the layer is called (a
    shared layer's penalty is not multiplied), on the weight in Keras's parameter shape."""
    if not self.is_mutable_collection("losses") or self.is_initializing():
      return
    for name, weight in (("gamma_regularizer", gamma), ("beta_regularizer", beta)):
      penalty = regularizers.get(getattr(self, name), argument=name)
      if penalty is not None and weight is not None:
        value = jnp.asarray(penalty(jnp.reshape(weight, keras_shape)), jnp.float32)
        self.sow("losses", name, value, reduce_fn=lambda _, new: new, init_fn=lambda: None)

  def _adjustment(self, shape: tuple[int, ...]):
    """Calls the user's adjustment with the shape (and a key if it asks for one)."""
    kwargs = {}
    if "key" in inspect.signature(self.adjustment).parameters:
      kwargs["key"] = self.make_rng("adjustment")
    adjust_scale, adjust_bias = self.adjustment(tuple(shape), **kwargs)
    # NumPy broadcasting, made explicit so that strict rank promotion accepts a ``(C,)`` result.
    results = []
    for part, value in (("scale", adjust_scale), ("bias", adjust_bias)):
      value = jnp.asarray(value)
      _validation.check_adjustment_shape(part, value.shape, tuple(shape))
      value = value.astype(functional.reduction_dtype(value.dtype))
      results.append(value.reshape((1,) * (len(shape) - value.ndim) + value.shape))
    return tuple(results)

  def _variables(self, feature_shape, keras_shape) -> dict[str, Any]:
    """Creates (or fetches and shape-checks) every variable of the layer."""
    stats_dtype = functional.promote_dtypes(self.param_dtype, jnp.float32)
    mean_init = initializers.get(self.moving_mean_initializer)
    variance_init = initializers.get(self.moving_variance_initializer)

    def stat(name, init, transform=None):
      if self.has_variable("batch_stats", name):
        existing = self.get_variable("batch_stats", name)
        _validation.check_feature_shape(name, existing.shape, feature_shape)

      def make():
        value = init(self.make_rng("params"), keras_shape, stats_dtype).reshape(feature_shape)
        return value if transform is None else transform(value)

      return self.variable("batch_stats", name, make)

    variables = {}
    for name, init_arg, enabled in (
      ("gamma", "gamma_initializer", self.scale),
      ("beta", "beta_initializer", self.center),
    ):
      if not enabled:
        continue
      if self.has_variable("params", name):
        _validation.check_feature_shape(
          name, self.get_variable("params", name).shape, feature_shape
        )
      init = initializers.get(getattr(self, init_arg), argument=init_arg)
      variables[name] = self.param(
        name, lambda key, init=init: init(key, keras_shape, self.param_dtype).reshape(feature_shape)
      )
    variables["moving_mean"] = stat("moving_mean", mean_init)
    variables["moving_variance"] = stat("moving_variance", variance_init)
    if self.renorm:
      variables["moving_stddev"] = stat("moving_stddev", variance_init, jnp.sqrt)
      variables["renorm_mean"] = stat("renorm_mean", mean_init)
      variables["renorm_stddev"] = stat("renorm_stddev", variance_init, jnp.sqrt)
    return variables


_INITIALIZER_ARGS = (
  "beta_initializer",
  "gamma_initializer",
  "moving_mean_initializer",
  "moving_variance_initializer",
)
_REGULARIZER_ARGS = ("beta_regularizer", "gamma_regularizer")
_CONSTRAINT_ARGS = ("beta_constraint", "gamma_constraint")
# Lists and dicts (Keras configs, axes, clipping bounds, groups) are frozen so modules hash.
_HASHABLE_CONFIG_ARGS = (
  ("axis", "renorm_clipping", "axis_index_groups")
  + _INITIALIZER_ARGS
  + _REGULARIZER_ARGS
  + _CONSTRAINT_ARGS
)


def _keras_param_shape(
  feature_axes: tuple[int, ...], shape: tuple[int | None, ...], *, ghost: bool
) -> tuple[int, ...]:
  """Keras's weight shape (spec section 2, step 6).

  Args:
    feature_axes: the normalized feature axes, in increasing order.
    shape: the input shape (only the feature sizes are read).
    ghost: whether ghost batches are used.

  Returns:
    ``(C,)`` for one feature axis without ghost batches; otherwise the input rank with 1 on the
    other axes, and one more 1 inserted at index 1 with ghost batches.
  """
  if len(feature_axes) == 1 and not ghost:
    return (shape[feature_axes[0]],)
  full = tuple(shape[a] if a in feature_axes else 1 for a in range(len(shape)))
  return full[:1] + (1,) + full[1:] if ghost else full


def _check_axis_name_bound(axis_name) -> None:
  """Raises a clear error when no enclosing `shard_map`/`pmap`/`vmap` binds `axis_name`."""
  try:
    jax.lax.axis_size(axis_name)
  except NameError as error:
    raise ValueError(
      f"`axis_name`={axis_name!r} is not bound: cross-device statistics need the training call "
      f"to run inside `jax.shard_map` (or `jax.pmap`/`jax.vmap`) over an axis named "
      f"{axis_name!r}. Call the step under that transformation, or construct the layer with "
      "`axis_name=None` for single-device statistics."
    ) from error


def _broadcast(value, feature_axes: tuple[int, ...], ndim: int):
  """Reshapes a feature-shaped array so it broadcasts against a rank-`ndim` input."""
  if value is None:
    return None
  value = value.value if isinstance(value, nn.Variable) else value
  shape = [1] * ndim
  for axis, size in zip(feature_axes, value.shape, strict=True):
    shape[axis] = size
  return jnp.reshape(value, shape)
