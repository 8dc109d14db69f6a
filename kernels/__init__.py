"""Triton kernels of klops (installed as ``klops.kernels``): ``@triton.jit`` functions and plain
launchers over tensors. No autograd here: ``klops/`` wraps these launchers in custom ops."""
