"""The reference trainers (klops.trainers) through ``klops train``: a few steps of each on the tiny preset, the
direction of its metric by a margin, and the metrics.jsonl format."""

import json
import subprocess
import sys

import pytest
import torch

import klops
from klops import cli, trainers
from klops.trainers import common

pytest.importorskip("transformers")
pytest.importorskip("tqdm")


def run(tmp_path, *argv: str) -> list[dict]:
    """``klops train ARGV --out tmp_path``: the metrics.jsonl it wrote, after checking its format."""
    assert cli.main(["train", *argv, "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = int(argv[argv.index("--steps") + 1])
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    for row in rows:
        assert all(isinstance(value, (int, float)) for value in row.values())
        assert row["tokens_per_s"] > 0 and row["peak_mb"] > 0
    return rows


def mean(rows: list[dict], key: str) -> float:
    return sum(row[key] for row in rows) / len(rows)


def test_train_help_lists_the_trainers():
    result = subprocess.run(
        [sys.executable, "-m", "klops.cli", "train", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "--steps" not in result.stdout  # the trainers' own options are in `klops train NAME --help`
    for name in trainers.TRAINERS:
        assert f"    {name} " in result.stdout
    with pytest.raises(SystemExit) as exit:
        cli.main(["train", "sft", "--help"])
    assert exit.value.code == 0


def test_import_klops_does_not_import_transformers():
    code = "import sys, klops, klops.cli; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_sft_loss_goes_down(tmp_path, capsys):
    rows = run(tmp_path, "sft", "--steps", "12", "--batch-size", "16", "--label-smoothing", "0.05", "--z-loss", "1e-4")
    assert set(rows[0]) >= {"step", "loss"}
    assert mean(rows[-3:], "loss") < rows[0]["loss"] - 0.4, [row["loss"] for row in rows]
    out = capsys.readouterr().out
    assert "evaluation" in out and "before" in out and "after" in out
    assert (tmp_path / "curves.png").stat().st_size > 0


@pytest.mark.parametrize("loss", ["sigmoid", "tdpo2"])
def test_dpo_margin_goes_up(tmp_path, loss):
    rows = run(tmp_path, "dpo", "--steps", "12", "--loss", loss, "--warmup-steps", "30", "--batch-size", "16")
    assert set(rows[0]) >= {"step", "loss", "margin"}
    assert abs(rows[0]["margin"]) < 1e-5  # the policy starts as its reference
    assert mean(rows[-3:], "margin") > 0.15, [row["margin"] for row in rows]
    assert mean(rows[-3:], "loss") < rows[0]["loss"] - 0.05


@pytest.mark.parametrize(
    "options",
    [("--steps", "12", "--batch-size", "16", "--kind", "jsd", "--beta", "0.3"),
     ("--steps", "12", "--batch-size", "16", "--teacher", "topk", "--top-k", "3", "--sinkhorn", "0.01"),
     ("--steps", "16", "--batch-size", "32", "--on-policy")],  # the student's samples: noisier
)  # fmt: skip
def test_distill_divergence_down_agreement_up(tmp_path, options):
    rows = run(tmp_path, "distill", "--teacher-steps", "60", *options)
    assert set(rows[0]) >= {"step", "loss", "divergence", "agreement"}
    assert mean(rows[-3:], "divergence") < 0.93 * rows[0]["divergence"], [row["divergence"] for row in rows]
    assert mean(rows[-3:], "agreement") > mean(rows[:3], "agreement") + 0.04, [row["agreement"] for row in rows]


@pytest.mark.parametrize("options", [(), ("--loss-type", "grpo", "--beta", "0.04")])
def test_grpo_reward_goes_up(tmp_path, options):
    rows = run(tmp_path, "grpo", "--steps", "40", "--warmup-steps", "40", *options)
    assert set(rows[0]) >= {"step", "loss", "reward", "entropy"}
    assert mean(rows[-5:], "reward") > mean(rows[:5], "reward") + 0.05, [round(row["reward"], 3) for row in rows]
    if "--beta" in options:  # the policy starts as its reference, then moves away from it
        assert abs(rows[0]["kl"]) < 1e-4 and mean(rows[-5:], "kl") > 0.01


def test_bad_arguments_are_clear_errors(capsys):
    assert cli.main(["train", "grpo", "--batch-size", "10", "--group", "4"]) == 2
    assert "--batch-size 10 must be a multiple of --group 4" in capsys.readouterr().err
    assert cli.main(["train", "distill", "--on-policy", "--teacher", "topk", "--device", "cpu"]) == 2
    assert "needs off-policy data" in capsys.readouterr().err
    assert cli.main(["train", "sft", "--device", "tpu"]) == 2
    assert "--device must be cpu, cuda or cuda:N" in capsys.readouterr().err


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_head_inputs_keep_the_logit_scale_and_the_bias(scale):
    tokenizer = common.tiny_tokenizer()
    model = common.tiny_model(tokenizer, hidden_size=16)
    model.lm_head = torch.nn.Linear(16, len(tokenizer), bias=True)
    torch.nn.init.normal_(model.lm_head.bias)
    model.config.logit_scale = scale
    inputs = common.batch(tokenizer, [("12=", "21"), ("345=", "543")], "cpu")
    hidden, head = common.head_inputs(model, inputs)
    assert head.bias is not None and head.softcap is None and head.logit_scale == scale
    logits = scale * model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    labels = inputs["labels"]
    expected = klops.sequence_logprobs(logits, labels)
    torch.testing.assert_close(klops.sequence_logprobs(hidden, labels, weight=head.weight, **head.kwargs()), expected)
