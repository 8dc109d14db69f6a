"""Group relative policy optimisation: sample a group of completions per prompt, score each with a reward
function, and push the policy toward the completions that beat their group's mean.

Each step: ``model.generate`` samples ``--group`` completions of each prompt at temperature 1; the reward of a
completion is the fraction of the answer's characters it has in place (on the tiny task, the reversed digits);
``klops.group_advantages`` centres the rewards on their group's mean (and divides by its std);
``klops.fused_linear_grpo_loss`` takes the policy's last hidden states and LM head (log-probs and entropy in one
fused sweep, no ``[B, L, V]`` logits), any ``--loss-type`` of ``klops.grpo_loss``, and with ``--beta > 0`` the
hidden states and head of a frozen reference model for the KL penalty. One optimizer step per batch of samples,
so the ratio to the sampling policy is 1 and the clipping only shapes the gradient.
"""

import copy
import random

import torch

import klops
from klops.grpo import KL_ESTIMATORS, LOSS_TYPES

from . import common, sft


def arguments(parser) -> None:
    common.add_common_arguments(parser, steps=100, lr=3e-4, batch_size=128)
    parser.add_argument("--group", type=int, default=16, help="completions per prompt (default 16)")
    parser.add_argument("--loss-type", choices=tuple(LOSS_TYPES), default="dapo", help="default: dapo")
    parser.add_argument("--beta", type=float, default=0.0, help="KL penalty to a frozen reference (default 0)")
    parser.add_argument("--kl-estimator", choices=(*KL_ESTIMATORS, "full"), default="k3",
                        help="the per-token KL to the reference (full: over the vocabulary; default k3)")  # fmt: skip
    parser.add_argument("--warmup-steps", type=int, default=40, help="SFT steps on the task first (default: 40)")


def reward(completion: str, answer: str) -> float:
    """The reward function: the fraction of the answer's characters in place."""
    return common.char_accuracy(completion, answer)


def grpo_step(policy, reference, inputs: dict, advantages: torch.Tensor, args) -> tuple[torch.Tensor, dict]:
    """The loss and metrics of one batch of sampled completions with their advantages ``[B]``."""
    labels = inputs["labels"]
    mask = labels != -100
    hidden, head = common.head_inputs(policy, inputs)
    ref = {}
    if args.beta > 0:
        with torch.no_grad():
            ref_hidden, ref_head = common.head_inputs(reference, inputs)
        ref = {"ref_hidden": ref_hidden, "ref_weight": ref_head.weight, "ref_bias": ref_head.bias}
    return klops.fused_linear_grpo_loss(
        hidden, head.weight, labels.masked_fill(~mask, 0), advantages, mask, loss_type=args.loss_type, beta=args.beta,
        kl_estimator=args.kl_estimator, **head.kwargs(), **ref,
    )  # fmt: skip


def train(args) -> list[dict]:
    """Warm the policy up on the task, then ``args.steps`` GRPO steps of ``args.batch_size`` completions."""
    if args.batch_size % args.group:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of --group {args.group}")
    policy, tokenizer = common.load(args, seed=args.seed)
    sft.warm_up(policy, tokenizer, args.warmup_steps, args.device, seed=args.seed + 1)
    reference = copy.deepcopy(policy).requires_grad_(False).eval() if args.beta > 0 else None
    rng, held_out = random.Random(args.seed), common.task(64, random.Random(10_000 + args.seed))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr)

    def step(i: int) -> dict:
        pairs = common.task(args.batch_size // args.group, rng)
        inputs, texts = common.sample(policy, tokenizer, pairs, args.group, args.device)
        answers = [answer for _, answer in pairs for _ in range(args.group)]
        rewards = torch.tensor([reward(text, answer) for text, answer in zip(texts, answers)])
        advantages = klops.group_advantages(rewards, args.group).to(args.device)
        loss, metrics = grpo_step(policy, reference, inputs, advantages, args)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        logged = {"loss": loss.item(), "reward": rewards.mean().item()}
        logged.update({name: metrics[name].item() for name in ("kl", "entropy") if name in metrics})
        return {**logged, "tokens": int(inputs["attention_mask"].sum())}

    before = common.evaluate(policy, tokenizer, held_out, args.device)
    history = common.train_loop("grpo", step, args.steps, args.device, args.out, ("loss", "reward", "entropy"))
    common.report(before, common.evaluate(policy, tokenizer, held_out, args.device))
    return history
