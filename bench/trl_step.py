"""TRL's SFTTrainer steps on the CPU as TRL ships and under ``klops.integrations.trl.patch()``: time per step and
peak memory, each variant in a fresh process (its peak resident set is its own); then the function ``patch()``
replaces alone, TRL's ``ChunkedLogProbFunction`` against klops's (forward + backward, SFT's outputs), alternated in
one process so that a drifting machine affects both alike.

A randomly initialised Llama built from a config in code (no download) with a vocabulary of 128256 (Llama-3's), a
word-level tokenizer over it, plain SGD. TRL's SFTTrainer computes its loss through its fused LM head
(``add_fused_lm_head``: log-probs, entropy and ``is_top1`` of chunked logits, never the full ``[N, V]``), which
``patch()`` routes to ``klops.fused_linear_logprobs``. Usage::

    python bench/trl_step.py [--vocab 128256] [--hidden 256] [--tokens 512] [--steps 5] [--threads 2]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def one_variant(patched: bool, args) -> dict:
    """Builds the model and trainer, runs args.steps steps, returns the step times and memory (this process)."""
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    import klops.integrations.trl

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": i + 3 for i in range(args.vocab - 3)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")  # fmt: skip
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    length = args.tokens // args.batch
    gen = torch.Generator().manual_seed(1)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, args.vocab - 3, (length,), generator=gen))
             for _ in range(args.batch * (args.steps + 1))]  # fmt: skip
    times = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(out, use_cpu=True, optim="sgd", learning_rate=0.1, max_steps=args.steps + 1,
                           per_device_train_batch_size=args.batch, max_length=length + 1, report_to="none",
                           save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0)  # fmt: skip
        trainer = SFTTrainer(model, args=config, train_dataset=Dataset.from_dict({"text": texts}),
                             processing_class=tokenizer, callbacks=[StepTimes()])  # fmt: skip
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if patched:
            klops.integrations.trl.patch()
        trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {
        "patched": patched,
        "step_ms": [1e3 * t for t in times[1:]],  # the first step (and klops's first-call build) left out
        "first_step_ms": 1e3 * times[0],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_train_mb": rss_before,
        "losses": losses,
    }


def head_alone(args, repeats: int = 3) -> dict:
    """Seconds of forward + backward of TRL's ChunkedLogProbFunction and of klops's replacement on the step's
    [tokens, D] hidden states and [V, D] head, with SFT's outputs, alternated (one untimed call each first)."""
    import torch
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    import klops.integrations.trl

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, requires_grad=True)
    weight = (0.05 * torch.randn(args.vocab, args.hidden)).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,))
    functions = {"trl": ChunkedLogProbFunction, "klops": klops.integrations.trl.ChunkedLogProbFunction}

    def step(function):
        start = time.perf_counter()
        log_probs, entropy, *_ = function.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0,
                                                ("log_probs", "entropy", "is_top1"))  # fmt: skip
        (log_probs.sum() + 0.1 * entropy.sum()).backward()
        return time.perf_counter() - start

    for function in functions.values():
        step(function)
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            times[name].append(step(function))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per step (batch x length)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one untimed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", choices=["trl", "klops"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(one_variant(args.variant == "klops", args)))  # the trainer prints its logs too
        return
    results = []
    for variant in ("trl", "klops"):
        command = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
        stdout = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(stdout[stdout.rindex("RESULT ") + 7 :]))
    print(f"SFTTrainer step, V={args.vocab}, D={args.hidden}, {args.tokens} tokens, {args.threads} threads, fp32")
    print("| variant | step ms (median, min-max) | 1st step ms | peak RSS MB | RSS before training MB |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        ms = r["step_ms"]
        name = "klops.integrations.trl.patch()" if r["patched"] else "TRL 1.16 as shipped"
        print(f"| {name} | {statistics.median(ms):.0f} ({min(ms):.0f}-{max(ms):.0f}) | {r['first_step_ms']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['rss_before_train_mb']:.0f} |")  # fmt: skip
    print("losses:", *([f"{x:.5f}" for x in r["losses"]] for r in results))
    head = head_alone(args)
    print(f"\nThe fused LM head alone, forward + backward ({args.tokens} x {args.hidden} hidden, [{args.vocab}, "
          f"{args.hidden}] head), alternated: TRL {min(head['trl']):.2f} s, klops {min(head['klops']):.2f} s "
          f"(min of {len(head['trl'])}; all: {head})")  # fmt: skip


if __name__ == "__main__":
    main()
