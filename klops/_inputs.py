"""Input checks and row views shared by every op.

Every check raises before any kernel runs and names the argument and what was expected. Nothing is
broadcast: per-row tensors (labels, mask, weights) must have exactly the rows' shape.
"""

import math
import numbers
import os

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REDUCTIONS = ("none", "sum", "mean", "batchmean")
# Labels of these dtypes are read as they are by every backend; other integer dtypes are widened to int64.
LABEL_DTYPES = (torch.int32, torch.int64)

# Whether data-dependent checks (labels in range) of GPU tensors run on the host: see set_host_checks.
_host_checks = os.environ.get("KLOPS_HOST_CHECKS", "0") == "1"


def set_host_checks(enabled: bool) -> None:
    """Check labels of GPU tensors on the host: a clear ``ValueError`` naming the bad label, at the cost
    of one host sync per call (the CPU waits for the model's forward). Off by default, or on with the
    environment variable ``KLOPS_HOST_CHECKS=1``.

    Off, the check of GPU tensors is a device-side assertion (``torch._assert_async``): no sync, and a
    bad label fails the way PyTorch's own ``cross_entropy`` does (a device-side assert that ends the CUDA
    context). CPU tensors are always checked on the host, where it costs nothing; under
    ``torch.compile`` every check is the device-side assertion.
    """
    global _host_checks
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _host_checks = enabled


def check_logits(name: str, x) -> None:
    """A float tensor [..., V] with V >= 1 and stride 1 along the vocabulary."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must have dtype float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(x.shape)}")
    if x.numel() > 0 and x.stride(-1) != 1:
        raise ValueError(
            f"{name} must have stride 1 in its last (vocabulary) dimension, got strides {tuple(x.stride())}; "
            "call .contiguous() first"
        )


def check_same_rows(name: str, x, ref_name: str, ref: torch.Tensor, *, integer: bool = False) -> None:
    """x is a tensor on ref's device whose shape is exactly ref.shape[:-1] (one entry per row)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    rows = tuple(ref.shape[:-1])
    if tuple(x.shape) != rows:
        raise ValueError(f"{name} must have shape {rows} (the rows of {ref_name}), got {tuple(x.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")
    if integer and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")


def host_checks_enabled() -> bool:
    """Whether labels of GPU tensors are checked on the host (set_host_checks)."""
    return _host_checks


def as_labels(name: str, labels, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """Per-row integer labels of ref's rows, as int32 or int64 (what every backend reads): int8, int16,
    uint8 and the other integer dtypes are widened to int64, a copy of one entry per row."""
    check_same_rows(name, labels, ref_name, ref, integer=True)
    return labels if labels.dtype in LABEL_DTYPES else labels.to(torch.int64)


def check_labels_in_range(name: str, labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Labels lie in [0, V) or equal ignore_index; never a host sync on a GPU tensor (set_host_checks).

    On the host (CPU tensors, or set_host_checks(True)) a bad label raises ValueError; otherwise the
    check is torch._assert_async, a device-side assertion queued on the current stream."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    check_none(bad, labels, f"{name} must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}")


def check_none(bad: torch.Tensor, values: torch.Tensor, expected: str) -> None:
    """No entry of the bool tensor ``bad`` is set; else ``ValueError(expected, got values[bad][0])``.

    Checked on the host for CPU tensors and under set_host_checks(True); otherwise (GPU tensors, and
    under torch.compile) with torch._assert_async, a device-side assertion queued on the current stream:
    never a host sync."""
    if bad.numel() == 0:
        return
    if torch.compiler.is_compiling() or not (bad.device.type == "cpu" or _host_checks):
        torch._assert_async(~bad.any(), expected)
    elif bool(bad.any()):
        raise ValueError(f"{expected}, got {values[bad][0].item()}")


def teacher_tolerance(dtype: torch.dtype, vocab_size: int) -> float:
    """How far the log-mass ``log sum_v p_v`` of an honest teacher row given as log-probs or probs may lie from 0,
    and its log-probs above 0: ``eps (1 + log V)``, eps the machine epsilon of ``dtype`` (bfloat16's for float32).

    Derivation: rounding each log-prob to the unit roundoff u = eps / 2 (relative) moves the mass by
    ``sum_v p_v (exp(lp_v d_v) - 1) ~ u sum_v p_v |lp_v| = u H(p) <= u log V`` to first order; probabilities
    rounded to u move it by at most u. Twice that bound (second-order terms, the fp32 sums of the check) plus eps
    (V = 1, tiny V) admits every row a rounded teacher can give. A float32 tensor gets bfloat16's eps: a bfloat16
    teacher cast up is honest, and float32's own bound (~1e-6) would reject it. At V = 128256 that is 0.10
    (float32, bfloat16) and 0.013 (float16, whose probabilities lose at most V 2^-25 = 0.004 more to subnormals).
    The mistakes the check is for are far beyond: probabilities read as log-probs have a log-mass >= log V (each
    exp(p) >= 1), logits read as probabilities have negative entries or a mass far from 1, and raw logits in a
    ``TopK`` have entries or a log-sum-exp above 0 by their scale."""
    eps = torch.finfo(torch.bfloat16 if dtype == torch.float32 else dtype).eps
    return eps * (1.0 + math.log(vocab_size))


def check_teacher_rows(
    name: str, target_is: str, dtype: torch.dtype, vocab_size: int, valid: torch.Tensor, top: torch.Tensor,
    log_mass: torch.Tensor,
) -> None:  # fmt: skip
    """A teacher given as log-probs or probabilities is normalized (docs/losses.md §1), checked on its valid rows from
    the statistics its op's forward sweep left per row: ``top``, the row's largest log-prob (``"logprobs"``) or largest
    negated probability (``"probs"``), and ``log_mass = log sum_v p_v``. No log-prob above ``teacher_tolerance``, no
    negative probability, ``|log_mass| <= teacher_tolerance``; raised or asserted as ``check_none`` does (never a
    host sync on a GPU tensor). Nothing for logits."""
    if target_is == "logits":
        return
    tol = teacher_tolerance(dtype, vocab_size)
    within = f"within {tol:.2g} for {dtype} at V={vocab_size}"
    if target_is == "logprobs":
        what = (
            f"{name} must hold log-probabilities with target_is='logprobs' (each <= 0, exp summing to 1 per row, "
            f"{within}; probabilities take target_is='probs', logits target_is='logits')"
        )
        check_none(valid & ~(top <= tol), top, f"{what}: a row's largest entry is above 0")
    else:
        what = (
            f"{name} must hold probabilities with target_is='probs' (each >= 0, summing to 1 per row, {within}; "
            "log-probs take target_is='logprobs', logits target_is='logits')"
        )
        check_none(valid & ~(top <= 0.0), -top, f"{what}: a row's smallest entry is negative")
    check_none(valid & ~(log_mass.abs() <= tol), log_mass.exp(), f"{what}: a row's probabilities sum to")


def check_dense_teacher(teacher_logits, student_logits) -> None:
    """teacher_logits [..., V] has the student's shape and device."""
    check_logits("teacher_logits", teacher_logits)
    if teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise ValueError(
            f"vocabulary mismatch: student_logits has V={student_logits.shape[-1]}, teacher_logits has "
            f"V={teacher_logits.shape[-1]}; pad the smaller one with -inf logits"
        )
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits must have the shape of student_logits {tuple(student_logits.shape)}, "
            f"got {tuple(teacher_logits.shape)}"
        )
    if teacher_logits.device != student_logits.device:
        raise ValueError(
            f"teacher_logits is on {teacher_logits.device} but student_logits is on {student_logits.device}"
        )


def token_mask(labels: torch.Tensor, mask, ignore_index: int) -> torch.Tensor:
    """fp32 [...]: 1 where the label is not ignore_index and the mask (if any) is nonzero."""
    keep = labels != ignore_index
    if mask is not None:
        check_same_rows("mask", mask, "labels", labels[..., None])
        keep = keep & (mask != 0)
    return keep.float()


def split_model(name: str, model):
    """(logits, None, None) or (hidden, weight, bias) of a model given as logits or as (hidden, weight[, bias])."""
    if isinstance(model, torch.Tensor):
        return model, None, None
    if isinstance(model, tuple | list) and len(model) in (2, 3):
        return (*model, None) if len(model) == 2 else tuple(model)
    raise TypeError(f"{name} must be logits [..., V] or a tuple (hidden [..., D], weight [V, D][, bias [V]])")


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_int(name: str, value, low: int) -> int:
    """A Python int >= low (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_real(name: str, value, *, low: float, high: float, open_low: bool = False) -> float:
    """A real Python number in [low, high] ((low, high] when open_low)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    value = float(value)
    inside = (low < value if open_low else low <= value) and value <= high
    if not math.isfinite(value) or not inside:
        bracket = "(" if open_low else "["
        raise ValueError(f"{name} must lie in {bracket}{low}, {high}], got {value}")
    return value


def check_temperature(temperature) -> float:
    return check_real("temperature", temperature, low=0.0, high=math.inf, open_low=True)


def check_num_items(num_items, reduction: str | None = None) -> None:
    """An int or 0-d tensor count that divides a reduced loss, so never with ``reduction="none"``."""
    if num_items is None:
        return
    if reduction == "none":
        raise ValueError('num_items divides a reduced loss; it cannot be given with reduction="none"')
    if isinstance(num_items, torch.Tensor):
        if num_items.dim() != 0:
            raise ValueError(f"num_items must be an int or a 0-d tensor, got shape {tuple(num_items.shape)}")
        return
    if isinstance(num_items, bool) or not isinstance(num_items, numbers.Integral) or num_items <= 0:
        raise ValueError(f"num_items must be a positive int or a 0-d tensor, got {num_items!r}")


def check_linear(hidden_name, hidden, weight_name, weight, bias_name, bias) -> None:
    """hidden [..., D] and weight [V, D] float tensors on one device; bias [V] or None."""
    for name, x in ((hidden_name, hidden), (weight_name, weight)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in LOGIT_DTYPES:
            raise TypeError(f"{name} must have dtype float32, bfloat16 or float16, got {x.dtype}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(f"{hidden_name}, {weight_name} and {bias_name} must have one dtype, got {hidden.dtype}, "
                        f"{weight.dtype}" + (f", {bias.dtype}" if bias is not None else ""))  # fmt: skip
    if hidden.dim() < 1:
        raise ValueError(f"{hidden_name} must have shape [..., D], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{weight_name} must have shape [V, D] with D = {hidden_name}.shape[-1] = {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.device != hidden.device:
        raise ValueError(f"{weight_name} is on {weight.device} but {hidden_name} is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{bias_name} must have shape ({weight.shape[0]},) (the rows of {weight_name})")
        if bias.device != weight.device:
            raise ValueError(f"{bias_name} is on {bias.device} but {weight_name} is on {weight.device}")


def check_softcap(softcap, name: str = "softcap"):
    """softcap: None or a positive real (Gemma-2's final-logit soft cap)."""
    if softcap is None:
        return None
    return check_real(name, softcap, low=0.0, high=math.inf, open_low=True)


def scale_head_inputs(name: str, logit_scale, hidden: torch.Tensor, bias: torch.Tensor | None):
    """``(s hidden, s bias)`` for a finite real ``s = logit_scale``: the logits ``softcap(s (hidden @ W^T + b))``
    (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``, Falcon-H1's ``lm_head_multiplier``) are formed as
    ``softcap((s hidden) @ W^T + s b)``, an O(N D) product that autograd carries into the gradients of hidden,
    weight and bias; never a pass over the [V, D] head or the logits. Exact for powers of two; otherwise one
    rounding of ``s hidden`` in its dtype."""
    s = check_real(name, logit_scale, low=-math.inf, high=math.inf)
    if s == 1.0:
        return hidden, bias
    return hidden * s, None if bias is None else bias * s


def _collapsible(shape, stride) -> bool:
    """Whether dims with this shape/stride can be viewed as one dim (sizes-1 dims ignored)."""
    expected = None
    for size, st in reversed(list(zip(shape, stride))):
        if size == 1:
            continue
        if expected is not None and st != expected:
            return False
        expected = st * size
    return True


def as_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """View tensors of one leading shape [...] (each with its own last dim: V for logits, D for hidden
    states) as (B, L, last) with a common (B, L), without copying.

    When the leading dims of every tensor collapse to one stride the view is (1, N, last); otherwise
    (e.g. ``logits[:, :-1]``) the last leading dim is kept apart and the kernels index rows by two
    strides, so that slicing never costs a copy of the logits.
    """
    shape = tensors[0].shape
    N = math.prod(shape[:-1])
    if N == 0:  # e.g. logits[:, :-1] of length-1 sequences: nothing is read, any (B, L) will do
        return tuple(t.reshape(1, 0, t.shape[-1]) for t in tensors)
    if all(_collapsible(t.shape[:-1], t.stride()[:-1]) for t in tensors):
        return tuple(t.view(1, N, t.shape[-1]) for t in tensors)
    L = shape[-2]
    return tuple(t.reshape(N // L, L, t.shape[-1]) for t in tensors)
