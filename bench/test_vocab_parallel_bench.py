"""Smoke test of bench/vocab_parallel.py: the script runs at a tiny size on 1 and 2 gloo ranks (an odd vocabulary, so
uneven shards) and its JSON holds every op at every world size, with traffic on 2 ranks and none on 1."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("vocab_parallel.py")
OPS = {"logprobs", "fused_kl_forward", "fused_kl_jsd", "fused_linear_cross_entropy", "fused_linear_kl"}


def test_vocab_parallel_bench_smoke(tmp_path):
    out = tmp_path / "vocab_parallel.json"
    command = [sys.executable, str(SCRIPT), "--tokens", "16", "--vocab", "101", "--hidden", "8", "--steps", "1",
               "--worlds", "1,2", "--out", str(out)]  # fmt: skip
    stdout = subprocess.run(command, check=True, capture_output=True, text=True, timeout=300).stdout
    records = json.loads(out.read_text())["results"]
    assert {(r["op"], r["world"]) for r in records} == {(op, world) for op in OPS for world in (1, 2)}
    assert len(records) == 2 * len(OPS)
    for r in records:
        assert r["op"] in stdout
        assert sum(r["shard_sizes"]) == 101
        assert r["median_ms"] > 0
        if r["world"] == 1:
            assert r["bytes_sent_per_rank"] == [0] and r["collectives"] == 0 and r["saved_bytes_per_rank"] == 0
        else:
            assert r["shard_sizes"] == [51, 50]
            assert all(sent > 0 for sent in r["bytes_sent_per_rank"]) and r["collectives"] > 0
            assert r["saved_bytes_per_rank"] == r["full_input_bytes"] - r["shard_input_bytes"] > 0
