"""Vocabulary-parallel ops on the CPU with gloo (issue 33): time per step against the number of ranks at a fixed
total vocabulary, the bytes each rank sends per step, and the memory the sharding saves per rank.

For each world size W in --worlds, W gloo processes (world 1: the plain single-process op, without vocab_group, the
baseline) each hold a contiguous slice of the vocabulary, as ``torch.tensor_split`` splits it (uneven when W does not
divide V): logits ``[N, V_r]`` or head shards ``[V_r, D]`` with replicated hidden states, drawn from one seed
(64 rows at a time, so that no rank ever holds the full tensors). Ops, forward + backward, fp32, with
``vocab_group=dist.group.WORLD``: ``logprobs`` (+ entropy), ``fused_kl`` forward and jsd,
``fused_linear_cross_entropy``, ``fused_linear_kl`` (student and teacher head shards). A step's time is the slowest
rank's (all-reduce MAX), after a barrier; the median over --steps steps, after 2 warm-ups. Traffic:
``klops.vocab_parallel.record_traffic()`` around one step (backward included). Memory: the sharded inputs' bytes on
the largest shard against the full tensors, and each rank's peak RSS during the op (ru_maxrss, reset per op through
Linux's /proc/self/clear_refs; it includes the process's baseline: torch, klops, gloo). Each rank gets
--threads // W threads (at least 1): with 2 cores, 4 ranks oversubscribe them. Usage::

    python bench/vocab_parallel.py [--tokens 512] [--vocab 128256] [--hidden 256] [--steps 5] [--threads 2]
                                   [--worlds 1,2,4] [--out vocab_parallel.json]
"""

import argparse
import json
import resource
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import klops
from klops.vocab_parallel import record_traffic

WARMUPS = 2
DRAW_ROWS = 64  # rows drawn at a time
# op: (what is sharded over the vocabulary, the sharded tensors)
OPS = {
    "logprobs": ("logits", ("student",)),
    "fused_kl_forward": ("logits", ("student", "teacher")),
    "fused_kl_jsd": ("logits", ("student", "teacher")),
    "fused_linear_cross_entropy": ("head", ("student",)),
    "fused_linear_kl": ("head", ("student", "teacher")),
}


def shard_sizes(vocab: int, world: int) -> list[int]:
    """V_r of each rank, as ``torch.tensor_split`` splits ``range(vocab)`` into ``world`` parts."""
    size, extra = divmod(vocab, world)
    return [size + (r < extra) for r in range(world)]


def drawn(rows: int, cols: int, keep: slice, dim: int, gen: torch.Generator, scale: float) -> torch.Tensor:
    """The slice ``keep`` along ``dim`` of a ``[rows, cols]`` normal tensor of std ``scale``, drawn from ``gen``
    DRAW_ROWS rows at a time (the same full tensor on every rank, never held whole)."""
    blocks = []
    for first in range(0, rows, DRAW_ROWS):
        block = torch.randn(min(DRAW_ROWS, rows - first), cols, generator=gen)
        part = block[:, keep] if dim == 1 else block[max(keep.start - first, 0) : max(keep.stop - first, 0)]
        blocks.append(scale * part)
    return torch.cat(blocks)


def op_inputs(op: str, args, keep: slice) -> dict[str, torch.Tensor]:
    """This rank's inputs of ``op``: labels, the sharded ``student`` (and ``teacher``) logits or heads, and for the
    heads the replicated hidden states; the student's tensors require grad."""
    gen = torch.Generator().manual_seed(0)
    N, V, D = args.tokens, args.vocab, args.hidden
    sharded, names = OPS[op]
    x = {"labels": torch.randint(0, V, (N,), generator=gen)}
    for name in names:
        if sharded == "logits":
            x[name] = drawn(N, V, keep, 1, gen, scale=2.0)
        else:
            x[f"{name}_hidden"] = torch.randn(N, D, generator=gen)
            x[name] = drawn(V, D, keep, 0, gen, scale=D**-0.5)
    for name in ("student", "student_hidden"):
        if name in x:
            x[name].requires_grad_()
    return x


def loss(op: str, x: dict[str, torch.Tensor], group) -> torch.Tensor:
    """The scalar a step backpropagates: ``op`` on this rank's inputs (``group`` None: the single-process op)."""
    if op == "logprobs":
        logp, entropy = klops.logprobs(x["student"], x["labels"], return_entropy=True, vocab_group=group)
        return logp.mean() + entropy.mean()
    if op.startswith("fused_kl_"):
        return klops.fused_kl(x["student"], x["teacher"], op.removeprefix("fused_kl_"), vocab_group=group)
    if op == "fused_linear_cross_entropy":
        return klops.fused_linear_cross_entropy(x["student_hidden"], x["student"], x["labels"], vocab_group=group)
    return klops.fused_linear_kl(x["student_hidden"], x["student"], x["teacher_hidden"], x["teacher"],
                                 vocab_group=group)  # fmt: skip


def sharded_bytes(op: str, args, vocab_size: int) -> int:
    """Bytes of ``op``'s vocabulary-sharded fp32 inputs when a rank holds ``vocab_size`` ids."""
    sharded, names = OPS[op]
    return len(names) * vocab_size * (args.tokens if sharded == "logits" else args.hidden) * 4


def measure(op: str, args, rank: int, world: int) -> dict:
    """Times ``op`` on this rank (a collective call: every rank runs it); the record on rank 0, else None."""
    sizes = shard_sizes(args.vocab, world)
    start = sum(sizes[:rank])
    group = dist.group.WORLD if world > 1 else None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (ru_maxrss) to the current RSS
    x = op_inputs(op, args, slice(start, start + sizes[rank]))
    trained = [t for t in x.values() if t.requires_grad]

    def step():
        loss(op, x, group).backward()
        for t in trained:
            t.grad = None

    for _ in range(WARMUPS):
        step()
    with record_traffic() as calls:
        step()
    times = []
    for _ in range(args.steps):
        dist.barrier()
        begin = time.perf_counter()
        step()
        elapsed = torch.tensor([time.perf_counter() - begin])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(1e3 * elapsed.item())
    mine = (sum(size for _, size in calls), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    ranks = [None] * world
    dist.all_gather_object(ranks, mine)
    if rank:
        return None
    full, shard = sharded_bytes(op, args, args.vocab), sharded_bytes(op, args, max(sizes))
    return {
        "op": op,
        "world": world,
        "threads_per_rank": torch.get_num_threads(),
        "oversubscribed": world * torch.get_num_threads() > args.threads,  # more threads than --threads (cores)
        "shard_sizes": sizes,
        "step_ms": times,
        "median_ms": statistics.median(times),
        "bytes_sent_per_rank": [sent for sent, _ in ranks],
        "collectives": len(calls),
        "calls": [list(call) for call in calls],
        "full_input_bytes": full,
        "shard_input_bytes": shard,
        "saved_bytes_per_rank": full - shard,
        "peak_rss_mb_per_rank": [rss for _, rss in ranks],
        "all_gather_logits_bytes": (world - 1) * args.tokens * args.vocab * 4 // world,
    }


def worker(rank: int, world: int, args, folder: str) -> None:
    """One rank: every op in turn; rank 0 writes the records to ``folder/world{W}.json``."""
    torch.set_num_threads(max(1, args.threads // world))
    dist.init_process_group("gloo", init_method=f"file://{folder}/store{world}", rank=rank, world_size=world)
    try:
        records = [measure(op, args, rank, world) for op in OPS]
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(f"{folder}/world{world}.json", "w") as f:
            json.dump(records, f)


def table(args, records: list[dict]) -> str:
    """The markdown table of the records, with the speed-up against the op's single-process time."""
    base = {r["op"]: r["median_ms"] for r in records if r["world"] == 1}
    lines = [
        f"Vocabulary-parallel ops, gloo on the CPU: N={args.tokens}, V={args.vocab}, D={args.hidden}, fp32, "
        f"forward + backward, median of {args.steps} steps (slowest rank) after {WARMUPS} warm-ups, "
        f"{args.threads} threads shared by the ranks (--threads // W each, at least 1; (over): W ranks run more "
        f"threads than {args.threads}, oversubscribing the cores). Bytes: sent per rank per step, by klops's "
        "collectives. Memory: the sharded inputs (logits or heads) of the largest shard against the full tensors; "
        "peak RSS includes the process baseline.",
        "",
        "| op | W | threads/rank | ms/step | speed-up | collectives | bytes sent/rank | all-gather of fp32 logits "
        "| sharded inputs MB (full) | saved/rank MB | peak RSS/rank MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        speedup = f"{base[r['op']] / r['median_ms']:.2f}" if r["op"] in base else "-"
        threads = f"{r['threads_per_rank']}{' (over)' * r['oversubscribed']}"
        lines.append(
            f"| {r['op']} | {r['world']} | {threads} | {r['median_ms']:.1f} | {speedup} | "
            f"{r['collectives']} | {max(r['bytes_sent_per_rank'])} | {r['all_gather_logits_bytes']} | "
            f"{r['shard_input_bytes'] / 2**20:.1f} ({r['full_input_bytes'] / 2**20:.1f}) | "
            f"{r['saved_bytes_per_rank'] / 2**20:.1f} | {max(r['peak_rss_mb_per_rank']):.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="rows N")
    parser.add_argument("--vocab", type=int, default=128256, help="the total vocabulary V, split over the ranks")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size D of the fused-linear ops")
    parser.add_argument("--steps", type=int, default=5, help=f"timed steps (after {WARMUPS} warm-ups)")
    parser.add_argument("--threads", type=int, default=2, help="threads in all, shared by the ranks")
    parser.add_argument("--worlds", default="1,2,4", help="comma-separated numbers of ranks")
    parser.add_argument("--out", default="vocab_parallel.json", help="where the JSON goes")
    args = parser.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    records = []
    with tempfile.TemporaryDirectory() as folder:
        for world in worlds:
            mp.spawn(worker, args=(world, args, folder), nprocs=world, join=True)
            with open(f"{folder}/world{world}.json") as f:
                records += json.load(f)
    records.sort(key=lambda r: (list(OPS).index(r["op"]), r["world"]))
    with open(args.out, "w") as f:
        json.dump({"config": vars(args) | {"warmups": WARMUPS, "dtype": "float32"}, "results": records}, f, indent=1)
    print(table(args, records))


if __name__ == "__main__":
    main()
