"""The real-library fixture suites, each with its generator and README.

`keras_parity` (tf_keras's V1 layer), `framework_parity` (tf_keras V2, Keras 3, PyTorch),
`keras_models` (Keras configs and models), `keras_files` (saved model files of every format) and
`model_ports` (whole models). The generators need TensorFlow, Keras or torch; the tests replay
the committed fixtures without them.
"""
