"""Helpers of the chunked paths: the torch backend's chunks of rows and the per-row statistics the kernels keep,
and the fused-linear ops' chunked path (klops/linear.py, klops/topk.py): a chunk of rows' logits formed, swept by a
row op and dropped, forward and backward, with the gradient sums of the chunks."""

import math

import torch
import torch.nn.functional as F

# The torch backend holds a few fp32 temporaries of a chunk of rows at a time (log q and q, as many for a
# teacher, and a divergence's a; the helpers below work in place where they can): cap a chunk at this many
# entries (4 MiB per temporary, about 20 MiB in all), so that its extra memory is O(chunk * V), not O(N * V).
# Rows are never split: a chunk holds at least one row.
TORCH_CHUNK_ELEMENTS = 1 << 20

# The most negative fp32 number: log q = -inf clamped to it makes q log q = 0 * it = 0 instead of NaN.
FLOAT32_MIN = torch.finfo(torch.float32).min


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


def _row_max(x: torch.Tensor) -> torch.Tensor:
    """The raw fp32 max of each row of [..., V] logits, 0 for an all -inf row."""
    row_max = x.amax(dim=-1).float()
    return torch.where(row_max == -math.inf, 0.0, row_max)


def _shifted(x: torch.Tensor, row_max: torch.Tensor, temperature: float) -> torch.Tensor:
    """(x - max) / T as a new fp32 tensor, the one temporary (x of any float dtype; the max is subtracted in raw
    units before dividing by T, which keeps log-probabilities near the max exact, as the kernels do)."""
    shifted = x - row_max[..., None]  # fp32: row_max is
    return shifted if temperature == 1.0 else shifted.div_(temperature)


def row_stats(x: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw row max, log sum exp((x - max) / T)) of [..., V] logits; the max of an all -inf row is 0."""
    row_max = _row_max(x)
    return row_max, _shifted(x, row_max, temperature).exp_().sum(-1).log()


def log_softmax_rows(x: torch.Tensor, temperature: float):
    """(log q, q, raw row max, logsum) of [..., V] logits with q = softmax(x / T): two fp32 temporaries and one exp
    per entry (q = exp((x - max) / T) / its sum, log q = (x - max) / T - logsum)."""
    row_max = _row_max(x)
    log_q = _shifted(x, row_max, temperature)
    q = log_q.exp()
    total = q.sum(-1)
    logsum = total.log()
    return log_q.sub_(logsum[..., None]), q.div_(total[..., None]), row_max, logsum


def log_softmax_from_stats(x: torch.Tensor, row_max: torch.Tensor, logsum: torch.Tensor, temperature: float):
    """fp32 log softmax(x / T) of [rows, cols] logits from their rows' saved (raw max, logsum) [rows], as one new
    tensor."""
    return _shifted(x, row_max, temperature).sub_(logsum[..., None])


# ----------------------------------------------------------------------------------------------------
# the fused-linear ops' chunked path: a chunk of rows' logits at a time


def chunk_logits(hidden, weight, bias, softcap):
    """(logits [C, V], tanh(z / s) or None) of a chunk of rows: ``F.linear`` in the inputs' dtype, then
    the soft cap in fp32 when asked."""
    z = F.linear(hidden, weight, bias)
    if softcap is None:
        return z, None
    t = torch.tanh(z.float() / softcap)
    return softcap * t, t


def accumulate_grads(dz, t, hidden, weight, grads, rows) -> None:
    """grad_hidden[rows] = dz' @ W, grad_weight += dz'^T h, grad_bias += sum dz' with dz' = dz (1 - t^2)
    under a soft cap; the matmuls run in the weight's dtype, the sums over chunks in fp32."""
    if t is not None:
        dz = torch.mul(t, t).neg_().add_(1.0).mul_(dz)
    dz = dz.to(weight.dtype)
    grad_hidden, grad_weight, grad_bias = grads
    grad_hidden[rows] = (dz @ weight).to(grad_hidden.dtype)
    if weight.dtype == torch.float32:
        grad_weight.addmm_(dz.t(), hidden)  # no [V, D] temporary
    else:
        grad_weight += (dz.t() @ hidden).float()
    if grad_bias.numel():
        grad_bias += dz.float().sum(0)


def new_grads(hidden, weight, bias):
    """(grad_hidden, fp32 grad_weight accumulator [V, D], fp32 grad_bias accumulator [V] or [0]) to fill."""
    V, D = weight.shape
    return (
        torch.empty_like(hidden),
        torch.zeros((V, D), dtype=torch.float32, device=weight.device),
        torch.zeros((V if bias is not None else 0,), dtype=torch.float32, device=weight.device),
    )


# Entries of one chunk's logits by device: on a GPU 2^24 (64 MiB in fp32, 128 rows of a 128k vocabulary:
# matmuls of M = 128 keep the tensor cores busy), on the CPU 2^19 (2 MiB, 16 rows of a 32k vocabulary: at
# D=256 a chunk's four products run at 42% of their rate at M = 256, against 26% at M = 8, 80% at M = 65;
# peak memory above the inputs over forward + backward at N=4096, D=256, V=32000 fp32, the 31 MiB fp32 weight
# gradient included: 41 MiB for logprobs / cross-entropy, 49 MiB for KL from the teacher's hidden states,
# against 500 MiB for one [N, V] tensor; 2^20 and up make test_cpu_memory_stays_far_below_one_logits_tensor's
# resident-set peak vary past its bound).
LINEAR_CHUNK_ELEMENTS = {"cuda": 1 << 24, "cpu": 1 << 19}


def linear_chunks(B: int, L: int, V: int, device: torch.device):
    """(b, slice of l) index tuples of the (B, L) rows, LINEAR_CHUNK_ELEMENTS // V rows at most: they
    index the (B, L, D) hidden states, the (B, L) per-row tensors and a (B, L, V) teacher alike."""
    step = max(1, LINEAR_CHUNK_ELEMENTS.get(device.type, LINEAR_CHUNK_ELEMENTS["cpu"]) // V)
    for b in range(B):
        for start in range(0, L, step):
            yield b, slice(start, min(L, start + step))


def chunked_rows(hidden, weight, bias, softcap, outputs, chunk_rows):
    """Fills the (B, L) outputs a chunk of rows at a time from ``chunk_rows(z [1, C, V], rows)``, the chunk's
    values ``[1, C]`` per output; returns them. A chunk's logits are freed before the next chunk's are made."""
    for rows in linear_chunks(*hidden.shape[:2], weight.shape[0], hidden.device):
        values = chunk_rows(chunk_logits(hidden[rows], weight, bias, softcap)[0][None], rows)
        for out, value in zip(outputs, values):
            out[rows] = value[0]
    return outputs


def chunked_backward(hidden, weight, bias, softcap, chunk_grad):
    """(grad_hidden, grad_weight, grad_bias or [0]) from ``chunk_grad(z [1, C, V], rows)``, the gradient of each
    chunk's logits (formed again here), a chunk of rows at a time, freed before the next chunk's are made."""
    grads = new_grads(hidden, weight, bias)
    for rows in linear_chunks(*hidden.shape[:2], weight.shape[0], hidden.device):
        z, t = chunk_logits(hidden[rows], weight, bias, softcap)
        accumulate_grads(chunk_grad(z[None], rows)[0], t, hidden[rows], weight, grads, rows)
        del z, t
    return cast_grads(grads, weight, bias)


def empty_rows(hidden, count: int):
    """count uninitialized (B, L) fp32 outputs of an op over the rows of hidden."""
    return tuple(hidden.new_empty(hidden.shape[:2], dtype=torch.float32) for _ in range(count))


def fake_grads(hidden, weight, bias):
    """Uninitialized (grad_hidden, grad_weight, grad_bias or [0]) of a fused-linear backward op (its fake)."""
    return (
        torch.empty_like(hidden),
        torch.empty_like(weight),
        weight.new_empty(0) if bias is None else torch.empty_like(bias),
    )


def cast_grads(grads, weight, bias):
    """(grad_hidden, grad_weight, grad_bias) with the fp32 sums cast to the weight's and the bias's dtypes."""
    grad_hidden, grad_weight, grad_bias = grads
    return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype if bias is None else bias.dtype)
