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


def chunk_logits(hidden, weight, bias, softcap, buffer=None):
    """(logits [C, V], tanh(z / s) or None) of a chunk of rows: ``F.linear`` in the inputs' dtype, then
    the soft cap in fp32 when asked. ``buffer`` (chunk_buffer): the logits are written into its first C V entries
    (no gradient is recorded) rather than into a new tensor."""
    if buffer is None:
        z = F.linear(hidden, weight, bias)
    else:
        z = buffer[: hidden.shape[0] * weight.shape[0]].view(hidden.shape[0], weight.shape[0])
        with torch.no_grad():
            torch.mm(hidden, weight.t(), out=z) if bias is None else torch.addmm(bias, hidden, weight.t(), out=z)
    if softcap is None:
        return z, None
    t = torch.tanh(z.float() / softcap)
    return softcap * t, t


def logits_of_chunks(hidden, weight, bias, softcap):
    """rows -> chunk_logits of hidden[rows], every chunk written into one buffer (chunk_buffer) made at the first
    call, the sweep's largest chunk (linear_chunks)."""
    buffer = None

    def logits(rows):
        nonlocal buffer
        chunk = hidden[rows]
        if buffer is None:
            buffer = chunk_buffer(hidden, weight, chunk.shape[0])
        return chunk_logits(chunk, weight, bias, softcap, buffer)

    return logits


def chunk_buffer(hidden, weight, rows: int):
    """A flat buffer for the logits of chunks of up to ``rows`` rows (chunk_logits), in the logits' dtype. One buffer
    serves every chunk of a sweep: on the CPU a new [C, V] tensor per chunk costs the page faults of its first
    touch (45 ms of 155 for the product of 256 rows at V = 128256, D = 256 on 2 cores), and a gradient written over
    the chunk's logits (logprobs_grad_of_chunk) then needs no second [C, V] buffer."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return torch.empty(rows * weight.shape[0], dtype=dtype, device=weight.device)


def accumulate_grads(dz, t, hidden, weight, grads, rows, first: bool) -> None:
    """grad_hidden[rows] = dz' @ W, grad_weight += dz'^T h, grad_bias += sum dz' with dz' = dz (1 - t^2)
    under a soft cap (the first chunk writes the sums instead of adding: no pass to zero them); the matmuls run
    in the weight's dtype, the sums over chunks in fp32."""
    if t is not None:
        dz = torch.mul(t, t).neg_().add_(1.0).mul_(dz)
    dz = dz.to(weight.dtype)
    grad_hidden, grad_weight, grad_bias = grads
    grad_hidden[rows] = (dz @ weight).to(grad_hidden.dtype)
    if weight.dtype == torch.float32:  # no [V, D] temporary, and no pass to zero the first (addmm_'s beta=0 has one)
        torch.mm(dz.t(), hidden, out=grad_weight) if first else grad_weight.addmm_(dz.t(), hidden)
    elif first:
        grad_weight.copy_(dz.t() @ hidden)
    else:
        grad_weight += (dz.t() @ hidden).float()
    if grad_bias.numel():
        bias_sum = dz.sum(0, dtype=torch.float32)
        grad_bias.copy_(bias_sum) if first else grad_bias.add_(bias_sum)


def new_grads(hidden, weight, bias, hidden_dtype=None):
    """(grad_hidden in hidden_dtype (default hidden's), fp32 grad_weight sum [V, D], fp32 grad_bias sum [V] or [0]),
    uninitialized: the first chunk writes them (chunk_sweep)."""
    V, D = weight.shape
    return (
        torch.empty_like(hidden, dtype=hidden_dtype or hidden.dtype),
        torch.empty((V, D), dtype=torch.float32, device=weight.device),
        torch.empty((V if bias is not None else 0,), dtype=torch.float32, device=weight.device),
    )


# Entries of one chunk's logits by device: on a GPU 2^24 (64 MiB in fp32, 128 rows of a 128k vocabulary: matmuls of
# M = 128 keep the tensor cores busy), on the CPU 2^19 (2 MiB; with the floor below it decides only where V < 2048) ...
LINEAR_CHUNK_ELEMENTS = {"cuda": 1 << 24, "cpu": 1 << 19}
# ... and rows of a chunk at least, whatever V: a chunk's matmuls read the whole head [V, D], N / C times per product
# for chunks of C rows, and a CPU BLAS is slow on few rows: on 2 cores (AMD EPYC, fp32, D = 256, V = 32000, N = 512)
# the logits' product took 1229 ms in chunks of 16 rows, 464 in chunks of 64, 248 in chunks of 256, and
# fused_linear_cross_entropy forward + backward 2758 / 1164 / 1022 / 742 ms with at least 16 / 64 / 128 / 256 rows
# (eager: 791 ms). The memory this costs is the chunk's [C, V] logits and gradient: 33 MiB each at V = 32000, 125 MiB
# at V = 128256. On a GPU 64 rows keep the 2^24 entries above for V up to 262144.
LINEAR_MIN_ROWS = {"cuda": 64, "cpu": 256}


def linear_chunk_rows(V: int, device: torch.device) -> int:
    """The rows of one chunk at most: ``max(LINEAR_MIN_ROWS, LINEAR_CHUNK_ELEMENTS // V)`` on the device's type."""
    device_type = device.type if device.type in LINEAR_CHUNK_ELEMENTS else "cpu"
    return max(1, LINEAR_MIN_ROWS[device_type], LINEAR_CHUNK_ELEMENTS[device_type] // V)


def linear_chunks(B: int, L: int, V: int, device: torch.device, multiple: int = 1):
    """(b, slice of l) index tuples of the (B, L) rows, ``linear_chunk_rows`` rows at most, rounded down to a
    multiple of ``multiple`` (at least ``multiple``), with every slice starting at a multiple of it: they index the
    (B, L, D) hidden states, the (B, L) per-row tensors and a (B, L, V) teacher alike."""
    step = max(multiple, linear_chunk_rows(V, device) // multiple * multiple)
    for b in range(B):
        for start in range(0, L, step):
            yield b, slice(start, min(L, start + step))


def chunk_sweep(hidden, weight, bias, softcap, outputs, chunk_fn, grads=None, multiple: int = 1):
    """The chunked path's one loop: for each chunk of rows, its logits z (formed by one matmul), then
    ``values, dz = chunk_fn(z [1, C, V], rows)``: ``values [1, C]`` fill the (B, L) ``outputs`` at the chunk's rows,
    and ``dz [1, C, V]`` (the gradient of the chunk's logits, or None) goes into ``grads`` (new_grads; zeros where
    there are no rows). Every chunk's logits go into one buffer (chunk_buffer), which dz may overwrite (the C++ CPU
    kernels' logprobs_grad_of_chunk / divergence_grad_of_chunk): a sweep holds one [C, V] block. ``multiple``: chunks
    of whole groups of that many rows (linear_chunks). Returns outputs."""
    first, logits = True, logits_of_chunks(hidden, weight, bias, softcap)
    for rows in linear_chunks(*hidden.shape[:2], weight.shape[0], hidden.device, multiple):
        z, t = logits(rows)
        values, dz = chunk_fn(z[None], rows)
        for out, value in zip(outputs, values):
            out[rows] = value[0]
        if dz is not None:
            accumulate_grads(dz[0], t, hidden[rows], weight, grads, rows, first)
            first = False
        del z, t, dz
    if grads is not None and first:  # N = 0
        grads[1].zero_(), grads[2].zero_()
    return outputs


def chunked_rows(hidden, weight, bias, softcap, outputs, chunk_rows):
    """Fills the (B, L) outputs a chunk of rows at a time from ``chunk_rows(z [1, C, V], rows)``, the chunk's
    values ``[1, C]`` per output; returns them."""
    return chunk_sweep(hidden, weight, bias, softcap, outputs, lambda z, rows: (chunk_rows(z, rows), None))


def chunked_backward(hidden, weight, bias, softcap, chunk_grad):
    """(grad_hidden, grad_weight, grad_bias or [0]) from ``chunk_grad(z [1, C, V], rows)``, the gradient of each
    chunk's logits (formed again here: the recomputation of a per-row output's backward)."""
    grads = new_grads(hidden, weight, bias)
    chunk_sweep(hidden, weight, bias, softcap, (), lambda z, rows: ((), chunk_grad(z, rows)), grads)
    return cast_grads(grads, weight, bias)


# ----------------------------------------------------------------------------------------------------
# the gradient in the forward, for a scalar loss: total = sum_r w_r value_r over the rows (a reduction "sum" or "mean"
# divides it by a constant outside). Each chunk's dz = d total / dz is formed right after its row statistics, while
# its logits are in cache, and turned into grad_hidden [N, D] and grad_weight [V, D] (fp32, held from the forward to
# the backward, with grad_bias [V]); the backward scales them by the scalar upstream gradient g, which is exact:
# d(g total)/dx = g d total/dx. Three products of 2 N V D instead of four (no recomputed logits), and no second sweep.


def chunk_row_weights(row_weight, rows, like):
    """The chunk's row weights w [1, C] (fp32 ones without row_weight), the upstream gradient of its values."""
    return torch.ones_like(like, dtype=torch.float32) if row_weight is None else row_weight[rows][None].float()


def chunked_total(hidden, weight, bias, softcap, row_weight, outputs, chunk_total):
    """(total, values, grad_hidden, grad_weight, grad_bias, *other outputs) of a scalar loss from one chunk sweep:
    ``chunk_total(z [1, C, V], rows)`` gives the chunk's values [1, C] per output (the first: the rows' loss
    value_r) and dz = d total / dz [1, C, V]; total = sum_r w_r value_r (w = row_weight (B, L), or 1). The gradients
    are fp32 (grad_bias [0] without bias), to be scaled in the backward (register_total_autograd)."""
    grads = new_grads(hidden, weight, bias, torch.float32)
    values, *others = chunk_sweep(hidden, weight, bias, softcap, outputs, chunk_total, grads)
    total = values.sum() if row_weight is None else (values * row_weight).sum()
    return (total, values, *grads, *others)


def fake_total(hidden, weight, bias, others: int):
    """The fake of a chunked_total op: (total, values, grad_hidden, grad_weight, grad_bias, *others (B, L)), fp32."""
    grad_bias = weight.new_empty((0 if bias is None else weight.shape[0],), dtype=torch.float32)
    f32 = dict(dtype=torch.float32)
    return (hidden.new_empty((), **f32), *empty_rows(hidden, 1), torch.empty_like(hidden, **f32),
            torch.empty_like(weight, **f32), grad_bias, *empty_rows(hidden, others))  # fmt: skip


def register_total_autograd(name: str, row_weight_index: int | None) -> None:
    """Autograd of a chunked_total op whose inputs start (hidden, weight, bias): the backward returns the forward's
    gradients times the scalar upstream gradient g, cast to each input's dtype, and g values to the row weights
    (input row_weight_index). Once differentiable: a double backward raises, as the recomputing backward ops (which
    have no autograd of their own) do."""

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # else autograd passes zeros [V, D] for the unused grad_weight output
        ctx.save_for_backward(*output[1:5])
        ctx.dtypes = tuple(None if x is None else x.dtype for x in inputs[:3])
        ctx.inputs = len(inputs)

    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, *_grad_others):
        values, *grads = ctx.saved_tensors
        result = scaled_total_grads(grads, grad_total, ctx.dtypes, ctx.needs_input_grad) + [None] * (ctx.inputs - 3)
        if row_weight_index is not None and ctx.needs_input_grad[row_weight_index]:
            result[row_weight_index] = values * grad_total
        return tuple(result)

    torch.library.register_autograd(name, backward, setup_context=setup_context)


def scaled_total_grads(grads, grad_total, dtypes, needs_input_grad) -> list:
    """[grad_hidden, grad_weight, grad_bias] of a loss whose fp32 gradients ``grads`` were formed in its forward:
    each times the scalar upstream gradient ``grad_total``, in its input's dtype (``dtypes``; None: no input), None
    where ``needs_input_grad`` says no. An upstream gradient of exactly 1 on the CPU hands fp32 gradients over as
    they are (no pass over the [V, D] weight gradient)."""
    result = [None] * len(grads)
    unit = _is_one_on_cpu(grad_total)
    for i, (grad, dtype) in enumerate(zip(grads, dtypes)):
        if dtype is not None and needs_input_grad[i]:  # in fp32, rounded once into the input's dtype
            if unit and dtype == grad.dtype:
                result[i] = grad  # autograd copies it where the graph is retained, else takes it as it is
            else:
                result[i] = torch.mul(grad, grad_total, out=torch.empty_like(grad, dtype=dtype))
    return result


def _is_one_on_cpu(grad: torch.Tensor) -> bool:
    """Whether the upstream gradient of a scalar loss is exactly 1 (``loss.backward()``) on the CPU, where reading it
    syncs nothing: its fp32 gradients are then the result as they are, without a pass over the [V, D] weight
    gradient and a second copy of it. While traced (torch.compile, AOT autograd: a fake or functional tensor, no
    data-dependent branch) and on a GPU: False."""
    traced = torch.compiler.is_compiling() or type(grad) is not torch.Tensor
    return grad.device.type == "cpu" and not traced and grad.item() == 1.0


def gradient_in_forward(reduction: str, *tensors) -> bool:
    """Whether a chunked fused-linear loss takes the gradient in its forward: a scalar loss (reduction "sum" or
    "mean") of which a gradient is wanted (grad mode on and one of the tensors requires it)."""
    wanted = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return reduction != "none" and wanted


def reduction_row_weights(valid, weights, reduction: str, num_items):
    """The row weights w of a chunked_total op whose total is then the reduced loss itself (docs/losses.md §0):
    the user's ``weights`` (None: 1) over ``num_items``, or over the valid rows for "mean"; "sum" keeps them.
    The mean's scale is then paid per row inside the row kernels, and ``loss.backward()``'s upstream gradient is
    exactly 1, which register_total_autograd hands over without a pass over the [V, D] weight gradient."""
    if num_items is None and reduction == "sum":
        return weights
    count = valid.sum().clamp(min=1) if num_items is None else num_items
    scale = 1.0 / torch.as_tensor(count, dtype=torch.float32, device=valid.device)
    return scale.expand(valid.shape) if weights is None else weights.float() * scale


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
