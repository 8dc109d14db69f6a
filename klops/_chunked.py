"""Row helpers of the torch backend: chunks of rows, and the per-row statistics the kernels keep."""

import math

import torch

# The torch backend materializes about a dozen fp32 temporaries per chunk of rows: cap a chunk at this
# many entries (4 MiB per temporary, ~50 MiB in all), so that its extra memory is O(chunk * V), not
# O(N * V). Rows are never split: a chunk holds at least one row.
TORCH_CHUNK_ELEMENTS = 1 << 20


def row_chunks(B: int, L: int, V: int):
    """(b, slice of l) pieces of a (B, L, V) row grid, each at most TORCH_CHUNK_ELEMENTS entries."""
    step = max(1, TORCH_CHUNK_ELEMENTS // V)
    for b in range(B):
        for start in range(0, L, step):
            yield b, slice(start, min(L, start + step))


def scaled(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """x / T in fp32 (no pass over x when T = 1)."""
    x = x.float()
    return x if temperature == 1.0 else x / temperature


def row_stats(x: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw row max, log sum exp((x - max) / T)) of [..., V] logits; the max of an all -inf row is 0.

    Subtracting the max in raw units before dividing by T keeps log-probabilities near the max exact,
    as the kernels do."""
    x = x.float()
    row_max = x.amax(dim=-1)
    row_max = torch.where(row_max == -math.inf, 0.0, row_max)
    return row_max, torch.logsumexp(scaled(x - row_max[..., None], temperature), dim=-1)


def log_softmax_from_stats(x: torch.Tensor, row_max: torch.Tensor, logsum: torch.Tensor, temperature: float):
    """fp32 log softmax(x / T) of [rows, cols] logits from their rows' saved (raw max, logsum) [rows]."""
    return scaled(x.float() - row_max[:, None], temperature) - logsum[:, None]
