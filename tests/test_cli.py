"""The command line: `klops info` and `klops bench` (on tiny cases)."""

import json

import pytest
import torch

import klops
from klops import bench, bench_sinkhorn, cli


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("klops-kernels ") and "(import klops)" in out and f"torch {torch.__version__}" in out
    assert "backends on cpu: " in out and "(auto: torch)" in out and "klops._C: " in out
    assert "label check: CPU tensors on the host; GPU tensors by a device-side assertion, no host sync" in out


def test_bench_checks_and_reports(tmp_path, monkeypatch, capsys):
    tiny = [bench.Case("fused_kl", 4, 96, torch.float32, "jsd"), bench.Case("logprobs", 4, 96, torch.float32),
            bench.Case("fused_linear_cross_entropy", 4, 96, torch.float32, hidden=16),
            bench.Case("fused_linear_kl", 4, 96, torch.float32, "reverse", hidden=16),
            bench.Case("fused_kl_topk", 4, 96, torch.float32, k=8), bench.Case("tdpo_loss", 16, 96, torch.float32),
            bench.Case("dckd_loss", 16, 96, torch.float32, k=8),
            bench.Case("fused_linear_logprobs", 8, 96, torch.float32, hidden=16),
            bench.Case("fused_linear_grpo_loss", 8, 96, torch.float32, hidden=16),
            bench.Case("akl_loss", 4, 96, torch.float32)]  # fmt: skip
    monkeypatch.setattr(bench, "cases", lambda device, quick, **_: tiny)
    tiny_sinkhorn = [bench_sinkhorn.SinkhornCase("sinkhorn", 16, 3, batch=2),
                     bench_sinkhorn.SinkhornCase("sinkhorn_distill_loss", 8, 40)]  # fmt: skip
    monkeypatch.setattr(bench_sinkhorn, "cases", lambda device, quick: tiny_sinkhorn)
    out_json = tmp_path / "report.json"
    assert cli.main(["bench", "--quick", "--device", "cpu", "--repeats", "1", "--json", str(out_json)]) == 0
    table = capsys.readouterr().out
    report = json.loads(out_json.read_text())
    impls = {row["impl"] for row in report["results"]}
    assert {"klops[torch]", "torch eager", "torch.compile", "POT (ot.sinkhorn, log)", "torch loop"} <= impls
    for row in report["results"]:
        assert "error" not in row, row
        assert row["ms"] > 0 and row["peak_mib"] >= 0
        if row["impl"].startswith("klops"):
            assert row["rel_err"] < 1e-5, row
            assert row["impl"] in table
        if "fused_linear" in row["case"]:
            assert row["flops_frac"] > 0 and "of matmul" in table, row
        if row["case"].startswith("sinkhorn"):
            assert row["tflops"] > 0 and "GFLOP/s)" in table, row
    assert report["matmul_tflops"]["float32"] > 0
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["klops"] == klops.__version__
    assert report["date"].startswith("20") and report["repeats"] == 1
    assert all(row["pass"] for row in report["results"] if row["impl"].startswith("klops"))


def test_bench_does_not_time_a_failing_kernel(monkeypatch, capsys):
    """A klops implementation that disagrees with the reference is reported FAILED, untimed, and the exit is 1."""
    monkeypatch.setattr(bench, "cases", lambda device, quick, **_: [bench.Case("logprobs", 4, 96, torch.float32)])
    monkeypatch.setattr(bench_sinkhorn, "cases", lambda device, quick: [])
    real = bench.implementations

    def broken(case, device):
        impls = real(case, device)
        impls["klops[torch]"] = lambda z, y: 1.5 * impls["torch eager"](z, y)
        return impls

    monkeypatch.setattr(bench, "implementations", broken)
    assert cli.main(["bench", "--device", "cpu", "--repeats", "1"]) == 1
    out = capsys.readouterr()
    assert "FAILED the reference check (not timed)" in out.out and "1 klops case(s) failed" in out.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_bench_without_gpu_is_one_line(capsys):
    assert cli.main(["bench", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU is usable here" in err and "--device cpu" in err


@pytest.mark.parametrize("device", ["tpu", "gpu0"])
def test_bench_rejects_unknown_device(device, capsys):
    assert cli.main(["bench", "--device", device]) == 2
    assert "--device must be cpu, cuda or cuda:N" in capsys.readouterr().err


def test_bench_ops_selects_cases(monkeypatch, capsys, tmp_path):
    tiny = [bench.Case("fused_kl", 4, 96, torch.float32), bench.Case("logprobs", 4, 96, torch.float32)]
    monkeypatch.setattr(bench, "cases", lambda device, quick, **_: tiny)
    monkeypatch.setattr(bench_sinkhorn, "cases", lambda device, quick: [])
    out_json = tmp_path / "report.json"
    args = ["bench", "--device", "cpu", "--repeats", "1", "--ops", "logprobs", "--json", str(out_json)]
    assert cli.main(args) == 0
    assert {row["case"].split()[0] for row in json.loads(out_json.read_text())["results"]} == {"logprobs"}


@pytest.mark.parametrize("ops", ["fused_kll", "", "logprobs,dpo"])
def test_bench_rejects_unknown_ops(ops, capsys):
    assert cli.main(["bench", "--device", "cpu", "--ops", ops]) == 2
    assert "--ops takes a comma-separated list of fused_kl, logprobs" in capsys.readouterr().err


@pytest.mark.parametrize("repeats", ["0", "-3"])
def test_bench_rejects_non_positive_repeats(repeats, capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--repeats", repeats])
    assert "must be a positive integer" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"klops-kernels {klops.__version__}")


@pytest.mark.parametrize("quick", [True, False])
def test_bench_ops_name_every_case(quick):
    """--ops can select every case the bench runs (a new op must be added to bench.OPS)."""
    device = torch.device("cpu")
    assert {case.op for case in bench.cases(device, quick) + bench_sinkhorn.cases(device, quick)} <= set(bench.OPS)


def test_bench_shapes_dtype_backends_baselines_and_out(monkeypatch, tmp_path, capsys):
    """--shapes (a preset and N,V[,D]) and --dtype make the cases; --backends / --baselines choose what is timed;
    --out writes the JSON and Markdown report."""
    made = []
    real = bench.cases

    def small(device, quick, shapes=None, dtype=None):  # the requested shapes, recorded, then made tiny
        made.append((shapes, dtype))
        return [case for case in real(device, quick, shapes=[(4, 96, 16)], dtype=dtype)
                if case.op in ("logprobs", "fused_linear_cross_entropy")]  # fmt: skip

    monkeypatch.setattr(bench, "cases", small)
    args = ["bench", "--device", "cpu", "--repeats", "1", "--shapes", "cpu-small", "64,1000", "--dtype", "fp32",
            "--backends", "auto", "--baselines", "eager", "--out", str(tmp_path)]  # fmt: skip
    assert cli.main(args) == 0
    assert made == [([bench.SHAPE_PRESETS["cpu-small"], (64, 1000)], torch.float32)]
    (report,) = tmp_path.glob("*.json")
    assert report.with_suffix(".md").exists() and "| case | impl |" in report.with_suffix(".md").read_text()
    rows = json.loads(report.read_text())["results"]
    assert {row["impl"] for row in rows} == {"klops[torch]", "torch eager"}
    assert {row["case"] for row in rows} == {"logprobs N=4 V=96 float32",
                                             "fused_linear_cross_entropy N=4 V=96 D=16 float32"}  # fmt: skip
    assert "[1/2] logprobs N=4 V=96 float32" in capsys.readouterr().err


def test_bench_cases_at_shapes():
    cases = bench.cases(torch.device("cpu"), True, shapes=[(64, 1000), (32, 500, 8)], dtype=torch.bfloat16)
    assert {(case.rows, case.vocab) for case in cases} == {(64, 1000), (32, 500)}
    assert {case.hidden for case in cases if case.op == "fused_linear_kl"} == {256, 8}
    assert {case.dtype for case in cases} == {torch.bfloat16}


@pytest.mark.parametrize("args, message", [
    (["--shapes", "llama"], "--shapes takes presets (llama3-8b"), (["--shapes", "64,0"], "N,V[,D] with positive"),
    (["--backends", "cuda"], "--backends cuda: usable on cpu here: "), (["--backends", "tpu"], "--backends takes"),
    (["--baselines", "eager,deepspeed"], "--baselines takes a comma-separated list of eager, compile, liger"),
])  # fmt: skip
def test_bench_rejects_bad_selection(args, message, capsys):
    assert cli.main(["bench", "--device", "cpu", *args]) == 2
    assert message in capsys.readouterr().err


def test_bench_baseline_families():
    families = {name: bench.baseline_family(name) for name in ("klops[triton]", "torch eager", "torch.compile",
                "liger-kernel", "cut-cross-entropy", "POT (ot.sinkhorn, log)", "torch loop", "torch eager (published)")}  # fmt: skip
    assert list(families.values()) == [None, "eager", "compile", "liger", "cce", "pot", "eager", "eager"]
    assert bench.selected("klops[torch] dense teacher", {"torch"}, None)
    assert not bench.selected("klops[triton]", {"torch"}, None) and not bench.selected("torch.compile", None, {"eager"})
