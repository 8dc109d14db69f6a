"""Packed batches: several sequences laid end to end in one row ``[1, T]``, as padding-free trainers give them.

Transformers' padding-free collators (``DataCollatorWithFlattening``, TRL's ``padding_free=True``) describe a
packed row by ``position_ids [1, T]`` that restart at 0 where each sequence starts, or by ``cu_seqlens [S + 1]``,
the cumulative sequence lengths (flash-attention's ``cu_seq_lens_q``: 0, then the end of each sequence, T last).
Token-level ops need neither: a token's log-prob, entropy or divergence does not depend on its neighbours. The
sequence-level ops (``sequence_logprobs``, ``grpo_loss``, ``tdpo_loss``, ``dckd_loss``) take either and give what
they give for the same sequences padded, one row each: per-sequence sums as segment sums over the packed row
(nothing of size ``[S, V]`` or ``[S, T, V]``), and ``grpo_loss``'s per-token inputs unpacked to ``[S, L_max]``.

Sizing the outputs takes the host: ``S`` from ``position_ids`` (``cu_seqlens`` carries it in its shape), and
``L_max`` for ``grpo_loss``: one host sync per call, as the padding-free attention path itself takes.
"""

from dataclasses import dataclass

import torch

from ._inputs import check_none


@dataclass(frozen=True)
class Packing:
    """The sequences of a packed row of ``T`` tokens: ``seq [T]`` (int64, the sequence of each token), ``starts
    [S]`` (the first token of each), ``lengths [S]`` and ``S``."""

    seq: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    count: int

    def sums(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sequence sums ``[S]`` of token values ``x [1, T]`` (or ``[T]``), with their gradient."""
        out = x.new_zeros((self.count,), dtype=x.dtype)
        return out.index_add(0, self.seq, x.reshape(-1))

    def per_token(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sequence values ``[S]`` spread over the tokens of each: ``[1, T]``."""
        return values[self.seq][None]

    def unpack(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """Token values ``x [1, T]`` as ``[S, length]``, one sequence per row from its first column, zeros after it
        (with their gradient); ``length`` at least the longest sequence."""
        column = torch.arange(self.seq.numel(), device=x.device) - self.starts[self.seq]
        out = x.new_zeros((self.count, length))
        return out.index_put((self.seq, column), x.reshape(-1))


def packing(position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None, tokens: torch.Tensor):
    """The Packing of ``tokens [1, T]`` (e.g. the labels) described by ``position_ids [1, T]`` or ``cu_seqlens
    [S + 1]``, or None when neither is given (not packed). Errors name the argument and what was expected."""
    if position_ids is None and cu_seqlens is None:
        return None
    if position_ids is not None and cu_seqlens is not None:
        raise ValueError("describe the packed batch by position_ids or by cu_seqlens, not both")
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError(f"a packed batch is one row [1, T]: the tokens have shape {tuple(tokens.shape)}")
    T = tokens.shape[1]
    device = tokens.device
    if position_ids is not None:
        if not isinstance(position_ids, torch.Tensor) or position_ids.shape != tokens.shape:
            raise ValueError(f"position_ids must have the tokens' shape {tuple(tokens.shape)} (one row, packed), "
                             f"got {tuple(getattr(position_ids, 'shape', ()))}")  # fmt: skip
        if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
            raise TypeError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
        positions = position_ids.reshape(-1).to(device)
        step = positions[1:] - positions[:-1]
        check_none(positions[:1] != 0, positions[:1], "position_ids must start at 0 (the first sequence's start)")
        check_none((step != 1) & (positions[1:] != 0), positions[1:],
                   "position_ids must count up by 1 within a sequence and restart at 0 at the next")  # fmt: skip
        starts = torch.nonzero(positions == 0).reshape(-1)  # the host sync that sizes S
        cu_seqlens = torch.cat((starts, torch.tensor([T], device=device)))
    else:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be a 1-D tensor [S + 1] (0, then each sequence's end), got "
                             f"{tuple(getattr(cu_seqlens, 'shape', ()))}")  # fmt: skip
        if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
            raise TypeError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int64)
        ends = torch.tensor([0, T], device=device)
        check_none(cu_seqlens[[0, -1]] != ends, cu_seqlens[[0, -1]],
                   f"cu_seqlens must start at 0 and end at the packed row's length T = {T}")  # fmt: skip
        check_none(cu_seqlens[1:] <= cu_seqlens[:-1], cu_seqlens[1:], "cu_seqlens must increase (no empty sequence)")
    starts, lengths = cu_seqlens[:-1], cu_seqlens[1:] - cu_seqlens[:-1]
    seq = torch.repeat_interleave(torch.arange(starts.numel(), device=device), lengths, output_size=T)
    return Packing(seq=seq, starts=starts, lengths=lengths, count=starts.numel())
