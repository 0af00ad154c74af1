"""Compatibility alias: the linen Module moved to `kbn_jax.linen`."""

from kbn_jax.linen import BatchNormalization as BatchNormalization
