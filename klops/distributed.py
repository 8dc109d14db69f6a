"""Data-parallel helpers, and the test that tells a vocabulary-sharded input from a whole one.

``num_items`` gives the global count of valid tokens that every klops loss takes as ``num_items=``: with it, the
gradients that DDP averages over ranks (and a trainer sums over gradient-accumulation steps) are those of one big
batch, whatever the number of valid tokens on each rank (docs/losses.md §0, §7).
"""

import sys

import torch
import torch.distributed as dist

__all__ = ["num_items", "is_sharded"]

# The vocabulary-parallel form of each public op that has one, by the op's name: klops/vocab_parallel.py, which
# builds on the op modules, registers them (imported by klops/__init__.py), and the public functions look them up
# here, so that no op module imports vocab_parallel back.
VOCAB_PARALLEL_FORMS = {}


def vocab_parallel_form(name: str):
    """Decorator: registers a function as the vocabulary-parallel form of the public op ``name``."""

    def register(function):
        VOCAB_PARALLEL_FORMS[name] = function
        return function

    return register


def num_items(mask_or_labels: torch.Tensor, group=None, ignore_index: int = -100) -> torch.Tensor:
    """The number of valid tokens summed over the ranks of ``group`` (default: the world), as a 0-d int64 tensor on
    the input's device, from one all-reduce of 8 bytes (a functional collective: no host sync, traceable).

    ``mask_or_labels``: a bool or float mask (valid where nonzero) or integer labels (valid where not
    ``ignore_index``), any shape. Without an initialized process group, the local count.

    Each rank's ``loss_r = sum of its tokens' losses / num_items`` then adds up over the ranks to the whole batch's
    mean. DDP averages gradients over its ``W`` ranks, so multiply by ``W``:
    ``loss = klops.fused_linear_cross_entropy(h, w, labels, num_items=klops.distributed.num_items(labels)) * W``
    gives every rank the gradient of the whole batch's mean loss (tests/test_vocab_parallel.py checks it).
    """
    if not isinstance(mask_or_labels, torch.Tensor):
        raise TypeError(f"mask_or_labels must be a torch.Tensor, got {type(mask_or_labels).__name__}")
    if mask_or_labels.dtype == torch.bool or mask_or_labels.is_floating_point():
        count = (mask_or_labels != 0).sum()
    else:
        count = (mask_or_labels != ignore_index).sum()
    if not dist.is_available() or not dist.is_initialized():
        return count
    from torch.distributed._functional_collectives import AsyncCollectiveTensor, all_reduce

    total = all_reduce(count, "sum", group if group is not None else dist.group.WORLD)
    return total.wait() if isinstance(total, AsyncCollectiveTensor) else total


def is_sharded(x) -> bool:
    """Whether x is a DTensor (without importing torch.distributed.tensor where none can exist)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)
