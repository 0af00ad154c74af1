"""Keras's training semantics for a Flax + optax loop: penalties, constraints, frozen layers.

A Keras model adds the weight penalties of its layers to the loss, projects constrained weights
after every optimizer step, and never updates the weights of a frozen (``trainable=False``)
layer. These helpers do the same for every `kbn_jax.BatchNormalization` of any Flax model:

* `find_batch_norms` locates the layers (their variable paths, configs and input shapes) by
  tracing the model once, abstractly, on a sample input;
* `regularization_loss` sums the penalties the layers sow into the ``losses`` collection, and
  `regularization_penalty` computes the same penalties directly from the parameters;
* `constrain_params` projects gamma/beta onto their Keras constraints, and `keras_constraints`
  is the same projection as a chainable optax transformation;
* `trainable_mask` / `freeze_non_trainable` keep any optimizer (weight decay included) off the
  gamma and beta of frozen layers; `keras_optimizer` combines freezing and constraints.

Example::

  >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, kbn_jax
  >>> from kbn_jax import training
  >>> class Net(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x, train=False):
  ...     x = nn.Dense(4)(x)
  ...     x = kbn_jax.BatchNormalization(gamma_regularizer="l2", gamma_constraint="non_neg")(
  ...         x, training=train)
  ...     return nn.Dense(1)(x)
  >>> model, x = Net(), jnp.ones((8, 3))
  >>> sites = training.find_batch_norms(model, x)
  >>> [site.path for site in sites]
  [('BatchNormalization_0',)]
  >>> variables = jax.jit(model.init)(jax.random.key(0), x)
  >>> tx = training.keras_optimizer(optax.sgd(1e-2, momentum=0.9), sites)
  >>> opt_state = tx.init(variables["params"])
  >>> def loss_fn(params):
  ...   y, updates = model.apply({**variables, "params": params}, x, train=True,
  ...                            mutable=["batch_stats", "losses"])
  ...   return jnp.mean(y**2) + training.regularization_loss(updates["losses"])
  >>> grads = jax.jit(jax.grad(loss_fn))(variables["params"])
  >>> updates, opt_state = tx.update(grads, opt_state, variables["params"])
  >>> params = optax.apply_updates(variables["params"], updates)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kbn_jax import _keras_identifiers, _keras_weights, _variables, constraints
from kbn_jax import nnx as kbn_nnx
from kbn_jax.linen import BatchNormalization

_AFFINE = ("gamma", "beta")


@dataclasses.dataclass(frozen=True)
class BatchNormSite:
  """A kbn_jax batch-norm layer (linen or NNX) inside a model.

  Attributes:
    path: the Module's scope path, which is also the path of its variables inside each
      collection (``params[path...]["gamma"]``); ``()`` when the model is the layer itself.
    module: the layer's configuration (an unbound clone), or the NNX layer itself.
    input_shape: the shape of the sample input the layer saw (for NNX, the smallest input
      shape that holds its feature axes).
  """

  path: tuple[str, ...]
  module: Any
  input_shape: tuple[int, ...]

  @property
  def keras_shape(self) -> tuple[int, ...]:
    """Keras's shape of gamma/beta (constraints and regularizers act on this shape)."""
    return _variables.keras_param_shape(self.module.config, self.input_shape)


def find_batch_norms(
  model: nn.Module,
  *args: Any,
  rngs: Any = None,
  method: Callable[..., Any] | str | None = None,
  **kwargs: Any,
) -> tuple[BatchNormSite, ...]:
  """Finds every kbn_jax batch-norm layer of a model (linen or NNX).

  For a linen model, by tracing ``model.init`` once; the trace is abstract (`jax.eval_shape`):
  nothing is computed or allocated. Layers reached through lifted transforms that add axes to
  their variables (``nn.scan``, ``nn.vmap``) are found, but the helpers below reject their
  stacked variables. For an NNX model (`kbn_jax.nnx.BatchNormalization` layers), by walking its
  graph: no sample input is needed, and the paths are those of ``nnx.state(model, nnx.Param)``
  (what ``nnx.Optimizer`` hands its optax transformation).

  Args:
    model: any Flax linen Module, or an NNX Module.
    *args: sample inputs for ``model.init`` (arrays or `jax.ShapeDtypeStruct`; other values,
      such as a ``train`` flag, are passed as they are).
    rngs: the ``rngs`` of ``model.init`` (default: a fixed key for ``"params"``).
    method: passed to ``model.init``.
    **kwargs: keyword arguments for ``model.init``.

  Returns:
    One `BatchNormSite` per layer, in the order of their first call.
  """
  if isinstance(model, nnx.Module):
    return _nnx_sites(model)
  sites: dict[tuple[str, ...], BatchNormSite] = {}

  def interceptor(next_fun, call_args, call_kwargs, context):
    module = context.module
    if isinstance(module, BatchNormalization) and context.method_name == "__call__":
      x = call_args[0] if call_args else call_kwargs["inputs"]
      path = tuple(str(p) for p in module.path)
      if path not in sites:
        sites[path] = BatchNormSite(path, module.clone(parent=None), tuple(np.shape(x)))
    return next_fun(*call_args, **call_kwargs)

  leaves, treedef = jax.tree.flatten((args, kwargs))
  traced = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]
  init_rngs = jax.random.key(0) if rngs is None else rngs

  def init(*values):
    filled = list(leaves)
    for i, value in zip(traced, values, strict=True):
      filled[i] = value
    call_args, call_kwargs = jax.tree.unflatten(treedef, filled)
    return model.init(init_rngs, *call_args, method=method, **call_kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(init, *(leaves[i] for i in traced))
  return tuple(sites.values())


def _nnx_sites(model: nnx.Module) -> tuple[BatchNormSite, ...]:
  """The `kbn_jax.nnx.BatchNormalization` layers of an NNX model, by graph path."""
  sites = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, kbn_nnx.BatchNormalization):
      shape = _variables.proxy_input_shape(node.config, node.num_features)
      sites.append(BatchNormSite(tuple(str(p) for p in path), node, shape))
  return tuple(sites)


def _is_array(value: Any) -> bool:
  return isinstance(value, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def _key_name(entry: Any) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(entry, attribute):
      return str(getattr(entry, attribute))
  return str(entry)


def _path_names(path: Sequence[Any]) -> tuple[str, ...]:
  return tuple(_key_name(entry) for entry in path)


def _layer_params(params: Any, site: BatchNormSite) -> Mapping[str, Any]:
  node = params
  for name in site.path:
    if not isinstance(node, Mapping) or name not in node:
      raise KeyError(
        f"No parameters at {'/'.join(site.path)!r} for a BatchNormalization found there; pass "
        "the model's `params` collection (variables['params']), from the same model."
      )
    node = node[name]
  return node


def _check_shape(site: BatchNormSite, name: str, value: Any) -> None:
  expected = _keras_weights.layout(site.module.config, site.input_shape).feature_shape
  if tuple(np.shape(value)) != expected:
    raise ValueError(
      f"`{'/'.join(site.path + (name,))}` has shape {tuple(np.shape(value))}, expected "
      f"{expected}; layers inside nn.scan/nn.vmap (stacked variables) are not supported by "
      "the kbn_jax.training helpers."
    )


# ---------------------------------------------------------------------------------------------
# Regularizers
# ---------------------------------------------------------------------------------------------
def regularization_loss(losses: Any) -> jax.Array:
  """Sums every value sown into a ``losses`` collection (the Flax way of ``model.losses``).

  `kbn_jax.BatchNormalization` sows ``gamma_regularizer`` and ``beta_regularizer`` penalties
  there in training calls when ``mutable`` includes ``"losses"``; values other modules sow are
  summed too.

  Args:
    losses: the ``losses`` collection returned by ``apply`` (any pytree of arrays).

  Returns:
    A float32 scalar; 0 for an empty collection.
  """
  total = jnp.zeros((), jnp.float32)
  for leaf in jax.tree.leaves(losses):
    total = total + jnp.sum(jnp.asarray(leaf).astype(jnp.float32))
  return total


def regularization_penalty(params: Any, sites: Sequence[BatchNormSite]) -> jax.Array:
  """Keras's weight penalties of the layers, computed from the parameters.

  Equal to `regularization_loss` of one training call's sown ``losses``, but it needs no mutable
  collection and does not depend on the mode (Keras adds these penalties to the loss in training
  and evaluation alike). Penalties see each weight in Keras's parameter shape.

  Args:
    params: the model's ``params`` collection.
    sites: from `find_batch_norms`.

  Returns:
    A float32 scalar.
  """
  total = jnp.zeros((), jnp.float32)
  for site in sites:
    layer = _layer_params(params, site)
    for name in _AFFINE:
      if name in layer:
        _check_shape(site, name, layer[name])
    penalties = _variables.regularization_penalties(site.module.config, layer, site.input_shape)
    for value in penalties.values():
      total = total + value
  return total


# ---------------------------------------------------------------------------------------------
# Constraints
# ---------------------------------------------------------------------------------------------
def _constraint(identifier: Any, argument: str) -> Callable[[jax.Array], jax.Array] | None:
  """Resolves a constraint; Keras's ``NonNeg`` is `optax.projections.projection_non_negative`."""
  if isinstance(identifier, (str, Mapping)):
    name, _ = _keras_identifiers.parse(identifier, argument=argument)
    if name in ("non_neg", "nonneg"):
      return optax.projections.projection_non_negative
  return constraints.get(identifier, argument=argument)


def _projections(sites: Sequence[BatchNormSite]) -> dict[tuple[str, ...], Any]:
  """``{variable path: (site, name, projection)}`` for every constrained, trainable weight."""
  out = {}
  for site in sites:
    if not site.module.trainable:  # Keras constrains only the variables it updates.
      continue
    for name in _AFFINE:
      argument = f"{name}_constraint"
      projection = _constraint(getattr(site.module, argument), argument)
      if projection is not None:
        out[site.path + (name,)] = (site, name, projection)
  return out


def _project(entry, value: jax.Array) -> jax.Array:
  site, name, projection = entry
  _check_shape(site, name, value)
  projected = projection(jnp.reshape(value, site.keras_shape))
  return jnp.reshape(projected, jnp.shape(value)).astype(jnp.asarray(value).dtype)


def constrain_params(params: Any, sites: Sequence[BatchNormSite]) -> Any:
  """Projects gamma/beta of every trainable layer onto its Keras constraint.

  Call it on the parameters after each optimizer step, as Keras applies constraints after each
  update. The projection sees the weight in Keras's parameter shape, so axis conventions are
  Keras's: ``max_norm(axis=0)`` bounds the norm of the whole ``(C,)`` vector of a single-axis
  layer, but each entry of a ``(1, C1, 1, C2)`` multi-axis weight. Frozen layers
  (``trainable=False``) are left alone, as Keras leaves them.

  Args:
    params: the model's ``params`` collection.
    sites: from `find_batch_norms`.

  Returns:
    ``params`` with the constrained weights replaced; other leaves are the same objects.
  """
  projections = _projections(sites)

  def project(path, value):
    entry = projections.get(_path_names(path))
    return value if entry is None else _project(entry, value)

  return jax.tree_util.tree_map_with_path(project, params)


def keras_constraints(sites: Sequence[BatchNormSite]) -> optax.GradientTransformation:
  """An optax transformation that applies the layers' constraints after the step.

  Chain it last (``optax.chain(optimizer, keras_constraints(sites))``): for each constrained
  weight it returns the update ``constraint(p + u) - p``, so that ``optax.apply_updates`` lands on
  the projected value; other updates pass through unchanged.

  .. note::
    ``p + (constraint(p + u) - p)`` equals ``constraint(p + u)`` up to one float rounding; call
    `constrain_params` after ``optax.apply_updates`` instead where bit-exactness matters.

  Args:
    sites: from `find_batch_norms`.

  Returns:
    A `optax.GradientTransformation` whose ``update`` needs ``params``.
  """
  projections = _projections(sites)

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
        "keras_constraints needs the parameters: call `tx.update(grads, opt_state, params)`."
      )

    def constrain(path, update, param):
      entry = projections.get(_path_names(path))
      if entry is None:
        return update
      new = optax.apply_updates(param, update)
      return (_project(entry, new) - param).astype(jnp.asarray(update).dtype)

    return jax.tree_util.tree_map_with_path(constrain, updates, params), state

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# Frozen layers
# ---------------------------------------------------------------------------------------------
def trainable_mask(params: Any, sites: Sequence[BatchNormSite]) -> Any:
  """A pytree of bools like `params`: False for gamma/beta of ``trainable=False`` layers.

  .. warning::
    Do not pass it to ``optax.masked``: masked-out leaves get the *raw gradient* as their update.
    Use `freeze_non_trainable`, which gives them zero updates.

  Args:
    params: the model's ``params`` collection.
    sites: from `find_batch_norms`.

  Returns:
    The mask.
  """
  frozen = {site.path + (name,) for site in sites if not site.module.trainable for name in _AFFINE}
  return jax.tree_util.tree_map_with_path(lambda path, _: _path_names(path) not in frozen, params)


def freeze_non_trainable(
  optimizer: optax.GradientTransformation, sites: Sequence[BatchNormSite]
) -> optax.GradientTransformation:
  """Wraps `optimizer` so that the gamma/beta of frozen layers never change.

  Frozen weights get zero updates and no optimizer state; the rest go through `optimizer`,
  weight decay included (``optax.multi_transform`` with ``optax.set_to_zero``). Keras V1
  semantics: the layer still normalizes with batch statistics when called with
  ``training=True`` and does not update its moving statistics.

  Args:
    optimizer: any optax transformation.
    sites: from `find_batch_norms`.

  Returns:
    The wrapped transformation.
  """

  def labels(params):
    return jax.tree.map(lambda t: "trainable" if t else "frozen", trainable_mask(params, sites))

  return optax.multi_transform({"trainable": optimizer, "frozen": optax.set_to_zero()}, labels)


def keras_optimizer(
  optimizer: optax.GradientTransformation, sites: Sequence[BatchNormSite]
) -> optax.GradientTransformation:
  """`optimizer` with Keras's layer semantics: frozen layers untouched, constraints applied.

  Args:
    optimizer: any optax transformation.
    sites: from `find_batch_norms`.

  Returns:
    ``optax.chain(freeze_non_trainable(optimizer, sites), keras_constraints(sites))``.
  """
  return optax.chain(freeze_non_trainable(optimizer, sites), keras_constraints(sites))


__all__ = [
  "BatchNormSite",
  "constrain_params",
  "find_batch_norms",
  "freeze_non_trainable",
  "keras_constraints",
  "keras_optimizer",
  "regularization_loss",
  "regularization_penalty",
  "trainable_mask",
]
