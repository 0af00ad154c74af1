"""`kbn_jax.torch_compat` (issue 12): conventions, round trips and errors.

The numbers against real PyTorch are in tests/framework_parity (14 recorded BatchNorm cases).
"""

import numpy as np
import pytest

import kbn_jax
from kbn_jax import torch_compat


def _state(channels=3, **extra):
  rng = np.random.default_rng(0)
  state = {
    "weight": rng.uniform(0.5, 1.5, channels).astype(np.float32),
    "bias": rng.normal(size=channels).astype(np.float32),
    "running_mean": rng.normal(size=channels).astype(np.float32),
    "running_var": rng.uniform(0.5, 2, channels).astype(np.float32),
    "num_batches_tracked": np.array(12, np.int64),
  }
  return {**state, **extra}


def test_round_trip_keeps_every_entry_and_pytorch_types():
  state = _state()
  layer, variables = torch_compat.from_state_dict(state, momentum=0.3, eps=1e-4)
  assert (layer.momentum, layer.epsilon, layer.axis, layer.semantics) == (0.7, 1e-4, 1, "torch")
  back = torch_compat.to_state_dict(layer, variables)
  assert list(back) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
  for key, value in state.items():
    np.testing.assert_array_equal(back[key], value)
  assert back["num_batches_tracked"].dtype == np.int64 and back["num_batches_tracked"].shape == ()


def test_prefix_affine_false_and_cumulative_momentum():
  model_state = {f"layer1.bn.{k}": v for k, v in _state().items() if k not in ("weight", "bias")}
  layer, variables = torch_compat.from_state_dict(model_state, momentum=None, prefix="layer1.bn.")
  assert layer.momentum is None and not layer.scale and not layer.center
  assert "params" not in variables


def test_no_running_statistics_means_batch_statistics_always():
  layer, variables = torch_compat.from_state_dict({"weight": np.ones(3), "bias": np.zeros(3)})
  assert layer.use_running_average is False and layer.trainable is False
  x = np.random.default_rng(1).normal(3.0, 2.0, (6, 3)).astype(np.float32)
  y = layer.apply(variables, x)  # eval as PyTorch does it: the batch's own statistics
  np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)
  assert torch_compat.to_state_dict(layer, variables, track_running_stats=False).keys() == {
    "weight",
    "bias",
  }


@pytest.mark.parametrize(
  ("state", "kwargs", "message"),
  [
    (_state(extra=np.ones(3)), {}, r"keys \['extra'\] that a PyTorch BatchNorm layer"),
    (_state(), {"momentum": 1.5}, r"`momentum`=1.5 must be PyTorch's momentum"),
    ({"running_mean": np.zeros(3)}, {}, "only one of `running_mean` and `running_var`"),
    ({}, {"prefix": "bn."}, "no key starting with `prefix`='bn.'"),
    (_state(running_var=np.ones(4)), {}, r"must all have shape \(C,\)"),
    ({"num_batches_tracked": np.array(0)}, {}, "neither parameters nor running statistics"),
  ],
)
def test_bad_state_dicts_raise(state, kwargs, message):
  with pytest.raises(ValueError, match=message):
    torch_compat.from_state_dict(state, **kwargs)


def test_to_state_dict_needs_torch_semantics():
  layer = kbn_jax.BatchNormalization()
  with pytest.raises(ValueError, match="semantics='torch'"):
    torch_compat.to_state_dict(layer, {})
