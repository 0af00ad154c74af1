"""Hostile Keras files: each is refused with a clear error, fast and in little memory.

The corpus is built here, with h5py's low-level writes and a raw zip writer. The hostile cases run
in a few subprocesses that import only the reader (`kbn_jax._keras_files`, NumPy, h5py) under an
address-space cap and a timeout, and report each case's outcome, time and the process's peak
memory (VmHWM): a case that hangs (a FIFO) fails by the timeout, one that inflates a bomb by the
peak.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from kbn_jax import _keras_files as kf
from kbn_jax import keras_compat

FIXTURES = Path(__file__).resolve().parent / "oracles" / "keras_files" / "fixtures"
PACKAGE = Path(kf.__file__).resolve().parent
PEAK_GROWTH_MB = 300  # the most any hostile case may add to the worker's peak memory
CASE_SECONDS = 3.0


# ---------------------------------------------------------------------------------------------
# Builders: each writes one hostile file into `d` and returns (path, function, kwargs, regex)
# ---------------------------------------------------------------------------------------------
def _bn_config(layers):
  return json.dumps({"class_name": "Functional", "config": {"name": "m", "layers": layers}})


def _bn_entry(name="bn", **config):
  cfg = {"name": name, "axis": -1, "momentum": 0.9, "epsilon": 1e-3, **config}
  return {"class_name": "BatchNormalization", "config": cfg, "inbound_nodes": []}


def _legacy(path, *, gamma=None, names=None, layer_names=(b"bn",), config=None):
  """A legacy .h5 model with one BN layer `bn`; `gamma(group)` writes the gamma dataset."""
  with h5py.File(path, "w", libver="latest") as f:
    f.attrs["model_config"] = config or _bn_config([_bn_entry()])
    f.attrs["keras_version"] = "2.15.0"
    root = f.create_group("model_weights")
    root.attrs["layer_names"] = list(layer_names)
    group = root.create_group("bn/bn")
    weight_names = names or ["bn/gamma:0", "bn/beta:0", "bn/moving_mean:0", "bn/moving_variance:0"]
    root["bn"].attrs["weight_names"] = [n.encode() for n in weight_names]
    for short in ("beta", "moving_mean", "moving_variance"):
      group[f"{short}:0"] = np.ones(3, np.float32)
    if gamma is None:
      group["gamma:0"] = np.ones(3, np.float32)
    else:
      gamma(group)
  return path


def external_storage(d):
  secret = d / "secret.txt"
  secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 4)

  def gamma(group):
    group.create_dataset("gamma:0", shape=(3,), dtype="f4", external=[(str(secret), 0, 12)])

  return _legacy(d / "external.h5", gamma=gamma), "read_batch_norm_layers", {}, "external storage"


def virtual_dataset(d):
  with h5py.File(d / "source.h5", "w") as f:
    f["x"] = np.arange(3, dtype=np.float32)

  def gamma(group):
    layout = h5py.VirtualLayout(shape=(3,), dtype="f4")
    layout[:] = h5py.VirtualSource(str(d / "source.h5"), "x", shape=(3,))
    group.create_virtual_dataset("gamma:0", layout)

  path = _legacy(d / "virtual.h5", gamma=gamma)
  return path, "read_layer_weights", {"layer_name": "bn"}, "virtual layout"


def external_link_to_fifo(d):
  fifo = d / "pipe"
  os.mkfifo(fifo)
  evil = {"class_name": "Dense", "config": {"name": "evil"}}
  config = _bn_config([_bn_entry(), evil])
  path = _legacy(d / "elink.h5", layer_names=(b"bn", b"evil"), config=config)
  with h5py.File(path, "a") as f:
    f["model_weights/evil"] = h5py.ExternalLink(str(fifo), "/x")
  return path, "read_layer_weights", {"layer_name": "evil"}, "refusing the ExternalLink"


def fifo_as_path(d):
  os.mkfifo(d / "model.h5")
  return d / "model.h5", "read_batch_norm_layers", {}, "not a regular file"


def soft_link_group(d):
  path = _legacy(d / "soft.h5")
  with h5py.File(path, "a") as f:
    f["model_weights"].move("bn", "real")
    f["model_weights/bn"] = h5py.SoftLink("/model_weights/real")
  return path, "read_batch_norm_layers", {}, "refusing the SoftLink"


def huge_declared_dataset(d):
  def gamma(group):  # 2**40 floats declared, nothing stored
    group.create_dataset("gamma:0", shape=(2**40,), maxshape=(None,), chunks=(1024,), dtype="f4")

  path = _legacy(d / "declared.h5", gamma=gamma)
  return path, "read_layer_weights", {"layer_name": "bn"}, r"elements, over the cap|declares \d+"


def chunk_larger_than_dataset(d):
  def gamma(group):  # a (3,) weight whose one chunk declares 512 MB
    group.create_dataset(
      "gamma:0", shape=(3,), maxshape=(None,), chunks=(2**27,), dtype="f4", compression="gzip"
    )

  path = _legacy(d / "chunk.h5", gamma=gamma)
  return path, "read_batch_norm_layers", {}, r"chunks of 536870912 bytes, larger than the dataset"


def gzip_bomb_dataset(d):
  def gamma(group):  # 64 MB of zeros in 64 KB: a filtered dataset past the ratio
    group.create_dataset("gamma:0", data=np.zeros(2**24, np.float32), chunks=(2**20,), **GZIP)

  path = _legacy(d / "gzip.h5", gamma=gamma)
  return path, "read_layer_weights", {"layer_name": "bn"}, r"compression ratio over 100"


GZIP = {"compression": "gzip", "compression_opts": 9}


def repeated_weight_name(d):
  names = ["bn/gamma:0"] * 12 + ["bn/beta:0", "bn/moving_mean:0", "bn/moving_variance:0"]
  path = _legacy(d / "repeated.h5", names=names)
  return path, "read_layer_weights", {"layer_name": "bn"}, r"lists the weights \['bn/gamma:0'\]"


def hard_link_diamonds(d):
  """40 levels of groups, each linked twice from the one above: 2**40 paths in a small file."""
  path = d / "diamonds.weights.h5"
  with h5py.File(path, "w") as f:
    group = f.create_group("layers")
    for i in range(40):
      child = group.create_group(f"a{i}")
      group[f"b{i}"] = child
      group = child
  return path, "read_layer_weights", {"layer_name": "nope"}, "linked from more than one place"


def hard_link_cycle(d):
  path = d / "cycle.weights.h5"
  with h5py.File(path, "w") as f:
    group = f.create_group("layers/batch_normalization")
    group["loop"] = f["layers"]
  return path, "read_layer_weights", {"layer_name": "bn"}, "linked from more than one place"


def deep_regularizer(d):
  """A regularizer nested 600 deep (JSON text: json.dumps itself cannot write it)."""
  deep = '{"class_name": "L1L2", "config": {"l1": ' * 600 + '"l2"' + "}}" * 600
  config = _bn_config([_bn_entry(gamma_regularizer="DEEP")]).replace('"DEEP"', deep)
  path = _legacy(d / "deep.h5", config=config)
  return path, "read_batch_norm_layers", {}, r"`model_config`.*is nested deeper than"


def _raw_zip(path, members):
  """A zip written byte by byte: `members` = [(name, data, method, declared_size or None)]."""
  out, central = bytearray(), bytearray()
  for name, data, method, declared in members:
    raw = name.encode()
    body = data if method == 0 else zlib.compress(data, 9)[2:-4]
    size = len(data) if declared is None else declared
    crc = zlib.crc32(data)
    header = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(body), size,
                         len(raw), 0)  # fmt: skip
    central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc,
                           len(body), size, len(raw), 0, 0, 0, 0, 0, len(out))  # fmt: skip
    central += raw
    out += header + raw + body
  end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central),
                    len(out), 0)  # fmt: skip
  path.write_bytes(bytes(out + central + end))
  return path


def _keras_members():
  with zipfile.ZipFile(FIXTURES / "k3_convnet.keras") as archive:
    return {n: archive.read(n) for n in archive.namelist()}


def zip_weights_bomb(d):
  members = _keras_members()
  bomb = members["model.weights.h5"] + b"\0" * (64 << 20)
  path = _raw_zip(
    d / "bomb.keras",
    [("config.json", members["config.json"], 8, None), ("model.weights.h5", bomb, 8, None)],
  )
  return path, "read_batch_norm_layers", {}, r"model\.weights\.h5 declares \d+ bytes .* ratio"


def zip_config_bomb(d):
  config = b'{"class_name": "Functional", "config": {"layers": []}}' + b" " * (15 << 20)
  path = _raw_zip(d / "config_bomb.keras", [("config.json", config, 8, None)])
  return path, "read_layer_config", {"layer_name": "bn"}, r"config\.json declares .* ratio"


def zip_lying_header(d):
  members = _keras_members()
  path = _raw_zip(
    d / "lying.keras",
    [("config.json", members["config.json"], 8, 0xFFFF0000)],  # declares 4 GB
  )
  return path, "read_batch_norm_layers", {}, r"config\.json declares 4294901760 bytes"


HOSTILE = [
  external_storage,
  virtual_dataset,
  external_link_to_fifo,
  fifo_as_path,
  soft_link_group,
  huge_declared_dataset,
  chunk_larger_than_dataset,
  gzip_bomb_dataset,
  repeated_weight_name,
  hard_link_diamonds,
  hard_link_cycle,
  deep_regularizer,
  zip_weights_bomb,
  zip_config_bomb,
  zip_lying_header,
]

# Runs in a fresh interpreter: the reader without the rest of kbn_jax (no JAX), memory capped.
_WORKER = textwrap.dedent(
  """
  import json, resource, sys, time, types
  package = types.ModuleType("kbn_jax")
  package.__path__ = [sys.argv[1]]
  sys.modules["kbn_jax"] = package
  import kbn_jax._keras_files as kf
  import h5py, numpy

  def peak_mb():
    # This process's own peak RSS: VmHWM starts afresh at exec, while ru_maxrss carries the
    # parent's peak (pytest's) across fork and exec.
    try:
      with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmHWM")) / 1024
    except OSError:
      return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

  cap = 2 << 30
  resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
  out = []
  for path, function, kwargs in json.loads(sys.argv[2]):
    start = time.perf_counter()
    try:
      getattr(kf, function)(path, **kwargs)
      outcome = ["ok", ""]
    except BaseException as error:
      outcome = [type(error).__name__, str(error)]
    seconds = time.perf_counter() - start
    peak = peak_mb()
    out.append(outcome + [seconds, peak])
    print(json.dumps(out[-1]), flush=True)
  """
)


def _run_worker(cases, timeout=120):
  """Runs [(path, function, kwargs)] in one capped subprocess; returns [(type, msg, s, MB)]."""
  payload = json.dumps([[str(p), f, k] for p, f, k in cases])
  baseline = subprocess.run(
    [sys.executable, "-c", _WORKER, str(PACKAGE), "[]"],
    capture_output=True,
    text=True,
    timeout=timeout,
    check=True,
  )
  assert baseline.stdout == ""
  done = subprocess.run(
    [sys.executable, "-c", _WORKER, str(PACKAGE), payload],
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  lines = [json.loads(line) for line in done.stdout.splitlines()]
  assert len(lines) == len(cases), done.stderr[-2000:]
  return lines


def test_hostile_files_are_refused_quickly_in_little_memory(tmp_path):
  built = []
  for builder in HOSTILE:
    folder = tmp_path / builder.__name__
    folder.mkdir()
    built.append((builder.__name__, *builder(folder)))
  # The first case measures the worker's own footprint (imports, a valid read).
  cases = [(FIXTURES / "k3_convnet.keras", "read_batch_norm_layers", {})]
  cases += [(path, function, kwargs) for _, path, function, kwargs, _ in built]
  results = _run_worker(cases)
  assert results[0][0] == "ok", results[0]
  floor = results[0][3]
  for (name, path, _, _, pattern), (kind, message, seconds, peak) in zip(
    built, results[1:], strict=True
  ):
    assert kind == "ValueError", (name, kind, message)
    assert path.name in message, (name, message)
    assert __import__("re").search(pattern, message), (name, message)
    assert seconds < CASE_SECONDS, (name, seconds)
    assert peak - floor < PEAK_GROWTH_MB, (name, peak, floor)


def test_bombs_load_with_raised_limits(tmp_path):
  """The limits are the reason for a refusal: a trusted file loads with larger ones."""
  path = _legacy(
    tmp_path / "gzip.h5",
    gamma=lambda g: g.create_dataset("gamma:0", data=np.zeros(3, np.float32), **GZIP),
  )
  tight = kf.Limits(expansion=1, small_member_bytes=1, min_budget_bytes=1)
  with pytest.raises(ValueError, match=r"gzip\.h5: layer 'bn'.*compression ratio over 1:.*limits="):
    kf.read_batch_norm_layers(path, limits=tight)
  assert kf.read_batch_norm_layers(path)["bn"].weights[0].shape == (3,)
  with pytest.raises(ValueError, match=r"Limits\.expansion must be a positive int"):
    kf.Limits(expansion=0)
  with pytest.raises(TypeError, match=r"limits must be a kbn_jax\._keras_files\.Limits"):
    kf.read_batch_norm_layers(path, limits={"expansion": 10})


@pytest.mark.slow
def test_many_names_are_read_in_linear_time(tmp_path):
  """500 batch norms listed among 100k layer names: each lookup is a dict hit (before: the list
  was decoded again for every batch norm, 500 x 100k names)."""
  path = tmp_path / "wide.h5"
  names = [f"layer_{i}" for i in range(100_000)]
  bns = [f"bn_{i}" for i in range(500)]
  with h5py.File(path, "w", libver="latest") as f:
    f.attrs["model_config"] = _bn_config([_bn_entry(n) for n in bns])
    f.attrs["keras_version"] = "2.15.0"
    root = f.create_group("model_weights")
    root.attrs["layer_names"] = [n.encode() for n in names + bns]
    for n in bns:
      group = root.create_group(n)
      group.attrs["weight_names"] = [f"{n}/{w}:0".encode() for w in kf.WEIGHT_ORDER[:4]]
      for w in kf.WEIGHT_ORDER[:4]:
        group[f"{n}/{w}:0"] = np.ones(2, np.float32)
  [(kind, message, seconds, _)] = _run_worker([(path, "read_batch_norm_layers", {})])
  assert kind == "ok", message
  assert seconds < 6.0, seconds  # about 1 s on an idle machine


def test_chunked_name_lists(tmp_path):
  """Keras splits name lists over 64 KB into layer_names0, layer_names1, ...: read in order."""
  path = _legacy(tmp_path / "m.h5")
  with h5py.File(path, "a") as f:
    root = f["model_weights"]
    del root.attrs["layer_names"]
    root.attrs["layer_names0"] = [b"other"]
    root.attrs["layer_names1"] = [b"bn"]
  assert len(kf.read_layer_weights(path, "bn")) == 4


# ---------------------------------------------------------------------------------------------
# Real files: '/' in layer names, to_json() configs, SavedModel directories
# ---------------------------------------------------------------------------------------------
SLASH_KEYS = ["conv1/bn", "block2/bn", "dense1/bn"]


@pytest.mark.parametrize("name", ["tfk_slash.h5", "tfk_slash.keras"])
def test_slash_names_are_keys(name):
  records = kf.read_batch_norm_layers(FIXTURES / name)
  assert list(records) == SLASH_KEYS
  kernel, bias = kf.read_layer_weights(FIXTURES / name, "block2/conv")
  assert kernel.shape == (3, 3, 4, 5) and bias.shape == (5,)


def test_slash_names_in_a_legacy_weights_file_without_config():
  """save_weights(.h5) lists 'conv1/bn' in layer_names: found by its name, no config needed."""
  path = FIXTURES / "tfk_slash_weights.h5"
  with np.load(FIXTURES / "tfk_slash.npz") as reference:
    for key in SLASH_KEYS:
      for i, got in enumerate(kf.read_layer_weights(path, key)):
        np.testing.assert_array_equal(got, reference[f"{key}/w_before/{i}"])
  with pytest.raises(kf.LayerNotFoundError, match=r"'bn' is ambiguous: it is inside"):
    kf.read_layer_weights(path, "bn")


@pytest.mark.parametrize("name", ["tfk_slash.weights.h5", "tfk_slash_weights.h5"])
def test_to_json_config_gives_the_keras_version(name):
  """tf_keras writes keras_version on top of model.to_json(): the weights load as keras_v2."""
  config = FIXTURES / "tfk_slash.json"
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    records = kf.read_batch_norm_layers(FIXTURES / name, config_path=config)
    layers = keras_compat.load_batch_norms(FIXTURES / name, config_path=config)
  assert list(records) == SLASH_KEYS == list(layers)
  for record in records.values():
    assert (record.semantics, record.ambiguous) == ("keras_v2", False)
    assert "'2.21.0'" in record.semantics_evidence
    if name == "tfk_slash.weights.h5":  # the new layout records no version: the JSON's decides
      assert "tfk_slash.json" in record.semantics_evidence
  # The same text given as model_config.
  text = config.read_text()
  again = kf.read_batch_norm_layers(FIXTURES / name, model_config=text)
  assert {r.semantics for r in again.values()} == {"keras_v2"}
  # Without a version anywhere, the evidence says so truthfully.
  bare = json.loads(text)
  del bare["keras_version"], bare["backend"]
  bare["module"] = None
  records = kf.read_batch_norm_layers(FIXTURES / "tfk_slash.weights.h5", model_config=bare)
  assert "neither the file nor its config records" in records["conv1/bn"].semantics_evidence


def test_a_name_equal_to_a_nested_path_is_an_error_naming_both(tmp_path):
  nested = {"class_name": "Sequential", "config": {"name": "head", "layers": [_bn_entry("bn")]}}
  (tmp_path / "c.json").write_text(_bn_config([_bn_entry("head/bn"), nested]))
  with pytest.raises(
    ValueError,
    match=r"c\.json: the layer 'head/bn' \(top level\) and the layer 'bn' inside the "
    r"nested model 'head' are both keyed 'head/bn'",
  ):
    kf.read_layer_config(tmp_path / "c.json", "head/bn")


def test_saved_model_directory_says_how_to_convert(tmp_path):
  (tmp_path / "saved_model.pb").write_bytes(b"")
  with pytest.raises(ValueError, match=r"SavedModel.*does not read.*model\.save\('model\.keras'\)"):
    keras_compat.load_batch_norms(tmp_path)


# ---------------------------------------------------------------------------------------------
# load_batch_norms: config errors name the file and the layer; suspicious values warn
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  ("config", "message"),
  [
    ({"momentum": 5}, r"momentum"),
    ({"axis": "x"}, r"axis"),
    ({"gamma_initializer": {"class_name": "Nope", "config": {}}}, r"Nope|nope"),
  ],
)
def test_config_errors_name_the_file_and_layer(tmp_path, config, message):
  path = _legacy(tmp_path / "m.h5", config=_bn_config([_bn_entry(**config)]))
  with pytest.raises((ValueError, TypeError), match=rf"m\.h5: layer 'bn': .*{message}"):
    keras_compat.load_batch_norms(path)


def test_suspicious_values_load_with_a_warning(tmp_path):
  def gamma(group):
    group["gamma:0"] = np.array([1.0, np.nan, np.inf], np.float32)

  path = _legacy(tmp_path / "m.h5", gamma=gamma)
  with h5py.File(path, "a") as f:
    f["model_weights/bn/bn/moving_variance:0"][...] = np.array([1.0, -2.0, 1.0], np.float32)
  with pytest.warns(
    UserWarning,
    match=r"m\.h5: layer 'bn': 2 non-finite values in 'gamma', 1 negative value in "
    r"'moving_variance'; loaded as they are",
  ):
    layers = keras_compat.load_batch_norms(path)
  np.testing.assert_array_equal(layers["bn"][1]["params"]["gamma"], [1.0, np.nan, np.inf])


def test_zip_member_count_is_checked_before_the_archive_is_parsed(tmp_path):
  members = [(f"m{i}", b"", 0, None) for i in range(5)]
  path = _raw_zip(tmp_path / "many.keras", members)
  with pytest.raises(ValueError, match=r"many\.keras: the zip archive lists 5 members, over the"):
    kf.read_batch_norm_layers(path, limits=kf.Limits(max_names=4))
  with pytest.raises(ValueError, match=r"many\.keras is a zip archive but not a \.keras model"):
    kf.read_batch_norm_layers(path)


def test_bad_arguments_are_type_errors():
  with pytest.raises(TypeError, match=r"config_path must be a str or os\.PathLike, got 3"):
    kf.read_batch_norm_layers(FIXTURES / "k3_convnet.weights.h5", config_path=3)
  with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike, got None"):
    kf.read_batch_norm_layers(None)
  with pytest.raises(TypeError, match=r"layer_name must be a non-empty str, got 5"):
    kf.read_layer_weights(FIXTURES / "k3_convnet.keras", 5)
