"""Grafting: loaded batch norms placed into a user's own Flax model, every one accounted for.

`graft_batch_norms` takes what `keras_compat.load_batch_norms` or
`torch_compat.load_batch_norms` returns, ``{name: (module, variables)}``, and a model of the
user's own: linen variables (``{"params": ..., "batch_stats": ...}``, as ``model.init`` returns
them) or an NNX Module. A *place* is a `kbn_jax` batch norm of that model, named by its path
joined with ``/``: the nesting of the linen variables (``"block1/bn"``), or the NNX attribute
path (``"layer1/0/bn1"``, list indices as numbers). Nothing is placed until every loaded layer
has found a place of the right size and every place has got one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from kbn_jax.nnx import BatchNormalization as NnxBatchNormalization

_COLLECTIONS = ("params", "batch_stats")
# Settings that change the numbers and that an NNX place carries: they must agree with the file.
_SETTINGS = ("momentum", "epsilon", "semantics", "renorm", "renorm_momentum")
_MARKER = "moving_mean"  # every kbn_jax batch norm keeps it in `batch_stats`


def _linen_places(variables: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
  """``{path: {collection: {name: array}}}`` of every batch norm in linen variables."""
  places: dict[str, dict[str, dict[str, Any]]] = {}

  def walk(tree: Any, path: tuple[str, ...]) -> None:
    if not isinstance(tree, Mapping):
      return
    if _MARKER in tree and not isinstance(tree[_MARKER], Mapping):
      places["/".join(path)] = {"batch_stats": dict(tree)}
      return
    for key, value in tree.items():
      walk(value, (*path, str(key)))

  walk(variables.get("batch_stats", {}), ())
  params = variables.get("params", {})
  for path, place in places.items():
    node = params
    for key in path.split("/") if path else ():
      node = node.get(key, {}) if isinstance(node, Mapping) else {}
    place["params"] = {k: v for k, v in node.items() if not isinstance(v, Mapping)}
  return places


def _nnx_places(model: nnx.Module) -> dict[str, NnxBatchNormalization]:
  """``{path: layer}`` of every `kbn_jax.nnx.BatchNormalization` in an NNX model."""
  return {
    "/".join(str(p) for p in path): node
    for path, node in nnx.iter_graph(model)
    if isinstance(node, NnxBatchNormalization)
  }


def _nnx_variables(layer: NnxBatchNormalization) -> dict[str, dict[str, Any]]:
  return {key: dict(value) for key, value in layer.linen_variables().items()}


def _size_problems(
  name: str, path: str, loaded: Mapping[str, Any], place: Mapping[str, Any]
) -> list[str]:
  """What keeps the variables `loaded` from fitting `place` (names and shapes)."""
  problems = []
  for collection in _COLLECTIONS:
    ours = {k: jnp.shape(v) for k, v in loaded.get(collection, {}).items()}
    theirs = {k: jnp.shape(v) for k, v in place.get(collection, {}).items()}
    if ours != theirs:
      problems.append(f"{name!r} -> {path!r}: {collection} {ours} from the file, {theirs} there")
  return problems


def _setting_problems(name: str, path: str, module: Any, layer: Any) -> list[str]:
  differ = [
    f"{s} {getattr(module.config, s)!r} (file) vs {getattr(layer.config, s)!r}"
    for s in _SETTINGS
    if getattr(module.config, s) != getattr(layer.config, s)
  ]
  return [f"{name!r} -> {path!r}: {', '.join(differ)}"] if differ else []


def _set(tree: Mapping[str, Any], path: str, values: Mapping[str, Any]) -> dict[str, Any]:
  """A copy of `tree` with the leaves `values` written at `path`."""
  out = dict(tree)
  if not path:
    return {**out, **values}
  head, _, rest = path.partition("/")
  out[head] = _set(out.get(head, {}), rest, values)
  return out


def graft_batch_norms(
  loaded: Mapping[str, tuple[Any, Mapping[str, Any]]],
  target: Any,
  *,
  names: Mapping[str, str] | None = None,
  default_path: Callable[[str], str] = lambda name: name,
) -> Any:
  """Places every loaded batch norm into a model, checking that each one finds its place.

  Args:
    loaded: ``{name: (module, variables)}`` from ``load_batch_norms``.
    target: the model's linen variables (``{"params": ..., "batch_stats": ...}``) or an NNX
      Module holding `kbn_jax.nnx.BatchNormalization` layers.
    names: loaded name -> place path (``"block1/bn"``) for the layers whose path differs from
      ``default_path(name)``.
    default_path: the place path of a loaded name not in `names`.

  Returns:
    Linen: the complete variables (a new dict; every other variable as it was). NNX: `target`,
    its batch norms' values set in place.

  Raises:
    ValueError: naming every loaded layer that found no place, every place that got none, and
      every place whose variables (feature sizes, center/scale) or, for NNX, settings
      (momentum, epsilon, semantics, renorm) differ from the file's.
  """
  if not isinstance(loaded, Mapping):
    raise TypeError(
      f"`loaded` must be the dict that load_batch_norms returns, got {type(loaded).__name__}."
    )
  names = dict(names or {})
  unknown = sorted(set(names) - set(loaded))
  is_nnx = isinstance(target, nnx.Module)
  if not is_nnx and not isinstance(target, Mapping):
    raise TypeError(
      "`target` must be linen variables ({'params': ..., 'batch_stats': ...}, from "
      f"model.init) or an NNX Module, got {type(target).__name__}."
    )
  places = _nnx_places(target) if is_nnx else _linen_places(target)
  paths = {name: names.get(name, default_path(name)) for name in loaded}
  homeless = [f"{n!r} (looked for {p!r})" for n, p in paths.items() if p not in places]
  empty = sorted(set(places) - set(paths.values()))
  problems = []
  for name, path in paths.items():
    if path not in places:
      continue
    module, variables = loaded[name]
    place = _nnx_variables(places[path]) if is_nnx else places[path]
    problems += _size_problems(name, path, variables, place)
    if is_nnx:
      problems += _setting_problems(name, path, module, places[path])
  reused = sorted(path for path, count in Counter(paths.values()).items() if count > 1)
  report = [
    (f"`names` keys that were not loaded: {unknown}", unknown),
    (f"loaded batch norms with no place: {', '.join(homeless)}", homeless),
    (f"places that got no batch norm: {empty}", empty),
    (f"places given more than one batch norm: {reused}", reused),
    (f"mismatches: {'; '.join(problems)}", problems),
  ]
  found = [line for line, items in report if items]
  if found:
    raise ValueError(
      f"graft_batch_norms: {len(loaded)} loaded, {len(places)} places in the model; "
      + "; ".join(found)
      + ". Map file names to model paths with `names={'file_name': 'path/in/model'}` "
      f"(the model's places: {sorted(places)[:8]}{' ...' if len(places) > 8 else ''})."
    )
  if is_nnx:
    for name, path in paths.items():
      layer = places[path]
      for collection in loaded[name][1].values():
        for key, value in collection.items():
          getattr(layer, key).set_value(jnp.asarray(value))
    return target
  grafted = {k: dict(v) if isinstance(v, Mapping) else v for k, v in target.items()}
  for name, path in paths.items():
    for collection, values in loaded[name][1].items():
      grafted[collection] = _set(grafted.get(collection, {}), path, values)
  return grafted
