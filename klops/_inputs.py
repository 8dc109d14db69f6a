"""Input checks and row views shared by every op.

Every check raises before any kernel runs and names the argument and what was expected. Nothing is
broadcast: per-row tensors (labels, mask, weights) must have exactly the rows' shape.
"""

import math
import numbers

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REDUCTIONS = ("none", "sum", "mean", "batchmean")


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


def check_labels_in_range(name: str, labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Labels lie in [0, V) or equal ignore_index. Reads the labels (one host sync), so it runs only
    in eager mode; under torch.compile the kernels treat every label as trusted."""
    if torch.compiler.is_compiling() or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        value = labels[bad][0].item()
        raise ValueError(f"{name} must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}, got {value}")


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


def check_num_items(num_items) -> None:
    if num_items is None:
        return
    if isinstance(num_items, torch.Tensor):
        if num_items.dim() != 0:
            raise ValueError(f"num_items must be an int or a 0-d tensor, got shape {tuple(num_items.shape)}")
        return
    if isinstance(num_items, bool) or not isinstance(num_items, numbers.Integral) or num_items <= 0:
        raise ValueError(f"num_items must be a positive int or a 0-d tensor, got {num_items!r}")


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
    """View tensors of one shape [..., V] as (B, L, V) with a common (B, L), without copying.

    When the leading dims of every tensor collapse to one stride the view is (1, N, V); otherwise
    (e.g. ``logits[:, :-1]``) the last leading dim is kept apart and the kernels index rows by two
    strides, so that slicing never costs a copy of the logits.
    """
    shape = tensors[0].shape
    V = shape[-1]
    N = math.prod(shape[:-1])
    if all(_collapsible(t.shape[:-1], t.stride()[:-1]) for t in tensors):
        return tuple(t.view(1, N, V) for t in tensors)
    L = shape[-2]
    return tuple(t.reshape(N // L, L, V) for t in tensors)
