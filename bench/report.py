"""Run the full benchmark on this machine and commit-ready results to bench/results/.

    python bench/report.py [--device cuda] [--quick]

Writes ``bench/results/<date>-<device>.md`` (versions, device, table) and the same data as JSON (as
``klops bench --out bench/results``).
"""

import argparse
import pathlib

import torch

from klops import bench, cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    report = bench.run(torch.device(args.device), quick=args.quick, progress=cli.progress)
    out = bench.write_report(report, pathlib.Path(__file__).parent / "results", cli.info())
    print(out.with_suffix(".md").read_text())
    print(f"wrote {out}.md and .json")


if __name__ == "__main__":
    main()
