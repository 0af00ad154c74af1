"""`BatchNormalization`: the Keras 2.x V1 layer as a `flax.linen` Module.

The Module is a thin shell over `kbn_jax.functional.batch_normalization`. It validates its
configuration (a `BatchNormConfig`), creates or fetches the variables, makes one call of the
pure function, and writes the moving statistics to the ``batch_stats`` collection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict
from jax.typing import DTypeLike

from kbn_jax import _keras_config, _layer, _variables
from kbn_jax._config import HASHABLE_ARGS, BatchNormConfig, freeze

_NOT_GIVEN: Any = type("NotGiven", (), {"__repr__": lambda self: "<not given>"})()

LINEN = _layer.Hints(
  training_hint=(
    "under `jax.jit`, mark the argument that carries it static (`static_argnames` or "
    "`static_argnums`); under `nn.jit` or `nn.remat`, pass `static_argnums` for its position; "
    "or set `use_running_average` on the Module instead"
  ),
  missing_hint="pass the variables that `init` returned.",
  mapping_hint="`jax.shard_map` (or `jax.pmap`/`jax.vmap`/`nn.vmap`)",
)


_IMMUTABLE_STATS = (
  "`training=True` updates the moving statistics, so the 'batch_stats' collection must be "
  "mutable: call `layer.apply(variables, x, training=True, mutable=['batch_stats'])`, or "
  "construct the layer with `trainable=False`."
)
_NO_MODE = (
  "No mode was given: pass `training=True` (or False) to the call, or set "
  "`use_running_average` on the Module. 'batch_stats' is mutable, so this looks like a "
  "training call; pass `training=None` for Keras's default (inference)."
)


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
    use_running_average: Flax's mode attribute: ``True`` for inference, ``False`` for training,
      ``None`` to take the mode from the call's `training`. A call's `training` overrides it
      (``training=None`` defers to it); contradicting values raise.
    semantics: ``"keras_v1"`` (default), ``"keras_v2"``, ``"keras3"`` or ``"torch"``: whose layer
      is reproduced (see `kbn_jax.functional.BatchNormConfig`).
    ghost_batch_scope: ``"device"`` (default) or ``"global"``: where ghost batches live under
      `axis_name`.
  """

  axis: int | Sequence[int] = -1
  momentum: float | None = 0.99
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
  use_running_average: bool | None = None
  semantics: str = "keras_v1"
  ghost_batch_scope: str = "device"

  def __post_init__(self):
    config = BatchNormConfig.from_attributes(self)  # validates every argument
    _layer.check_optional_bool("use_running_average", self.use_running_average)
    for name in HASHABLE_ARGS:  # after validation, so errors show the values as given
      object.__setattr__(self, name, freeze(getattr(self, name), FrozenDict))
    object.__setattr__(self, "dtype", config.dtype)
    object.__setattr__(self, "param_dtype", config.param_dtype)
    object.__setattr__(self, "_bn_config", config)
    super().__post_init__()

  @property
  def config(self) -> BatchNormConfig:
    """The layer's validated `BatchNormConfig` (what `kbn_jax.functional` takes)."""
    return self._bn_config

  @classmethod
  def from_keras_config(cls, config: Mapping[str, Any], **kwargs: Any) -> BatchNormalization:
    """Builds the layer from a Keras ``get_config()`` dict; keyword arguments as for
    `kbn_jax.keras_compat.from_keras_config` (e.g. ``axis_name="batch"``, ``keep_name=True``,
    ``semantics="keras_v2"``)."""
    fields = {field.name for field in dataclasses.fields(cls)} - {"parent"}
    return cls(**_keras_config.config_kwargs(config, fields=fields, **kwargs))

  def to_keras_config(self) -> dict[str, Any]:
    """A config dict that ``tf_keras``'s V1 ``BatchNormalization.from_config`` accepts."""
    return _keras_config.to_keras(self.config, self.name)

  @nn.compact
  def __call__(
    self,
    inputs: jax.typing.ArrayLike,
    training: bool | None = _NOT_GIVEN,
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
        ``None`` takes the mode from `use_running_average`, else inference (Keras's learning
        phase). Left out, the mode comes from `use_running_average`; if that is unset too, the
        call is inference, except that a call with ``batch_stats`` mutable raises (it looks like
        a forgotten ``training=True``).
      mask: optional ``inputs.shape[:-1]`` weights for padding-aware moments (Keras >= 2.12);
        masked-out positions must hold finite values (the weights are multiplied in). Ignored
        with a warning on fused configurations, as in Keras.
      renorm_clipping: optional per-call clipping bounds (may be traced, e.g. a warm-up
        schedule under ``jit``); they override the attribute of the same name.

    Returns:
      The normalized array, of dtype `dtype` or the promotion of input and parameter dtypes.
    """
    config = self.config
    training = self._mode(training)
    x = jnp.asarray(inputs)
    initializing = self.is_initializing()
    params, stats = self._variables(x.shape, initializing)
    updating = _layer.updates_statistics(config, training) and not initializing
    if updating and not self.is_mutable_collection("batch_stats"):
      raise ValueError(_IMMUTABLE_STATS)
    if training and not initializing and self.is_mutable_collection("losses"):
      for name, value in _variables.regularization_penalties(config, params, x.shape).items():
        self.sow("losses", name, value, reduce_fn=lambda _, new: new, init_fn=lambda: None)
    adjustment_key = None
    if training and _variables.adjustment_takes_key(config):
      adjustment_key = self.make_rng("adjustment")
    y, new_stats = _layer.run(
      x,
      params,
      {name: variable.value for name, variable in stats.items()},
      config,
      training=training,
      mask=mask,
      renorm_clipping=renorm_clipping,
      adjustment_key=adjustment_key,
      axis_name=None if initializing else config.axis_name,
      hints=LINEN,
    )
    if updating:
      for name, variable in stats.items():
        variable.value = new_stats[name]
    return y

  @nn.nowrap
  def _mode(self, training: Any) -> bool:
    """Resolves the call's `training` against `use_running_average` (Flax's mode idiom)."""
    mode = self.use_running_average
    if training is _NOT_GIVEN or training is None:
      if mode is not None:
        return not mode
      if training is _NOT_GIVEN and self.is_mutable_collection("batch_stats"):
        if not self.is_initializing():
          raise ValueError(_NO_MODE)
      return False
    training = _layer.check_training(training, LINEN)
    if mode is not None and training == mode:
      raise ValueError(
        f"`training`={training} contradicts `use_running_average`={mode} set on the Module; "
        "pass one of them, or values that agree (training = not use_running_average)."
      )
    return training

  @nn.nowrap
  def _variables(self, input_shape, initializing):
    """Creates (at `init`) or fetches and shape-checks every variable of the layer."""
    config = self.config
    if not initializing and not self.has_variable("batch_stats", "moving_mean"):
      raise ValueError(
        f"`batch_stats` of {type(self).__name__} '{self.name}' not found in the variables: pass "
        "`{'params': ..., 'batch_stats': ...}` as `init` returned them (a TrainState or "
        "checkpoint that kept only `params` lacks the moving statistics)."
      )

    def initial(name):
      return lambda key=None: _variables.initial_value(config, name, key, input_shape)

    feature_shape = _variables.feature_shape(config, input_shape)
    params = {}
    for name in _variables.param_names(config):
      if self.has_variable("params", name):  # before Flax's own check, with our message
        existing = jnp.shape(self.get_variable("params", name))
        _layer.check_feature_shape(name, existing, feature_shape, LINEN.feature_hint)
      params[name] = self.param(name, initial(name))
    stats = {}
    for name in _variables.stat_names(config):
      if initializing and not self.has_variable("batch_stats", name):
        key = self.make_rng("params") if _variables.initializer_needs_key(config, name) else None
        stats[name] = self.variable("batch_stats", name, initial(name), key)
      else:
        stats[name] = self.variable("batch_stats", name)
    return params, stats
