"""`kbn_jax._keras_files`: BatchNormalization layers from every Keras file format, safely.

Expected values come from `tests/oracles/keras_files/fixtures`, written by real tf_keras 2.21 and
Keras
3.15 (see its README); nothing here needs TensorFlow or Keras. Corrupted and mismatched files
are crafted in `tmp_path`.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from kbn_jax import _keras_files as kf
from kbn_jax import _keras_semantics

FIXTURES = Path(__file__).resolve().parent / "oracles" / "keras_files" / "fixtures"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
MODEL_FILES = sorted(f for f, v in MANIFEST["files"].items() if v["format"] in ("h5", "keras"))
WEIGHTS_ONLY = sorted(f for f, v in MANIFEST["files"].items() if "config_from" in v)
CORE_KEYS = (
  "name",
  "trainable",
  "axis",
  "momentum",
  "epsilon",
  "center",
  "scale",
  "renorm",
  "renorm_clipping",
  "renorm_momentum",
)


def _reference(model: str) -> dict[str, np.ndarray]:
  with np.load(FIXTURES / f"{model}.npz", allow_pickle=False) as arrays:
    return dict(arrays)


def _weights(ref: dict[str, np.ndarray], key: str, when: str = "w_before") -> list[np.ndarray]:
  out = []
  while f"{key}/{when}/{len(out)}" in ref:
    out.append(ref[f"{key}/{when}/{len(out)}"])
  return out


def _assert_records(records, model: str) -> None:
  info = MANIFEST["models"][model]["layers"]
  ref = _reference(model)
  assert sorted(records) == sorted(info)
  for key, record in records.items():
    assert record.name == key
    expected = _weights(ref, key)
    assert len(record.weights) == len(expected) == info[key]["n_weights"]
    for got, want in zip(record.weights, expected, strict=True):
      assert got.dtype == want.dtype and got.shape == want.shape
      np.testing.assert_array_equal(got, want)
    saved = info[key]["get_config"]
    for k in CORE_KEYS:
      if k in saved:
        assert record.config[k] == saved[k], (key, k)
    if record.input_shape is not None:
      assert list(record.input_shape) == info[key]["input_shape"]
    assert record.class_name == "BatchNormalization"


def _layer_order(model: str) -> list[str]:
  return list(kf.read_batch_norm_layers(FIXTURES / f"{model}.keras"))


# ---------------------------------------------------------------------------------------------
# Real files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_files_read_every_batch_norm(name):
  spec = MANIFEST["files"][name]
  records = kf.read_batch_norm_layers(FIXTURES / name)
  _assert_records(records, spec["model"])
  for record in records.values():
    assert record.semantics == spec["semantics"], (name, record.semantics_evidence)
    assert not record.ambiguous
    assert record.file_format == spec["format"]
  first = next(iter(records.values()))
  marker = {"keras3": "3.15.1", "keras_v2": "2.21.0"}[spec["semantics"]]
  assert marker in first.semantics_evidence


@pytest.mark.parametrize("name", WEIGHTS_ONLY)
def test_weights_only_files_with_a_config(name):
  spec = MANIFEST["files"][name]
  records = kf.read_batch_norm_layers(FIXTURES / name, config_path=FIXTURES / spec["config_from"])
  _assert_records(records, spec["model"])
  for record in records.values():
    assert record.semantics == spec["semantics"], record.semantics_evidence
  # The same with the model config itself, as a dict or JSON text.
  source = FIXTURES / spec["config_from"]
  if source.suffix == ".keras":
    with zipfile.ZipFile(source) as archive:
      text = archive.read("config.json").decode()
  elif source.suffix == ".json":
    text = source.read_text()
  else:
    with h5py.File(source, "r") as file:
      text = file.attrs["model_config"]
  for config in (json.loads(text), text):
    again = kf.read_batch_norm_layers(FIXTURES / name, model_config=config)
    _assert_records(again, spec["model"])


def test_input_shapes_recorded_by_the_files():
  shapes = {
    name: {k: r.input_shape for k, r in kf.read_batch_norm_layers(FIXTURES / name).items()}
    for name in ("k3_convnet.keras", "k3_convnet.h5", "tfk_convnet.keras", "tfk_convnet.h5")
  }
  # Keras 3 .keras: every layer's build_config; legacy .h5: the inbound tensor's shape.
  assert shapes["k3_convnet.keras"] == {
    "bn_frozen": (None, 6, 6, 4),
    "bn_renorm": (None, 6, 6, 5),
    "block/bn_inner": (None, 6, 6, 6),
    "bn_dense": (None, 6),
    "head/bn_head": (None, 4),
  }
  assert shapes["k3_convnet.h5"] == {**shapes["k3_convnet.keras"], "head/bn_head": None}
  # tf_keras: build_config in .keras (not for the inner layers of a Sequential), none in .h5.
  assert shapes["tfk_convnet.keras"]["bn_conv"] == (None, 6, 6, 5)
  assert shapes["tfk_convnet.keras"]["head/bn_head"] is None
  assert set(shapes["tfk_convnet.h5"].values()) == {None}


def test_keras3_nested_groups_and_renorm_order():
  records = kf.read_batch_norm_layers(FIXTURES / "k3_convnet.keras")
  assert {k: r.weights_path for k, r in records.items()} == {
    "bn_frozen": "layers/batch_normalization",
    "bn_renorm": "layers/batch_normalization_1",
    "block/bn_inner": "layers/functional/layers/batch_normalization",
    "bn_dense": "layers/batch_normalization_2",
    "head/bn_head": "layers/sequential/layers/batch_normalization",
  }
  renorm = records["bn_renorm"]
  assert len(renorm.weights) == 7 and renorm.config["renorm_clipping"]["rmax"] == 3.0
  assert len(records["bn_dense"].weights) == 3 and records["bn_dense"].config["center"] is False


@pytest.mark.parametrize("name", ["tfk_convnet.h5", "k3_convnet.h5", "tfk_convnet.keras"])
def test_frozen_layer_keeps_trainable_false(name):
  record = kf.read_batch_norm_layers(FIXTURES / name)["bn_frozen"]
  assert record.config["trainable"] is False


def test_fixtures_show_each_librarys_frozen_semantics():
  """Keras 3 and V2 run a frozen layer in inference under training=True; V1 does not."""
  for model, truth in (("tfk_convnet", "keras_v2"), ("k3_convnet", "keras3"), ("tfk_v1", "v1")):
    ref = _reference(model)
    same = np.array_equal(ref["bn_frozen/y_train"], ref["bn_frozen/y_infer"])
    assert same == (truth != "v1")
    # A trainable layer's training call moves its moving statistics in every library.
    before, after = _weights(ref, "bn_dense"), _weights(ref, "bn_dense", "w_after")
    assert not np.array_equal(before[-1], after[-1])


def test_explicit_v1_class_saves_like_v2():
  """Measured: tf_keras's explicit V1 class leaves no trace in .h5 or .keras files."""
  for name in ("tfk_v1.h5", "tfk_v1.keras"):
    for record in kf.read_batch_norm_layers(FIXTURES / name).values():
      assert record.semantics == "keras_v2" and "V1 class saves identically" in (
        record.semantics_evidence
      )
  assert MANIFEST["models"]["tfk_v1"]["true_semantics"] == "keras_v1"


@pytest.mark.parametrize("name", MODEL_FILES + WEIGHTS_ONLY)
def test_read_layer_weights_every_format(name):
  spec = MANIFEST["files"][name]
  ref = _reference(spec["model"])
  kwargs = {"config_path": FIXTURES / spec["config_from"]} if "config_from" in spec else {}
  for key in MANIFEST["models"][spec["model"]]["layers"]:
    got = kf.read_layer_weights(FIXTURES / name, key, **kwargs)
    for a, b in zip(got, _weights(ref, key), strict=True):
      np.testing.assert_array_equal(a, b)
  # Other layers: the kernel and bias, whatever the format.
  conv = kf.read_layer_weights(FIXTURES / name, "conv1", **kwargs)
  assert [w.shape for w in conv] == [(3, 3, 3, 4), (4,)]


@pytest.mark.parametrize("model", ["tfk_convnet", "k3_convnet"])
def test_other_layers_agree_across_formats(model):
  files = [f for f, v in MANIFEST["files"].items() if v["model"] == model]
  read = []
  for name in files:
    spec = MANIFEST["files"][name]
    kwargs = {"config_path": FIXTURES / spec["config_from"]} if "config_from" in spec else {}
    read.append(kf.read_layer_weights(FIXTURES / name, "dense1", **kwargs))
  for other in read[1:]:
    for a, b in zip(read[0], other, strict=True):
      np.testing.assert_array_equal(a, b)


def test_bare_inner_names_find_nested_layers():
  ref = _reference("k3_convnet")
  for name in ("k3_convnet.keras", "k3_convnet.h5"):
    got = kf.read_layer_weights(FIXTURES / name, "bn_inner")
    np.testing.assert_array_equal(got[2], _weights(ref, "block/bn_inner")[2])
  cfg = kf.read_layer_config(
    FIXTURES / "tfk_convnet_weights.h5", "bn_head", config_path=FIXTURES / "tfk_convnet.h5"
  )
  assert cfg["config"]["name"] == "bn_head"


def test_weights_h5_without_config_by_group_path():
  ref = _reference("tfk_convnet")
  path = FIXTURES / "tfk_convnet.weights.h5"
  got = kf.read_layer_weights(path, "layers/batch_normalization_1")
  for a, b in zip(got, _weights(ref, "bn_conv"), strict=True):
    np.testing.assert_array_equal(a, b)
  got = kf.read_layer_weights(path, "layers/sequential/layers/batch_normalization")
  np.testing.assert_array_equal(got[0], _weights(ref, "head/bn_head")[0])
  # tf_keras records no layer names there: a name needs the config, and the error says so.
  with pytest.raises(KeyError, match=r"tfk_convnet\.weights\.h5.*no layer 'bn_conv'.*config_path"):
    kf.read_layer_weights(path, "bn_conv")
  with pytest.raises(KeyError, match=r"layers/batch_normalization_1"):
    kf.read_layer_weights(path, "bn_conv")


def test_keras3_weights_h5_without_config_by_recorded_name():
  ref = _reference("k3_convnet")
  path = FIXTURES / "k3_convnet.weights.h5"
  for key in ("bn_renorm", "block/bn_inner", "bn_inner", "head/bn_head"):
    full = "block/bn_inner" if key == "bn_inner" else key
    got = kf.read_layer_weights(path, key)
    for a, b in zip(got, _weights(ref, full), strict=True):
      np.testing.assert_array_equal(a, b)


def test_weights_only_files_without_a_config_say_what_to_pass():
  for name in ("tfk_convnet.weights.h5", "k3_convnet.weights.h5", "tfk_convnet_weights.h5"):
    with pytest.raises(ValueError, match=rf"{name}.*no model config.*config_path="):
      kf.read_batch_norm_layers(FIXTURES / name)
    with pytest.raises(KeyError, match=rf"{name}.*no model config.*config_path="):
      kf.read_layer_config(FIXTURES / name, "bn_conv")


def test_legacy_weights_file_by_name():
  ref = _reference("tfk_convnet")
  path = FIXTURES / "tfk_convnet_weights.h5"
  for key in ("bn_frozen", "bn_dense", "head/bn_head", "bn_head"):
    full = "head/bn_head" if key == "bn_head" else key
    for a, b in zip(kf.read_layer_weights(path, key), _weights(ref, full), strict=True):
      np.testing.assert_array_equal(a, b)
  assert kf.read_layer_weights(path, "re_lu") == []
  with pytest.raises(KeyError, match=r"no layer named 'nope'.*'bn_frozen'.*'head/bn_head'"):
    kf.read_layer_weights(path, "nope")


def test_read_layer_config():
  for name in MODEL_FILES:
    spec = MANIFEST["files"][name]
    for key, info in MANIFEST["models"][spec["model"]]["layers"].items():
      entry = kf.read_layer_config(FIXTURES / name, key)
      assert entry["class_name"] == "BatchNormalization"
      assert entry["config"]["momentum"] == info["get_config"]["momentum"]
  entry = kf.read_layer_config(FIXTURES / "k3_convnet.keras", "block/bn_inner")
  assert entry["build_config"] == {"input_shape": [None, 6, 6, 6]}
  # Returned entries are fresh copies.
  entry["config"]["momentum"] = 0.0
  assert (
    kf.read_layer_config(FIXTURES / "k3_convnet.keras", "block/bn_inner")["config"]["momentum"]
    == 0.9
  )


def test_missing_layer_lists_batch_norm_layers():
  for name in MODEL_FILES:
    first = next(iter(MANIFEST["models"][MANIFEST["files"][name]["model"]]["layers"]))
    with pytest.raises(KeyError, match=rf"{name}: no layer named 'nope'.*'{first}'"):
      kf.read_layer_weights(FIXTURES / name, "nope")
    with pytest.raises(KeyError, match=r"no layer named 'nope'"):
      kf.read_layer_config(FIXTURES / name, "nope")


def test_records_are_frozen():
  record = kf.read_batch_norm_layers(FIXTURES / "k3_convnet.keras")["bn_frozen"]
  with pytest.raises(AttributeError):
    record.semantics = "keras_v1"


def test_reading_writes_nothing(tmp_path):
  shutil.copy(FIXTURES / "k3_convnet.keras", tmp_path / "m.keras")
  kf.read_batch_norm_layers(tmp_path / "m.keras")
  assert [p.name for p in tmp_path.iterdir()] == ["m.keras"]


# ---------------------------------------------------------------------------------------------
# Semantics rules, on crafted files
# ---------------------------------------------------------------------------------------------
def _bn_entry(name="bn", class_name="BatchNormalization", **config):
  cfg = {"name": name, "trainable": True, "axis": [1], "momentum": 0.9, "epsilon": 1e-3}
  cfg.update({"center": True, "scale": True, **config})
  return {"class_name": class_name, "config": cfg, "name": name, "inbound_nodes": []}


def _bn_arrays(n=3, names=("gamma", "beta", "moving_mean", "moving_variance"), dtype="float32"):
  rng = np.random.default_rng(0)
  return {k: rng.standard_normal(n).astype(dtype) for k in names}


def _write_legacy(path, layers, attrs=None, model_config=True, weight_names=None):
  """A legacy HDF5 model: `layers` = [(entry, {short: array})]."""
  with h5py.File(path, "w") as file:
    config = {"class_name": "Functional", "config": {"name": "m", "layers": [e for e, _ in layers]}}
    if model_config:
      file.attrs["model_config"] = json.dumps(config)
    for k, v in (attrs or {}).items():
      file.attrs[k] = v
    root = file.create_group("model_weights")
    names = [e["config"]["name"] for e, _ in layers]
    root.attrs["layer_names"] = [n.encode() for n in names]
    for (_entry, arrays), name in zip(layers, names, strict=True):
      group = root.create_group(name)
      wnames = (weight_names or {}).get(name, [f"{name}/{k}:0" for k in arrays])
      group.attrs["weight_names"] = [w.encode() for w in wnames]
      for w, value in zip(wnames, arrays.values(), strict=False):
        group.create_dataset(w, data=value)
  return path


@pytest.mark.parametrize(
  ("attrs", "class_name", "extra", "semantics", "ambiguous", "evidence"),
  [
    ({"keras_version": "2.2.4-tf", "backend": "tensorflow"}, None, {}, "keras_v1", True, "-tf"),
    ({"keras_version": "2.3.0-tf"}, None, {}, "keras_v1", True, "first TF 2 releases"),
    ({"keras_version": "2.4.0", "backend": "tensorflow"}, None, {}, "keras_v2", False, "TF2"),
    ({"keras_version": "2.15.0"}, None, {}, "keras_v2", False, "V2 class"),
    ({"keras_version": "2.3.1", "backend": "tensorflow"}, None, {}, "keras_v1", False, "2.0-2.3"),
    ({"keras_version": "2.1.6", "backend": "theano"}, None, {}, "keras_v1", False, "theano"),
    ({"keras_version": "3.0.1", "backend": "tensorflow"}, None, {}, "keras3", False, "3.0.1"),
    ({"backend": "jax"}, None, {}, "keras3", False, "jax"),
    ({}, None, {"synchronized": False}, "keras3", False, "synchronized"),
    ({}, None, {"dtype": {"class_name": "DTypePolicy", "config": {}}}, "keras3", False, "DType"),
    ({"keras_version": "2.21.0"}, "BatchNormalizationV1", {}, "keras_v1", False, "V1"),
    ({"keras_version": "2.2.4-tf"}, "BatchNormalizationV2", {}, "keras_v2", False, "V2"),
    ({}, None, {}, "keras_v1", True, "nor its config records a Keras version"),
  ],
)
def test_semantics_rules(tmp_path, attrs, class_name, extra, semantics, ambiguous, evidence):
  entry = _bn_entry(class_name=class_name or "BatchNormalization", **extra)
  path = _write_legacy(tmp_path / "m.h5", [(entry, _bn_arrays())], attrs)
  record = kf.read_batch_norm_layers(path)["bn"]
  assert (record.semantics, record.ambiguous) == (semantics, ambiguous)
  assert evidence in record.semantics_evidence
  assert record.class_name == (class_name or "BatchNormalization")


@pytest.mark.parametrize(
  ("config", "semantics", "ambiguous"),
  [
    ({"class_name": "BatchNormalizationV2", "config": {}}, "keras_v2", False),
    ({"class_name": "BatchNormalization", "config": {"synchronized": False}}, "keras3", False),
    ({"dtype": {"class_name": "DTypePolicy", "config": {"name": "float32"}}}, "keras3", False),
    ({"axis": -1, "momentum": 0.9}, "keras_v1", True),
  ],
)
def test_bare_configs_follow_the_same_rules_without_file_facts(config, semantics, ambiguous):
  inner = config.get("config", config)
  detection = _keras_semantics.detect(config.get("class_name"), inner, None)
  assert (detection.semantics, detection.ambiguous) == (semantics, ambiguous)
  if ambiguous:
    assert detection.evidence.startswith("the config records no Keras version")
  assert _keras_semantics.semantics_of_config(config, trainable=True, stacklevel=1) == semantics


def test_semantics_from_a_bare_config_module(tmp_path):
  """A .weights.h5 with a tf_keras config.json and no metadata: the model's module decides."""
  with zipfile.ZipFile(FIXTURES / "tfk_convnet.keras") as archive:
    config = json.loads(archive.read("config.json"))
  (tmp_path / "config.json").write_text(json.dumps(config))
  records = kf.read_batch_norm_layers(
    FIXTURES / "tfk_convnet.weights.h5", config_path=tmp_path / "config.json"
  )
  assert {r.semantics for r in records.values()} == {"keras_v2"}
  assert "tf_keras.src.engine.functional" in records["bn_conv"].semantics_evidence
  with zipfile.ZipFile(FIXTURES / "k3_convnet.keras") as archive:
    config = json.loads(archive.read("config.json"))
  records = kf.read_batch_norm_layers(FIXTURES / "k3_convnet.weights.h5", model_config=config)
  assert {r.semantics for r in records.values()} == {"keras3"}


def test_lambda_and_custom_layers_are_only_read(tmp_path):
  lam = {
    "class_name": "Lambda",
    "config": {"name": "lam", "function": ["4wEAAAAAAAAA", None, None], "module": "os"},
    "inbound_nodes": [],
  }
  custom = {"class_name": "my>Custom", "config": {"name": "custom"}, "inbound_nodes": []}
  path = _write_legacy(
    tmp_path / "m.h5", [(lam, {}), (custom, {}), (_bn_entry(), _bn_arrays())], {}
  )
  assert list(kf.read_batch_norm_layers(path)) == ["bn"]


def test_bfloat16_tagged_weights(tmp_path):
  values = np.array([1.0, -2.5, 0.15625], np.float32)
  bits = (values.view(np.uint32) >> 16).astype(np.uint16)
  path = tmp_path / "w.weights.h5"
  with h5py.File(path, "w") as file:
    group = file.create_group("layers/batch_normalization/vars")
    for i in range(4):
      dataset = group.create_dataset(str(i), data=bits)
      dataset.attrs["dtype"] = "bfloat16"
  got = kf.read_layer_weights(path, "layers/batch_normalization")
  assert len(got) == 4 and got[0].dtype == np.float32
  np.testing.assert_array_equal(got[0], values)


# ---------------------------------------------------------------------------------------------
# Corrupted, truncated and mismatched files
# ---------------------------------------------------------------------------------------------
def _rezip(src, dst, replace=None, drop=(), add=None):
  with zipfile.ZipFile(src) as archive:
    members = {n: archive.read(n) for n in archive.namelist()}
  for n in drop:
    members.pop(n)
  members.update(replace or {})
  with zipfile.ZipFile(dst, "w") as archive:
    for n, data in members.items():
      archive.writestr(n, data)
    for n, data in (add or {}).items():
      archive.writestr(n, data)
  return dst


def _config_of(name):
  with zipfile.ZipFile(FIXTURES / name) as archive:
    return json.loads(archive.read("config.json"))


def test_random_bytes_and_empty_files(tmp_path):
  (tmp_path / "r.h5").write_bytes(np.random.default_rng(0).bytes(4096))
  (tmp_path / "e.keras").write_bytes(b"")
  for name in ("r.h5", "e.keras"):
    with pytest.raises(ValueError, match=rf"{name} is not a Keras file"):
      kf.read_batch_norm_layers(tmp_path / name)
  with pytest.raises(FileNotFoundError):
    kf.read_batch_norm_layers(tmp_path / "absent.h5")


@pytest.mark.parametrize("name", ["tfk_convnet.h5", "k3_convnet.keras", "k3_convnet.weights.h5"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_files(tmp_path, name, fraction):
  data = (FIXTURES / name).read_bytes()
  path = tmp_path / name
  path.write_bytes(data[: int(len(data) * fraction)])
  kwargs = {"config_path": FIXTURES / "k3_convnet.keras"} if "weights" in name else {}
  with pytest.raises(ValueError, match=rf"{name}"):
    kf.read_batch_norm_layers(path, **kwargs)


@pytest.mark.parametrize("name", ["tfk_convnet.h5", "k3_convnet.h5"])
def test_randomly_corrupted_hdf5(tmp_path, name):
  """Damage anywhere: a clear ValueError naming the file, or (HDF5 stores no checksums for raw
  data) a normal read when only unused bytes or array values were hit."""
  data = (FIXTURES / name).read_bytes()
  path = tmp_path / name
  errors = 0
  for seed in range(40):
    rng = np.random.default_rng(seed)
    damaged = bytearray(data)
    for i in rng.integers(8, len(data), 20):
      damaged[i] = int(rng.integers(0, 256))
    path.write_bytes(bytes(damaged))
    try:
      kf.read_batch_norm_layers(path)
    except ValueError as error:
      assert str(path) in str(error) or name in str(error)
      errors += 1
  assert errors >= 30


def test_corrupted_zip_member_fails_its_crc(tmp_path):
  data = bytearray((FIXTURES / "k3_convnet.keras").read_bytes())
  with zipfile.ZipFile(FIXTURES / "k3_convnet.keras") as archive:
    info = archive.getinfo("model.weights.h5")
  start = info.header_offset + 30 + len(info.filename) + len(info.extra)
  for i in range(start + 3000, start + 3100):
    data[i] ^= 0xFF
  (tmp_path / "m.keras").write_bytes(bytes(data))
  with pytest.raises(
    ValueError, match=r"m\.keras: cannot be read as a Keras file; it is truncated, corrupted.*CRC"
  ):
    kf.read_batch_norm_layers(tmp_path / "m.keras")


def test_keras_zip_missing_or_bad_members(tmp_path):
  src = FIXTURES / "k3_convnet.keras"
  cases = {
    "no_config.keras": ({"drop": ["config.json"]}, r"no config\.json"),
    "no_weights.keras": ({"drop": ["model.weights.h5"]}, r"has no model\.weights\.h5 member"),
    "npz.keras": (
      {"drop": ["model.weights.h5"], "add": {"model.weights.npz": b"x"}},
      r"model\.weights\.npz.*not supported",
    ),
    "bad_json.keras": ({"replace": {"config.json": b"{not json"}}, r"Malformed JSON"),
    "bad_meta.keras": ({"replace": {"metadata.json": b"\xff\xfe"}}, r"Malformed JSON.*metadata"),
    "list_json.keras": ({"replace": {"config.json": b"[1, 2]"}}, r"not a JSON object"),
    "no_layers.keras": (
      {"replace": {"config.json": b'{"class_name": "MyModel", "config": {}}'}},
      r"no list of layers.*subclassed",
    ),
    "not_h5.keras": ({"replace": {"model.weights.h5": b"hello"}}, r"not an HDF5 file"),
    "deep.keras": ({"replace": {"config.json": b"[" * 100000}}, r"nested deeper than"),
  }
  for name, (edit, message) in cases.items():
    path = _rezip(src, tmp_path / name, **edit)
    with pytest.raises(ValueError, match=rf"{name}.*{message}|{message}.*{name}"):
      kf.read_batch_norm_layers(path)


def test_zip_member_over_the_cap():
  limits = kf.Limits(max_config_bytes=1000)
  with pytest.raises(ValueError, match=r"k3_convnet\.keras: config\.json declares \d+ bytes"):
    kf.read_batch_norm_layers(FIXTURES / "k3_convnet.keras", limits=limits)


def test_config_not_matching_the_weights(tmp_path):
  # Keras 3: a layer dropped from the config shifts the groups; the recorded names catch it.
  config = _config_of("k3_convnet.keras")
  config["config"]["layers"] = [
    e for e in config["config"]["layers"] if e.get("name") != "bn_frozen"
  ]
  path = _rezip(
    FIXTURES / "k3_convnet.keras",
    tmp_path / "k3.keras",
    replace={"config.json": json.dumps(config).encode()},
  )
  with pytest.raises(
    ValueError,
    match=r"k3\.keras: the group 'layers/batch_normalization' holds "
    r"the layer 'bn_frozen'.*'bn_renorm'.*does not belong",
  ):
    kf.read_batch_norm_layers(path)
  # tf_keras (no recorded names): center=False on a layer with beta -> a count mismatch.
  config = _config_of("tfk_convnet.keras")
  for entry in config["config"]["layers"]:
    if entry.get("name") == "bn_conv":
      entry["config"]["center"] = False
  (tmp_path / "c.json").write_text(json.dumps(config))
  with pytest.raises(
    ValueError,
    match=r"tfk_convnet\.weights\.h5: layer 'bn_conv'.*holds 4 "
    r"variables.*center=False.*needs 3",
  ):
    kf.read_batch_norm_layers(FIXTURES / "tfk_convnet.weights.h5", config_path=tmp_path / "c.json")
  # The wrong model's config entirely: groups missing.
  with pytest.raises(ValueError, match=r"layer 'bn_renorm'.*holds 4 variables.*needs 7"):
    kf.read_batch_norm_layers(
      FIXTURES / "tfk_convnet.weights.h5", config_path=FIXTURES / "k3_convnet.keras"
    )


def test_input_shape_not_matching_the_weights(tmp_path):
  entry = _bn_entry(axis=-1)
  entry["build_config"] = {"input_shape": [None, 5, 7]}
  path = _write_legacy(tmp_path / "m.h5", [(entry, _bn_arrays(3))], {"keras_version": "3.1.0"})
  with pytest.raises(ValueError, match=r"m\.h5: layer 'bn'.*shape \(3,\).*\(7,\) features"):
    kf.read_batch_norm_layers(path)
  entry["build_config"] = {"input_shape": [None, 3]}
  entry["config"]["axis"] = 4
  path = _write_legacy(tmp_path / "n.h5", [(entry, _bn_arrays(3))], {"keras_version": "3.1.0"})
  with pytest.raises(ValueError, match=r"n\.h5: layer 'bn'.*axis \[4\] is out of range"):
    kf.read_batch_norm_layers(path)


@pytest.mark.parametrize(
  ("arrays", "config", "message"),
  [
    ({**_bn_arrays(3), "gamma": np.ones(4, np.float32)}, {}, r"different shapes"),
    (_bn_arrays(3, dtype="int32"), {}, r"dtype int32, not a real floating type"),
    (_bn_arrays(3), {"center": False}, r"holds the weights \[.*'beta'.*needs \['gamma', 'moving"),
    (_bn_arrays(3), {"renorm": True}, r"needs \[.*'renorm_stddev'\]"),
    (_bn_arrays(3, names=("gamma", "beta", "moving_mean")), {}, r"needs .*'moving_variance'"),
    ({k: np.ones((3, 1), np.float32) for k in _bn_arrays()}, {}, r"with one axis, \(C,\)"),
    ({k: np.ones(0, np.float32) for k in _bn_arrays()}, {}, r"empty shape"),
    (_bn_arrays(3), {"scale": "yes"}, r"`scale` is 'yes' in the config, not a bool"),
  ],
)
def test_mismatched_legacy_weights(tmp_path, arrays, config, message):
  path = _write_legacy(tmp_path / "m.h5", [(_bn_entry(**config), arrays)], {})
  with pytest.raises(ValueError, match=rf"m\.h5: layer 'bn'.*{message}"):
    kf.read_batch_norm_layers(path)


def test_string_datasets_are_refused(tmp_path):
  path = _write_legacy(tmp_path / "m.h5", [(_bn_entry(), _bn_arrays())], {})
  with h5py.File(path, "a") as file:
    group = file["model_weights/bn/bn"]
    del group["gamma:0"]
    group.create_dataset("gamma:0", data=np.array([b"a", b"b", b"c"]))
  with pytest.raises(ValueError, match=r"m\.h5: layer 'bn': weight 'bn/gamma:0'.*dtype \|S1"):
    kf.read_batch_norm_layers(path)


@pytest.mark.parametrize(
  ("name", "message"),
  [
    ("../../bn/gamma:0", r"refusing the weight name '\.\./\.\./bn/gamma:0'"),
    ("/model_weights/bn/bn/gamma:0", r"refusing the weight name '/model_weights"),
  ],
)
def test_weight_names_cannot_escape_their_group(tmp_path, name, message):
  names = {"bn": [name, "bn/beta:0", "bn/moving_mean:0", "bn/moving_variance:0"]}
  path = _write_legacy(tmp_path / "m.h5", [(_bn_entry(), _bn_arrays())], {}, weight_names=names)
  with pytest.raises(ValueError, match=rf"m\.h5: layer 'bn': {message}"):
    kf.read_batch_norm_layers(path)


@pytest.mark.parametrize("link", ["soft", "external"])
def test_links_are_refused(tmp_path, link):
  other = tmp_path / "other.h5"
  with h5py.File(other, "w") as file:
    file["secret"] = np.ones(3, np.float32)
  path = _write_legacy(tmp_path / "m.h5", [(_bn_entry(), _bn_arrays())], {})
  with h5py.File(path, "a") as file:
    group = file["model_weights/bn/bn"]
    del group["gamma:0"]
    if link == "soft":
      group["gamma:0"] = h5py.SoftLink("/model_weights/bn/bn/beta:0")
    else:
      group["gamma:0"] = h5py.ExternalLink(str(other), "/secret")
  with pytest.raises(ValueError, match=r"m\.h5: layer 'bn': refusing the (Soft|External)Link at"):
    kf.read_batch_norm_layers(path)


def test_listed_weight_missing(tmp_path):
  path = _write_legacy(tmp_path / "m.h5", [(_bn_entry(), _bn_arrays())], {})
  with h5py.File(path, "a") as file:
    del file["model_weights/bn/bn/beta:0"]
  with pytest.raises(ValueError, match=r"m\.h5: weight 'bn/beta:0' of 'bn' is listed.*missing"):
    kf.read_batch_norm_layers(path)


def test_weights_h5_variable_names_checked(tmp_path):
  path = tmp_path / "w.weights.h5"
  with h5py.File(path, "w") as file:
    group = file.create_group("layers/batch_normalization/vars")
    for key in ("0", "2"):
      group[key] = np.ones(3, np.float32)
  with pytest.raises(
    ValueError, match=r"w\.weights\.h5: .*named \['0', '2'\], expected \['0', '1'\]"
  ):
    kf.read_layer_weights(path, "layers/batch_normalization")


def test_hdf5_that_is_not_keras(tmp_path):
  with h5py.File(tmp_path / "x.h5", "w") as file:
    file["data"] = np.ones(3)
  with pytest.raises(ValueError, match=r"x\.h5 is an HDF5 file but not a Keras"):
    kf.read_batch_norm_layers(tmp_path / "x.h5")


def test_malformed_model_configs(tmp_path):
  cases = {
    "no_class.h5": [{"config": {"name": "x"}}],
    "no_config.h5": [{"class_name": "Dense"}],
    "bad_name.h5": [{"class_name": "Dense", "config": {"name": "a/../b"}}],
    "dup.h5": [_bn_entry("bn"), _bn_entry("bn")],
  }
  messages = {
    "no_class.h5": r"layer 0 of the model has no class_name",
    "no_config.h5": r"\(Dense\) has no config object",
    "bad_name.h5": r"invalid name 'a/\.\./b'",
    "dup.h5": r"two layers keyed 'bn'",
  }
  for name, layers in cases.items():
    with h5py.File(tmp_path / name, "w") as file:
      file.attrs["model_config"] = json.dumps(
        {"class_name": "Functional", "config": {"layers": layers}}
      )
      file.create_group("model_weights").attrs["layer_names"] = []
    with pytest.raises(ValueError, match=rf"{name}: .*{messages[name]}"):
      kf.read_batch_norm_layers(tmp_path / name)


def test_ambiguous_bare_names(tmp_path):
  inner = {"class_name": "Sequential", "config": {"name": "a", "layers": [_bn_entry("bn")]}}
  other = {"class_name": "Sequential", "config": {"name": "b", "layers": [_bn_entry("bn")]}}
  config = {"class_name": "Functional", "config": {"name": "m", "layers": [inner, other]}}
  (tmp_path / "c.json").write_text(json.dumps(config))
  with pytest.raises(KeyError, match=r"the name 'bn' is ambiguous.*'a/bn', 'b/bn'"):
    kf.read_layer_config(tmp_path / "c.json", "bn")
  assert kf.read_layer_config(tmp_path / "c.json", "b/bn")["config"]["name"] == "bn"
  with pytest.raises(ValueError, match=r"c\.json is a JSON model config and holds no weights"):
    kf.read_batch_norm_layers(tmp_path / "c.json")


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match=r"config_path or model_config, not both"):
    kf.read_batch_norm_layers(
      FIXTURES / "k3_convnet.weights.h5",
      config_path=FIXTURES / "k3_convnet.keras",
      model_config={"layers": []},
    )
  with pytest.raises(ValueError, match=r"config_path=.*weights\.h5 holds no model config"):
    kf.read_batch_norm_layers(
      FIXTURES / "k3_convnet.weights.h5", config_path=FIXTURES / "k3_convnet.weights.h5"
    )


def test_without_h5py(monkeypatch):
  monkeypatch.setitem(sys.modules, "h5py", None)
  with pytest.raises(ImportError, match=r"pip install kbn_jax\[keras\]"):
    kf.read_batch_norm_layers(FIXTURES / "k3_convnet.h5")


def test_in_memory_weights_are_an_hdf5_image():
  """The .keras reader opens model.weights.h5 from memory: no temporary file."""
  with zipfile.ZipFile(FIXTURES / "k3_convnet.keras") as archive:
    data = archive.read("model.weights.h5")
  with h5py.File(io.BytesIO(data), "r") as file:
    assert "layers" in file


def test_model_config_as_get_config_dict():
  inner = _config_of("k3_convnet.keras")["config"]  # what model.get_config() returns
  records = kf.read_batch_norm_layers(FIXTURES / "k3_convnet.weights.h5", model_config=inner)
  _assert_records(records, "k3_convnet")


def test_tf_keras_2_13_group_name(tmp_path):
  """tf_keras 2.13 named the top container `_layer_checkpoint_dependencies`; Keras reads both."""
  path = tmp_path / "old.weights.h5"
  shutil.copy(FIXTURES / "tfk_convnet.weights.h5", path)
  with h5py.File(path, "a") as file:
    file.move("layers", "_layer_checkpoint_dependencies")
  records = kf.read_batch_norm_layers(path, config_path=FIXTURES / "tfk_convnet.keras")
  _assert_records(records, "tfk_convnet")


def test_directories_and_null_datasets(tmp_path):
  with pytest.raises(ValueError, match=r"is a directory"):
    kf.read_batch_norm_layers(tmp_path)
  path = tmp_path / "w.weights.h5"
  with h5py.File(path, "w") as file:
    file.create_group("layers/batch_normalization/vars").create_dataset("0", dtype="f4")
  with pytest.raises(
    ValueError, match=r"w\.weights\.h5: .*variable 0 is an empty \(null\) dataset"
  ):
    kf.read_layer_weights(path, "layers/batch_normalization")
