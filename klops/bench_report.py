"""The outputs of ``klops bench``: the terminal / Markdown table, the JSON report and the PNG plots.

The JSON report (``write_json``) is ``bench.run``'s dict as is: top level ``device``, ``date``, ``versions``,
``ceilings`` (``copy_bandwidth_gbps``, ``matmul_tflops`` per dtype, both measured in the run), ``repeats``; one
object per case, implementation and pass in ``results`` (the fields are listed in ``bench.measure``); ``not_run``,
the cases a time limit left out; ``skipped_baselines``, family -> why it could not run here.
"""

import importlib.util
import json
import math
import pathlib
import re


def format_table(report: dict) -> str:
    """The report as a legend and a Markdown table, one line per case and implementation."""
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v is not None)
    ceilings = report["ceilings"]
    rates = ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in ceilings["matmul_tflops"].items())
    lines = [
        f"device: {report['device']}; measured copy bandwidth {ceilings['copy_bandwidth_gbps']:.1f} GB/s"
        + (f"; measured matmul rate {rates}" if rates else ""),
        f"{report['date']}; {versions}",
        f"ms: median of {report['repeats']} steps after 2 warm-ups (GPU: CUDA events, L2 flushed before each step; "
        "CPU: wall clock). peak MiB: above the inputs (GPU: allocator peak; CPU: resident-set peak), forward / "
        "forward + backward.",
        "rate: the bytes the op must move (inputs read once, the gradient written once) over the forward + backward "
        "time, as a fraction of the copy bandwidth; fused-linear cases: the matmul FLOPs they must do (3 products "
        "of 2 N V D, 4 with a teacher head) as a fraction of the matmul rate. rel err: the larger of the loss's and "
        "the gradient's error against float64 (torch.compile: not checked, it runs the eager function; nor the "
        "Sinkhorn baselines, which stop their own way); an implementation beyond 2e-2 is FAILED and not timed.",
        "1st call ms: the implementation's first forward + backward on the case's inputs, before its check and "
        "warm-ups (wall clock, synchronized): one step plus whatever that call sets off. In the first case of each op "
        "(listed after the table) that is the one-time cost: imports, torch.compile's compile, Triton's JIT and "
        "autotuning, an extension built on first use; in later cases only what the new shape sets off (torch.compile "
        "compiles again per shape). Costs shared between ops fall on the first op to run them.",
    ]
    if report["device"].startswith("cpu"):
        lines.append(
            "On the CPU klops[torch] is the portable fallback that bounds memory, not the GPU kernels; it is "
            "expected to be slower than eager PyTorch here and to hold less memory."
        )
    lines += [
        "",
        "| case | impl | fwd ms | fwd+bwd ms | 1st call ms | peak MiB | rate (fwd+bwd) | of ceiling "
        "| rel err vs fp64 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (case, impl), rows in _by_case_and_impl(report["results"]).items():
        rows = {row["pass"]: row for row in rows}
        last = rows["forward+backward"]
        err = f"{last['rel_err']:.1e}" if "rel_err" in last else ""
        err = "(as eager)" if impl.startswith("torch.compile") else err
        if last["correct"] is False:
            lines.append(f"| {case} | {impl} | FAILED the reference check (not timed) | | | | | | {err} |")
            continue
        times = [_time_cell(rows.get(pass_name, {})) for pass_name in ("forward", "forward+backward")]
        times.append(f"{last['first_call_ms']:.1f}" if "first_call_ms" in last else "")
        peaks = " / ".join(f"{row['peak_mem_mib']:.1f}" for row in rows.values() if "peak_mem_mib" in row)
        rate, fraction = _rate(last)
        lines.append(f"| {case} | {impl} | {' | '.join(times)} | {peaks} | {rate} | {fraction} | {err} |")
    lines += _first_calls(report["results"])
    for family, why in report.get("skipped_baselines", {}).items():
        lines += ["", f"Baseline {family} not run: {why}."]
    if report["not_run"]:
        lines += ["", f"Not run (the time limit had passed): {len(report['not_run'])} case(s): "
                  + "; ".join(report["not_run"]) + "."]  # fmt: skip
    return "\n".join(lines)


def _first_calls(results: list[dict]) -> list[str]:
    """Lines stating each op's first-call latency per implementation: the first case of the op in the run."""
    first = {}
    for row in results:
        if row["pass"] == "forward+backward" and row.get("first_of_op") and "first_call_ms" in row:
            first.setdefault(row["op"], []).append(row)
    if not first:
        return []
    lines = ["", "First call of each op in this process (forward + backward at its first case's shape, ms; in brackets "
             "the steady-state time of the same call):"]  # fmt: skip
    for op, rows in first.items():
        calls = []
        for row in rows:
            steady = f" ({row['time_ms']:.0f})" if "time_ms" in row else ""
            calls.append(f"{row['impl']} {row['first_call_ms']:.0f}{steady}")
        lines.append(f"- {op} ({rows[0]['case']}): {', '.join(calls)}")
    return lines


def _by_case_and_impl(results: list[dict]) -> dict:
    groups = {}
    for row in results:
        groups.setdefault((row["case"], row["impl"]), []).append(row)
    return groups


def _time_cell(row: dict) -> str:
    return f"{row['time_ms']:.3f}" if "time_ms" in row else row.get("error", "")


def _rate(row: dict) -> tuple[str, str]:
    """(achieved rate, fraction of its ceiling) of a row, as table cells."""
    if "flops_fraction" in row:
        return f"{row['tflop_per_s']:.2f} TFLOP/s", f"{100 * row['flops_fraction']:.1f}% of matmul"
    rate = f"{row['gb_per_s']:.1f} GB/s" if "gb_per_s" in row else ""
    if "tflop_per_s" in row:  # the Sinkhorn cases' compute rate
        rate = f"{rate} ({1e3 * row['tflop_per_s']:.0f} GFLOP/s)".strip()
    fraction = f"{100 * row['bandwidth_fraction']:.1f}% of copy" if "bandwidth_fraction" in row else ""
    return rate, fraction


def write_report(report: dict, out_dir, info: str) -> tuple[pathlib.Path, list[pathlib.Path]]:
    """Writes ``<out_dir>/<date>-<device>.json`` (the report, with ``info``), the plots of ``write_plots`` and
    ``.md`` (info, table, plots); returns (that path without its suffix, the plots' paths)."""
    report = dict(report, info=info)
    out = pathlib.Path(out_dir) / f"{report['date'][:10]}-{slug(report['device'])}"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(report, str(out.with_suffix(".json")))
    plots = write_plots(report, out)
    figures = "".join(f"\n![{path.stem}]({path.name})\n" for path in plots)
    text = f"# klops benchmark, {report['date']}\n\n```\n{info}\n```\n\n{format_table(report)}\n{figures}"
    out.with_suffix(".md").write_text(text)
    return out, plots


def slug(text: str) -> str:
    """``text`` as a file name: "NVIDIA H200" -> "nvidia-h200", "cpu (2 threads)" -> "cpu-2-threads"."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def can_plot() -> bool:
    """Whether matplotlib (the ``bench`` extra) is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def write_plots(report: dict, stem: pathlib.Path) -> list[pathlib.Path]:
    """The figures of a run, as PNGs beside ``stem``; none without matplotlib (``pip install matplotlib``).

    - ``<stem>-<op>-<dtype>.png`` for each op (with its kind and dtype) measured at two or more (N, V): forward +
      backward time and peak memory against V (at the N with the most V values) and against N (at the V with the
      most N values), one line per implementation.
    - ``<stem>-cases.png`` for the cases measured at one shape only (all of a ``--quick`` run): forward + backward
      time and peak memory of each implementation, one group of bars per case.

    Returns the paths written."""
    if not can_plot():
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for row in report["results"]:
        if row["pass"] == "forward+backward" and "time_ms" in row and "peak_mem_mib" in row:
            groups.setdefault(" ".join(filter(None, (row["op"], row.get("kind"), row["dtype"]))), []).append(row)
    paths, single = [], []
    for title, rows in groups.items():
        shapes = {(row["shape"].get("N"), row["shape"].get("V")) for row in rows}
        if len(shapes) < 2 or any(None in shape for shape in shapes):  # one shape, or not a token op (sinkhorn)
            single += rows
            continue
        figure, axes = plt.subplots(2, 2, figsize=(12, 8))
        for column, (x, fixed) in enumerate((("V", "N"), ("N", "V"))):
            xs_at = {}
            for row in rows:
                xs_at.setdefault(row["shape"][fixed], set()).add(row["shape"][x])
            at = max(xs_at, key=lambda size: (len(xs_at[size]), size))
            for impl in dict.fromkeys(row["impl"] for row in rows):
                points = sorted((row["shape"][x], row["time_ms"], row["peak_mem_mib"]) for row in rows
                                if row["impl"] == impl and row["shape"][fixed] == at)  # fmt: skip
                if points:
                    sizes, times, peaks = zip(*points)
                    axes[0][column].plot(sizes, times, marker="o", label=impl)
                    axes[1][column].plot(sizes, peaks, marker="o", label=impl)
            axes[0][column].set(title=f"{fixed} = {at}", ylabel="forward + backward ms")
            axes[1][column].set(xlabel=x, ylabel="peak MiB above the inputs")
            axes[0][column].set_yscale("log")
            axes[1][column].set_ylim(bottom=0)  # a peak can be 0 (CPU: nothing kept above the inputs)
            for axis in (axes[0][column], axes[1][column]):
                axis.set_xscale("log", base=2)
                axis.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        figure.suptitle(f"{title} on {report['device']}")
        figure.tight_layout()
        path = stem.parent / f"{stem.name}-{slug(title)}.png"
        figure.savefig(path, dpi=90)
        plt.close(figure)
        paths.append(path)
    if single:
        paths.append(_write_cases_figure(plt, single, report["device"], stem.parent / f"{stem.name}-cases.png"))
    return paths


# The panels of the one-shape figure: (row field, axis label, value label).
CASE_PANELS = (
    ("time_ms", "forward + backward ms (log scale)", lambda ms: f"{ms:.3g}" if ms < 1000 else f"{ms:.0f}"),
    ("peak_mem_mib", "peak MiB above the inputs", "{:.1f}".format),
)


def _write_cases_figure(plt, rows: list[dict], device: str, path: pathlib.Path) -> pathlib.Path:
    """Forward + backward time (log scale) and peak memory of each implementation of each case, as two panels of
    horizontal bars, one group per case and one colour per implementation, each bar labelled with its value."""
    cases = list(dict.fromkeys(row["case"] for row in rows))
    impls = list(dict.fromkeys(row["impl"] for row in rows))
    colours = {impl: plt.get_cmap("tab10")(i % 10) for i, impl in enumerate(impls)}
    at = {(row["case"], row["impl"]): row for row in rows}
    height = 0.8 / max(sum((case, impl) in at for impl in impls) for case in cases)  # of one bar, in case rows
    inches = max(3.0, 1.4 + 0.22 * len(rows) + 0.3 * len(cases))
    figure, axes = plt.subplots(1, 2, figsize=(13, inches), sharey=True)
    for axis, (field, label, value_label) in zip(axes, CASE_PANELS):
        for y, case in enumerate(cases):
            present = [impl for impl in impls if (case, impl) in at]
            for slot, impl in enumerate(present):
                value, centre = at[case, impl][field], y + (slot - (len(present) - 1) / 2) * height
                axis.barh(centre, value, height * 0.9, color=colours[impl])
                axis.annotate(value_label(value), (value, centre), xytext=(3, 0), textcoords="offset points",
                              va="center", fontsize=7)  # fmt: skip
        axis.set_xlabel(label)
        axis.grid(True, axis="x", alpha=0.3)
        axis.margins(x=0.15)
    axes[0].set_xscale("log")
    fastest = min(row["time_ms"] for row in rows)
    axes[0].set_xlim(left=10 ** math.floor(math.log10(fastest)))  # bars from a power of ten: lengths compare
    axes[0].set_yticks(range(len(cases)), [_case_label(case) for case in cases], fontsize=8)
    axes[0].set_ylim(len(cases) - 0.5, -0.5)  # the first case on top
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[impl]) for impl in impls]
    columns = min(len(impls), 5)
    legend_rows = -(-len(impls) // columns)
    figure.legend(handles, impls, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.35 / inches), ncol=columns,
                  fontsize=8, frameon=False)  # fmt: skip
    figure.suptitle(f"klops bench on {device}: one shape per case", y=1 - 0.08 / inches, va="top")
    figure.tight_layout()
    figure.subplots_adjust(top=1 - (0.45 + 0.2 * legend_rows) / inches)  # below the title and the legend
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _case_label(case: str) -> str:
    """A case name on two lines: the op (and kind), then its sizes and dtype."""
    words = case.split()
    first_size = next((i for i, word in enumerate(words) if "=" in word), len(words))
    return " ".join(words[:first_size]) + "\n" + " ".join(words[first_size:])
