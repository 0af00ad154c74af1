"""PyTorch interop: ``torch.nn.BatchNorm1d/2d/3d`` state dicts in and out.

`from_state_dict` turns a PyTorch batch-norm state dict into a `kbn_jax.BatchNormalization`
with ``semantics="torch"`` and its Flax variables; `to_state_dict` goes back. torch is never
imported: the state dict may hold torch tensors or NumPy arrays.

PyTorch's conventions differ from Keras's, and the converters translate them:

* ``momentum``: PyTorch's is the weight of the *new* value (default 0.1); kbn_jax keeps the
  Keras convention (weight of the old value), so ``momentum=0.1`` becomes ``0.9``.
  ``momentum=None`` (PyTorch's cumulative average) stays None and uses ``num_batches_tracked``.
* ``eps`` defaults to 1e-5 (Keras: 1e-3); the channel axis is 1 (NCHW).
* The running variance moves toward the *unbiased* batch variance at every rank, and
  ``num_batches_tracked`` counts training calls: both are what ``semantics="torch"`` does.
* ``affine=False`` (no ``weight``/``bias``) maps to ``scale=False, center=False``.
* ``track_running_stats=False`` (no buffers): PyTorch normalizes with batch statistics in
  training *and* eval. The layer comes back with ``trainable=False`` (no updates) and
  ``use_running_average=False``, so calls without ``training=`` use batch statistics as PyTorch
  does; its (unused) statistics are 0 and 1.

Example::

  >>> import numpy as np
  >>> from kbn_jax import torch_compat
  >>> state = {"weight": np.ones(3), "bias": np.zeros(3), "running_mean": np.zeros(3),
  ...          "running_var": np.ones(3), "num_batches_tracked": np.array(7)}
  >>> layer, variables = torch_compat.from_state_dict(state)
  >>> layer.momentum, layer.epsilon, int(variables["batch_stats"]["num_batches_tracked"])
  (0.9, 1e-05, 7)
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from kbn_jax import _grafting, _suspicious
from kbn_jax.linen import BatchNormalization

_PARAMS = {"weight": "gamma", "bias": "beta"}
_BUFFERS = {"running_mean": "moving_mean", "running_var": "moving_variance"}
_KNOWN = set(_PARAMS) | set(_BUFFERS) | {"num_batches_tracked"}
_COUNTER_MAX = np.iinfo(np.int32).max  # the layer keeps num_batches_tracked as int32
_SHOWN = 6  # prefixes or keys an error lists before "and N more"
_NOT_GIVEN: Any = type("_NotGiven", (), {"__repr__": lambda self: "<not given>"})()
_DEFAULTS_WARNING = (
  "a state dict does not hold `momentum` or `eps`: {count} batch norms loaded with PyTorch's "
  "defaults (momentum={momentum}, eps={eps}); pass the values the modules were built with, once "
  "or per layer (torchvision's MobileNetV3 uses momentum=0.01, eps=1e-3; a wrong eps changes "
  "every output, a wrong momentum every running statistic)."
)


def _listing(names: list[str]) -> str:
  """At most `_SHOWN` names, then how many more."""
  shown = ", ".join(repr(n) for n in names[:_SHOWN])
  return shown if len(names) <= _SHOWN else f"{shown} and {len(names) - _SHOWN} more"


def batch_norm_prefixes(state_dict: Mapping[Any, Any]) -> list[str]:
  """The key prefixes of every batch norm in a whole model's state dict, in its order.

  A batch norm is found by its ``running_mean`` buffer (``affine`` or not); layers built with
  ``track_running_stats=False`` hold no buffer and are not found.

  Args:
    state_dict: ``model.state_dict()`` (torch tensors or NumPy arrays).

  Returns:
    The prefixes with their trailing dot, e.g. ``["bn1.", "layer1.0.bn1.", ...]`` (``""`` for
    a state dict of one batch norm).
  """
  return [
    key[: -len("running_mean")]
    for key in state_dict
    if isinstance(key, str) and (key == "running_mean" or key.endswith(".running_mean"))
  ]


def _prefix_hint(state_dict: Mapping[str, Any], prefix: str) -> str:
  """Why `prefix` selects no batch norm, and the prefix the user probably meant."""
  prefixes = batch_norm_prefixes(state_dict)
  if prefix and not prefix.endswith(".") and f"{prefix}." in prefixes:
    return f"did you mean {prefix + '.'!r}? (a prefix ends with a dot)"
  if prefix in prefixes:
    return "the other keys are not a batch norm's: leave them out."
  close = difflib.get_close_matches(prefix, prefixes, n=3)
  if close:
    return f"did you mean {' or '.join(repr(c) for c in close)}?"
  if prefixes:
    return f"the state dict's batch norms: {_listing(prefixes)}."
  return "the state dict holds no `running_mean` buffer."


def _whole_model_error(state_dict: Mapping[str, Any], unknown: list[str], prefix: str) -> str:
  """Why the keys under `prefix` are not one batch norm's, with the likely fix."""
  prefixes = batch_norm_prefixes(state_dict)
  if prefix and not prefix.endswith(".") and f"{prefix}." in prefixes:
    return f"`prefix`={prefix!r} leaves a dot before every key: {_prefix_hint(state_dict, prefix)}"
  under = [p for p in prefixes if p.startswith(prefix)]
  if len(under) > 1:
    return (
      f"`state_dict` holds {len(under)} batch norms ({_listing(under)}), not one: pass one "
      "layer's key prefix as `prefix=`, or load them all with "
      "torch_compat.load_batch_norms(state_dict)."
    )
  return (
    f"`state_dict` has keys {_listing(unknown)} that a PyTorch BatchNorm layer does not have; "
    f"pass one layer's entries (known: {sorted(_KNOWN)}), or its key prefix as `prefix=` "
    f"({_prefix_hint(state_dict, prefix)})"
  )


def _to_numpy(value: Any, key: str) -> np.ndarray:
  """A NumPy copy of a torch tensor (without importing torch) or array-like, named by `key`."""
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
      value = value.float()
    value = value.numpy()
  try:
    return np.array(value)
  except (TypeError, ValueError) as error:
    raise TypeError(f"state_dict[{key!r}] is not an array ({error}).") from None


def _vector(value: Any, key: str) -> np.ndarray:
  """A parameter or buffer as a real floating vector, named by `key` in every error."""
  array = _to_numpy(value, key)
  if array.dtype.kind != "f":
    raise TypeError(
      f"state_dict[{key!r}] has dtype {array.dtype}; a batch-norm weight or buffer is a real "
      "floating array (convert it with `.float()` or `np.asarray(value, np.float32)`)."
    )
  if array.ndim != 1:
    raise ValueError(
      f"state_dict[{key!r}] has shape {array.shape}; a batch-norm weight or buffer is a vector "
      "of shape (C,)."
    )
  with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf: warned
    return array.astype(np.float32)


def _counter(value: Any, key: str) -> int:
  """`num_batches_tracked` as a Python int: an integer scalar in [0, 2**31 - 1]."""
  array = _to_numpy(value, key)
  if array.dtype.kind not in "iu" or array.size != 1:
    raise TypeError(
      f"state_dict[{key!r}] is {array.dtype} of shape {array.shape}; it must be an integer "
      "scalar (PyTorch keeps an int64 0-d tensor)."
    )
  count = int(array.reshape(()))
  if not 0 <= count <= _COUNTER_MAX:
    raise ValueError(
      f"state_dict[{key!r}]={count} must be a count of training calls in [0, {_COUNTER_MAX}]."
    )
  return count


def _warn_suspicious(arrays: Mapping[str, np.ndarray], layer: str) -> None:
  """Warns for NaN/Inf values and negative variances, which PyTorch loads silently."""
  found = _suspicious.describe(arrays, variances=("running_var",))
  if found:
    warnings.warn(
      f"PyTorch batch norm {layer}: {found}; loaded as they are, as PyTorch does (inference "
      "gives NaN where a running variance is negative).",
      stacklevel=3,
    )


def from_state_dict(
  state_dict: Mapping[str, Any],
  *,
  momentum: float | None = 0.1,
  eps: float = 1e-5,
  axis: int = 1,
  prefix: str = "",
) -> tuple[BatchNormalization, dict[str, dict[str, Any]]]:
  """A `kbn_jax.BatchNormalization` and its variables from a PyTorch batch-norm state dict.

  NaN or infinite values and negative running variances load as PyTorch loads them, with a
  warning that names the layer and counts them.

  Args:
    state_dict: ``module.state_dict()`` of a ``BatchNorm1d/2d/3d`` (torch tensors or NumPy
      arrays): ``weight`` and ``bias`` (with ``affine``), ``running_mean``, ``running_var`` and
      ``num_batches_tracked`` (with ``track_running_stats``), or a whole model's with `prefix`.
    momentum: the PyTorch module's ``momentum`` (PyTorch's convention; None for the cumulative
      average). A state dict does not hold it: pass what the module was built with.
    eps: the PyTorch module's ``eps``.
    axis: the channel axis of the inputs (1 for PyTorch's NCHW; -1 for channels-last data).
    prefix: the layer's key prefix in a whole model's state dict, e.g. ``"layer1.0.bn1."``
      (`load_batch_norms` loads every batch norm of a model).

  Returns:
    ``(layer, variables)``: the layer (``semantics="torch"``) and ``{"params": {"gamma",
    "beta"}, "batch_stats": {"moving_mean", "moving_variance", "num_batches_tracked"}}``.

  Raises:
    TypeError: for a non-string key, or a value that is not a real floating vector (an integer
      scalar for ``num_batches_tracked``), naming the key.
    ValueError: for unknown, missing or unpaired keys (the message suggests the prefix),
      mismatched shapes, a negative or non-integer counter, or a momentum outside [0, 1].
  """
  if not isinstance(state_dict, Mapping):
    raise TypeError(f"`state_dict` must be a mapping of names to arrays, got {state_dict!r:.80}.")
  if not isinstance(prefix, str):
    raise TypeError(f"`prefix` must be a string such as 'layer1.0.bn1.', got {prefix!r}.")
  for key in state_dict:
    if not isinstance(key, str):
      raise TypeError(f"`state_dict` key {key!r} is not a string; PyTorch's keys are names.")
  entries = {
    key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)
  }
  if not entries:
    raise ValueError(
      f"`state_dict` has no key starting with `prefix`={prefix!r}: "
      f"{_prefix_hint(state_dict, prefix)}"
    )
  unknown = sorted(set(entries) - _KNOWN)
  if unknown:
    raise ValueError(_whole_model_error(state_dict, [prefix + k for k in unknown], prefix))
  if momentum is not None and not (
    isinstance(momentum, (int, float))
    and not isinstance(momentum, bool)
    and math.isfinite(momentum)
    and 0 <= momentum <= 1
  ):
    raise ValueError(
      f"`momentum`={momentum!r} must be PyTorch's momentum in [0, 1] (the weight of the new "
      "value, default 0.1) or None (cumulative average)."
    )
  for first, second in (("weight", "bias"), ("running_mean", "running_var")):
    if (first in entries) != (second in entries):
      present, absent = (first, second) if first in entries else (second, first)
      raise ValueError(
        f"`state_dict` has {prefix + present!r} but not {prefix + absent!r}; a PyTorch "
        f"BatchNorm holds `{first}` and `{second}` together: pass both."
      )
  arrays = {
    key: _vector(value, prefix + key)
    for key, value in entries.items()
    if key != "num_batches_tracked"
  }
  count = (
    _counter(entries["num_batches_tracked"], prefix + "num_batches_tracked")
    if ("num_batches_tracked" in entries)
    else 0
  )
  tracked = "running_mean" in arrays
  if not arrays:
    raise ValueError(
      "`state_dict` holds neither parameters nor running statistics (affine=False and "
      "track_running_stats=False): the layer has no state; build "
      "kbn_jax.BatchNormalization(axis=1, epsilon=eps, center=False, scale=False, "
      "semantics='torch', trainable=False, use_running_average=False) directly."
    )
  shapes = {prefix + key: value.shape for key, value in arrays.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"`state_dict` vectors must all have shape (C,), got {shapes}.")
  _warn_suspicious(arrays, repr(prefix[:-1] if prefix.endswith(".") else prefix or "state_dict"))
  layer = BatchNormalization(
    axis=axis,
    momentum=None if momentum is None else 1.0 - momentum,
    epsilon=eps,
    center="bias" in arrays,
    scale="weight" in arrays,
    trainable=tracked,
    use_running_average=None if tracked else False,
    semantics="torch",
  )
  channels = next(iter(shapes.values()))
  params = {
    ours: jnp.asarray(arrays[theirs]) for theirs, ours in _PARAMS.items() if theirs in arrays
  }
  stats = {
    "moving_mean": jnp.zeros(channels, jnp.float32),
    "moving_variance": jnp.ones(channels, jnp.float32),
    "num_batches_tracked": jnp.asarray(count, jnp.int32),
  }
  for theirs, ours in _BUFFERS.items():
    if theirs in arrays:
      stats[ours] = jnp.asarray(arrays[theirs])
  variables = {"batch_stats": stats}
  if params:
    variables["params"] = params
  return layer, variables


def _per_layer(value: Any, argument: str, names: list[str], default: Any) -> dict[str, Any]:
  """`value` for every layer: one value, or a mapping that names each layer exactly once."""
  if value is _NOT_GIVEN:
    return dict.fromkeys(names, default)
  if not isinstance(value, Mapping):
    return dict.fromkeys(names, value)
  missing, extra = sorted(set(names) - set(value)), sorted(set(value) - set(names))
  if missing or extra:
    raise ValueError(
      f"`{argument}` per layer must name every batch norm of the state dict: missing "
      f"{_listing(missing)}, unknown {_listing(extra)}; give one value for all, or a mapping "
      "with every name."
    )
  return dict(value)


def load_batch_norms(
  state_dict: Mapping[str, Any],
  *,
  momentum: float | None | Mapping[str, float | None] = _NOT_GIVEN,
  eps: float | Mapping[str, float] = _NOT_GIVEN,
  axis: int = 1,
) -> dict[str, tuple[BatchNormalization, dict[str, dict[str, Any]]]]:
  """Every batch norm of a whole PyTorch model's state dict, ready to run in JAX.

  A batch norm is found by its ``running_mean`` buffer (see `batch_norm_prefixes`). A state
  dict holds no ``momentum`` or ``eps``: pass them as the modules were built, once for all or
  per layer; without them PyTorch's defaults are used, with a warning.

  Args:
    state_dict: ``model.state_dict()`` (torch tensors or NumPy arrays).
    momentum: PyTorch's momentum (weight of the new value; None for the cumulative average),
      or ``{name: momentum}`` naming every batch norm (``"layer1.0.bn1"``). Default 0.1.
    eps: PyTorch's eps, or ``{name: eps}`` naming every batch norm. Default 1e-5.
    axis: the channel axis of the inputs (1 for NCHW).

  Returns:
    ``{name: (layer, variables)}`` in the state dict's order, named as PyTorch names the
    modules (``"layer1.0.bn1"``); see `from_state_dict`, and `graft_batch_norms` to place them.

  Raises:
    ValueError: for a state dict without batch norms, a per-layer mapping that does not name
      every layer, or a layer that `from_state_dict` refuses (naming its keys).
  """
  if not isinstance(state_dict, Mapping):
    raise TypeError(f"`state_dict` must be a mapping of names to arrays, got {state_dict!r:.80}.")
  prefixes = batch_norm_prefixes(state_dict)
  if not prefixes:
    raise ValueError(
      "`state_dict` holds no batch norm (no `running_mean` buffer); layers built with "
      "track_running_stats=False hold none: load them one by one with from_state_dict(prefix=)."
    )
  names = [p[:-1] if p.endswith(".") else p for p in prefixes]
  if momentum is _NOT_GIVEN or eps is _NOT_GIVEN:
    warnings.warn(_DEFAULTS_WARNING.format(count=len(names), momentum=0.1, eps=1e-5), stacklevel=2)
  momenta = _per_layer(momentum, "momentum", names, 0.1)
  epsilons = _per_layer(eps, "eps", names, 1e-5)
  layers = {}
  for name, prefix in zip(names, prefixes, strict=True):
    owned = {
      k: v for k, v in state_dict.items() if k.startswith(prefix) and k[len(prefix) :] in _KNOWN
    }
    layers[name] = from_state_dict(
      owned, momentum=momenta[name], eps=epsilons[name], axis=axis, prefix=prefix
    )
  return layers


def graft_batch_norms(
  loaded: Mapping[str, tuple[Any, Mapping[str, Any]]],
  target: Any,
  *,
  names: Mapping[str, str] | None = None,
) -> Any:
  """Places every batch norm of `load_batch_norms` into a model of your own.

  `kbn_jax.keras_compat.graft_batch_norms` with PyTorch's module names: by default
  ``"layer1.0.bn1"`` goes to the place ``"layer1/0/bn1"`` (an NNX model that mirrors the
  PyTorch one, lists as ``nnx.List``), other paths through `names`.

  Args:
    loaded: ``{name: (layer, variables)}`` from `load_batch_norms`.
    target: the model's linen variables (from ``model.init``) or an NNX Module.
    names: PyTorch name -> place path (``{"layer1.0.bn1": "layer1_0/bn1"}``) where the
      default does not fit.

  Returns:
    Linen: the complete variables. NNX: `target`, its batch norms set in place.

  Raises:
    ValueError: naming every batch norm without a place, every place without one, and every
      mismatch of feature size or (NNX) setting.
  """
  return _grafting.graft_batch_norms(
    loaded, target, names=names, default_path=lambda name: name.replace(".", "/")
  )


def to_state_dict(
  layer: Any, variables: Mapping[str, Mapping[str, Any]], *, track_running_stats: bool = True
) -> dict[str, np.ndarray]:
  """A PyTorch ``BatchNorm*d`` state dict (NumPy arrays, PyTorch's names and order).

  Args:
    layer: a ``semantics="torch"`` layer (linen or NNX), e.g. from `from_state_dict`.
    variables: its variables (``{"params": ..., "batch_stats": ...}``).
    track_running_stats: include the buffers (False for a module built with
      ``track_running_stats=False``).

  Returns:
    ``{"weight"?, "bias"?, "running_mean", "running_var", "num_batches_tracked"}``, float32
    vectors and an int64 0-d ``num_batches_tracked``; load it with
    ``module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})``.

  Raises:
    ValueError: for a layer without ``semantics="torch"`` or missing variables.
  """
  if getattr(layer, "semantics", None) != "torch":
    raise ValueError(
      f"`layer` has `semantics`={getattr(layer, 'semantics', None)!r}; PyTorch's running "
      "variance and counter need semantics='torch' (build the layer with from_state_dict, or "
      "pass semantics='torch')."
    )
  params = variables.get("params", {})
  stats = variables.get("batch_stats", {})
  state: dict[str, np.ndarray] = {}
  for theirs, ours in _PARAMS.items():
    if ours in params:
      state[theirs] = np.array(params[ours], np.float32)
  if track_running_stats:
    missing = [n for n in (*_BUFFERS.values(), "num_batches_tracked") if n not in stats]
    if missing:
      raise ValueError(
        f"`variables` lacks batch_stats {missing}; pass this layer's variables as `init` or "
        "`from_state_dict` returned them."
      )
    for theirs, ours in _BUFFERS.items():
      state[theirs] = np.array(stats[ours], np.float32)
    state["num_batches_tracked"] = np.array(stats["num_batches_tracked"], np.int64)
  return state
