"""What the tests and the benchmarks share: `torch_reference`, the PyTorch oracle.

Importing it needs PyTorch (requirements-test.txt installs it); nothing in
the rest of the package imports this subpackage.
"""
