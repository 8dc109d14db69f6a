"""Knowledge distillation: a student learns a teacher's next-token distributions on the completion tokens.

``klops.fused_linear_kl`` takes both models' last hidden states and LM heads and forms neither model's logits;
any ``--kind`` of ``klops.fused_kl`` (forward, reverse, jsd, skew_forward, skew_reverse, tv, alpha) with its
``--beta`` / ``--alpha``. Off-policy (default): the task's own completions. On-policy (``--on-policy``, GKD): the
student's own samples, scored by the teacher. ``--teacher topk``: the teacher enters as a ``klops.TopK`` of its top
``--top-k`` log-probs per token, stored once before training as a distillation data set would hold them.
``--sinkhorn WEIGHT`` adds that multiple of ``klops.sinkhorn_distill_loss`` (SinKD, optimal transport between the
batch's rows), which takes logits: it forms both models' logits on the completion rows only. On the tiny preset
the teacher is a wider tiny model taught the task first, the student a narrower one.
"""

import argparse
import random

import torch

import klops
from klops.divergence import DIVERGENCE_KINDS
from klops.integrations.hf import last_hidden_states, lm_head

from . import common, sft


def arguments(parser) -> None:
    common.add_common_arguments(parser, steps=120, lr=3e-3)
    parser.add_argument("--kind", choices=DIVERGENCE_KINDS, default="forward", help="the divergence (default forward)")
    parser.add_argument("--beta", type=float, default=None, help="jsd's coefficient")
    parser.add_argument("--alpha", type=float, default=None, help="skew_* and alpha's coefficient")
    parser.add_argument("--on-policy", action="store_true", help="distill on the student's own samples (GKD)")
    parser.add_argument("--teacher", default="dense", metavar="dense|topk|PATH",
                        help="the teacher's full distribution (default), its stored top-k log-probs (topk), or a "
                        "local model directory to use as the dense teacher instead of the tiny one")  # fmt: skip
    parser.add_argument("--top-k", type=int, default=4, help="tokens per row of --teacher topk (default 4)")
    parser.add_argument("--sinkhorn", type=float, default=0.0, metavar="WEIGHT",
                        help="add WEIGHT times SinKD's loss (forms logits; default 0: off)")  # fmt: skip
    parser.add_argument("--teacher-steps", type=int, default=150, help="SFT steps of the tiny teacher (default 150)")


def hidden_and_head(model, inputs: dict):
    """``(hidden [B, L - 1, D], head)``: the model's last hidden states before each next token, and its head."""
    hidden = last_hidden_states(model, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return hidden[:, :-1], lm_head(model)


def logits(hidden: torch.Tensor, head) -> torch.Tensor:
    """``softcap(c (h W^T + b))`` of some rows: for SinKD and the agreement metric only, never ``[B, L, V]``."""
    z = head.logit_scale * torch.nn.functional.linear(hidden, head.weight, head.bias)
    return z if head.softcap is None else head.softcap * torch.tanh(z / head.softcap)


@torch.no_grad()
def stored_topk(teacher, inputs: dict, k: int) -> klops.TopK:
    """The teacher's top-k log-probs of the rows of ``inputs``: what a stored distillation data set holds."""
    hidden, head = hidden_and_head(teacher, inputs)
    logprobs, indices = logits(hidden, head).log_softmax(-1).topk(k, dim=-1)
    return klops.TopK(indices, logprobs, tail="bin")


def load_teacher(args, student_tokenizer):
    """The dense teacher: ``--teacher PATH``, or on the tiny preset a wider tiny model taught the task first."""
    if args.teacher not in ("dense", "topk"):
        teacher, _ = common.load(argparse.Namespace(**{**vars(args), "model": args.teacher}))
    else:
        teacher = common.tiny_model(student_tokenizer, hidden_size=128, seed=args.seed + 7).to(args.device)
        sft.warm_up(teacher, student_tokenizer, args.teacher_steps, args.device, seed=args.seed + 2)
    return teacher.requires_grad_(False).eval()


def train(args) -> list[dict]:
    """Teach the teacher, then distill it into a fresh (smaller) student for ``args.steps`` steps."""
    if args.teacher == "topk" and args.on_policy:
        raise ValueError("--teacher topk stores the teacher's top-k before training: it needs off-policy data")
    student, tokenizer = common.load(args, hidden_size=32, seed=args.seed)
    teacher = load_teacher(args, tokenizer)
    rng, held_out = random.Random(args.seed), common.task(64, random.Random(10_000 + args.seed))
    batches = [common.task(args.batch_size, rng) for _ in range(args.steps)]
    if args.teacher == "topk":
        stored = [stored_topk(teacher, common.batch(tokenizer, pairs, args.device), args.top_k) for pairs in batches]
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)

    def step(i: int) -> dict:
        if args.on_policy:
            inputs, _ = common.sample(student, tokenizer, batches[i], 1, args.device)
        else:
            inputs = common.batch(tokenizer, batches[i], args.device)
        labels = inputs["labels"]
        hidden, head = hidden_and_head(student, inputs)
        with torch.no_grad():
            teacher_hidden, teacher_head = hidden_and_head(teacher, inputs)
        if args.teacher == "topk":
            target, target_head = stored[i], {}
        else:
            target, target_head = teacher_hidden, {"teacher_weight": teacher_head.weight}
            target_head.update(teacher_head.teacher_kwargs())
        coefficients = {"beta": args.beta, "alpha": args.alpha}
        divergence = klops.fused_linear_kl(hidden, head.weight, target, kind=args.kind, labels=labels,
                                           **target_head, **coefficients, **head.student_kwargs())  # fmt: skip
        valid, loss = labels != -100, divergence
        if args.sinkhorn > 0:
            student_logits, teacher_logits = logits(hidden[valid], head), logits(teacher_hidden[valid], teacher_head)
            loss = loss + args.sinkhorn * klops.sinkhorn_distill_loss(student_logits, teacher_logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # the completion tokens where both models' most likely next token agree (a metric:
            # [valid rows, V] logits of each model, once per step)
            student_top1 = logits(hidden[valid], head).argmax(-1)
            agreement = (student_top1 == logits(teacher_hidden[valid], teacher_head).argmax(-1)).float().mean()
        return {"loss": loss.item(), "divergence": divergence.item(), "agreement": agreement.item(),
                "tokens": int(inputs["attention_mask"].sum())}  # fmt: skip

    teacher_eval = common.evaluate(teacher, tokenizer, held_out, args.device)
    print("teacher: " + "  ".join(f"{key} {value:.3f}" for key, value in teacher_eval.items()))
    before = common.evaluate(student, tokenizer, held_out, args.device)
    history = common.train_loop("distill", step, args.steps, args.device, args.out, ("loss", "divergence", "agreement"))
    common.report(before, common.evaluate(student, tokenizer, held_out, args.device))
    return history
