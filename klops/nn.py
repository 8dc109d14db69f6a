"""``nn.Module`` wrappers of the klops ops, for trainers that build their losses as modules."""

import torch

from .divergence import fused_kl
from .linear import fused_linear_cross_entropy, fused_linear_logprobs
from .linear_divergence import fused_linear_kl
from .logprobs import logprobs

__all__ = ["FusedKL", "LogProbs", "FusedLinearKL", "FusedLinearLogProbs", "FusedLinearCrossEntropy"]


class FusedKL(torch.nn.Module):
    """``klops.fused_kl`` with its options fixed at construction.

    ``FusedKL(kind="jsd", beta=0.5)(student_logits, teacher_logits, labels=labels)``: per-call
    arguments are the tensors (``labels``, ``mask``, ``weights``, ``num_items``); see ``klops.fused_kl``.
    """

    def __init__(
        self,
        kind: str = "forward",
        *,
        beta: float | None = None,
        alpha: float | None = None,
        temperature: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        target_is: str = "logits",
        backend: str = "auto",
    ):
        super().__init__()
        self.kind, self.beta, self.alpha, self.temperature = kind, beta, alpha, temperature
        self.ignore_index, self.reduction, self.target_is, self.backend = ignore_index, reduction, target_is, backend

    def forward(self, student_logits, teacher_logits, *, labels=None, mask=None, weights=None, num_items=None):
        return fused_kl(
            student_logits, teacher_logits, self.kind,
            beta=self.beta, alpha=self.alpha, temperature=self.temperature,
            labels=labels, mask=mask, weights=weights, ignore_index=self.ignore_index,
            reduction=self.reduction, num_items=num_items, target_is=self.target_is, backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, temperature={self.temperature}, reduction={self.reduction!r}, "
            f"backend={self.backend!r}"
        )


class LogProbs(torch.nn.Module):
    """``klops.logprobs`` with its options fixed: ``LogProbs(temperature=0.7)(logits, labels)``."""

    def __init__(
        self, *, temperature: float = 1.0, return_entropy: bool = False, ignore_index: int = -100, backend: str = "auto"
    ):
        super().__init__()
        self.temperature, self.return_entropy, self.ignore_index, self.backend = (
            temperature,
            return_entropy,
            ignore_index,
            backend,
        )

    def forward(self, logits, labels):
        return logprobs(
            logits, labels, temperature=self.temperature, return_entropy=self.return_entropy,
            ignore_index=self.ignore_index, backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, return_entropy={self.return_entropy}, backend={self.backend!r}"


class _Options(torch.nn.Module):
    """A module holding the keyword options of a klops function, given at construction."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class FusedLinearKL(_Options):
    """``klops.fused_linear_kl`` with its options fixed at construction:
    ``FusedLinearKL(kind="jsd", beta=0.5)(student_hidden, student_weight, teacher_hidden, teacher_weight)``;
    per-call arguments are the tensors (``teacher_logits``, biases, ``labels``, ``mask``, ``weights``,
    ``num_items``)."""

    def forward(self, student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, **tensors):
        return fused_linear_kl(
            student_hidden, student_weight, teacher_hidden, teacher_weight, **tensors, **self.options
        )


class FusedLinearLogProbs(_Options):
    """``klops.fused_linear_logprobs`` with its options fixed: ``FusedLinearLogProbs(temperature=0.7)(hidden,
    weight, labels, bias=None)``."""

    def forward(self, hidden, weight, labels, bias=None):
        return fused_linear_logprobs(hidden, weight, labels, bias=bias, **self.options)


class FusedLinearCrossEntropy(_Options):
    """``klops.fused_linear_cross_entropy`` with its options fixed, in place of Liger-Kernel's
    ``LigerFusedLinearCrossEntropyLoss``: ``FusedLinearCrossEntropy(label_smoothing=0.1)(hidden, weight,
    labels, bias=None, num_items=None)``."""

    def forward(self, hidden, weight, labels, bias=None, num_items=None):
        return fused_linear_cross_entropy(hidden, weight, labels, bias=bias, num_items=num_items, **self.options)
