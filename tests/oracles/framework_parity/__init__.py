"""Framework-parity fixtures: tf_keras V2, Keras 3 and PyTorch batch norm (see README.md)."""
