"""bench/compare.py's arithmetic and its arguments (the runs themselves are
bench/load.py's, measured, never timed in a test)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def compare() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_compare", BENCH / "compare.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclass looks itself up there
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_compare", None)
        sys.path.remove(str(BENCH))


def test_arguments_after_the_separator_go_to_load_py(compare: ModuleType) -> None:
    head = compare.git("rev-parse", "HEAD")
    args, load_args = compare.parse_args(["--before", "HEAD", "--pairs", "4", "--", "--scenario", "burst"])
    assert (args.before, args.after, args.pairs) == (head, None, 4)  # the commit, resolved once
    assert load_args == ["--scenario", "burst"]
    for capacity in (["--scenario", "capacity"], ["--scenario=capacity"]):
        with pytest.raises(SystemExit):
            compare.parse_args(["--before", "HEAD", "--", *capacity])
    with pytest.raises(SystemExit):
        compare.parse_args(["--before", "HEAD", "--pairs", "0"])


def test_a_wrong_revision_or_load_argument_is_refused_before_any_run(
    compare: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        compare.parse_args(["--before", "no-such-revision", "--", "--scenario", "burst"])
    assert "--before no-such-revision: not a commit of this repository" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.parse_args(["--before", "HEAD", "--after", "HEAD~100000"])
    assert "--after HEAD~100000: not a commit" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.parse_args(["--before", "HEAD", "--", "--users", "-3"])
    assert "bench/load.py: error:" in capsys.readouterr().err


def test_medians_per_side_and_their_changes(compare: ModuleType) -> None:
    Run = compare.Run
    runs = [
        Run("before", 1, 200, 200, 150.0, 300.0, 400.0, 0.75, 0.10, 0.8),
        Run("after", 1, 200, 200, 160.0, 330.0, 400.0, 0.83, 0.11, 0.9),
        Run("after", 2, 200, 200, 170.0, 350.0, 500.0, 0.70, 0.12, 0.7),
        Run("before", 2, 199, 200, 140.0, 280.0, 400.0, 0.70, 0.10, 0.8),
        Run("before", 3, error="bench/load.py exited 1, no report"),
        Run("after", 3, 200, 200, 150.0, 320.0, 380.0, 0.90, 0.16, 1.0),
    ]
    totals = compare.summary(runs)
    assert totals["before"] == {
        "runs": 3,
        "failed_runs": 1,
        "exact": 399,
        "answers": 400,
        "ttft_p99_ms": 290.0,
        "floor_p99_ms": 400.0,
        "ratio": 0.725,
        "cpu_per_1k": 0.1,
        "cpu_ratio": 0.8,
    }
    assert totals["after"]["ratio"] == 0.83 and totals["after"]["cpu_per_1k"] == 0.12  # medians, not means
    assert totals["after"]["ttft_p99_ms"] == 330.0 and totals["after"]["floor_p99_ms"] == 400.0
    assert totals["ratio_change"] == 0.105
    assert totals["cpu_change_pct"] == 20.0
    assert totals["after"]["cpu_ratio"] == 0.9 and totals["cpu_ratio_change_pct"] == 12.5
    table = compare.table(runs, totals).splitlines()
    assert table[2] == "| 1 | before | 200/200 | 150.0 / 300.0 | 400.0 | 0.75 | 0.1 (x0.8) |"
    assert "| 3 | before | bench/load.py exited 1, no report |" in table[6]
    assert table[-1] == (
        "ratio after - before (medians): 0.105; CPU per 1k tokens: 20.0 %, its ratio to the floor's: 12.5 %"
    )


def test_a_side_without_figures_has_no_change(compare: ModuleType) -> None:
    totals = compare.summary([compare.Run("before", 1, error="x"), compare.Run("after", 1, error="y")])
    assert totals["before"]["ratio"] is None
    assert (totals["ratio_change"], totals["cpu_change_pct"], totals["cpu_ratio_change_pct"]) == (
        None,
        None,
        None,
    )
