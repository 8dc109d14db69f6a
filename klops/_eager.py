"""Eager calls of the klops custom ops without importing torch._dynamo (and with it triton).

``torch.library.custom_op`` wraps each implementation in ``torch._disable_dynamo``, which imports
``torch._dynamo`` on the op's first call; ``torch._dynamo`` imports triton whenever it is installed. On a
2-core CPU that first ``backend="torch"`` call took 1.1 s and grew the process from 223 to 383 MiB (triton
80 of them) for an op that needs neither. Dynamo can be compiling or running compiled code only once
``torch._dynamo`` is imported, so before that the plain implementation is the same call; after it, the
dynamo-disabled one runs, as torch has it. ``compile_when_called`` defers a ``torch.compile`` (klops bench's
baselines) to its first call for the same reason.
"""

import functools
import sys

import torch


def import_dynamo_lazily(package: str) -> None:
    """Make every custom op defined in the modules of ``package`` call its implementation directly while
    torch._dynamo is not imported. Leaves an op as it is where torch's layout differs (the calls still work,
    and import dynamo)."""
    try:
        from torch._library.custom_ops import CustomOpDef
    except ImportError:
        return
    ops = {
        id(value): value
        for name, module in list(sys.modules.items())
        if name.startswith(package + ".")
        for value in vars(module).values()
        if isinstance(value, CustomOpDef)
    }
    for op in ops.values():
        implementations = getattr(op, "_backend_fns", None)
        if isinstance(implementations, dict):
            for device_type, disabled in implementations.items():
                plain = getattr(disabled, "__wrapped__", None)
                if plain is not None:
                    implementations[device_type] = _disabled_once_dynamo_loads(disabled, plain)


def _disabled_once_dynamo_loads(disabled, plain):
    @functools.wraps(plain)
    def implementation(*args, **kwargs):
        if "torch._dynamo" in sys.modules:
            return disabled(*args, **kwargs)
        return plain(*args, **kwargs)

    return implementation


def compile_when_called(fn):
    """``torch.compile(fn, dynamic=False)``, made on the first call: a run without the compile baseline does not
    import torch._dynamo (seconds on a small CPU, and triton with it)."""
    compiled = None

    def call(*args):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn, dynamic=False)
        return compiled(*args)

    return call
