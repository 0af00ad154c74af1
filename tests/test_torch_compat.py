"""`kbn_jax.torch_compat`: conventions, round trips and errors.

The numbers against real PyTorch are in tests/oracles/framework_parity (14 recorded BatchNorm
cases).
"""

import warnings

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
    (_state(extra=np.ones(3)), {}, r"keys 'extra' that a PyTorch BatchNorm .* leave them out"),
    (_state(), {"momentum": 1.5}, r"`momentum`=1.5 must be PyTorch's momentum"),
    ({"running_mean": np.zeros(3)}, {}, "has 'running_mean' but not 'running_var'"),
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


def _model_state(*names):
  """A whole model's state dict: a conv weight and one batch norm per name."""
  state = {"conv1.weight": np.ones((3, 3, 1, 1), np.float32)}
  for name in names:
    state.update({f"{name}.{k}": v for k, v in _state().items()})
  return state


_MODEL = _model_state("bn1", "layer1.0.bn1", "layer1.0.bn2")


@pytest.mark.parametrize(
  ("state", "error", "message"),
  [  # issue 17: every value checked, every error naming its key
    (_state(weight=np.ones(3, np.complex64)), TypeError, r"\['weight'\] has dtype complex64"),
    (_state(bias=np.array(["0", "1", "2"])), TypeError, r"\['bias'\] has dtype <U1"),
    (_state(running_mean=np.ones(3, bool)), TypeError, r"\['running_mean'\] has dtype bool"),
    (_state(running_var=[[1.0, 2.0], [3.0]]), TypeError, r"\['running_var'\] is not an array"),
    (_state(weight=np.ones((3, 1), np.float32)), ValueError, r"shape \(3, 1\); .* \(C,\)"),
    (_state(num_batches_tracked=3.7), TypeError, "'num_batches_tracked'.* integer scalar"),
    (_state(num_batches_tracked=np.array(-5)), ValueError, r"=-5 must be a count"),
    (_state(num_batches_tracked=2**40), ValueError, r"=1099511627776 must be a count"),
    (_state(num_batches_tracked=2**70), TypeError, "'num_batches_tracked'.* integer scalar"),
    (_state(num_batches_tracked=np.ones(2, int)), TypeError, r"of shape \(2,\)"),
    ({"weight": np.ones(3, np.float32)}, ValueError, "has 'weight' but not 'bias'"),
    ({**_state(), 3: np.ones(3)}, TypeError, "key 3 is not a string"),
  ],
)
def test_invalid_values_raise_naming_the_key(state, error, message):
  with pytest.raises(error, match=message):
    torch_compat.from_state_dict(state)


def test_suspicious_values_load_with_a_warning_naming_layer_and_count():
  bad = {"bn1.running_var": np.array([1.0, -2.0, np.nan], np.float32)}
  bad["bn1.weight"] = np.array([np.inf, 1.0, 1.0], np.float32)
  expected = "'bn1': 1 non-finite value in 'weight', 1 non-finite value in 'running_var', 1 neg"
  with pytest.warns(UserWarning, match=expected):
    _, variables = torch_compat.from_state_dict({**_MODEL, **bad}, prefix="bn1.")
  np.testing.assert_array_equal(variables["batch_stats"]["moving_variance"], [1.0, -2.0, np.nan])
  with pytest.warns(UserWarning, match="1 negative value in 'running_var'"):
    torch_compat.from_state_dict({**_MODEL, **bad}, prefix="bn1.")
  with pytest.warns(UserWarning, match="3 non-finite values in 'bias'"):  # float64 beyond float32
    torch_compat.from_state_dict(_state(bias=np.full(3, 1e300)))


@pytest.mark.parametrize(
  ("prefix", "message"),
  [
    ("", r"holds 3 batch norms \('bn1\.', 'layer1\.0\.bn1\.', 'layer1\.0\.bn2\.'\), not one"),
    ("layer1.0.bn1", r"did you mean 'layer1\.0\.bn1\.'\? \(a prefix ends with a dot\)"),
    ("layer1.0.bn", r"holds 2 batch norms"),
    ("layer1.0.bn3.", r"no key starting with .*did you mean 'layer1\.0\.bn[12]\.'"),
    ("conv", r"keys 'conv1\.weight' that a PyTorch BatchNorm layer does not have"),
  ],
)
def test_whole_model_errors_suggest_the_prefix(prefix, message):
  with pytest.raises(ValueError, match=message) as error:
    torch_compat.from_state_dict(_MODEL, prefix=prefix)
  assert len(str(error.value)) < 400  # issue 20: was 3,574 characters for a ResNet


def test_long_listings_are_cut():
  state = _model_state(*(f"features.{i}.1" for i in range(40)))
  with pytest.raises(ValueError, match=r"holds 40 batch norms .* and 34 more\), not one"):
    torch_compat.from_state_dict(state)


def test_to_state_dict_returns_writable_arrays():
  layer, variables = torch_compat.from_state_dict(_state())
  back = torch_compat.to_state_dict(layer, variables)
  assert all(value.flags.writeable for value in back.values())


def test_load_batch_norms_finds_every_layer_and_translates_momentum():
  loaded = torch_compat.load_batch_norms(
    _MODEL, momentum={"bn1": 0.01, "layer1.0.bn1": None, "layer1.0.bn2": 0.1}, eps=1e-3
  )
  assert list(loaded) == ["bn1", "layer1.0.bn1", "layer1.0.bn2"]
  settings = [(m.momentum, m.epsilon, m.semantics) for m, _ in loaded.values()]
  assert settings == [(0.99, 1e-3, "torch"), (None, 1e-3, "torch"), (0.9, 1e-3, "torch")]
  layer, variables = loaded["layer1.0.bn2"]
  back = torch_compat.to_state_dict(layer, variables)
  for key, value in back.items():
    np.testing.assert_array_equal(value, _MODEL[f"layer1.0.bn2.{key}"])


def test_load_batch_norms_warns_without_momentum_and_eps():
  with pytest.warns(UserWarning, match=r"3 batch norms loaded with PyTorch's defaults"):
    loaded = torch_compat.load_batch_norms(_MODEL)
  assert {(m.momentum, m.epsilon) for m, _ in loaded.values()} == {(0.9, 1e-5)}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    torch_compat.load_batch_norms(_MODEL, momentum=0.1, eps=1e-5)


@pytest.mark.parametrize(
  ("state", "kwargs", "message"),
  [
    (_MODEL, {"momentum": {"bn1": 0.1}, "eps": 1e-5}, r"missing 'layer1\.0\.bn1', 'layer1"),
    (_MODEL, {"momentum": 0.1, "eps": {"bn": 1e-5}}, r"`eps` per layer .* unknown 'bn'"),
    ({"conv.weight": np.ones(3)}, {"momentum": 0.1, "eps": 1e-5}, "holds no batch norm"),
    (
      {**_MODEL, "bn1.running_var": np.ones(4, np.float32)},
      {"momentum": 0.1, "eps": 1e-5},
      r"'bn1\.running_var': \(4,\)",
    ),
  ],
)
def test_load_batch_norms_errors(state, kwargs, message):
  with pytest.raises(ValueError, match=message):
    torch_compat.load_batch_norms(state, **kwargs)
