"""What the reference trainers share: the tiny preset (a model, a tokenizer and a synthetic task built in code),
batches of prompt + completion (given or sampled), the head's inputs to the fused ops, greedy evaluation, and the
loop that logs each optimizer step.

The tiny task is reversing a string of digits: the prompt ``"3141="`` asks for the completion ``"1413"`` and the
end-of-sequence token. Its tokenizer has one token per character, its model is a two-layer Llama, so that every
trainer runs on a 2-core CPU in seconds with nothing downloaded. ``--model PATH`` takes a local Hugging Face model
directory (and its tokenizer) instead; the task stays the same.
"""

import argparse
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

import torch

from klops.integrations.hf import last_hidden_states, lm_head

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
DIGITS = "0123456789"


# --- the tiny preset ---------------------------------------------------------------------------------------------


def tiny_tokenizer():
    """A ``PreTrainedTokenizerFast`` with one token per character of the task (digits, ``=``) and pad / bos / eos."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([PAD, BOS, EOS, *DIGITS, "="])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # "4321", not "4 3 2 1"
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def tiny_model(tokenizer, hidden_size: int = 64, layers: int = 2, seed: int = 0):
    """A randomly initialised Llama small enough to train on a CPU in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load(args, hidden_size: int = 64, seed: int = 0):
    """``(model, tokenizer)`` on ``args.device``: the tiny preset, or the local directory ``args.model``."""
    if args.model is None:
        tokenizer = tiny_tokenizer()
        model = tiny_model(tokenizer, hidden_size, seed=seed)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(args.model)
    return model.to(args.device), tokenizer


def task(n: int, rng: random.Random, digits: int = 4) -> list[tuple[str, str]]:
    """``n`` (prompt, completion) pairs of the synthetic task: reverse ``digits`` random digits."""
    pairs = []
    for _ in range(n):
        text = "".join(rng.choice(DIGITS) for _ in range(digits))
        pairs.append((text + "=", text[::-1]))
    return pairs


def batch(tokenizer, pairs: list[tuple[str, str]], device) -> dict[str, torch.Tensor]:
    """Prompt + completion + eos, right-padded: ``input_ids``, ``attention_mask`` ``[B, L]`` and ``labels`` ``[B,
    L - 1]``, the next tokens with -100 on the prompt and the padding (already shifted for ``hidden[:, :-1]``)."""
    rows, starts = [], []
    for prompt, completion in pairs:
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt_ids + completion_ids)
        starts.append(len(prompt_ids))
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    labels = ids[:, 1:].clone()
    labels[mask[:, 1:] == 0] = -100
    for i, start in enumerate(starts):
        labels[i, : start - 1] = -100
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def prompts(tokenizer, pairs: list[tuple[str, str]], device) -> dict[str, torch.Tensor]:
    """The prompts alone, left-padded for ``model.generate``."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    encoded = tokenizer([prompt for prompt, _ in pairs], return_tensors="pt", padding=True)
    tokenizer.padding_side = side
    return {"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device)}


def head_inputs(model, inputs: dict):
    """``(hidden [B, L - 1, D], head)``: the model's last hidden states before each next token on ``inputs``, and
    its ``klops.integrations.hf.LMHead`` (weight, bias, soft cap, logit scale)."""
    hidden = last_hidden_states(model, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return hidden[:, :-1], lm_head(model)


@torch.no_grad()
def sample(model, tokenizer, pairs: list[tuple[str, str]], group: int, device) -> tuple[dict, list[str]]:
    """``group`` sampled completions of each prompt (consecutive rows), at temperature 1: the inputs as ``batch``
    lays them out (``labels``: the completion up to its first eos, -100 elsewhere) and the completions' text."""
    inputs = prompts(tokenizer, [pair for pair in pairs for _ in range(group)], device)
    max_new = max(len(tokenizer(answer, add_special_tokens=False)["input_ids"]) for _, answer in pairs) + 1
    training = model.training
    ids = model.eval().generate(**inputs, max_new_tokens=max_new, do_sample=True, top_k=0, top_p=1.0,
                                pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model.train(training)
    start = inputs["input_ids"].shape[1]
    completion = ids[:, start:]
    ended = (completion == tokenizer.eos_token_id).long().cumsum(1)
    keep = (ended == 0) | ((ended == 1) & (completion == tokenizer.eos_token_id))  # up to and with the first eos
    mask = torch.cat([inputs["attention_mask"], keep.long()], dim=1)
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    labels[:, : start - 1] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, completions(tokenizer, ids, start)


def completions(tokenizer, generated: torch.Tensor, prompt_length: int) -> list[str]:
    """The text that ``model.generate`` wrote after the prompts, up to the first eos."""
    return tokenizer.batch_decode(generated[:, prompt_length:], skip_special_tokens=True)


def char_accuracy(completion: str, answer: str) -> float:
    """The fraction of the answer's characters that the completion has in place, over the longer of the two (extra
    characters cost as much as missing ones)."""
    hits = sum(a == b for a, b in zip(completion, answer))
    return hits / max(len(answer), len(completion))


@torch.no_grad()
def evaluate(model, tokenizer, pairs: list[tuple[str, str]], device) -> dict[str, float]:
    """Greedy completions of the pairs' prompts: exact matches and characters in place, both as fractions."""
    inputs = prompts(tokenizer, pairs, device)
    max_new = max(len(tokenizer(answer, add_special_tokens=False)["input_ids"]) for _, answer in pairs) + 1
    training = model.training
    generated = model.eval().generate(**inputs, max_new_tokens=max_new, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model.train(training)
    texts = completions(tokenizer, generated, inputs["input_ids"].shape[1])
    answers = [answer for _, answer in pairs]
    return {
        "exact": sum(t == a for t, a in zip(texts, answers)) / len(pairs),
        "chars": sum(char_accuracy(t, a) for t, a in zip(texts, answers)) / len(pairs),
    }


# --- command line, logging, metrics, plot ------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser, steps: int, lr: float, batch_size: int = 32) -> None:
    """The options every trainer takes."""
    parser.add_argument("--preset", choices=("tiny",), default="tiny", help="the tiny model and task (default)")
    parser.add_argument("--model", default=None, metavar="PATH", help="a local Hugging Face causal LM directory")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default: {steps})")
    parser.add_argument("--lr", type=float, default=lr, help=f"AdamW learning rate (default: {lr})")
    parser.add_argument(
        "--batch-size", type=int, default=batch_size, help=f"sequences per step (default: {batch_size})"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, metavar="DIR", help="write metrics.jsonl and curves.png to DIR")


def peak_memory_mb(device: torch.device) -> float:
    """The peak memory so far: allocated on a GPU, the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def train_loop(name: str, step, steps: int, device, out: str | None, shown: tuple[str, ...]) -> list[dict]:
    """Call ``step(i)`` ``steps`` times; it runs one optimizer step and returns its metrics (floats, with ``loss``
    and ``tokens``). Shows a progress bar and one log line per step, adds ``step``, ``tokens_per_s`` and
    ``peak_mb``, and with ``out`` writes ``metrics.jsonl`` (one object per step) and ``curves.png`` of ``shown``."""
    from tqdm import tqdm

    device = torch.device(device)
    if out is not None:
        os.makedirs(out, exist_ok=True)
        (Path(out) / "metrics.jsonl").write_text("")
    history = []
    bar = tqdm(range(steps), desc=f"klops train {name}", file=sys.stderr, dynamic_ncols=True)
    for i in bar:
        start = time.perf_counter()
        metrics = step(i)
        seconds = time.perf_counter() - start
        tokens = metrics.pop("tokens")
        metrics = {"step": i + 1, **metrics, "tokens_per_s": tokens / seconds, "peak_mb": peak_memory_mb(device)}
        history.append(metrics)
        line = " ".join(f"{key} {value:.4g}" for key, value in metrics.items() if key != "step")
        bar.write(f"step {i + 1:3d} {line}", file=sys.stderr)
        if out is not None:  # a line per step, on disk as soon as the step ends
            with open(Path(out) / "metrics.jsonl", "a") as log:
                log.write(json.dumps(metrics) + "\n")
    if out is not None:
        print(plot(history, shown, Path(out) / "curves.png", name))
    return history


def plot(history: list[dict], keys: tuple[str, ...], path: Path, title: str) -> str:
    """One panel per metric against the step, as a PNG; a message saying what was written, or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"no {path.name}: matplotlib is not installed (pip install matplotlib); metrics.jsonl has the curves"
    figure, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot([m["step"] for m in history], [m[key] for m in history])
        ax.set_xlabel("step")
        ax.set_title(key)
    figure.suptitle(f"klops train {title}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return f"wrote {path.parent / 'metrics.jsonl'} and {path}"


def report(before: dict[str, float], after: dict[str, float]) -> None:
    """The before / after evaluation, one line per measure."""
    print("evaluation (held-out prompts, greedy):")
    for key in before:
        print(f"  {key:<10} before {before[key]:.3f}  after {after[key]:.3f}")
