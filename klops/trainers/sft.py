"""Supervised fine-tuning: next-token cross-entropy of the completion, from the model's last hidden states and LM
head through ``klops.fused_linear_cross_entropy``, so that the ``[B, L, V]`` logits never exist.

Per completion token, with ``lse`` the log-sum-exp of its logits: ``(1 - eps) (lse - z_y) + eps (lse - mean z) +
z_loss lse^2`` (label smoothing ``eps``, PaLM's z-loss), averaged over the completion tokens.
"""

import random

import torch

import klops
from klops.integrations.hf import last_hidden_states, lm_head

from . import common


def arguments(parser) -> None:
    common.add_common_arguments(parser, steps=150, lr=3e-3)
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="eps of the smoothed target (default 0)")
    parser.add_argument("--z-loss", type=float, default=0.0, help="weight of lse^2 (PaLM; default 0)")


def sft_loss(model, inputs: dict, label_smoothing: float = 0.0, z_loss: float = 0.0) -> torch.Tensor:
    """The mean cross-entropy of ``inputs["labels"]`` (shifted next tokens, -100 where not trained)."""
    head = lm_head(model)
    hidden = last_hidden_states(model, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return klops.fused_linear_cross_entropy(
        hidden[:, :-1], head.weight, inputs["labels"], label_smoothing=label_smoothing, z_loss=z_loss, **head.kwargs()
    )


def warm_up(model, tokenizer, steps: int, device, seed: int = 1, batch_size: int = 32, lr: float = 3e-3) -> None:
    """Teach the model the task for ``steps`` quiet SFT steps: the teacher of ``distill``, the starting point of
    ``grpo`` and ``dpo``."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = sft_loss(model, common.batch(tokenizer, common.task(batch_size, rng), device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def train(args) -> list[dict]:
    """Train ``args.steps`` steps on the reversal task; print the held-out accuracy before and after."""
    model, tokenizer = common.load(args, seed=args.seed)
    rng, held_out = random.Random(args.seed), common.task(64, random.Random(10_000 + args.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    def step(i: int) -> dict:
        inputs = common.batch(tokenizer, common.task(args.batch_size, rng), args.device)
        loss = sft_loss(model, inputs, args.label_smoothing, args.z_loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"loss": loss.item(), "tokens": int(inputs["attention_mask"].sum())}

    before = common.evaluate(model, tokenizer, held_out, args.device)
    history = common.train_loop("sft", step, args.steps, args.device, args.out, ("loss",))
    common.report(before, common.evaluate(model, tokenizer, held_out, args.device))
    return history
