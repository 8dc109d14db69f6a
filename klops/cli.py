"""The ``klops`` command line: ``klops info``, ``klops bench`` and ``klops train``."""

import argparse
import importlib
import importlib.metadata
import platform
import sys

import torch

from . import __version__, _inputs, bench, bench_baselines, bench_report, trainers
from ._cpu import describe as describe_cpu_kernels
from .backend import (
    BACKENDS,
    CUDA_EXTENSION,
    CUDA_EXTENSION_PROBLEM,
    TRITON_VERSION,
    available_backends,
    resolve,
    triton_interpreter,
)

DISTRIBUTION = "klops-kernels"


def distribution_version() -> str:
    """The installed klops-kernels version (with the +cu...torch... of a CUDA build), or klops.__version__
    when klops runs from a source tree that is not installed."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return __version__


def info() -> str:
    """Versions, devices, usable backends and the state of the CUDA extension, one per line."""
    lines = [
        f"{DISTRIBUTION} {distribution_version()} (import klops)",
        f"python {platform.python_version()}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton {TRITON_VERSION or 'not installed'}" + (" (TRITON_INTERPRET=1)" if triton_interpreter() else ""),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"gpu {i}: {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        lines.append("gpu: none")
    if CUDA_EXTENSION_PROBLEM is not None:
        lines.append(f"klops._C: not used: {CUDA_EXTENSION_PROBLEM}")
    elif CUDA_EXTENSION is None:
        lines.append("klops._C: not built (install with KLOPS_BUILD_CUDA=1 to build it)")
    else:
        archs = CUDA_EXTENSION.arch_list()
        sms = ", ".join("sm_" + arch.replace(".", "") for arch in archs.split(";"))
        lines.append(
            f"klops._C: built for TORCH_CUDA_ARCH_LIST={archs} ({sms}) with CUDA {CUDA_EXTENSION.cuda_version()} "
            f"against torch {CUDA_EXTENSION.torch_version()}"
        )
    lines.append(f"CPU kernels: {describe_cpu_kernels()}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        usable = ", ".join(available_backends(device))
        lines.append(f"backends on {device.type}: {usable} (auto: {resolve('divergence', 'auto', device)})")
    if _inputs.host_checks_enabled():
        lines.append("label check: on the host, a ValueError (one sync per call on GPU tensors; set_host_checks)")
    else:
        lines.append("label check: CPU tensors on the host; GPU tensors by a device-side assertion, no host sync")
    return "\n".join(lines)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def bench_device(name: str | None) -> torch.device:
    """The device ``klops bench --device name`` runs on (a GPU when there is one); ValueError when it
    cannot run here."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is usable here (torch {torch.__version__}, CUDA "
                         f"{torch.version.cuda or 'none'}); run with --device cpu")  # fmt: skip
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def bench_ops(text: str | None) -> list[str] | None:
    """The ops of ``klops bench --ops a,b`` (None: all); ValueError naming an unknown one."""
    if text is None:
        return None
    ops = [op.strip() for op in text.split(",") if op.strip()]
    unknown = [op for op in ops if op not in bench.OPS]
    if unknown or not ops:
        raise ValueError(f"--ops takes a comma-separated list of {', '.join(bench.OPS)}; got {text!r}")
    return ops


def bench_shapes(specs: list[str] | None) -> list[tuple] | None:
    """The shapes of ``klops bench --shapes PRESET|N,V[,D] ...`` (None: the default sizes); ValueError naming a
    bad one."""
    if specs is None:
        return None
    shapes = []
    for spec in specs:
        if spec in bench.SHAPE_PRESETS:
            shapes += bench.SHAPE_PRESETS[spec]
            continue
        try:
            numbers = tuple(int(x) for x in spec.split(","))
        except ValueError:
            numbers = ()
        if len(numbers) not in (2, 3) or min(numbers) < 1:
            raise ValueError(f"--shapes takes presets ({', '.join(bench.SHAPE_PRESETS)}) or N,V[,D] with positive "
                             f"integers; got {spec!r}")  # fmt: skip
        shapes.append(numbers)
    return shapes


def bench_names(text: str | None, flag: str, allowed: tuple[str, ...]) -> list[str] | None:
    """The comma-separated names of ``klops bench --<flag>`` (None: all); ValueError naming an unknown one."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or any(name not in allowed for name in names):
        raise ValueError(f"--{flag} takes a comma-separated list of {', '.join(allowed)}; got {text!r}")
    return names


def bench_backends(text: str | None, device: torch.device) -> set[str] | None:
    """The concrete klops backends of ``--backends`` on ``device`` ("auto": the one auto picks there)."""
    names = bench_names(text, "backends", BACKENDS)
    if names is None:
        return None
    usable = available_backends(device)
    backends = {resolve("divergence", "auto", device) if name == "auto" else name for name in names}
    if not backends <= set(usable):
        raise ValueError(f"--backends {text}: usable on {device.type} here: {', '.join(usable)}")
    return backends


def progress(index: int, total: int, name: str, seconds: float) -> None:
    """One line per case on stderr: ``[3/12] 0:41 fused_kl forward N=... float32``."""
    minutes, seconds = divmod(int(seconds), 60)
    print(f"[{index + 1}/{total}] {minutes}:{seconds:02d} {name}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="klops", description=__doc__)
    parser.add_argument("--version", action="version", version=f"{DISTRIBUTION} {distribution_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, devices, usable backends, CUDA extension")
    bench_parser = commands.add_parser(
        "bench", help="check each op against the reference, then time it against PyTorch",
        description="Check each op against float64, then time forward + backward and measure peak memory against "
        "eager PyTorch, torch.compile and the libraries installed. Prints a table; --json and --out write it to "
        "files, --out with figures (PNG).",
    )  # fmt: skip
    bench_parser.add_argument("--quick", action="store_true", help="one small case per op")
    bench_parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    bench_parser.add_argument("--repeats", type=positive_int, default=None, help="timed repetitions per case")
    bench_parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    bench_parser.add_argument(
        "--ops", default=None, help=f"comma-separated ops to run (default: all of {', '.join(bench.OPS)})"
    )
    bench_parser.add_argument(
        "--shapes", nargs="+", default=None, metavar="PRESET|N,V[,D]",
        help=f"every token op at these shapes instead of the defaults (presets: {', '.join(bench.SHAPE_PRESETS)}; "
        "D of the fused-linear ops: 4096 on a GPU, 256 on the CPU, if not given); the Sinkhorn cases then do not run",
    )  # fmt: skip
    bench_parser.add_argument("--dtype", default=None, choices=tuple(bench.DTYPES), help="the inputs' dtype")
    bench_parser.add_argument("--backends", default=None, help=f"klops backends to time, of {', '.join(BACKENDS)}")
    bench_parser.add_argument(
        "--baselines", default=None,
        help=f"baselines to time, of {', '.join(bench_baselines.BASELINES)} (default: all found): eager PyTorch, "
        "torch.compile of it, torch.nn.functional.linear_cross_entropy (default and chunked; torch 2.13+), "
        "Liger-Kernel, Cut Cross-Entropy, POT",
    )  # fmt: skip
    bench_parser.add_argument(
        "--out", default=None, metavar="DIR",
        help="write the report to DIR: <date>-<device>.json (every measurement and the versions), .md (the table "
        "printed here, with the figures) and PNG figures, which need matplotlib (pip install matplotlib): "
        "<date>-<device>-<op>[-<kind>]-<dtype>.png for each op measured at two or more shapes (forward + backward "
        "time and peak memory against V and against N, one line per implementation), and <date>-<device>-cases.png "
        "for the cases measured at one shape, all of them with --quick (forward + backward time and peak memory of "
        "each implementation, one group of bars per case)",
    )  # fmt: skip
    bench_parser.add_argument(
        "--time-limit", type=non_negative_float, default=None, metavar="SECONDS",
        help="start no case after this many seconds (a case already started runs to its end); the report lists "
        "the cases left",
    )  # fmt: skip
    train_parser = commands.add_parser(
        "train", help="train a tiny model with a reference trainer (sft, distill, grpo, dpo)",
        description="Thin reference trainers (klops.trainers, docs/trainers.md) on a Hugging Face causal LM, every "
        "loss from klops's fused-linear ops. --preset tiny (the default) builds a tiny model and a synthetic task in "
        "code and runs on a CPU in under two minutes; --model PATH takes a local model directory.",
    )  # fmt: skip
    trainer_parsers = train_parser.add_subparsers(dest="trainer", required=True, metavar="TRAINER")
    for name in trainers.TRAINERS:
        module = importlib.import_module(f"klops.trainers.{name}")
        summary = module.__doc__.split(":")[0].split(".")[0]
        module.arguments(trainer_parsers.add_parser(name, help=summary, description=module.__doc__))
    args = parser.parse_args(argv)

    if args.command == "info":
        print(info())
        return 0
    if args.command == "train":
        try:
            args.device = bench_device(args.device)
            importlib.import_module(f"klops.trainers.{args.trainer}").train(args)
        except ValueError as error:
            print(f"klops train {args.trainer}: error: {error}", file=sys.stderr)
            return 2
        return 0
    try:
        device = bench_device(args.device)
        ops = bench_ops(args.ops)
        shapes = bench_shapes(args.shapes)
        backends = bench_backends(args.backends, device)
        baselines = bench_names(args.baselines, "baselines", bench_baselines.BASELINES)
    except ValueError as error:
        print(f"klops bench: error: {error}", file=sys.stderr)
        return 2
    print(info(), end="\n\n", flush=True)
    report = bench.run(
        device, quick=args.quick, repeats=args.repeats, ops=ops, shapes=shapes, dtype=bench.DTYPES.get(args.dtype),
        backends=backends, baselines=None if baselines is None else set(baselines), progress=progress,
        time_limit=args.time_limit,
    )  # fmt: skip
    print(bench_report.format_table(report))
    if args.json:
        bench_report.write_json(report, args.json)
    if args.out:
        out, plots = bench_report.write_report(report, args.out, info())
        if plots:
            figures = f"{len(plots)} figure(s): " + ", ".join(path.name for path in plots)
        elif bench_report.can_plot():
            figures = "no figure (no case was timed)"
        else:
            figures = "no figure: matplotlib is not installed (pip install matplotlib)"
        print(f"wrote {out}.md and .json, {figures}")
    results = report["results"]
    failed = [r for r in results if r["impl"].startswith("klops") and (r["correct"] is False or "error" in r)]
    if failed:
        print(f"\n{len(failed)} klops case(s) failed the reference check or errored", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
