"""``bench_accuracy.py --add-to``: extending a committed GPU results table with the runs it lacks.

The earlier results are the real committed table of the H200 ablation run (``results/ablation_h200.json``).
It was measured before every CT was put into the canonical orientation, so as committed it is refused
(superseded); the merge mechanics are tested on its runs under the data description of today's fold 1
(``earlier_table``: the same runs, budget and provenance, the ``data`` block rewritten). Nothing is trained
here: these tests cover which runs are kept, what refuses a merge, and the report's provenance line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent / "Benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import bench_accuracy  # noqa: E402

ABLATION = BENCHMARKS / "results" / "ablation_h200.json"
#: The budget of the committed ablation run (see its command line).
ITS_BUDGET = ["--steps", "700", "--width", "12", "--patch", "64", "--no-compile"]


def parse(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *options: str):
    monkeypatch.setattr(sys, "argv", ["bench_accuracy.py", "--device", "cpu", "--work", str(tmp_path), *options])
    return bench_accuracy._parse()


@pytest.fixture
def earlier_table(monkeypatch, tmp_path) -> Path:
    """The H200 table's runs under today's fold-1 data description (see the module docstring)."""
    committed = json.loads(ABLATION.read_text(encoding="utf-8"))
    args = parse(monkeypatch, tmp_path, *ITS_BUDGET)
    committed["data"] = bench_accuracy._meta(args, bench_accuracy.Outcome())["data"]
    path = tmp_path / "ablation_h200.json"
    path.write_text(json.dumps(committed), encoding="utf-8")
    return path


def test_the_committed_table_measured_before_the_canonical_orientation_is_refused(monkeypatch, tmp_path):
    args = parse(monkeypatch, tmp_path, *ITS_BUDGET, "--add-to", str(ABLATION))
    with pytest.raises(SystemExit, match=rf"{ABLATION.name}: its runs had data = .*\"orientation\": \"RAS\""):
        bench_accuracy._earlier_results(args.add_to, args)


def test_the_earlier_runs_are_kept_with_their_machine_and_provenance(monkeypatch, tmp_path, earlier_table):
    args = parse(monkeypatch, tmp_path, *ITS_BUDGET, "--seeds", "3", "--add-to", str(earlier_table))
    earlier = bench_accuracy._earlier_results(args.add_to, args)

    committed = json.loads(earlier_table.read_text(encoding="utf-8"))
    assert [(r["config"], r["seed"]) for r in earlier["runs"]] == [(r["config"], r["seed"]) for r in committed["runs"]]
    assert len(earlier["runs"]) == 18
    assert {r["machine"] for r in earlier["runs"]} == {"NVIDIA H200 (CUDA 13.0)"}
    # The committed table itself extended the first ablation invocation; its recorded run count is not carried on.
    first = committed["earlier"][0]
    provenance = {key: first[key] for key in ("command", "machine", "torch", "date")}
    assert earlier["earlier"] == [
        provenance,
        {
            "command": committed["command"],
            "machine": "NVIDIA H200 (CUDA 13.0)",
            "torch": committed["torch"],
            "date": committed["date"],
        },
    ]

    outcome = bench_accuracy.Outcome(runs=earlier["runs"], earlier=earlier["earlier"])
    report = bench_accuracy._markdown(
        outcome.runs, bench_accuracy.configurations(args.patch), bench_accuracy._meta(args, outcome)
    )
    assert f"- Extends (`--add-to`) runs made by `{first['command']}` on NVIDIA H200" in report
    assert f"- Extends (`--add-to`) runs made by `{committed['command']}` on NVIDIA H200" in report
    assert "| (c) with scdl.grid = 21 | `scdl.grid=21` | 3 | 0.077 ± 0.013 |" in report


@pytest.mark.parametrize(
    "option, value, key",
    [
        ("--steps", "600", "steps"),
        ("--width", "16", "width"),
        ("--patch", "96", "patch"),
        ("--spacing", "1.5", "spacing_mm"),
    ],
)
def test_a_different_budget_is_refused_naming_the_file_and_the_difference(
    monkeypatch, tmp_path, earlier_table, option, value, key
):
    budget = list(ITS_BUDGET)
    if option in budget:
        budget[budget.index(option) + 1] = value
    else:
        budget += [option, value]
    args = parse(monkeypatch, tmp_path, *budget, "--add-to", str(earlier_table))

    with pytest.raises(
        SystemExit, match=rf"{earlier_table.name}: its runs had {key} = .*only runs with the same budget"
    ):
        bench_accuracy._earlier_results(args.add_to, args)


@pytest.mark.parametrize("content", ["not json", json.dumps({"runs": [{"config": "cps_ga"}]}), json.dumps([1, 2])])
def test_a_file_that_is_not_a_results_file_is_refused_by_name(monkeypatch, tmp_path, content):
    foreign = tmp_path / "foreign.json"
    foreign.write_text(content, encoding="utf-8")
    args = parse(monkeypatch, tmp_path, *ITS_BUDGET, "--add-to", str(foreign))

    with pytest.raises(SystemExit, match=r"foreign\.json: not a results file of bench_accuracy\.py"):
        bench_accuracy._earlier_results(args.add_to, args)


def test_a_results_file_whose_provenance_is_not_ours_is_refused_by_name(monkeypatch, tmp_path, earlier_table):
    table = json.loads(earlier_table.read_text(encoding="utf-8"))
    table["earlier"] = ["not an invocation"]
    earlier_table.write_text(json.dumps(table), encoding="utf-8")
    args = parse(monkeypatch, tmp_path, *ITS_BUDGET, "--add-to", str(earlier_table))

    with pytest.raises(SystemExit, match=r"ablation_h200\.json: not a results file of bench_accuracy\.py"):
        bench_accuracy._earlier_results(args.add_to, args)


def test_an_interrupted_results_write_keeps_the_table_it_extends(monkeypatch, tmp_path, earlier_table):
    """--out may hold the very accuracy.json that --add-to extends: a write that fails halfway must leave it whole."""
    out = tmp_path / "results"
    out.mkdir()
    table = out / "accuracy.json"
    table.write_text(earlier_table.read_text(encoding="utf-8"), encoding="utf-8")
    args = parse(monkeypatch, tmp_path, *ITS_BUDGET, "--seeds", "3", "--add-to", str(table))
    earlier = bench_accuracy._earlier_results(args.add_to, args)
    outcome = bench_accuracy.Outcome(runs=earlier["runs"], earlier=earlier["earlier"])

    def half_then_disk_full(path: Path, text: str, *args, **kwargs) -> int:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        bench_accuracy._write_results(outcome, bench_accuracy.configurations(args.patch), args, out)
    monkeypatch.undo()

    assert table.read_text(encoding="utf-8") == earlier_table.read_text(encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.json"]


def extended(table: Path, folder: Path, name: str, seed: int, train_seconds: float) -> Path:
    """A table made side by side from ``table``: its runs plus one run of (c) with ``seed``, and its provenance."""
    committed = json.loads(table.read_text(encoding="utf-8"))
    run = next(r for r in committed["runs"] if r["config"] == "cps_ga_scdl")
    made = {key: committed[key] for key in ("command", "machine", "torch", "date")}
    earlier = [*committed.get("earlier", []), made]
    table_of_it = {
        **committed,
        "command": f"python bench_accuracy.py --seeds {seed + 1} ({name})",
        "earlier": earlier,
        "runs": [*committed["runs"], {**run, "seed": seed, "train_seconds": train_seconds}],
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(table_of_it), encoding="utf-8")
    return path


def test_tables_made_side_by_side_from_one_table_are_united(monkeypatch, tmp_path, earlier_table):
    one = extended(earlier_table, tmp_path, "one", seed=3, train_seconds=100.0)
    other = extended(earlier_table, tmp_path, "other", seed=4, train_seconds=200.0)
    # Tables written before provenance lost its run counts could count one invocation differently, or list it twice
    # (a command run twice): it is still one invocation.
    table = json.loads(other.read_text(encoding="utf-8"))
    table["earlier"] = [
        *table["earlier"][:-1],
        {**table["earlier"][-1], "runs": -2},
        {**table["earlier"][-1], "runs": 3},
    ]
    other.write_text(json.dumps(table), encoding="utf-8")
    args = parse(monkeypatch, tmp_path, *ITS_BUDGET, "--add-to", str(earlier_table), str(one), str(other))
    earlier = bench_accuracy._earlier_results(args.add_to, args)

    assert len(earlier["runs"]) == 18 + 2  # the committed runs once, and each table's own
    assert {r["seed"] for r in earlier["runs"] if r["config"] == "cps_ga_scdl"} == {0, 1, 2, 3, 4}
    commands = [entry["command"] for entry in earlier["earlier"]]
    assert len(commands) == len(set(commands)) == 4  # the committed table's two invocations, then one and other
    assert all("runs" not in entry for entry in earlier["earlier"])


def test_two_tables_holding_different_runs_of_one_seed_are_refused_by_name(monkeypatch, tmp_path, earlier_table):
    one = extended(earlier_table, tmp_path, "one", seed=3, train_seconds=100.0)
    clash = extended(earlier_table, tmp_path, "clash", seed=3, train_seconds=300.0)
    args = parse(monkeypatch, tmp_path, *ITS_BUDGET, "--add-to", str(one), str(clash))

    with pytest.raises(SystemExit, match=r"clash\.json: its run cps_ga_scdl seed 3 is another run"):
        bench_accuracy._earlier_results(args.add_to, args)


def test_the_recorded_command_holds_no_machine_path(monkeypatch, tmp_path):
    """The script by its place in the repository (here run from another checkout), work and results folders by name,
    paths in the current folder relative, other paths by file name only."""
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path.parent / "elsewhere" / "accuracy.json"
    args = parse(monkeypatch, tmp_path / "work", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "data"))
    checkout = tmp_path.parent / "other-checkout" / "Testing" / "Benchmarks" / "bench_accuracy.py"
    monkeypatch.setattr(sys, "argv", [str(checkout), *sys.argv[1:], "--add-to", str(elsewhere)])
    command = bench_accuracy.portable_command(args)
    assert command.startswith("python Testing/Benchmarks/bench_accuracy.py --device cpu ")
    assert "--work WORK" in command and "--out OUT" in command and "--data data" in command
    assert "--add-to PATH/accuracy.json" in command
    assert str(tmp_path) not in command and str(elsewhere.parent) not in command


def test_the_tables_list_configurations_in_their_defined_order_whatever_order_the_runs_came_in(
    monkeypatch, tmp_path, earlier_table
):
    args = parse(monkeypatch, tmp_path, *ITS_BUDGET, "--add-to", str(earlier_table))
    earlier = bench_accuracy._earlier_results(args.add_to, args)
    configs = bench_accuracy.configurations(args.patch)
    outcome = bench_accuracy.Outcome(runs=earlier["runs"][::-1], earlier=earlier["earlier"])

    report = bench_accuracy._markdown(outcome.runs, configs, bench_accuracy._meta(args, outcome))

    present = [config.label for name, config in configs.items() if any(r["config"] == name for r in outcome.runs)]
    first_rows = [report.index(f"| {label} |") for label in present]
    assert len(present) > 2 and first_rows == sorted(first_rows)
