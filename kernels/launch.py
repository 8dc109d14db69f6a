"""Constants and host helpers shared by every backend, and the one place where the row kernels' block
sizes and warp counts are chosen. Imports nothing but torch, so that ``klops`` can read them without triton.
The divergence kinds, in the order of their ids, are kernels/kinds.py's."""

import contextlib

import torch

# Teacher encodings, in the order of their integer ids (Triton constexprs, the ``target`` int of the CUDA ops).
TARGET_KINDS = ("logits", "logprobs", "probs")


# (BLOCK_V, num_warps) of the row kernels, chosen from ptxas' register counts on sm_90 (bf16;
# `python -m tests.triton_aot --table` prints them) so that each SM keeps the most bytes of loads
# in flight: about 25 KB per SM covers HBM3's latency at full rate (4.8 TB/s x ~700 ns / 132 SMs).
# Forward sweeps keep 3-5 online accumulators per lane, so they take 8 entries per thread; at 4096/8
# warps the forward / reverse KL forward needed 179 registers, one block of 8 warps per SM and 16 KB
# of bf16 loads in flight, at 1024/4 it needs 80: 6 blocks, 24 warps and 24 KB per SM (jsd 28 KB).
# Backward sweeps keep no accumulator: 16 entries per thread, 72-80 registers, 6-7 blocks, 48-56 KB.
FORWARD_SWEEP = (1024, 4)
BACKWARD_SWEEP = (2048, 4)


def row_config(vocab_size: int, sweep: tuple[int, int]) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a kernel that streams rows of ``vocab_size`` entries, one per program:
    ``sweep`` (FORWARD_SWEEP or BACKWARD_SWEEP), shrunk to the row for short rows (same entries per
    thread, fewer warps)."""
    block, num_warps = sweep
    entries_per_warp = block // num_warps
    block = min(block, max(128, 1 << (vocab_size - 1).bit_length()))
    return block, max(1, min(num_warps, block // entries_per_warp))


def launch_over_rows(kernel, logits, *args, sweep: tuple[int, int], **constexprs) -> None:
    """Launch a row kernel with one program per row of the (B, L, V) ``logits``; nothing for 0 rows.

    ``args`` are the kernel's arguments in order; ``constexprs`` its compile-time ones (BLOCK_V and
    num_warps are added here from ``sweep``). The kernel runs on the logits' device, on that device's
    current stream (as a PyTorch op on these tensors would), whatever the current device is.
    """
    B, L, V = logits.shape
    if B * L == 0:
        return
    block_v, num_warps = row_config(V, sweep)
    with on_device(logits):
        kernel[(B * L,)](*args, **constexprs, BLOCK_V=block_v, num_warps=num_warps)


def on_device(tensor: torch.Tensor):
    """A context in which a kernel launch runs on the tensor's GPU (and its current stream), whatever the
    current device is; nothing for CPU tensors (the interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
