"""Counting suspicious values in loaded weights: NaN/Inf anywhere, negative variances.

Keras, PyTorch and Flax load such values silently; kbn_jax loads them too (the numbers stay the
library's) and warns, naming the layer and the count.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import numpy as np


def describe(arrays: Mapping[str, Any], variances: Collection[str]) -> str:
  """What is suspicious in `arrays`, as a phrase, or ``""`` when nothing is.

  Args:
    arrays: weight name -> array.
    variances: the names whose values must be non-negative (moving variances, stddevs).

  Returns:
    E.g. ``"2 non-finite values in 'gamma', 1 negative value in 'moving_variance'"``.
  """
  found = []
  for key, value in arrays.items():
    array = np.asarray(value)
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
      found.append(f"{bad} non-finite value{'s' * (bad > 1)} in {key!r}")
    if key in variances:
      negative = int(np.count_nonzero(array < 0))
      if negative:
        found.append(f"{negative} negative value{'s' * (negative > 1)} in {key!r}")
  return ", ".join(found)
