"""`make fuzz`: the property tests of tests/test_fuzz.py with a large budget (default 10,000
examples per target), then a table of inputs tried per target, where they went (rejection
reasons, status codes) and the time taken.

    python bench/fuzz.py [--examples N] [--json out/fuzz.json] [-k EXPR]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=10_000, help="hypothesis examples per target")
    parser.add_argument("--json", type=Path, default=REPO / "out" / "fuzz.json", help="report path")
    parser.add_argument("-k", default=None, help="pytest -k expression (a subset of targets)")
    args = parser.parse_args()

    args.json.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        report_path = handle.name
    env = dict(os.environ, FUZZ_EXAMPLES=str(args.examples), FUZZ_REPORT=report_path, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "tests/test_fuzz.py", "-q", "-p", "no:cacheprovider",
           "-W", "ignore::UserWarning", "--durations=0"]
    if args.k:
        cmd += ["-k", args.k]
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    print(result.stdout[-4000:])
    if result.returncode != 0:
        print(result.stderr[-4000:], file=sys.stderr)

    report = json.loads(Path(report_path).read_text()) if Path(report_path).stat().st_size else {"tried": {}}
    report["seconds"] = round(elapsed, 1)
    report["passed"] = result.returncode == 0
    args.json.write_text(json.dumps(report, indent=1))
    print("\n| target | inputs tried | outcomes |\n|---|---:|---|")
    for target, count in sorted(report["tried"].items()):
        outcomes = report.get("outcomes", {}).get(target, {})
        shown = ", ".join(f"{k} {v}" for k, v in list(outcomes.items())[:8]) or "-"
        print(f"| {target} | {count:,} | {shown} |")
    verdict = "all properties held" if report["passed"] else "A PROPERTY FAILED (see above)"
    total = sum(report["tried"].values())
    print(f"\ntotal {total:,} inputs in {elapsed:.0f} s, {verdict}; report: {args.json}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
