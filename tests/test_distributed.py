"""Batch statistics across devices: N devices == one device on the concatenated batch.

Eight host CPU devices (see ``conftest.py``). Every test holds the library to an invariant or to
an independent float64 NumPy reference, never to numbers taken from the code under test:

* `jax.shard_map` with ``axis_name``: outputs, moving statistics after each of two steps and the
  gradients w.r.t. input, gamma and beta equal a single-device run on the concatenated batch;
* sharded `jax.jit` without ``axis_name``: the same, with the batch sharded over a data axis;
* ``axis_index_groups``: each group gets the statistics of its own concatenated batch;
* ghost batches that live on one device or span several, against a float64 NumPy reference of
  the per-device rule;
* every device ends each step with bit-identical moving statistics;
* the compiled HLO holds one small per-channel collective per call and never moves activations;
* one `jax.pmap` compatibility run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kbn_jax
from tests._asserts import assert_trees_close

NUM_DEVICES = 8
AXIS = "data"
STEPS = 2
MOMENTUM = 0.9
EPSILON = 1e-3
# Relative to max(1, max |expected|): N devices vs 1 device only differ in float32 summation order.
TOLERANCE = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 1e-2}
# Against the float64 NumPy reference, the float32 computation itself rounds.
REFERENCE_TOLERANCE = 1e-5


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
  """A layer configuration and its global input."""

  name: str
  config: dict[str, Any]
  shape: tuple[int, ...]
  dtype: str = "float32"
  mask: bool = False
  mesh_shape: tuple[int, ...] = (NUM_DEVICES,)
  mesh_axes: tuple[str, ...] = (AXIS,)

  def layer(self, **overrides) -> kbn_jax.BatchNormalization:
    return kbn_jax.BatchNormalization(
      **{"momentum": MOMENTUM, "epsilon": EPSILON, **self.config, **overrides}
    )

  @property
  def axis_name(self):
    return self.mesh_axes[0] if len(self.mesh_axes) == 1 else self.mesh_axes


RENORM = {
  "renorm": True,
  "renorm_clipping": {"rmin": 0.7, "rmax": 1.5, "dmax": 0.5},
  "renorm_momentum": 0.5,
}
CASES = (
  Case("plain", {}, (32, 6)),
  # Two feature axes, and statistics synchronized over two mesh axes at once.
  Case("multi_axis", {"axis": [1, 3]}, (16, 3, 2, 4), mesh_shape=(2, 4), mesh_axes=("x", "y")),
  Case("renorm", RENORM, (32, 5)),
  # NHWC resolves to Keras's fused path: the moving variance gets the Bessel factor of the
  # global count (144 / 143), not the per-device one (18 / 17).
  Case("fused_nhwc", {}, (16, 3, 3, 4)),
  # Uneven fill: device 4 is fully masked, others keep from 10% to all positions.
  Case("mask", {}, (32, 7, 5), mask=True),
  Case("float16", {}, (32, 6), dtype="float16"),
  Case("bfloat16", {}, (32, 6), dtype="bfloat16"),
)
MASK_FILL = (1.0, 0.75, 0.5, 0.25, 0.0, 0.9, 0.6, 0.1)


# --------------------------------------------------------------------------------------------
# Data, steps and comparisons
# --------------------------------------------------------------------------------------------


def _data(case: Case, seed: int = 0) -> dict[str, np.ndarray | None]:
  """Inputs (per-channel means and scales), output cotangents and masks for every step."""
  rng = np.random.default_rng(seed)
  shape = (STEPS,) + case.shape
  channels = case.shape[-1]
  loc = np.linspace(-1.0, 1.0, channels)
  scale = np.linspace(0.5, 2.0, channels)
  x = (loc + scale * rng.standard_normal(shape)).astype(case.dtype)
  cotangent = rng.standard_normal(shape).astype(np.float32)
  mask = None
  if case.mask:
    per_device = case.shape[0] // NUM_DEVICES
    fill = np.repeat(np.asarray(MASK_FILL), per_device)[:, None]
    mask = (rng.uniform(size=(STEPS,) + case.shape[:-1]) < fill).astype(np.float32)
  return {"x": x, "cotangent": cotangent, "mask": mask}


def _initial_variables(case: Case) -> dict[str, Any]:
  """Variables with gamma and beta moved off their initial values, so they matter."""
  variables = case.layer().init(jax.random.key(0), np.zeros(case.shape, case.dtype))

  def perturb(p):
    return p + 0.1 * jnp.arange(1, p.size + 1, dtype=p.dtype).reshape(p.shape)

  return {
    "params": jax.tree.map(perturb, variables["params"]),
    "batch_stats": variables["batch_stats"],
  }


def _local_step(layer: kbn_jax.BatchNormalization):
  """A training step on ``loss = sum(y * cotangent)``: outputs, new statistics, gradients."""

  def step(params, batch_stats, x, cotangent, mask):
    def loss(params, x):
      y, updates = layer.apply(
        {"params": params, "batch_stats": batch_stats},
        x,
        training=True,
        mask=mask,
        mutable=["batch_stats"],
      )
      return jnp.sum(y * cotangent), (y, updates["batch_stats"])

    (grad_params, grad_x), (y, new_stats) = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return {"y": y, "grad_x": grad_x, "grad_params": grad_params}, new_stats

  return step


def _run(step, variables, data, put=lambda v, spec: v):
  """Runs `STEPS` steps of `step`; returns each step's outputs and statistics as NumPy."""
  params = put(variables["params"], "replicated")
  stats = put(variables["batch_stats"], "stats")
  history = []
  for s in range(STEPS):
    mask = None if data["mask"] is None else data["mask"][s]
    outputs, stats = step(
      params,
      stats,
      put(data["x"][s], "batch"),
      put(data["cotangent"][s], "batch"),
      put(mask, "batch"),
    )
    history.append(jax.tree.map(np.asarray, {**outputs, "batch_stats": stats}))
  return history


@functools.cache
def _single_device(case: Case, subset: tuple[int, ...] | None = None):
  """The reference: the same steps on one device, on the whole batch or on `subset` of it."""
  data = _data(case)
  if subset is not None:
    data = {k: None if v is None else v[:, list(subset)] for k, v in data.items()}
  step = jax.jit(_local_step(case.layer()))
  return _run(step, _initial_variables(case), data)


def _assert_identical_rows(per_device_stats):
  """Every device (row) holds bit-identical statistics."""
  for name, value in per_device_stats.items():
    assert value.shape[0] == NUM_DEVICES, name
    np.testing.assert_array_equal(value, np.broadcast_to(value[:1], value.shape), err_msg=name)


# --------------------------------------------------------------------------------------------
# shard_map
# --------------------------------------------------------------------------------------------


def _shard_map_step(layer, mesh, batch_spec):
  """`_local_step` under `jax.shard_map`; each device keeps (and returns) its own statistics."""
  step = _local_step(layer)

  def per_device(params, stats, x, cotangent, mask):
    outputs, new_stats = step(params, jax.tree.map(lambda a: a[0], stats), x, cotangent, mask)
    return outputs, jax.tree.map(lambda a: a[None], new_stats)

  out_specs = ({"y": batch_spec, "grad_x": batch_spec, "grad_params": P()}, batch_spec)
  return jax.jit(
    jax.shard_map(
      per_device,
      mesh=mesh,
      in_specs=(P(), batch_spec, batch_spec, batch_spec, batch_spec),
      out_specs=out_specs,
    )
  )


def _putter(mesh, batch_spec):
  """Places params replicated, the batch sharded and per-device statistics one row a device."""

  def put(value, kind):
    if value is None:
      return None
    if kind == "stats":
      value = jax.tree.map(lambda a: jnp.broadcast_to(a, (NUM_DEVICES,) + a.shape), value)
    spec = P() if kind == "replicated" else batch_spec
    return jax.device_put(value, NamedSharding(mesh, spec))

  return put


def _run_shard_map(case: Case, **layer_overrides):
  """Runs `case` under `jax.shard_map`; returns each step's results and the step's HLO text."""
  mesh = jax.make_mesh(case.mesh_shape, case.mesh_axes)
  batch_spec = P(case.mesh_axes)
  layer = case.layer(axis_name=case.axis_name, **layer_overrides)
  step = _shard_map_step(layer, mesh, batch_spec)
  put = _putter(mesh, batch_spec)
  history = _run(step, _initial_variables(case), _data(case), put)
  return history, _compiled_text(step, _first_step_args(case, put))


def _first_step_args(case: Case, put):
  variables, data = _initial_variables(case), _data(case)
  mask = None if data["mask"] is None else data["mask"][0]
  return (
    put(variables["params"], "replicated"),
    put(variables["batch_stats"], "stats"),
    put(data["x"][0], "batch"),
    put(data["cotangent"][0], "batch"),
    put(mask, "batch"),
  )


def _compiled_text(jitted, args) -> str:
  """The optimized HLO of `jitted` for `args` (the executable is already cached once run)."""
  return jitted.lower(*args).compile().as_text()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_shard_map_matches_one_device(case):
  sharded, hlo = _run_shard_map(case)
  expected = _single_device(case)
  tolerance = TOLERANCE[case.dtype]
  for s in range(STEPS):
    _assert_identical_rows(sharded[s]["batch_stats"])
    got = {**sharded[s], "batch_stats": jax.tree.map(lambda a: a[0], sharded[s]["batch_stats"])}
    assert_trees_close(got, expected[s], tolerance, what=f"step {s}: ")
  # The statistics travel in one all-gather of per-channel partials (forward and backward).
  gathers = [c for c in _collectives(hlo) if c.op == "all-gather"]
  assert len(gathers) == 1, _collectives(hlo)
  features = math.prod(expected[0]["batch_stats"]["moving_mean"].shape)
  assert _is_per_channel(gathers[0], features), gathers


def test_axis_index_groups_give_each_group_its_statistics():
  # Interleaved rather than contiguous, so group membership (not position) is what counts.
  groups = [[0, 2, 4, 6], [1, 3, 5, 7]]
  case = Case("groups", RENORM, (32, 5))
  sharded, _ = _run_shard_map(case, axis_index_groups=groups)
  per_device = case.shape[0] // NUM_DEVICES
  rows = [list(range(d * per_device, (d + 1) * per_device)) for d in range(NUM_DEVICES)]
  for s in range(STEPS):
    grad_params = []
    for group in groups:
      samples = tuple(i for d in group for i in rows[d])
      expected = _single_device(case, samples)[s]
      grad_params.append(expected["grad_params"])
      got = {
        "y": sharded[s]["y"][list(samples)],
        "grad_x": sharded[s]["grad_x"][list(samples)],
      }
      assert_trees_close(got, {k: expected[k] for k in got}, TOLERANCE["float32"], f"{group}: ")
      for d in group:
        stats = jax.tree.map(lambda a, d=d: a[d], sharded[s]["batch_stats"])
        assert_trees_close(stats, expected["batch_stats"], TOLERANCE["float32"], f"device {d}: ")
        # Bit-identical within the group.
        for name, value in stats.items():
          np.testing.assert_array_equal(value, sharded[s]["batch_stats"][name][group[0]])
    # gamma and beta are shared: their gradient sums both groups' losses.
    assert_trees_close(
      sharded[s]["grad_params"],
      jax.tree.map(lambda a, b: a + b, *grad_params),
      TOLERANCE["float32"],
      "grad_params: ",
    )


# --------------------------------------------------------------------------------------------
# Ghost batches: a float64 NumPy reference of the per-device rule
# --------------------------------------------------------------------------------------------


def _ghost_batches(batch_size: int, per_device: int, virtual_batch_size: int):
  """The sample indices of every virtual batch under the per-device rule.

  A device whose batch is at least `virtual_batch_size` splits it with Keras's strided layout
  (ghost batch ``j`` holds local samples ``j, j + b/vbs, ...``); smaller per-device batches of
  consecutive devices are concatenated into one virtual batch.
  """
  if per_device >= virtual_batch_size:
    stride = per_device // virtual_batch_size
    return [
      [start + j + i * stride for i in range(virtual_batch_size)]
      for start in range(0, batch_size, per_device)
      for j in range(stride)
    ]
  return [list(range(k, k + virtual_batch_size)) for k in range(0, batch_size, virtual_batch_size)]


def _ghost_reference(x, dy, variables, batches):
  """float64 forward, gradients and moving statistics of one step over the given ghost batches."""
  x, dy = x.astype(np.float64), dy.astype(np.float64)
  gamma = np.asarray(variables["params"]["gamma"], np.float64)
  beta = np.asarray(variables["params"]["beta"], np.float64)
  y, grad_x = np.empty_like(x), np.empty_like(x)
  grad_gamma, grad_beta = np.zeros_like(gamma), np.zeros_like(beta)
  means, variances = [], []
  axes = tuple(range(x.ndim - 1))
  for batch in batches:
    xb, dyb = x[batch], dy[batch]
    mean, variance = xb.mean(axes), xb.var(axes)
    inv = 1.0 / np.sqrt(variance + EPSILON)
    x_hat = (xb - mean) * inv
    y[batch] = x_hat * gamma + beta
    grad_x[batch] = gamma * inv * (dyb - dyb.mean(axes) - x_hat * (dyb * x_hat).mean(axes))
    grad_gamma += (dyb * x_hat).sum(axes)
    grad_beta += dyb.sum(axes)
    means.append(mean)
    variances.append(variance)
  stats = variables["batch_stats"]
  new_stats = {
    "moving_mean": _ema(stats["moving_mean"], np.mean(means, axis=0)),
    "moving_variance": _ema(stats["moving_variance"], np.mean(variances, axis=0)),
  }
  grads = {"gamma": grad_gamma, "beta": grad_beta}
  return {"y": y, "grad_x": grad_x, "grad_params": grads}, new_stats


def _ema(moving, value):
  moving = np.asarray(moving, np.float64)
  return moving * MOMENTUM + value * (1.0 - MOMENTUM)


@pytest.mark.parametrize(
  ("batch_size", "virtual_batch_size"),
  [(64, 4), (16, 8)],
  ids=["on_one_device", "across_devices"],
)
def test_ghost_batches_follow_the_per_device_rule(batch_size, virtual_batch_size):
  # 8 samples a device with virtual batches of 4: two ghost batches per device, no exchange
  # but the moving statistics; 2 samples a device with virtual batches of 8: groups of 4
  # consecutive devices form one virtual batch.
  case = Case("ghost", {"virtual_batch_size": virtual_batch_size}, (batch_size, 3, 5))
  sharded, _ = _run_shard_map(case)
  data = _data(case)
  variables = jax.tree.map(np.asarray, _initial_variables(case))
  batches = _ghost_batches(batch_size, batch_size // NUM_DEVICES, virtual_batch_size)
  assert sorted(i for b in batches for i in b) == list(range(batch_size))
  for s in range(STEPS):
    expected, new_stats = _ghost_reference(data["x"][s], data["cotangent"][s], variables, batches)
    variables = {"params": variables["params"], "batch_stats": new_stats}
    _assert_identical_rows(sharded[s]["batch_stats"])
    got = {k: sharded[s][k] for k in expected}
    assert_trees_close(got, expected, REFERENCE_TOLERANCE, f"step {s}: ")
    stats = jax.tree.map(lambda a: a[0], sharded[s]["batch_stats"])
    assert_trees_close(stats, new_stats, REFERENCE_TOLERANCE, f"step {s} statistics: ")


@pytest.mark.parametrize(
  ("per_device", "virtual_batch_size", "message"),
  [
    (6, 4, r"`virtual_batch_size`=4 must divide the batch size 6"),
    (3, 4, r"`virtual_batch_size`=4 spans several devices.*per-device batch is 3"),
    (4, 12, r"devices per virtual batch \(12/4\) must divide the 8 devices"),
  ],
  ids=["local_batch_not_a_multiple", "local_batch_not_a_divisor", "group_not_a_divisor"],
)
def test_bad_ghost_batch_layouts_raise(per_device, virtual_batch_size, message):
  case = Case("bad_ghost", {"virtual_batch_size": virtual_batch_size}, (8 * per_device, 5))
  with pytest.raises(ValueError, match=message):
    _run_shard_map(case)


def test_init_needs_no_mapped_axis():
  # `init` skips the collectives, so a synchronized layer initializes outside shard_map/pmap.
  x = np.ones((4, 3), np.float32)
  synced = kbn_jax.BatchNormalization(axis_name=AXIS).init(jax.random.key(0), x)
  plain = kbn_jax.BatchNormalization().init(jax.random.key(0), x)
  assert jax.tree.all(jax.tree.map(np.array_equal, synced, plain))


def test_ghost_batches_reject_axis_index_groups():
  with pytest.raises(ValueError, match=r"`axis_index_groups` cannot be combined"):
    kbn_jax.BatchNormalization(
      virtual_batch_size=4, axis_name=AXIS, axis_index_groups=[[0, 1, 2, 3], [4, 5, 6, 7]]
    )


# --------------------------------------------------------------------------------------------
# Sharded jit: no axis_name, the batch sharded over a data axis
# --------------------------------------------------------------------------------------------


# 16-bit inputs only change local arithmetic, which shard_map already covers.
SHARDED_JIT_CASES = tuple(c for c in CASES if c.dtype == "float32") + (
  Case("ghost", {"virtual_batch_size": 8}, (32, 3, 5)),
)


def _sharded_jit_putter(mesh, batch_spec):
  batch = NamedSharding(mesh, batch_spec)

  def put(value, kind):
    if value is None or kind != "batch":
      return value
    return jax.device_put(value, batch)

  return put


@pytest.mark.parametrize("case", SHARDED_JIT_CASES, ids=lambda c: c.name)
def test_sharded_jit_matches_one_device(case):
  mesh = jax.make_mesh(case.mesh_shape, case.mesh_axes)
  batch_spec = P(case.mesh_axes)
  put = _sharded_jit_putter(mesh, batch_spec)
  step = jax.jit(_local_step(case.layer()))
  sharded = _run(step, _initial_variables(case), _data(case), put)
  expected = _single_device(case)
  for s in range(STEPS):
    assert_trees_close(sharded[s], expected[s], TOLERANCE[case.dtype], f"step {s}: ")
  # Only all-reduces of statistics: nothing gathers, permutes or reshuffles activations.
  args = _first_step_args(case, put)
  assert {c.op for c in _collectives(_compiled_text(step, args))} == {"all-reduce"}
  # The output stays sharded; the statistics come back replicated, the same on every device.
  outputs, stats = step(*args)
  assert outputs["y"].sharding.is_equivalent_to(NamedSharding(mesh, batch_spec), len(case.shape))
  for value in jax.tree.leaves(stats):
    copies = [np.asarray(shard.data) for shard in value.addressable_shards]
    assert value.sharding.is_fully_replicated and len(copies) == NUM_DEVICES
    for copy in copies:
      np.testing.assert_array_equal(copy, copies[0])


# --------------------------------------------------------------------------------------------
# Collectives in the compiled HLO
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Collective:
  op: str
  shapes: tuple[tuple[int, ...], ...]

  @property
  def elements(self) -> int:
    return max(math.prod(shape) for shape in self.shapes)


_COLLECTIVE = re.compile(
  r"=\s+(?P<shapes>\S.*?)\s+(?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|"
  r"collective-permute|collective-broadcast|ragged-all-to-all)(?:-start)?\("
)


def _collectives(hlo_text: str) -> list[Collective]:
  """Every cross-device collective of an HLO module (async pairs counted once)."""
  found = []
  for line in hlo_text.splitlines():
    match = _COLLECTIVE.search(line)
    if match:
      shapes = tuple(
        tuple(int(d) for d in dims.split(",") if d)
        for dims in re.findall(r"\[([\d,]*)\]", match["shapes"])
      )
      found.append(Collective(match["op"], shapes))
  return found


_HLO_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_CALLED = re.compile(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)")
_BRANCHES = re.compile(
  r"branch_computations=\{([^}]*)\}|true_computation=%([\w.\-]+), "
  r"false_computation=%([\w.\-]+)"
)


def _collectives_per_path(hlo_text: str) -> list[list[Collective]]:
  """The collectives of each path through the module's conditionals (one list per path).

  The layer's moments take one pass or two behind a ``conditional``; a device runs the
  collectives of one branch, so each path is checked on its own.
  """
  computations, name, entry = {}, None, None
  for line in hlo_text.splitlines():
    header = _HLO_COMPUTATION.match(line)
    if header:
      name = header.group(1)
      entry = name if line.startswith("ENTRY") else entry
      computations[name] = []
    elif name is not None:
      computations[name].append(line)

  def paths(computation):
    result = [[]]
    for line in computations.get(computation, []):
      branches = _BRANCHES.search(line)
      if " conditional(" in line and branches:
        listed = branches.group(1) or ",".join(branches.group(2, 3))
        options = [p for b in listed.split(",") for p in paths(b.strip().lstrip("%"))]
      else:
        options = [_collectives(line)]
        for called in _CALLED.findall(line):
          options = [options[0] + p for p in paths(called)]
      result = [done + option for done in result for option in options]
    return result

  return paths(entry)


def _is_per_channel(collective: Collective, features: int) -> bool:
  """At most a handful of numbers per feature and device: statistics, not activations."""
  return all(
    math.prod(shape) % features == 0 and math.prod(shape) <= 4 * NUM_DEVICES * features
    for shape in collective.shapes
  )


# Big enough that any activation-sized transfer stands out: 4 x 8 x 8 x 16 values per device.
HLO_SHAPE = (8 * 4, 8, 8, 16)
FORWARD_CONFIGS = {
  "fused_nhwc": {},
  "ghost_on_one_device": {"virtual_batch_size": 2},
  "ghost_across_devices": {"virtual_batch_size": 16},
  "axis_index_groups": {"axis_index_groups": [[0, 1, 2, 3], [4, 5, 6, 7]]},
}


def _hlo_case(config) -> Case:
  return Case("hlo", config, HLO_SHAPE)


def _local_activation_elements() -> int:
  return math.prod(HLO_SHAPE) // NUM_DEVICES


@pytest.mark.parametrize("config", FORWARD_CONFIGS.values(), ids=FORWARD_CONFIGS.keys())
def test_forward_uses_one_per_channel_collective(config):
  case = _hlo_case(config)
  mesh = jax.make_mesh(case.mesh_shape, case.mesh_axes)
  batch_spec = P(AXIS)
  layer = case.layer(axis_name=AXIS)

  def forward(variables, x):
    y, updates = layer.apply(variables, x, training=True, mutable=["batch_stats"])
    return y, jax.tree.map(lambda a: a[None], updates["batch_stats"])

  step = jax.jit(
    jax.shard_map(
      forward, mesh=mesh, in_specs=(P(), batch_spec), out_specs=(batch_spec, batch_spec)
    )
  )
  put = _putter(mesh, batch_spec)
  args = (put(_initial_variables(case), "replicated"), put(_data(case)["x"][0], "batch"))
  collectives = _collectives(_compiled_text(step, args))
  assert len(collectives) == 1, collectives
  assert _is_per_channel(collectives[0], HLO_SHAPE[-1]), collectives
  assert collectives[0].elements * 8 <= _local_activation_elements()


def test_training_step_collectives_under_shard_map():
  # Forward and backward: the statistics' all-gather, plus per-channel sums for the backward
  # pass (the cotangents of the statistics and the gradients of the replicated gamma and beta,
  # which XLA deduplicates and packs into one all-reduce).
  case = _hlo_case({})
  mesh = jax.make_mesh(case.mesh_shape, case.mesh_axes)
  step = _shard_map_step(case.layer(axis_name=AXIS), mesh, P(AXIS))
  collectives = _collectives(_compiled_text(step, _first_step_args(case, _putter(mesh, P(AXIS)))))
  assert [c.op for c in collectives].count("all-gather") == 1, collectives
  assert {c.op for c in collectives} <= {"all-gather", "all-reduce"}, collectives
  assert len(collectives) <= 3, collectives
  for collective in collectives:
    assert _is_per_channel(collective, HLO_SHAPE[-1]), collective


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
def test_training_step_collectives_under_sharded_jit(backward):
  case = _hlo_case({})
  mesh = jax.make_mesh(case.mesh_shape, case.mesh_axes)
  put = _sharded_jit_putter(mesh, P(AXIS))
  layer = case.layer()
  args = _first_step_args(case, put)
  if backward:
    step = jax.jit(_local_step(layer))
  else:

    def forward(params, batch_stats, x, cotangent, mask):
      del cotangent, mask
      return layer.apply(
        {"params": params, "batch_stats": batch_stats}, x, training=True, mutable=["batch_stats"]
      )

    step = jax.jit(forward)
  paths = _collectives_per_path(_compiled_text(step, args))
  # Per-channel all-reduces only, on every path: the two sums of one pass in one all-reduce, or
  # the mean and then the second moment around it (two passes), or both when one pass is not
  # trusted; the backward pass adds one (its per-channel sums packed together).
  assert len(paths) >= 2, paths
  assert min(map(len, paths)) == 1 + backward, paths
  for collectives in paths:
    assert collectives and {c.op for c in collectives} == {"all-reduce"}, collectives
    assert len(collectives) <= 3 + backward, collectives
    for collective in collectives:
      assert _is_per_channel(collective, HLO_SHAPE[-1]), collective


# --------------------------------------------------------------------------------------------
# Large mean: no E[x^2] - E[x]^2 cancellation
# --------------------------------------------------------------------------------------------


@functools.cache
def _large_mean_variance(mode: str):
  """Batch variance of float32 data with mean 1e4 and std 1, and its float64 value."""
  case = Case("large_mean", {"momentum": 0.0}, (64, 3, 4))
  x = (1e4 + np.random.default_rng(0).standard_normal(case.shape)).astype(np.float32)
  variables = case.layer().init(jax.random.key(0), x)
  mesh = jax.make_mesh(case.mesh_shape, case.mesh_axes)
  xs = jax.device_put(x, NamedSharding(mesh, P(AXIS)))
  if mode == "shard_map":
    layer = case.layer(axis_name=AXIS)

    def variance(variables, x):
      _, updates = layer.apply(variables, x, training=True, mutable=["batch_stats"])
      return updates["batch_stats"]["moving_variance"]

    fn = jax.shard_map(variance, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P())
  else:
    layer = case.layer()

    def fn(variables, x):
      _, updates = layer.apply(variables, x, training=True, mutable=["batch_stats"])
      return updates["batch_stats"]["moving_variance"]

  # momentum 0: the moving variance is the batch variance.
  got = np.asarray(jax.jit(fn)(variables, xs), np.float64)
  return got, x.astype(np.float64).var(axis=(0, 1))


@pytest.mark.parametrize("mode", ["shard_map", "sharded_jit"])
def test_large_mean_variance_has_no_cancellation(mode):
  got, expected = _large_mean_variance(mode)
  # E[x^2] - E[x]^2 in float32 is off by more than 100% here.
  np.testing.assert_allclose(got, expected, rtol=1e-3)


@pytest.mark.parametrize("mode", ["shard_map", "sharded_jit"])
def test_large_mean_variance_is_as_accurate_as_two_pass(mode):
  # A single-device two-pass variance is accurate to ~3e-6 here.
  got, expected = _large_mean_variance(mode)
  np.testing.assert_allclose(got, expected, rtol=2e-5)


# --------------------------------------------------------------------------------------------
# pmap compatibility (pmap is in maintenance mode; this is its one test)
# --------------------------------------------------------------------------------------------


def _run_pmap(case: Case):
  """`_local_step` under `jax.pmap`: one copy of the variables per device, psum'd gradients."""
  step = _local_step(case.layer(axis_name=AXIS))

  def per_device(params, stats, x, cotangent, mask):
    outputs, new_stats = step(params, stats, x, cotangent, mask)
    outputs["grad_params"] = jax.lax.psum(outputs["grad_params"], AXIS)
    return outputs, new_stats

  pmapped = jax.pmap(per_device, axis_name=AXIS, in_axes=(None, 0, 0, 0, 0))

  def put(value, kind):
    if value is None or kind == "replicated":
      return value
    if kind == "stats":
      return jax.tree.map(lambda a: np.broadcast_to(a, (NUM_DEVICES,) + a.shape), value)
    return value.reshape((NUM_DEVICES, -1) + value.shape[1:])

  history = _run(pmapped, _initial_variables(case), _data(case), put)
  for outputs in history:
    for name in ("y", "grad_x"):
      outputs[name] = outputs[name].reshape((-1,) + outputs[name].shape[2:])
    outputs["grad_params"] = jax.tree.map(lambda a: a[0], outputs["grad_params"])
  return history


@pytest.mark.parametrize(
  "case",
  [CASES[0], CASES[4]],
  ids=lambda c: c.name,
)
def test_pmap_matches_one_device(case):
  history = _run_pmap(case)
  expected = _single_device(case)
  for s in range(STEPS):
    _assert_identical_rows(history[s]["batch_stats"])
    got = {**history[s], "batch_stats": jax.tree.map(lambda a: a[0], history[s]["batch_stats"])}
    assert_trees_close(got, expected[s], TOLERANCE["float32"], f"step {s}: ")


# --------------------------------------------------------------------------------------------
# Ghost-batch scope: "global" equals one device everywhere; "device" does not
# --------------------------------------------------------------------------------------------

GLOBAL_GHOST_CASES = tuple(
  Case(f"ghost_global_{vbs}", {"virtual_batch_size": vbs, "ghost_batch_scope": "global"}, shape)
  for vbs, shape in ((8, (32, 3, 5)), (16, (64, 5)), (32, (64, 2, 3)))
)


@pytest.mark.parametrize("case", GLOBAL_GHOST_CASES, ids=lambda c: c.name)
def test_global_ghost_scope_under_shard_map_equals_one_device(case):
  sharded, hlo = _run_shard_map(case)
  expected = _single_device(case)
  for s in range(STEPS):
    _assert_identical_rows(sharded[s]["batch_stats"])
    got = {**sharded[s], "batch_stats": jax.tree.map(lambda a: a[0], sharded[s]["batch_stats"])}
    assert_trees_close(got, expected[s], TOLERANCE["float32"], what=f"step {s}: ")
  # One small collective of per-ghost-batch partials; no activation moves.
  features = math.prod(expected[0]["batch_stats"]["moving_mean"].shape)
  ghosts = case.shape[0] // case.config["virtual_batch_size"]
  for collective in _collectives(hlo):
    assert collective.elements <= 4 * NUM_DEVICES * features * ghosts, collective


@pytest.mark.parametrize("case", GLOBAL_GHOST_CASES[:1], ids=lambda c: c.name)
def test_global_ghost_scope_under_pmap_equals_one_device(case):
  history = _run_pmap(case)
  expected = _single_device(case)
  for s in range(STEPS):
    _assert_identical_rows(history[s]["batch_stats"])
    got = {**history[s], "batch_stats": jax.tree.map(lambda a: a[0], history[s]["batch_stats"])}
    assert_trees_close(got, expected[s], TOLERANCE["float32"], f"step {s}: ")


def test_device_ghost_scope_differs_from_one_device_on_ordered_data():
  """The default splits each device's own batch (Keras under tf.distribute): other numbers."""
  case = Case("ghost_device", {"virtual_batch_size": 8}, (32, 3, 5))
  sharded, _ = _run_shard_map(case)
  expected = _single_device(case)
  with pytest.raises(AssertionError, match="max difference"):
    assert_trees_close(sharded[0]["y"], expected[0]["y"], 1e-3)


def test_global_ghost_scope_needs_a_multiple_of_the_device_count():
  case = Case("ghost_bad", {"virtual_batch_size": 4, "ghost_batch_scope": "global"}, (32, 5))
  with pytest.raises(ValueError, match=r"multiple of the 8 devices.*ghost_batch_scope='device'"):
    _run_shard_map(case)


@pytest.mark.parametrize("virtual_batch_size", [2, 6])
def test_sharded_jit_ghost_batches_on_an_explicit_mesh(virtual_batch_size):
  """A ghost batch that mixes shards: a clear error on an Explicit mesh, and an Auto mesh works
  (it gathers); a multiple of the device count works on both (SHARDED_JIT_CASES)."""
  case = Case("ghost_explicit", {"virtual_batch_size": virtual_batch_size}, (48, 5))
  step = jax.jit(_local_step(case.layer()))
  explicit = jax.make_mesh((4,), (AXIS,), devices=jax.devices()[:4])
  put = _sharded_jit_putter(explicit, P(AXIS))
  with pytest.raises(ValueError, match=r"not a multiple of the 4 shards.*AxisType\.Auto"):
    _run(step, _initial_variables(case), _data(case), put)
  auto = jax.make_mesh(
    (4,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4]
  )
  history = _run(step, _initial_variables(case), _data(case), _sharded_jit_putter(auto, P(AXIS)))
  expected = _single_device(case)
  for s in range(STEPS):
    assert_trees_close(history[s], expected[s], TOLERANCE["float32"], f"step {s}: ")


def test_symbolic_batch_export_of_ghost_batches_says_how():
  layer = kbn_jax.BatchNormalization(virtual_batch_size=2)
  variables = layer.init(jax.random.key(0), np.zeros((4, 3), np.float32))
  (batch,) = jax.export.symbolic_shape("b")
  spec = jax.ShapeDtypeStruct((batch, 3), jnp.float32)
  step = jax.jit(lambda v, x: layer.apply(v, x, training=True, mutable=["batch_stats"]))
  with pytest.raises(ValueError, match=r"batch size is symbolic.*symbolic_shape\(\"2\*k"):
    jax.export.export(step)(variables, spec)
  (batch,) = jax.export.symbolic_shape("2*k")
  exported = jax.export.export(step)(variables, jax.ShapeDtypeStruct((batch, 3), jnp.float32))
  y, _ = exported.call(variables, np.arange(24.0, dtype=np.float32).reshape(8, 3))
  np.testing.assert_allclose(
    y, step(variables, np.arange(24.0, dtype=np.float32).reshape(8, 3))[0], rtol=1e-6, atol=1e-6
  )
