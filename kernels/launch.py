"""Constants and host helpers shared by every backend, and the one place where the row kernels' block
sizes and warp counts are chosen. Imports nothing heavy, so that ``klops`` can read them without triton."""

import math

# Divergence kinds and teacher encodings, in the order of their integer ids (Triton constexprs, the
# ``kind`` / ``target`` ints of the CUDA ops).
DIVERGENCE_KINDS = ("forward", "reverse", "jsd", "skew_forward", "skew_reverse", "tv", "alpha")
TARGET_KINDS = ("logits", "logprobs", "probs")


def mixture_logs(coef: float) -> tuple[float, float]:
    """(log coef, log(1 - coef)): the mixture weights of jsd / skew_*, -inf at the ends of [0, 1];
    (0, 0) outside [0, 1] (Amari alpha, which mixes nothing)."""
    if not 0.0 <= coef <= 1.0:
        return 0.0, 0.0
    return (math.log(coef) if coef > 0 else -math.inf), (math.log1p(-coef) if coef < 1 else -math.inf)


def row_config(vocab_size: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a kernel that streams one row of ``vocab_size`` entries per program.

    The row is swept in blocks of BLOCK_V elements; 4096 fp32 lanes over 8 warps keeps 16 values per
    thread in flight, enough to saturate HBM on A100/H100 without spilling the online accumulators.
    """
    block = min(4096, max(128, 1 << (vocab_size - 1).bit_length()))
    num_warps = 8 if block >= 2048 else 4
    return block, num_warps


def launch_over_rows(kernel, logits, *args, **constexprs) -> None:
    """Launch a row kernel with one program per row of the (B, L, V) ``logits``; nothing for 0 rows.

    ``args`` are the kernel's arguments in order; ``constexprs`` its compile-time ones (BLOCK_V and
    num_warps are added here).
    """
    B, L, V = logits.shape
    if B * L == 0:
        return
    block_v, num_warps = row_config(V)
    kernel[(B * L,)](*args, **constexprs, BLOCK_V=block_v, num_warps=num_warps)
