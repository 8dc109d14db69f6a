"""Run the full benchmark on this machine and commit-ready results to bench/results/.

    python bench/report.py [--device cuda] [--quick]

Writes ``bench/results/<date>-<device>.md`` (versions, device, table) and the same data as JSON.
"""

import argparse
import datetime
import json
import pathlib
import re

import torch

from klops import bench, cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    report = bench.run(device, quick=args.quick)
    report["info"] = cli.info()
    report["date"] = datetime.date.today().isoformat()
    slug = re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-")
    out = pathlib.Path(__file__).parent / "results" / f"{report['date']}-{slug}"
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    text = f"# klops benchmark, {report['date']}\n\n```\n{report['info']}\n```\n\n{bench.format_table(report)}\n"
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {out}.md and .json")


if __name__ == "__main__":
    main()
