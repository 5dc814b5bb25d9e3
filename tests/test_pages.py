"""Generated pages: the committed ones are what their records render, records carry their
provenance, and a page marks the records that ran on older code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import load_script

CURRENT = "c" * 40


@pytest.fixture(scope="module")
def pages() -> ModuleType:
    return load_script("pages")


@pytest.fixture(scope="module")
def bench_page() -> ModuleType:
    return load_script("bench_page")


def test_committed_pages_are_what_their_records_render(pages: ModuleType) -> None:
    # rendered against the commit the pages state, so this holds in a checkout without git
    # history too; whether that commit is still the last code change is the next test's
    stated = pages.stated_commit()
    assert stated is not None, "docs/coverage.md states no commit: run `make docs`"
    for page in pages.pages():
        text = page.path.read_text(encoding="utf-8")
        assert page.render(stated) == text, (
            f"{page.path.name} is not what its records render: run `make docs` and commit it"
        )


def test_pages_are_judged_against_the_last_change_to_the_code(pages: ModuleType) -> None:
    provenance = load_script("provenance")
    latest = provenance.code_change()
    if latest is None:
        pytest.skip("no git history: the previous test checked the rendering alone")
    assert pages.stated_commit() == latest, (
        f"surgeon/ or configs/ changed in {latest[:10]} after the pages were rendered: "
        "run `make docs` (python scripts/pages.py) and commit the pages"
    )


def test_check_names_a_page_that_differs_and_render_restores_it(
    pages: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "page.md"
    page = pages.Page(target, lambda current: f"judged against {current}\n")
    monkeypatch.setattr(pages, "pages", lambda: [page])
    monkeypatch.setattr(pages, "ROOT", tmp_path)
    assert pages.main(["--check", "--against", CURRENT]) == 1
    assert not target.exists(), "--check writes nothing"
    assert pages.main(["--against", CURRENT]) == 0
    assert target.read_text() == f"judged against {CURRENT}\n"
    assert pages.main(["--check", "--against", CURRENT]) == 0


def test_readme_coverage_sentence_is_rendered_between_its_markers(
    pages: ModuleType, tmp_path: Path
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{pages.README_BEGIN}\nold claim\n{pages.README_END}\nrest\n")
    text = pages.render_readme(CURRENT, readme)
    assert text.startswith(f"intro\n{pages.README_BEGIN}\n- **Coverage**")
    assert text.endswith(f"{pages.README_END}\nrest\n") and "old claim" not in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        pages.render_readme(CURRENT, readme)


def _provenance(code: str) -> dict:
    return {
        "commit": "d" * 40,
        "code_commit": code,
        "dirty": False,
        "command": "scripts/bench.py --only scaling",
        "recorded": "2026-03-01T10:00:00+00:00",
        "machine": {"cpu": "Test CPU", "cores": 2},
        "versions": {"torch": "2.0", "python": "3.11"},
    }


def _scaling(code: str) -> dict:
    rows = [
        {"model": "resnet18", "nodes": 71, "best": 0.1, "median": 0.11},
        {"model": "resnet34", "nodes": 127, "best": 0.2, "median": 0.21},
    ]
    settings = {"repeats": 3, "size": 32, "threads": 1}
    return {"rows": rows, "settings": settings, "provenance": _provenance(code)}


def test_benchmark_page_shows_each_records_commit_and_marks_stale_ones(
    bench_page: ModuleType, tmp_path: Path
) -> None:
    (tmp_path / "scaling.json").write_text(json.dumps(_scaling(CURRENT)))
    page = bench_page.render_benchmarks(CURRENT, tmp_path)
    assert f"judged against `{CURRENT}`" in page
    assert "`scripts/bench.py --only scaling` on commit `dddddddddd`" in page
    assert "| resnet34 | 127 | 0.20 (0.21) |" in page
    assert "**Stale**" not in page
    # a section without a record says how to make one, and shows no number
    latency = page.split("## Model latency")[1].split("\n## ")[0]
    assert "No record yet: `python scripts/bench.py --only latency`" in latency
    assert not any(ch.isdigit() for ch in latency.replace("bench.py", "")), latency

    (tmp_path / "scaling.json").write_text(json.dumps(_scaling("f" * 40)))
    stale = bench_page.render_benchmarks(CURRENT, tmp_path)
    assert "**Stale** (ran on dddddddddd (code of ffffffffff)" in stale, stale
    assert stale == bench_page.render_benchmarks(CURRENT, tmp_path), "rendering is deterministic"


def test_layer_benchmark_quick_run_writes_a_record_the_page_renders(
    bench_page: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench_layers = load_script("bench_layers")
    bench_layers.main(["--quick", "--records", str(tmp_path)])
    record = json.loads((tmp_path / "layers.json").read_text())
    assert record["quick"] is True and record["provenance"]["command"].endswith(
        "scripts/bench_layers.py --quick --records " + str(tmp_path)
    )
    assert {r["role"] for r in record["rows"]} == {"surgeon", "reference", "context"}
    page = bench_page.render_benchmarks(CURRENT, tmp_path)
    assert "**Smoke run** (`--quick`)" in page
    assert "| space_to_depth phase-major | 2x16x16x16 | contiguous |" in page
    assert "- BlurPool f=4, channels_last: faster than" in page
    assert "Replacement layers" in capsys.readouterr().out


def test_cli_baselines_exit_as_the_surgeon_script_does() -> None:
    from surgeon.cli import GC_THRESHOLD

    bench = load_script("bench")
    commands = bench.cli_commands("out")
    programs = {name: command[-1] for name, command in commands.items() if name != "surgeon patch"}
    teardown = programs.pop("build only, interpreter teardown")
    assert "os._exit" not in teardown, "the context row exits normally"
    head, tail = bench.like_surgeon("\0").split("\0")
    for name, program in programs.items():
        assert program.startswith(head) and program.endswith(tail), f"{name} exits otherwise"
    assert f"gc.set_threshold({GC_THRESHOLD})" in head, "the baselines collect as surgeon does"
    # the wrapper really skips the interpreter's teardown (atexit handlers never run) and
    # still delivers the output
    probe = bench.like_surgeon("import atexit\natexit.register(print, 'teardown')\nprint('ran')")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout == "ran\n", done.stdout


def _search_record(taus: dict[str, list[float]], commit: str) -> dict[str, object]:
    truth = {"a b": [0.80, 0.82], "c d": [0.60, 0.62], "e f": [0.90, 0.92]}
    methods = {}
    for name, values in taus.items():
        runs = [
            {"kendall_tau": t, "top_pick": "e f", "top_pick_accuracy": 0.91, "cost_ratio": 2.0}
            for t in values
        ]
        methods[name] = {
            "supernets": 4 if name == "mixture" else 1,
            "runs": runs,
            "kendall_tau": sum(values) / len(values),
            "kendall_tau_range": [min(values), max(values)],
            "top_pick_accuracy": 0.91,
            "top_pick_accuracy_range": [0.91, 0.91],
            "cost_ratio": 2.0,
        }
    return {
        "task": {"images": 100, "size": 16},
        "model": {"blocks": 1, "width": 8},
        "space_size": 18,
        "steps": 10,
        "search_steps": 10,
        "batch_size": 8,
        "seeds": 2,
        "ground_truth": truth,
        "ground_truth_mean": {k: sum(v) / 2 for k, v in truth.items()},
        "default": "a b",
        "default_accuracy": 0.81,
        "best_accuracy": 0.91,
        "methods": methods,
        "mixture_ranks_better": min(taus["mixture"]) > max(taus["single"]),
        "mixture_pick_beats_default": True,
        "quick": False,
        "provenance": {"commit": commit, "dirty": False, "code_commit": commit, "command": "x"},
    }


def test_search_page_states_the_claims_beyond_the_spread_and_marks_old_records(
    tmp_path: Path,
) -> None:
    page = load_script("search_page")
    record = tmp_path / "digits.json"
    assert "No record yet" in page.render_search_results(CURRENT, record)
    overlapping = {"mixture": [0.2, 0.6], "single": [0.4, 0.5]}
    record.write_text(json.dumps(_search_record(overlapping, CURRENT)))
    text = page.render_search_results(CURRENT, record)
    assert "*The mixture ranks placements better than one supernet*: does not hold" in text
    assert "| `e f` | 0.910 | 0.900, 0.920 |" in text and "**Stale**" not in text
    apart = {"mixture": [0.7, 0.8], "single": [0.1, 0.3]}
    record.write_text(json.dumps(_search_record(apart, "d" * 40)))
    text = page.render_search_results(CURRENT, record)
    assert "*The mixture ranks placements better than one supernet*: holds" in text
    assert "**Stale**" in text


def test_results_page_is_stale_until_every_record_ran_on_the_current_code(
    tmp_path: Path,
) -> None:
    reproduce = load_script("reproduce")
    directory = tmp_path / "reproduce"
    directory.mkdir()
    for path in reproduce.RECORD_DIR.glob("*.json"):
        (directory / path.name).write_text(path.read_text(encoding="utf-8"))
    text = reproduce.render_page(CURRENT, directory)
    banner = text.splitlines()[2]
    assert banner.startswith("**Stale** records: `results.json` (original, spd, antialias): no "), (
        banner
    )
    current = {"commit": CURRENT, "code_commit": CURRENT, "dirty": False}
    for path in directory.glob("*.json"):
        record = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps({**record, "provenance": current}), encoding="utf-8")
    text = reproduce.render_page(CURRENT, directory)
    assert "**Stale**" not in text and text.startswith("# Results: does the surgery help?")
