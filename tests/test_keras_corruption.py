"""Byte corruption of every valid fixture file, drawn by Hypothesis.

Each damaged file either reads as Keras wrote it or fails with a clear `ValueError` naming the
file. A `.keras` zip is CRC-checked, so a read that succeeds returns exactly Keras's numbers. HDF5
stores no checksums for raw data: there a successful read must keep every layer, config, dtype and
shape, and only weight values may move (the damage hit a dataset's bytes).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kbn_jax import _keras_files as kf

FIXTURES = Path(__file__).resolve().parent / "oracles" / "keras_files" / "fixtures"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
FILES = sorted(MANIFEST["files"])
REFERENCE = {}


def _read(path, spec):
  kwargs = {"config_path": FIXTURES / spec["config_from"]} if "config_from" in spec else {}
  return kf.read_batch_norm_layers(path, **kwargs)


def _reference(name):
  if name not in REFERENCE:
    REFERENCE[name] = _read(FIXTURES / name, MANIFEST["files"][name])
  return REFERENCE[name]


damage = st.lists(
  st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8
)


@pytest.mark.slow
@settings(
  max_examples=60,
  derandomize=True,
  deadline=None,
  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(name=st.sampled_from(FILES), hits=damage)
def test_damaged_files_read_as_written_or_fail_clearly(tmp_path, name, hits):
  spec = MANIFEST["files"][name]
  data = bytearray((FIXTURES / name).read_bytes())
  for where, value in hits:
    data[int(where * len(data))] = value
  path = tmp_path / name
  path.write_bytes(bytes(data))
  try:
    records = _read(path, spec)
  except ValueError as error:  # LayerNotFoundError is one too
    assert name in str(error), str(error)
    return
  expected = _reference(name)
  assert list(records) == list(expected)
  for key, record in records.items():
    want = expected[key]
    assert record.config == want.config and record.semantics == want.semantics
    assert [w.shape for w in record.weights] == [w.shape for w in want.weights]
    assert [w.dtype for w in record.weights] == [w.dtype for w in want.weights]
    if spec["format"] == "keras":
      for got, ref in zip(record.weights, want.weights, strict=True):
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("name", FILES)
def test_undamaged_copies_read_keras_numbers(tmp_path, name):
  """The baseline the test above relies on: an undamaged copy reads Keras's recorded weights."""
  path = tmp_path / name
  path.write_bytes((FIXTURES / name).read_bytes())
  spec = MANIFEST["files"][name]
  with np.load(FIXTURES / f"{spec['model']}.npz") as arrays:
    for key, record in _read(path, spec).items():
      for i, got in enumerate(record.weights):
        np.testing.assert_array_equal(got, arrays[f"{key}/w_before/{i}"])


def test_a_damaged_key_in_a_serialized_initializer_is_refused(tmp_path):
  """One byte turns `"config"` into `"c nfig"` (valid JSON): refused, not read without arguments."""
  data = bytearray((FIXTURES / "k3_convnet.h5").read_bytes())
  where = int(0.1953125 * len(data))
  assert data[where : where + 1] == b"o", "the fixture changed; find the byte again"
  data[where] = ord(" ")
  path = tmp_path / "k3_convnet.h5"
  path.write_bytes(bytes(data))
  with pytest.raises(
    ValueError, match=r"k3_convnet\.h5: layer .*`\w+_initializer` has keys \['c nfig'\]"
  ):
    _read(path, MANIFEST["files"]["k3_convnet.h5"])
