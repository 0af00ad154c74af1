"""Keras's `fused` resolution, V1 and V2, against 84 combinations recorded from tf_keras 2.21.

For every (rank, axis, renorm, virtual_batch_size, adjustment, dtype) x fused in {None, True,
False} combination, `kbn_jax` must resolve `fused` as Keras did, and raise where Keras V2 raised
(with Keras's message) at construction or on the first call.
"""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import pytest

from kbn_jax import _layer, _variables, functional

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "keras_v2_fused_errors.json"
COMBOS = json.loads(FIXTURE.read_text())["combos"]


def _first_sentence(message: str) -> str:
  return message.split(". ")[0].rstrip(".")


def _resolve(combo, semantics):
  adjustment = (lambda shape: (jnp.ones(()), jnp.zeros(()))) if combo["adjustment"] else None
  config = functional.BatchNormConfig(
    axis=combo["axis"],
    fused=combo["fused"],
    renorm=combo["renorm"],
    virtual_batch_size=combo["virtual_batch_size"],
    adjustment=adjustment,
    dtype=combo["dtype"],
    semantics=semantics,
  )
  rank = combo["rank"]
  axes = _variables.feature_axes(config, rank)
  compute = jnp.dtype(config.dtype or jnp.float32)
  return _layer.resolve_fused(config, axes, rank, compute)


def _label(combo):
  keys = ("rank", "axis", "fused", "renorm", "virtual_batch_size", "adjustment", "dtype")
  return "-".join(f"{k}={combo[k]}" for k in keys)


@pytest.mark.parametrize("semantics", ["keras_v1", "keras_v2"])
@pytest.mark.parametrize("combo", COMBOS, ids=_label)
def test_fused_resolution_matches_keras(combo, semantics):
  expected = combo["v1" if semantics == "keras_v1" else "v2"]
  if expected["result"] == "raises":
    with pytest.raises(ValueError) as error:
      _resolve(combo, semantics)
    assert _first_sentence(str(error.value)) == _first_sentence(expected["message"])
  else:
    assert _resolve(combo, semantics) == expected["fused"]


def test_every_semantics_without_a_fused_kernel_never_fuses():
  for semantics in ("keras3", "torch"):
    config = functional.BatchNormConfig(semantics=semantics)
    assert not _layer.resolve_fused(config, (3,), 4, jnp.dtype(jnp.float32))
