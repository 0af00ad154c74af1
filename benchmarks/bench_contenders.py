"""Contenders for the benchmark: kbn_jax, Flax, Equinox, Haiku, Keras 3 (JAX), tf_keras V1, x*a+b.

Each builder takes a `Config` and a workload name and returns a `_timing.Contender` (or None
when that library has no such layer or option). The workloads are:

* ``infer``: inference with moving statistics;
* ``train_fwd``: a training forward pass, returning the output and the updated statistics;
* ``train_step``: forward + backward (``jax.vjp`` with a fixed output cotangent; gradients with
  respect to the input, gamma and beta) + the statistics update;
* the floor ``x * a + b`` (one read, one write of the activations) for every workload.

`activation_traffic` counts, in a compiled step's HLO, how many activation-sized arrays its
kernels read and write: memory traffic in units of one activation, free of timing noise.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from _timing import Contender

import kbn_jax

WORKLOADS = ("infer", "train_fwd", "train_step")
EPSILON = 1e-3
MOMENTUM = 0.99
RENORM_CLIPPING = {"rmax": 3.0, "rmin": 1 / 3, "dmax": 5.0}
OURS = "kbn_jax"
PLAIN = "kbn_jax (plain BN)"
FUNCTIONAL = "kbn_jax (functional)"
NNX = "kbn_jax (nnx)"
FLAX_NNX = "nnx.BatchNorm"
EQUINOX = "kbn_jax (equinox)"
EQX_PEER = "eqx.nn.BatchNorm"
HAIKU = "kbn_jax (haiku)"
HK_PEER = "hk.BatchNorm"
FLOOR = "x*a+b (floor)"


@dataclasses.dataclass(frozen=True)
class Config:
  """One benchmark configuration.

  Attributes:
    name: row label.
    shape: input shape.
    axis: feature axis.
    renorm: Batch Renormalization.
    virtual_batch_size: ghost batch size.
    plain: the name of the plain configuration this variant is compared with, if any.
  """

  name: str
  shape: tuple[int, ...]
  axis: int = -1
  renorm: bool = False
  virtual_batch_size: int | None = None
  plain: str | None = None

  @property
  def channels(self) -> int:
    return self.shape[self.axis]

  @property
  def variant(self) -> bool:
    return self.renorm or self.virtual_batch_size is not None


CONFIGS = (
  Config("nhwc_64x32x32x64", (64, 32, 32, 64)),
  Config("nhwc_32x56x56x128", (32, 56, 56, 128)),
  Config("nhwc_8x112x112x64", (8, 112, 112, 64)),
  Config("dense_256x1024", (256, 1024)),
  Config("dense_1024x1024", (1024, 1024)),
  Config("dense_4096x512", (4096, 512)),
  Config("nchw_64x64x32x32", (64, 64, 32, 32), axis=1),
  Config("ghost16_64x32x32x64", (64, 32, 32, 64), virtual_batch_size=16, plain="nhwc_64x32x32x64"),
  Config("renorm_64x32x32x64", (64, 32, 32, 64), renorm=True, plain="nhwc_64x32x32x64"),
)


# --------------------------------------------------------------------------------------------
# Inputs


@functools.lru_cache(maxsize=4)
def inputs(shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Input and output cotangent (float32, normal with mean 0.5 and std 2), fixed seeds."""
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32) * 2.0 + 0.5
  ct = jax.random.normal(jax.random.key(1), shape, jnp.float32)
  return jax.block_until_ready((x, ct))


def _numpy_inputs(shape):
  x, ct = inputs(shape)
  return np.asarray(x), np.asarray(ct)


# --------------------------------------------------------------------------------------------
# Flax linen modules: kbn_jax and flax.linen.BatchNorm


def _linen_contender(name, module, config: Config, workload: str):
  """Times a linen batch-norm module: `module(x, training)` with ``batch_stats``."""
  x, ct = inputs(config.shape)
  variables = module.init(jax.random.key(0), x)
  params, stats = variables.get("params", {}), variables["batch_stats"]

  def call(params, x, stats, training):
    return module.apply(
      {"params": params, "batch_stats": stats}, x, training, mutable=["batch_stats"]
    )

  compiled = jax.jit(_workload_fn(call, workload))
  return Contender(name, lambda: compiled(params, stats, x, ct)), _compile_builder(
    call, workload, (params, stats, x, ct)
  )


def _workload_fn(call, workload):
  """Wraps ``call(params, x, stats, training) -> (y, updates)`` into the workload's step."""
  if workload == "infer":
    return lambda params, stats, x, ct: call(params, x, stats, False)[0]
  if workload == "train_fwd":
    return lambda params, stats, x, ct: call(params, x, stats, True)

  def step(params, stats, x, ct):
    y, vjp, updates = jax.vjp(lambda x, p: call(p, x, stats, True), x, params, has_aux=True)
    return y, vjp(ct), updates

  return step


def _compile_builder(call, workload, args):
  """Returns a builder of fresh compilations of the training step (for compile time)."""
  if workload != "train_step":
    return None

  def build():
    fresh = _workload_fn(lambda *a: call(*a), workload)
    return lambda: jax.jit(fresh).lower(*args).compile()

  return build


def kbn_jax_contender(config: Config, workload: str, *, plain: bool = False):
  """kbn_jax.BatchNormalization as committed; `plain` drops renorm and ghost batches."""
  module = kbn_jax.BatchNormalization(**_keras_kwargs(config, plain=plain))

  class _Adapter:  # kbn_jax's signature is (x, training); Flax's is (x, use_running_average).
    init = module.init
    apply = module.apply

  return _linen_contender(PLAIN if plain else OURS, _Adapter, config, workload)


def _keras_kwargs(config: Config, *, plain: bool = False) -> dict:
  """The Keras arguments of a configuration; `plain` drops renorm and ghost batches."""
  kwargs = {"axis": config.axis, "momentum": MOMENTUM, "epsilon": EPSILON}
  if not plain:
    kwargs.update(renorm=config.renorm, virtual_batch_size=config.virtual_batch_size)
    if config.renorm:
      kwargs["renorm_clipping"] = RENORM_CLIPPING
  return kwargs


def functional_contender(config: Config, workload: str):
  """kbn_jax.functional.batch_normalization under `jax.jit`: the pure function, no Flax."""
  from kbn_jax import functional  # noqa: PLC0415

  bn_config = functional.BatchNormConfig(**_keras_kwargs(config))
  x, ct = inputs(config.shape)
  params, stats = functional.init_variables(bn_config, jax.random.key(0), config.shape)

  def call(params, x, stats, training):
    return functional.batch_normalization(x, params, stats, bn_config, training=training)

  compiled = jax.jit(_workload_fn(call, workload))
  return Contender(FUNCTIONAL, lambda: compiled(params, stats, x, ct)), _compile_builder(
    call, workload, (params, stats, x, ct)
  )


def flax_contender(config: Config, workload: str, *, fast_variance: bool):
  import flax.linen as nn  # noqa: PLC0415

  if config.variant:
    return None, None
  module = nn.BatchNorm(
    axis=config.axis, momentum=MOMENTUM, epsilon=EPSILON, use_fast_variance=fast_variance
  )

  class _Adapter:
    @staticmethod
    def init(key, x):
      return module.init(key, x, use_running_average=False)

    @staticmethod
    def apply(variables, x, training, mutable):
      return module.apply(variables, x, use_running_average=not training, mutable=mutable)

  name = "flax" if fast_variance else "flax (two-pass)"
  return _linen_contender(name, _Adapter, config, workload)


# --------------------------------------------------------------------------------------------
# Flax NNX modules: kbn_jax.nnx.BatchNormalization and flax.nnx.BatchNorm, inside nnx.jit


def kbn_nnx_available() -> bool:
  return importlib.util.find_spec("kbn_jax.nnx") is not None


def _nnx_contender(name, model, call, config: Config, workload: str):
  """Times an NNX batch-norm module; `call(model, x, training)` runs it.

  Training runs under `nnx.jit`; inference as a pure function of the split state under
  `jax.jit`, the way an inference server avoids `nnx.jit`'s per-call cost.

  The training step differentiates the module's parameters and the input with `jax.vjp` (a
  fixed output cotangent) through `nnx.split`/`nnx.merge`, and writes the new statistics back
  with `nnx.update`, the usual NNX training-step pattern. Compile times and HLO traffic come
  from the same step as a pure function under `jax.jit`.
  """
  from flax import nnx  # noqa: PLC0415

  x, ct = inputs(config.shape)

  def pure_step(graphdef, params, rest, x, ct):
    def forward(params, x):
      module = nnx.merge(graphdef, params, rest, copy=True)
      return call(module, x, True), nnx.state(module, nnx.BatchStat)

    y, vjp, new_stats = jax.vjp(forward, params, x, has_aux=True)
    return y, vjp(ct), new_stats

  if workload == "infer":
    # An inference server splits the model once and jits a pure function of its state (NNX's
    # documented low-overhead pattern): `nnx.jit` would add its per-call graph traversal,
    # about 200 us here, to every call.
    graphdef, state = nnx.split(model)
    infer = jax.jit(lambda state, x: call(nnx.merge(graphdef, state), x, False))
    return Contender(name, lambda: infer(state, x)), None
  if workload == "train_fwd":
    step = nnx.jit(lambda model, x, ct: call(model, x, True))
  else:

    @nnx.jit
    def step(model, x, ct):
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)
      y, grads, new_stats = pure_step(graphdef, params, rest, x, ct)
      nnx.update(model, new_stats)
      return y, grads

  build = None
  if workload == "train_step":
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def build():
      fresh = functools.partial(lambda *a: pure_step(*a), graphdef)
      return lambda: jax.jit(fresh).lower(params, rest, x, ct).compile()

  return Contender(name, lambda: step(model, x, ct)), build


def kbn_nnx_contender(config: Config, workload: str):
  """kbn_jax.nnx.BatchNormalization (skipped, with a note from `contenders`, if absent)."""
  if not kbn_nnx_available():
    return None, None
  from flax import nnx  # noqa: PLC0415

  import kbn_jax.nnx  # noqa: PLC0415

  model = kbn_jax.nnx.BatchNormalization(config.channels, **_keras_kwargs(config), rngs=nnx.Rngs(0))
  return _nnx_contender(
    NNX, model, lambda m, x, training: m(x, training=training), config, workload
  )


def flax_nnx_contender(config: Config, workload: str):
  """flax.nnx.BatchNorm (the default fast variance), mode given per call."""
  if config.variant:
    return None, None
  from flax import nnx  # noqa: PLC0415

  model = nnx.BatchNorm(
    config.channels, axis=config.axis, momentum=MOMENTUM, epsilon=EPSILON, rngs=nnx.Rngs(0)
  )
  return _nnx_contender(
    FLAX_NNX,
    model,
    lambda m, x, training: m(x, use_running_average=not training),
    config,
    workload,
  )


# --------------------------------------------------------------------------------------------
# Equinox (per example under jax.vmap, state in eqx.nn.State) and Haiku (transform_with_state)


def equinox_available() -> bool:
  return importlib.util.find_spec("equinox") is not None


def haiku_available() -> bool:
  return importlib.util.find_spec("haiku") is not None


def _per_example_channels_first(config: Config) -> bool:
  """Whether one example has its channels on axis 0 (NCHW or dense), as `eqx.nn.BatchNorm` asks."""
  return config.axis % len(config.shape) == 1


def _equinox_contender(name, make_layer, config: Config, workload: str):
  """Times an Equinox stateful layer the Equinox way: per example under ``jax.vmap``.

  ``call(params, x, state, training)`` combines the array fields with the static rest, vmaps the
  layer over the batch with ``axis_name="batch"`` (the state unmapped) and returns ``(y,
  state)``, which `_workload_fn` turns into the workload.
  """
  import equinox as eqx  # noqa: PLC0415

  x, ct = inputs(config.shape)
  layer, state = eqx.nn.make_with_state(make_layer)()
  params, static = eqx.partition(layer, eqx.is_inexact_array)

  def call(params, x, state, training):
    layer = eqx.combine(params, static)
    one = lambda x, state: layer(x, state, inference=not training)  # noqa: E731
    return jax.vmap(one, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

  compiled = jax.jit(_workload_fn(call, workload))
  return Contender(name, lambda: compiled(params, state, x, ct)), _compile_builder(
    call, workload, (params, state, x, ct)
  )


def kbn_equinox_contender(config: Config, workload: str):
  """kbn_jax.equinox.BatchNormalization, per example (`axis` counted in one example)."""
  if config.variant or not equinox_available():
    return None, None
  import kbn_jax.equinox  # noqa: PLC0415

  axis = config.axis - 1 if config.axis > 0 else config.axis
  kwargs = {"axis": axis, "momentum": MOMENTUM, "epsilon": EPSILON}
  make = functools.partial(kbn_jax.equinox.BatchNormalization, config.channels, "batch", **kwargs)
  return _equinox_contender(EQUINOX, make, config, workload)


def eqx_contender(config: Config, workload: str):
  """eqx.nn.BatchNorm (``mode="batch"``, the mode Equinox recommends), channels first only."""
  if config.variant or not equinox_available() or not _per_example_channels_first(config):
    return None, None
  import equinox as eqx  # noqa: PLC0415

  make = functools.partial(
    eqx.nn.BatchNorm, config.channels, "batch", eps=EPSILON, momentum=MOMENTUM, mode="batch"
  )
  return _equinox_contender(EQX_PEER, make, config, workload)


def _haiku_contender(name, make_layer, config: Config, workload: str):
  """Times a Haiku layer in ``hk.transform_with_state``: ``apply(params, state, x, training)``."""
  import haiku as hk  # noqa: PLC0415

  x, ct = inputs(config.shape)
  model = hk.transform_with_state(lambda x, is_training: make_layer()(x, is_training))
  params, state = model.init(jax.random.key(0), x, True)

  def call(params, x, state, training):
    return model.apply(params, state, None, x, training)

  compiled = jax.jit(_workload_fn(call, workload))
  return Contender(name, lambda: compiled(params, state, x, ct)), _compile_builder(
    call, workload, (params, state, x, ct)
  )


def kbn_haiku_contender(config: Config, workload: str):
  """kbn_jax.haiku.BatchNormalization."""
  if config.variant or not haiku_available():
    return None, None
  import kbn_jax.haiku  # noqa: PLC0415

  kwargs = {"axis": config.axis, "momentum": MOMENTUM, "epsilon": EPSILON}
  make = functools.partial(kbn_jax.haiku.BatchNormalization, **kwargs)
  return _haiku_contender(HAIKU, make, config, workload)


def hk_contender(config: Config, workload: str):
  """hk.BatchNorm with scale and offset (``data_format`` from the configuration's axis)."""
  if config.variant or not haiku_available():
    return None, None
  import haiku as hk  # noqa: PLC0415

  data_format = "channels_first" if _per_example_channels_first(config) else "channels_last"
  make = functools.partial(hk.BatchNorm, True, True, MOMENTUM, eps=EPSILON, data_format=data_format)
  return _haiku_contender(HK_PEER, make, config, workload)


# --------------------------------------------------------------------------------------------
# Keras 3 on the JAX backend, through stateless_call


def keras3_available() -> bool:
  return os.environ.get("KERAS_BACKEND") == "jax" and importlib.util.find_spec("keras") is not None


def keras3_contender(config: Config, workload: str):
  if config.variant or not keras3_available():
    return None, None
  import keras  # noqa: PLC0415

  if not keras.__version__.startswith("3") or keras.backend.backend() != "jax":
    return None, None
  layer = keras.layers.BatchNormalization(axis=config.axis, momentum=MOMENTUM, epsilon=EPSILON)
  layer.build(config.shape)
  trainable = [v.value for v in layer.trainable_variables]
  non_trainable = [v.value for v in layer.non_trainable_variables]
  x, ct = inputs(config.shape)

  def call(params, x, stats, training):
    return layer.stateless_call(params, stats, x, training=training)

  compiled = jax.jit(_workload_fn(call, workload))
  return Contender("keras3 (jax)", lambda: compiled(trainable, non_trainable, x, ct)), (
    _compile_builder(call, workload, (trainable, non_trainable, x, ct))
  )


# --------------------------------------------------------------------------------------------
# tf_keras's V1 layer (TensorFlow, fused where V1 fuses)


def tf_keras_available() -> bool:
  return importlib.util.find_spec("tf_keras") is not None


def tf_keras_contender(config: Config, workload: str):
  if not tf_keras_available():
    return None, None
  import tensorflow as tf  # noqa: PLC0415
  from tf_keras.src.layers.normalization.batch_normalization_v1 import (  # noqa: PLC0415
    BatchNormalization,
  )

  kwargs = {"axis": config.axis, "momentum": MOMENTUM, "epsilon": EPSILON}
  if config.renorm:
    kwargs.update(renorm=True, renorm_clipping=RENORM_CLIPPING)
  if config.virtual_batch_size is not None:
    kwargs["virtual_batch_size"] = config.virtual_batch_size
  layer = BatchNormalization(**kwargs)
  x_np, ct_np = _numpy_inputs(config.shape)
  x, ct = tf.constant(x_np), tf.constant(ct_np)
  layer.build(x.shape)

  if workload == "infer":
    fn = tf.function(lambda x, ct: layer(x, training=False))
  elif workload == "train_fwd":
    fn = tf.function(lambda x, ct: layer(x, training=True))
  else:

    def step(x, ct):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
      grads = tape.gradient(y, [x, layer.gamma, layer.beta], output_gradients=ct)
      return y, grads

    fn = tf.function(step)
  name = "tf_keras V1" + (" (fused)" if layer.fused else "")
  return Contender(name, lambda: fn(x, ct), block=_tf_block), None


def _tf_block(out):
  """TensorFlow runs eagerly and synchronously on CPU; touching one element confirms it."""
  leaves = jax.tree_util.tree_leaves(out)
  if leaves:
    leaves[0].numpy()


# --------------------------------------------------------------------------------------------
# The floor: one read and one write of the activations


def floor_contender(config: Config, workload: str):
  x, _ = inputs(config.shape)
  shape = [1] * len(config.shape)
  shape[config.axis] = config.channels
  a = jnp.full(shape, 1.5, jnp.float32)
  b = jnp.full(shape, 0.25, jnp.float32)
  compiled = jax.jit(_affine)

  def build():  # A fresh function object each time, so no cache is hit.
    return lambda: jax.jit(lambda *args: _affine(*args)).lower(x, a, b).compile()

  return Contender(FLOOR, lambda: compiled(x, a, b)), build if workload == "train_step" else None


def _affine(x, a, b):
  return x * a + b


def contenders(config: Config, workload: str, *, plain_refs: bool = True):
  """All available contenders for one configuration and workload.

  Args:
    config: the configuration.
    workload: one of `WORKLOADS`.
    plain_refs: for renorm and ghost configurations, also time `PLAIN` (kbn_jax without them).

  Returns:
    ``(contenders, compile_builders)``: a list of `Contender` and a dict name -> builder of
    fresh compilations of the training step (``train_step`` only; the floor's included).
  """
  builders = [
    lambda: kbn_jax_contender(config, workload),
    lambda: functional_contender(config, workload),
    lambda: kbn_nnx_contender(config, workload),
    lambda: flax_nnx_contender(config, workload),
    lambda: flax_contender(config, workload, fast_variance=True),
    lambda: flax_contender(config, workload, fast_variance=False),
    lambda: kbn_equinox_contender(config, workload),
    lambda: eqx_contender(config, workload),
    lambda: kbn_haiku_contender(config, workload),
    lambda: hk_contender(config, workload),
    lambda: keras3_contender(config, workload),
    lambda: tf_keras_contender(config, workload),
    lambda: floor_contender(config, workload),
  ]
  if plain_refs and config.variant:
    builders.append(lambda: kbn_jax_contender(config, workload, plain=True))
  result, compiles = [], {}
  for build in builders:
    contender, compile_builder = build()
    if contender is None:
      continue
    result.append(contender)
    if compile_builder is not None:
      compiles[contender.name] = compile_builder
  return result, compiles


# --------------------------------------------------------------------------------------------
# Activation traffic: activation-sized arrays read and written by a compiled step's kernels

_FREE_OPS = ("parameter", "constant", "bitcast", "tuple", "get-tuple-element")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\w+\[([\d,]*)\]")


def activation_traffic(hlo_text: str, size: int, *, path: str = "fast") -> tuple[int, int]:
  """Counts the activation-sized reads and writes of the entry computation of `hlo_text`.

  Every top-level instruction but parameters, constants, bitcasts and tuples is one kernel (a
  fusion, a copy, a custom call): each distinct operand with at least `size` elements is one
  read, each such array it produces one write. A ``conditional`` is counted by the kernels of
  one of its branches: the cheapest with ``path="fast"`` (kbn_jax's one-pass moments when they
  hold), the dearest with ``path="fallback"``.

  Args:
    hlo_text: optimized HLO, as from ``jax.jit(f).lower(...).compile().as_text()``.
    size: number of elements of one activation.
    path: ``"fast"`` or ``"fallback"``, the branch counted at each conditional.

  Returns:
    ``(reads, writes)``.
  """
  computations, name = {}, None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      name = "ENTRY" if header.group(1) else header.group(2)
      computations[name] = []
    elif name is not None and line.strip() != "}":
      computations[name].append(line)
  pick = min if path == "fast" else max
  return _computation_traffic(computations, "ENTRY", size, pick)


_COMPUTATION = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{$")
_BRANCHES = re.compile(
  r"(?:branch_computations=\{([^}]*)\}|true_computation=%([\w.\-]+), "
  r"false_computation=%([\w.\-]+))"
)


def _computation_traffic(computations, name, size, pick):
  """`activation_traffic` of one computation; conditionals add the `pick` of their branches."""
  elements, reads, writes = {}, 0, 0
  for line in computations[name]:
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    instruction, out_type, op, rest = match.groups()
    counts = [
      int(np.prod([int(d) for d in dims.split(",") if d])) for dims in _ARRAY.findall(out_type)
    ]
    elements[instruction] = max(counts, default=0)
    if op in _FREE_OPS:
      continue
    if op == "conditional":
      branches = _BRANCHES.search(rest)
      listed = branches.group(1) or ",".join(branches.group(2, 3))
      traffic = [
        _computation_traffic(computations, branch.strip().lstrip("%"), size, pick)
        for branch in listed.split(",")
      ]
      branch_reads, branch_writes = pick(traffic, key=sum)
      reads, writes = reads + branch_reads, writes + branch_writes
      continue
    operands = dict.fromkeys(re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0]))
    reads += sum(elements.get(o, 0) >= size for o in operands)
    writes += sum(c >= size for c in counts)
  return reads, writes


__all__ = [
  "CONFIGS",
  "EQUINOX",
  "EQX_PEER",
  "FLAX_NNX",
  "FLOOR",
  "FUNCTIONAL",
  "HAIKU",
  "HK_PEER",
  "NNX",
  "OURS",
  "PLAIN",
  "WORKLOADS",
  "Config",
  "activation_traffic",
  "contenders",
  "equinox_available",
  "haiku_available",
  "kbn_nnx_available",
  "keras3_available",
  "tf_keras_available",
]
