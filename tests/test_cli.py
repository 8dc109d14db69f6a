"""The command line: `klops info` and `klops bench` (on tiny cases)."""

import importlib.util
import json

import pytest
import torch

import klops
from klops import bench, bench_baselines, bench_report, bench_sinkhorn, cli
from klops.backend import resolve


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("klops-kernels ") and "(import klops)" in out and f"torch {torch.__version__}" in out
    auto = resolve("divergence", "auto", torch.device("cpu"))
    assert "backends on cpu: " in out and f"(auto: {auto})" in out and "klops._C: " in out
    assert "label check: CPU tensors on the host; GPU tensors by a device-side assertion, no host sync" in out


def test_bench_checks_and_reports(tmp_path, monkeypatch, capsys):
    tiny = [bench.Case("fused_kl", 4, 96, torch.float32, "jsd"), bench.Case("logprobs", 4, 96, torch.float32),
            bench.Case("fused_linear_cross_entropy", 4, 96, torch.float32, hidden=16),
            bench.Case("fused_linear_kl", 4, 96, torch.float32, "reverse", hidden=16),
            bench.Case("fused_kl_topk", 4, 96, torch.float32, k=8), bench.Case("tdpo_loss", 16, 96, torch.float32),
            bench.Case("dckd_loss", 16, 96, torch.float32, k=8),
            bench.Case("fused_linear_logprobs", 8, 96, torch.float32, hidden=16),
            bench.Case("fused_linear_grpo_loss", 8, 96, torch.float32, hidden=16),
            bench.Case("forward_reverse_kl", 4, 96, torch.float32),
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
    assert {"klops[torch]", "torch eager", "torch.compile", "torch loop"} <= impls
    lce = {"F.linear_cross_entropy", "F.linear_cross_entropy chunked"}  # checked against float64 below
    assert (lce <= impls) == (bench_baselines.lce_missing() is None) and report["skipped_baselines"] == (
        {} if bench_baselines.lce_missing() is None else {"lce": bench_baselines.lce_missing()}
    )
    assert ("POT (ot.sinkhorn, log)" in impls) == (importlib.util.find_spec("ot") is not None)  # where installed
    passes = {}
    for row in report["results"]:
        assert "error" not in row, row
        assert ROW_FIELDS <= row.keys() and row["shape"]["N" if "N" in row["shape"] else "n"] > 0, row
        assert row["op"] == row["case"].split()[0] and row["dtype"] == "float32"
        passes.setdefault((row["case"], row["impl"]), []).append(row["pass"])
        if row["pass"] == "forward+backward":  # the first call: before the check and the warm-ups
            assert row["first_call_ms"] > 0 and row["first_of_op"] is True, row
        else:
            assert "first_call_ms" not in row and "first_of_op" not in row, row
        assert row["time_ms"] > 0 and row["peak_mem_mib"] >= 0
        baseline_unchecked = row["impl"].startswith("torch.compile") or row["op"].startswith("sinkhorn")
        if row["impl"].startswith("klops") or not baseline_unchecked:
            assert row["rel_err"] < 1e-5 and row["correct"] is True, row
            assert row["impl"] in table
        else:  # torch.compile runs the function checked as torch eager; the Sinkhorn baselines stop their own way
            assert row["correct"] is None and "rel_err" not in row
        if "fused_linear" in row["case"]:
            assert row["flops_fraction"] > 0 and "bandwidth_fraction" not in row and "of matmul" in table, row
        elif row["case"].startswith("sinkhorn"):
            assert row["tflop_per_s"] > 0 and "GFLOP/s)" in table, row
        else:
            assert 0 < row["bandwidth_fraction"] == row["gb_per_s"] / report["ceilings"]["copy_bandwidth_gbps"], row
    assert set(map(tuple, passes.values())) == {("forward", "forward+backward")}
    assert report["ceilings"]["matmul_tflops"]["float32"] > 0 and report["ceilings"]["copy_bandwidth_gbps"] > 0
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["klops"] == klops.__version__
    assert report["date"].startswith("20") and report["repeats"] == 1 and report["device"].startswith("cpu")
    assert "| fwd+bwd ms | 1st call ms | peak MiB |" in table and "First call of each op in this process" in table
    (first_ce,) = [line for line in table.splitlines() if line.startswith("- fused_linear_cross_entropy (")]
    assert first_ce.startswith("- fused_linear_cross_entropy (fused_linear_cross_entropy N=4 V=96 D=16 float32): ")
    assert ", torch eager " in first_ce and ("F.linear_cross_entropy chunked " in first_ce) == (lce <= impls)


# The fields of every timed row of klops bench's JSON report (issue 20's schema).
ROW_FIELDS = {"op", "impl", "shape", "dtype", "pass", "time_ms", "peak_mem_mib", "correct"}


def test_bench_byte_and_flop_counts():
    """The floors: the forward reads the inputs once; the backward adds one gradient write (bytes), or two matmuls
    of 2 N V D (FLOPs)."""
    n, v, d = 4, 96, 16
    assert bench.Case("fused_kl", n, v, torch.bfloat16).min_bytes(backward=False) == 2 * n * v * 2
    assert bench.Case("fused_kl", n, v, torch.bfloat16).min_bytes() == 3 * n * v * 2
    assert bench.Case("logprobs", n, v, torch.float32).min_bytes() == 2 * n * v * 4
    assert bench.Case("fused_kl_topk", n, v, torch.float32, k=8).min_bytes(False) == n * v * 4 + n * 8 * 12
    assert bench.Case("fused_linear_cross_entropy", n, v, torch.float32, hidden=d).min_flops(False) == 2 * n * v * d
    assert bench.Case("fused_linear_cross_entropy", n, v, torch.float32, hidden=d).min_flops() == 6 * n * v * d
    assert bench.Case("fused_linear_kl", n, v, torch.float32, hidden=d).min_flops(False) == 4 * n * v * d
    assert bench.Case("fused_linear_kl", n, v, torch.float32, hidden=d).min_flops() == 8 * n * v * d
    sinkd = bench_sinkhorn.SinkhornCase("sinkhorn_distill_loss", n, v)
    assert (sinkd.min_bytes(False), sinkd.min_bytes()) == (2 * n * v * 4, 3 * n * v * 4)
    assert bench.Case("fused_kl_topk", n, v, torch.float32, k=8).shape == {"N": n, "V": v, "k": 8}


def _timed_row(op, impl, n, v, ms, mib, **extra):
    shape = {"N": n, "V": v}
    return dict(op=op, impl=impl, case=f"{op} N={n} V={v}", shape=shape, dtype="float32", time_ms=ms,
                peak_mem_mib=mib, correct=None, **{"pass": "forward+backward"}, **extra)  # fmt: skip


def test_bench_report_files_and_plots(tmp_path, monkeypatch):
    """--out's files: the JSON as run() returned it, the Markdown table, one PNG per op measured at two or more
    shapes (time and memory against V and N) and one of the cases measured at one shape; none, and no failure,
    without matplotlib."""
    rows = [_timed_row("logprobs", impl, n, v, 1.0 + n * v / 1e5, 2.0, rel_err=1e-7)
            for impl in ("klops[torch]", "torch eager") for n, v in ((4, 96), (8, 96), (4, 192))]  # fmt: skip
    rows.append(_timed_row("fused_kl", "torch eager", 4, 96, 1.0, 1.0, kind="jsd"))  # one shape: the cases figure
    report = dict(device="cpu (2 threads)", date="2026-12-04T00:00:00+00:00", versions={"klops": "0"},
                  ceilings=dict(copy_bandwidth_gbps=10.0, matmul_tflops={}), repeats=1, results=rows,
                  not_run=[])  # fmt: skip
    out, plots = bench_report.write_report(report, tmp_path / "cpu", "info line")
    assert out == tmp_path / "cpu" / "2026-12-04-cpu-2-threads"
    assert [path.name for path in plots] == ["2026-12-04-cpu-2-threads-logprobs-float32.png",
                                             "2026-12-04-cpu-2-threads-cases.png"]  # fmt: skip
    assert all(path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 10_000 for path in plots)
    assert json.loads(out.with_suffix(".json").read_text()) == dict(report, info="info line")
    markdown = out.with_suffix(".md").read_text()
    assert "info line" in markdown and f"]({plots[0].name})" in markdown
    assert "| logprobs N=8 V=96 | torch eager |" in markdown
    monkeypatch.setattr(bench_report, "can_plot", lambda: False)
    assert bench_report.write_plots(report, tmp_path / "again") == []


def test_bench_quick_out_writes_a_figure(monkeypatch, tmp_path, capsys):
    """A run with one shape per op (as --quick) writes the cases figure, and --help says what --out writes."""
    pytest.importorskip("matplotlib")
    tiny = [bench.Case("fused_kl", 4, 96, torch.float32), bench.Case("logprobs", 4, 96, torch.float32)]
    monkeypatch.setattr(bench, "cases", lambda device, quick, **_: tiny)
    monkeypatch.setattr(bench_sinkhorn, "cases", lambda device, quick: [])
    args = ["bench", "--quick", "--device", "cpu", "--repeats", "1", "--baselines", "eager", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    (figure,) = tmp_path.glob("*.png")
    assert figure.name.endswith("-cases.png") and figure.read_bytes().startswith(b"\x89PNG")
    assert f"1 figure(s): {figure.name}" in capsys.readouterr().out
    assert f"]({figure.name})" in next(tmp_path.glob("*.md")).read_text()
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps the help at the terminal's width, and at hyphens
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    help_text = capsys.readouterr().out
    assert "PNG figures, which need matplotlib (pip install matplotlib)" in help_text
    assert "-cases.png for the cases measured at one shape, all of them with --quick" in help_text


def test_bench_absent_and_failing_baselines(monkeypatch, capsys):
    """A baseline that is not installed is not listed; one that disagrees with float64 is FAILED and not timed; one
    that raises (here in its backward) is an error row for that pass, with the forward still timed. Neither fails the
    run."""
    case = bench.Case("fused_linear_cross_entropy", 4, 96, torch.float32, hidden=16)
    monkeypatch.setattr(bench_baselines.importlib.util, "find_spec", lambda name: None)
    assert bench_baselines.library_baselines(case) == {}
    monkeypatch.setattr(bench, "cases", lambda device, quick, **_: [bench.Case("logprobs", 4, 96, torch.float32)])
    monkeypatch.setattr(bench_sinkhorn, "cases", lambda device, quick: [])
    real = bench.implementations

    def with_broken_baseline(case, device):
        impls = real(case, device)
        impls["torch.compile"] = lambda z, y: z.detach().sum()  # not checked (as eager); no gradient: backward raises
        impls["torch eager"] = lambda z, y: z.sum()  # checked: FAILED, not timed
        return impls

    monkeypatch.setattr(bench, "implementations", with_broken_baseline)
    report = bench.run(torch.device("cpu"), quick=True, repeats=1)
    (eager,) = [row for row in report["results"] if row["impl"] == "torch eager"]
    assert eager["correct"] is False and eager["rel_err"] > 1e-2 and "time_ms" not in eager
    forward, backward = [row for row in report["results"] if row["impl"] == "torch.compile"]
    assert forward["pass"] == "forward" and forward["time_ms"] > 0 and "error" not in forward
    assert backward["pass"] == "forward+backward" and backward["error"].startswith("RuntimeError: ")
    assert "time_ms" not in backward
    assert cli.main(["bench", "--device", "cpu", "--repeats", "1"]) == 0
    table = capsys.readouterr().out
    assert "| logprobs N=4 V=96 float32 | torch.compile | " in table and "| torch eager | FAILED" in table


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


def test_bench_time_limit(monkeypatch, capsys, tmp_path):
    """No case starts once --time-limit seconds have passed: the one already running ends and is reported, the rest
    are listed as not run (JSON and table), and the exit is 0. Without the limit every case runs."""
    tiny = [bench.Case("logprobs", 4, 96, torch.float32), bench.Case("fused_kl", 4, 96, torch.float32),
            bench.Case("fused_kl", 4, 96, torch.float32, "reverse")]  # fmt: skip
    monkeypatch.setattr(bench, "cases", lambda device, quick, **_: tiny)
    monkeypatch.setattr(bench_sinkhorn, "cases", lambda device, quick: [])
    real_clock = bench.time.perf_counter
    clock = iter(range(0, 10_000, 10))  # each perf_counter() call is 10 s after the previous: the first case runs
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    out_json = tmp_path / "report.json"
    args = ["bench", "--device", "cpu", "--repeats", "1", "--baselines", "eager", "--json", str(out_json)]
    assert cli.main([*args, "--time-limit", "15"]) == 0
    report = json.loads(out_json.read_text())
    assert {row["case"] for row in report["results"]} == {tiny[0].name}
    assert report["not_run"] == [tiny[1].name, tiny[2].name]
    not_run = f"Not run (the time limit had passed): 2 case(s): {tiny[1].name}; {tiny[2].name}."
    assert not_run in capsys.readouterr().out
    monkeypatch.setattr(bench.time, "perf_counter", real_clock)
    assert cli.main(args) == 0
    report = json.loads(out_json.read_text())
    assert report["not_run"] == [] and len({row["case"] for row in report["results"]}) == 3
    assert "Not run" not in capsys.readouterr().out


@pytest.mark.parametrize("limit", ["-1", "nan", "soon"])
def test_bench_rejects_bad_time_limit(limit, capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--time-limit", limit])
    assert "--time-limit" in capsys.readouterr().err


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
    assert made == [([*bench.SHAPE_PRESETS["cpu-small"], (64, 1000)], torch.float32)]
    (report,) = tmp_path.glob("*.json")
    assert report.with_suffix(".md").exists() and "| case | impl |" in report.with_suffix(".md").read_text()
    captured = capsys.readouterr()
    assert "wrote " in captured.out and "[1/2] 0:00 logprobs N=4 V=96 float32" in captured.err
    rows = json.loads(report.read_text())["results"]
    auto = resolve("divergence", "auto", torch.device("cpu"))  # what --backends auto times
    assert {row["impl"] for row in rows} == {f"klops[{auto}]", "torch eager"}
    assert {row["case"] for row in rows} == {"logprobs N=4 V=96 float32",
                                             "fused_linear_cross_entropy N=4 V=96 D=16 float32"}  # fmt: skip


def test_bench_cases_at_shapes():
    cases = bench.cases(torch.device("cpu"), True, shapes=[(64, 1000), (32, 500, 8)], dtype=torch.bfloat16)
    assert {(case.rows, case.vocab) for case in cases} == {(64, 1000), (32, 500)}
    assert {case.hidden for case in cases if case.op == "fused_linear_kl"} == {256, 8}
    assert {case.dtype for case in cases} == {torch.bfloat16}


@pytest.mark.parametrize("args, message", [
    (["--shapes", "llama"], "--shapes takes presets (llama3-8b"), (["--shapes", "64,0"], "N,V[,D] with positive"),
    (["--backends", "cuda"], "--backends cuda: usable on cpu here: "), (["--backends", "tpu"], "--backends takes"),
    (["--baselines", "eager,deepspeed"], "--baselines takes a comma-separated list of eager, compile, lce, liger"),
])  # fmt: skip
def test_bench_rejects_bad_selection(args, message, capsys):
    assert cli.main(["bench", "--device", "cpu", *args]) == 2
    assert message in capsys.readouterr().err


def test_bench_baseline_families():
    names = ("klops[triton]", "torch eager", "torch.compile", "liger-kernel", "cut-cross-entropy",
             "POT (ot.sinkhorn, log)", "torch loop", "torch eager (published)",
             "F.linear_cross_entropy chunked")  # fmt: skip
    families = {name: bench.baseline_family(name) for name in names}
    assert list(families.values()) == [None, "eager", "compile", "liger", "cce", "pot", "eager", "eager", "lce"]
    assert set(families.values()) - {None} == set(bench_baselines.BASELINES)
    assert bench.selected("klops[torch] dense teacher", {"torch"}, None)
    assert not bench.selected("klops[triton]", {"torch"}, None) and not bench.selected("torch.compile", None, {"eager"})


def test_bench_first_calls_per_op(monkeypatch, tmp_path):
    """Each implementation's first call is timed in every case; first_of_op marks the op's first case in the process
    (the one that pays imports and compiles), and the table lists those first calls per op. Each case starts with
    torch.compile's code dropped (dynamo recompiles one function at most 8 times, then runs it eagerly)."""
    import torch._dynamo

    tiny = [bench.Case("logprobs", 4, 96, torch.float32), bench.Case("logprobs", 8, 96, torch.float32),
            bench.Case("fused_kl", 4, 96, torch.float32)]  # fmt: skip
    monkeypatch.setattr(bench, "cases", lambda device, quick, **_: tiny)
    monkeypatch.setattr(bench_sinkhorn, "cases", lambda device, quick: [])
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(True))
    report = bench.run(torch.device("cpu"), quick=True, repeats=1, backends={"torch"}, baselines={"eager"})
    assert len(resets) == len(tiny)
    last = [row for row in report["results"] if row["pass"] == "forward+backward"]
    assert all(row["first_call_ms"] > 0 for row in last)
    assert {(row["case"], row["impl"]) for row in last if row["first_of_op"]} == {
        (case.name, impl) for case in (tiny[0], tiny[2]) for impl in ("klops[torch]", "torch eager")
    }
    table = bench_report.format_table(report)
    assert f"- logprobs ({tiny[0].name}): klops[torch] " in table and f"- fused_kl ({tiny[2].name}): " in table
    assert tiny[1].name not in table.split("First call of each op")[1]


def test_bench_lce_baseline_checked_or_skipped(monkeypatch):
    """torch's F.linear_cross_entropy, default and chunked, agrees with float64 on a fused-linear CE case where the
    chunked mode cuts the rows (4 rows, V / D = 6: chunks of 1 row); on a torch without it (2.11, 2.12), neither is
    listed and the report says why."""
    case = bench.Case("fused_linear_cross_entropy", 4, 96, torch.float32, hidden=16)
    z, y = bench.make_inputs(case, torch.device("cpu"), torch.Generator().manual_seed(0))
    baselines = bench_baselines.torch_linear_cross_entropy(case)
    if bench_baselines.lce_missing() is None:
        assert list(baselines) == ["F.linear_cross_entropy", "F.linear_cross_entropy chunked"]
        for name, impl in baselines.items():
            assert bench.check_against_reference(case, name, impl, z, y) < 1e-5, name
            assert bench.baseline_family(name) == "lce"
    monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy", raising=False)
    assert bench_baselines.torch_linear_cross_entropy(case) == {}
    assert "has no torch.nn.functional.linear_cross_entropy (new in torch 2.13)" in bench_baselines.lce_missing()
    monkeypatch.setattr(bench, "cases", lambda device, quick, **_: [case])
    monkeypatch.setattr(bench_sinkhorn, "cases", lambda device, quick: [])
    report = bench.run(torch.device("cpu"), quick=True, repeats=1, backends={"torch"}, baselines={"eager", "lce"})
    assert report["skipped_baselines"] == {"lce": bench_baselines.lce_missing()}
    assert {row["impl"] for row in report["results"]} == {"klops[torch]", "torch eager"}
    assert f"Baseline lce not run: {bench_baselines.lce_missing()}." in bench_report.format_table(report)
    report = bench.run(torch.device("cpu"), quick=True, repeats=1, backends={"torch"}, baselines={"eager"})
    assert report["skipped_baselines"] == {}
