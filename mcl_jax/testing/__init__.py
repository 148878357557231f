"""What the tests and the benchmarks share.

`torch_reference`: the PyTorch oracle (importing it needs PyTorch, which
requirements-test.txt installs). `gcs_server`: a GCS-compatible server on
127.0.0.1 (fake-gcs-server, from requirements-test.txt) and the environment
that points the storage clients at it. Nothing in the rest of the package
imports this subpackage.
"""
