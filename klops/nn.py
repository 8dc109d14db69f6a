"""``nn.Module`` wrappers of the klops ops, for trainers that build their losses as modules."""

import torch

from .divergence import fused_kl
from .logprobs import logprobs

__all__ = ["FusedKL", "LogProbs"]


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
