"""Before and after a change, side by side: bench/load.py run in turns on two
trees of this repository, pair after pair, in one session of the machine.

One run says little on a shared machine (the SDK floor of a burst of 200
went from 300 to 1,000 ms between runs of the same code); a ratio to the
floor of the same run says more, and the medians of several interleaved
pairs more again. The order alternates (before first, then after first), so
a machine that gets busier as the session goes on weighs on both sides.

    python bench/compare.py --before a8621c3 --pairs 6 -- --scenario burst --users 200
    python bench/compare.py --before main~3 --after HEAD --pairs 3 -- --scenario burst --config postgres-redis

`--before` (and `--after`, default: this working tree as it is, uncommitted
changes included) is a git revision, checked out in a temporary worktree that
is removed at the end. Both trees are measured by this tree's bench/ (copied
over the revision's own), with this Python (the revision must run with the
packages installed here). Everything after `--` goes to bench/load.py
(`burst` or `steady`: one report line per run).

Prints a Markdown table, one row per run, and the medians per side:
exact answers, added time to first token p50 / p99, the SDK floor's p99 and
the product's ratio to it, server CPU per 1,000 tokens and its ratio to the
SDK floor's in the same run (a machine that runs slower for a while costs
both more CPU seconds); then one JSON line with the same figures. Progress
and each run's own log go to stderr (--quiet: only the summary of each run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import load
from load_common import log

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


@dataclass
class Run:
    side: str  # "before" or "after"
    pair: int
    exact: int | None = None
    n: int | None = None
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    floor_p99_ms: float | None = None
    ratio: float | None = None
    cpu_per_1k: float | None = None
    cpu_ratio: float | None = None  # to the SDK floor's CPU per 1k tokens, in the same run
    steal_pct: float | None = None
    error: str | None = None


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    args = list(sys.argv[1:] if argv is None else argv)
    load_args: list[str] = []
    if "--" in args:
        cut = args.index("--")
        args, load_args = args[:cut], args[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="bench/compare.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", required=True, help="git revision measured as before")
    parser.add_argument("--after", default=None, help="git revision measured as after (default: this tree)")
    parser.add_argument("--pairs", type=int, default=3, help="before/after pairs (default 3)")
    parser.add_argument("--quiet", action="store_true", help="leave out each run's own progress")
    parsed = parser.parse_args(args)
    if parsed.pairs < 1:
        parser.error("--pairs must be at least 1")
    # load.py's own parser: a wrong argument is told once, before any run.
    if load.parse_args(load_args).scenario == "capacity":
        parser.error("--scenario capacity prints a line per burst: compare burst or steady runs")
    for name in ("before", "after"):
        revision = getattr(parsed, name)
        if revision is not None:
            try:
                setattr(parsed, name, git("rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"))
            except subprocess.CalledProcessError:
                parser.error(f"--{name} {revision}: not a commit of this repository")
    return parsed, load_args


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


@contextmanager
def checkout(commit: str, into: Path) -> Iterator[Path]:
    """The commit in a worktree of its own, measured by this tree's bench/."""
    git("worktree", "add", "--detach", str(into), commit)
    try:
        shutil.rmtree(into / "bench", ignore_errors=True)
        shutil.copytree(BENCH, into / "bench", ignore=shutil.ignore_patterns("__pycache__"))
        yield into
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(into)], check=False)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=False)


def measure(side: str, pair: int, tree: Path, load_args: list[str], quiet: bool) -> Run:
    run = Run(side, pair)
    log(f"pair {pair}, {side}: {tree}")
    done = subprocess.run(
        [sys.executable, str(tree / "bench" / "load.py"), *load_args],
        cwd=tree,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL if quiet else None,
        text=True,
        check=False,
    )
    reports = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not reports:
        run.error = f"bench/load.py exited {done.returncode}" + ("" if reports else ", no report")
        log(f"  {run.error}")
        return run
    report: dict[str, Any] = json.loads(reports[-1])
    floor = report.get("floor") or {}
    run.exact = report.get("completed")
    run.n = report.get("n")
    run.ttft_p50_ms = report.get("added_ttft_p50_ms")
    run.ttft_p99_ms = report.get("added_ttft_p99_ms")
    run.floor_p99_ms = floor.get("added_ttft_p99_ms")
    run.ratio = (report.get("ratio") or {}).get("ttft_p99")
    run.cpu_per_1k = report.get("server_cpu_s_per_1k_tokens")
    run.cpu_ratio = (report.get("ratio") or {}).get("cpu_per_1k")
    run.steal_pct = floor.get("steal_pct")
    log(
        f"  {run.exact}/{run.n} exact, p99 {run.ttft_p99_ms} ms (SDK floor {run.floor_p99_ms}) "
        f"-> {run.ratio}, CPU {run.cpu_per_1k} s per 1k tokens (x{run.cpu_ratio} the floor's)"
    )
    return run


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 4) if present else None


def summary(runs: list[Run]) -> dict[str, Any]:
    sides: dict[str, Any] = {}
    for side in ("before", "after"):
        mine = [r for r in runs if r.side == side]
        sides[side] = {
            "runs": len(mine),
            "failed_runs": sum(r.error is not None for r in mine),
            "exact": sum(r.exact or 0 for r in mine),
            "answers": sum(r.n or 0 for r in mine),
            "ttft_p99_ms": median([r.ttft_p99_ms for r in mine]),
            "floor_p99_ms": median([r.floor_p99_ms for r in mine]),
            "ratio": median([r.ratio for r in mine]),
            "cpu_per_1k": median([r.cpu_per_1k for r in mine]),
            "cpu_ratio": median([r.cpu_ratio for r in mine]),
        }
    before, after = sides["before"], sides["after"]
    ratio_change = (
        round(after["ratio"] - before["ratio"], 3)
        if after["ratio"] is not None and before["ratio"] is not None
        else None
    )
    return {
        **sides,
        "ratio_change": ratio_change,
        "cpu_change_pct": percent_change(before["cpu_per_1k"], after["cpu_per_1k"]),
        "cpu_ratio_change_pct": percent_change(before["cpu_ratio"], after["cpu_ratio"]),
    }


def percent_change(before: float | None, after: float | None) -> float | None:
    return round(100 * (after / before - 1), 1) if after is not None and before else None


def cell(value: Any) -> str:
    return "-" if value is None else str(value)


def table(runs: list[Run], totals: dict[str, Any]) -> str:
    rows = [
        "| pair | side | exact | added TTFT p50 / p99 ms | SDK floor p99 ms | ratio "
        "| CPU s per 1k tokens (x floor) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        if r.error:
            rows.append(f"| {r.pair} | {r.side} | {r.error} | | | | |")
            continue
        rows.append(
            f"| {r.pair} | {r.side} | {r.exact}/{r.n} | {cell(r.ttft_p50_ms)} / {cell(r.ttft_p99_ms)} "
            f"| {cell(r.floor_p99_ms)} | {cell(r.ratio)} | {cell(r.cpu_per_1k)} (x{cell(r.cpu_ratio)}) |"
        )
    for side in ("before", "after"):
        s = totals[side]
        rows.append(
            f"| median | {side} | {s['exact']}/{s['answers']} | - / {cell(s['ttft_p99_ms'])} "
            f"| {cell(s['floor_p99_ms'])} | {cell(s['ratio'])} "
            f"| {cell(s['cpu_per_1k'])} (x{cell(s['cpu_ratio'])}) |"
        )
    rows.append(
        f"\nratio after - before (medians): {cell(totals['ratio_change'])}; "
        f"CPU per 1k tokens: {cell(totals['cpu_change_pct'])} %, "
        f"its ratio to the floor's: {cell(totals['cpu_ratio_change_pct'])} %"
    )
    return "\n".join(rows)


def compare(trees: dict[str, Path], args: argparse.Namespace, load_args: list[str]) -> list[Run]:
    runs: list[Run] = []
    for pair in range(1, args.pairs + 1):
        order = ("before", "after") if pair % 2 else ("after", "before")
        for side in order:
            runs.append(measure(side, pair, trees[side], load_args, args.quiet))
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    args, load_args = parse_args(argv)
    wall = time.monotonic()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        with checkout(args.before, Path(tmp) / "before") as before:
            if args.after is None:
                trees = {"before": before, "after": ROOT}
                runs = compare(trees, args, load_args)
            else:
                with checkout(args.after, Path(tmp) / "after") as after:
                    runs = compare({"before": before, "after": after}, args, load_args)
    totals = summary(runs)
    print(table(runs, totals))
    print(
        json.dumps(
            {
                "before": args.before,
                "after": args.after or "working tree",
                "load_args": load_args,
                "runs": [asdict(r) for r in runs],
                **totals,
            }
        )
    )
    log(f"done in {time.monotonic() - wall:.0f} s")
    return 0 if all(r.error is None for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
