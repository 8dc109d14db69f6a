"""Direct preference optimisation: DPO, f-DPO or token-level DPO (TDPO) on preference pairs, against a frozen
copy of the starting model.

Each step scores chosen and rejected completions of the same prompts (on the tiny task: the correct reversal,
and the reversal with one digit changed). DPO / f-DPO: the sequence log-probs of policy and reference from
``klops.sequence_logprobs`` on the last hidden states with ``weight=`` the LM head, then ``klops.dpo_loss``
(``loss_type`` sigmoid, ipo or hinge; ``divergence`` reverse, forward, jsd or alpha). TDPO: ``klops.tdpo_loss``
on ``(hidden, weight, bias)`` of both models, which adds each token's KL to the reference. No model's ``[B, L,
V]`` logits exist. The reward margin is ``beta`` times the difference of the chosen's and the rejected's log-ratios.
"""

import copy
import random

import torch

import klops

from . import common, sft


def arguments(parser) -> None:
    common.add_common_arguments(parser, steps=40, lr=3e-4)
    parser.add_argument("--loss", choices=("sigmoid", "ipo", "hinge", "tdpo1", "tdpo2"), default="sigmoid")
    parser.add_argument("--divergence", choices=("reverse", "forward", "jsd", "alpha"), default="reverse",
                        help="the f-DPO generator (default: reverse, plain DPO)")  # fmt: skip
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--warmup-steps", type=int, default=60, help="SFT steps on the task first (default: 60)")


def preference_pairs(n: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """``(prompt, chosen, rejected)``: the task's answer, and the answer with one digit changed."""
    triples = []
    for prompt, answer in common.task(n, rng):
        i = rng.randrange(len(answer))
        wrong = rng.choice([d for d in common.DIGITS if d != answer[i]])
        triples.append((prompt, answer, answer[:i] + wrong + answer[i + 1 :]))
    return triples


def dpo_step(policy, reference, inputs: dict, pairs: int, args) -> tuple[torch.Tensor, dict]:
    """The loss and metrics of ``pairs`` preference pairs: rows ``[0, pairs)`` of ``inputs`` chosen, the rest
    rejected."""
    labels = inputs["labels"]
    hidden, head = common.head_inputs(policy, inputs)
    with torch.no_grad():
        ref_hidden, ref_head = common.head_inputs(reference, inputs)
    if args.loss.startswith("tdpo"):
        chosen = torch.arange(pairs, device=labels.device)
        policy_model = (hidden, head.weight) if head.bias is None else (hidden, head.weight, head.bias)
        ref_model = (ref_hidden, ref_head.weight) if ref_head.bias is None else (ref_hidden, ref_head.weight,
                                                                                 ref_head.bias)  # fmt: skip
        variant = int(args.loss[-1])
        return klops.tdpo_loss(policy_model, ref_model, labels, None, chosen, chosen + pairs, beta=args.beta,
                               variant=variant, softcap=head.softcap, logit_scale=head.logit_scale)  # fmt: skip
    average = args.loss == "ipo"  # IPO scores the per-token mean log-ratio (TRL, the IPO authors)
    logp = klops.sequence_logprobs(hidden, labels, weight=head.weight, average=average, **head.kwargs())
    ref_logp = klops.sequence_logprobs(ref_hidden, labels, weight=ref_head.weight, average=average,
                                       **ref_head.kwargs())  # fmt: skip
    return klops.dpo_loss(logp[:pairs], logp[pairs:], ref_logp[:pairs], ref_logp[pairs:], beta=args.beta,
                          loss_type=args.loss, divergence=args.divergence)  # fmt: skip


def train(args) -> list[dict]:
    """Warm the model up on the task, freeze a copy as the reference, then ``args.steps`` preference steps."""
    policy, tokenizer = common.load(args, seed=args.seed)
    sft.warm_up(policy, tokenizer, args.warmup_steps, args.device, seed=args.seed + 1)
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    rng, held_out = random.Random(args.seed), common.task(64, random.Random(10_000 + args.seed))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr)

    def step(i: int) -> dict:
        triples = preference_pairs(args.batch_size, rng)
        chosen = [(prompt, answer) for prompt, answer, _ in triples]
        rejected = [(prompt, wrong) for prompt, _, wrong in triples]
        inputs = common.batch(tokenizer, chosen + rejected, args.device)
        loss, metrics = dpo_step(policy, reference, inputs, len(triples), args)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {
            "loss": loss.item(), "margin": metrics["rewards/margins"].item(),
            "accuracy": metrics["rewards/accuracies"].item(), "chosen": metrics["rewards/chosen"].item(),
            "rejected": metrics["rewards/rejected"].item(), "tokens": int(inputs["attention_mask"].sum()),
        }  # fmt: skip

    before = common.evaluate(policy, tokenizer, held_out, args.device)
    history = common.train_loop("dpo", step, args.steps, args.device, args.out, ("loss", "margin", "accuracy"))
    common.report(before, common.evaluate(policy, tokenizer, held_out, args.device))
    return history
