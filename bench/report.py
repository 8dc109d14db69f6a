"""Run the full benchmark on this machine and write commit-ready results under bench/results/<device>/.

    python bench/report.py [--device cuda] [--quick]

Writes ``bench/results/<device>/<date>-<device>.md`` (versions, device, table, plots), the same data as JSON and
the PNG plots, as ``klops bench --out bench/results/<device>`` does.
"""

import argparse
import pathlib

import torch

from klops import bench, bench_report, cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    report = bench.run(torch.device(args.device), quick=args.quick, progress=cli.progress)
    folder = pathlib.Path(__file__).parent / "results" / bench_report.slug(report["device"])
    out, plots = bench_report.write_report(report, folder, cli.info())
    print(out.with_suffix(".md").read_text())
    print(f"wrote {out}.md and .json, {len(plots)} plot(s)")


if __name__ == "__main__":
    main()
