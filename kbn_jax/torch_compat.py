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

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from kbn_jax.layers import BatchNormalization

_PARAMS = {"weight": "gamma", "bias": "beta"}
_BUFFERS = {"running_mean": "moving_mean", "running_var": "moving_variance"}
_KNOWN = set(_PARAMS) | set(_BUFFERS) | {"num_batches_tracked"}


def _to_numpy(value: Any, key: str) -> np.ndarray:
  """A NumPy copy of a torch tensor (without importing torch) or array-like."""
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu().numpy()
  array = np.asarray(value)
  if array.dtype == object:
    raise TypeError(f"state_dict[{key!r}] is not numeric: {type(value).__name__}.")
  return array


def from_state_dict(
  state_dict: Mapping[str, Any],
  *,
  momentum: float | None = 0.1,
  eps: float = 1e-5,
  axis: int = 1,
  prefix: str = "",
) -> tuple[BatchNormalization, dict[str, dict[str, Any]]]:
  """A `kbn_jax.BatchNormalization` and its variables from a PyTorch batch-norm state dict.

  Args:
    state_dict: ``module.state_dict()`` of a ``BatchNorm1d/2d/3d`` (torch tensors or NumPy
      arrays): ``weight``, ``bias`` (with ``affine``), ``running_mean``, ``running_var``,
      ``num_batches_tracked`` (with ``track_running_stats``).
    momentum: the PyTorch module's ``momentum`` (PyTorch's convention; None for the cumulative
      average). A state dict does not hold it: pass what the module was built with.
    eps: the PyTorch module's ``eps``.
    axis: the channel axis of the inputs (1 for PyTorch's NCHW; -1 for channels-last data).
    prefix: the layer's key prefix in a whole model's state dict, e.g. ``"layer1.0.bn1."``.

  Returns:
    ``(layer, variables)``: the layer (``semantics="torch"``) and ``{"params": {"gamma",
    "beta"}, "batch_stats": {"moving_mean", "moving_variance", "num_batches_tracked"}}``.

  Raises:
    ValueError: for unknown or missing keys, mismatched shapes, or a momentum outside [0, 1].
  """
  entries = {
    key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)
  }
  if not entries:
    raise ValueError(f"`state_dict` has no key starting with `prefix`={prefix!r}.")
  unknown = sorted(set(entries) - _KNOWN)
  if unknown:
    raise ValueError(
      f"`state_dict` has keys {unknown} that a PyTorch BatchNorm layer does not have; pass one "
      f"layer's entries (known: {sorted(_KNOWN)}), or its key prefix as `prefix=`."
    )
  if momentum is not None and not (
    isinstance(momentum, (int, float)) and not isinstance(momentum, bool) and 0 <= momentum <= 1
  ):
    raise ValueError(
      f"`momentum`={momentum!r} must be PyTorch's momentum in [0, 1] (the weight of the new "
      "value, default 0.1) or None (cumulative average)."
    )
  arrays = {key: _to_numpy(value, prefix + key) for key, value in entries.items()}
  tracked = "running_mean" in arrays or "running_var" in arrays
  if tracked and not ("running_mean" in arrays and "running_var" in arrays):
    raise ValueError("`state_dict` has only one of `running_mean` and `running_var`; pass both.")
  vectors = {key: value for key, value in arrays.items() if key != "num_batches_tracked"}
  if not vectors:
    raise ValueError(
      "`state_dict` holds neither parameters nor running statistics (affine=False and "
      "track_running_stats=False): the layer has no state; build "
      "kbn_jax.BatchNormalization(axis=1, epsilon=eps, center=False, scale=False, "
      "semantics='torch', trainable=False, use_running_average=False) directly."
    )
  shapes = {key: value.shape for key, value in vectors.items()}
  if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
    raise ValueError(f"`state_dict` vectors must all have shape (C,), got {shapes}.")
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
    ours: jnp.asarray(arrays[theirs], jnp.float32)
    for theirs, ours in _PARAMS.items()
    if theirs in arrays
  }
  stats = {
    "moving_mean": jnp.zeros(channels, jnp.float32),
    "moving_variance": jnp.ones(channels, jnp.float32),
    "num_batches_tracked": jnp.asarray(int(arrays.get("num_batches_tracked", 0)), jnp.int32),
  }
  for theirs, ours in _BUFFERS.items():
    if theirs in arrays:
      stats[ours] = jnp.asarray(arrays[theirs], jnp.float32)
  variables = {"batch_stats": stats}
  if params:
    variables["params"] = params
  return layer, variables


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
      state[theirs] = np.asarray(params[ours], np.float32)
  if track_running_stats:
    missing = [n for n in (*_BUFFERS.values(), "num_batches_tracked") if n not in stats]
    if missing:
      raise ValueError(
        f"`variables` lacks batch_stats {missing}; pass this layer's variables as `init` or "
        "`from_state_dict` returned them."
      )
    for theirs, ours in _BUFFERS.items():
      state[theirs] = np.asarray(stats[ours], np.float32)
    state["num_batches_tracked"] = np.asarray(stats["num_batches_tracked"], np.int64)
  return state
