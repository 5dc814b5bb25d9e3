"""docs/results.md from several records: each variant comes from the one command that trained
it, records of another recipe are refused, and each paper's direction is computed."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import load_script

CURRENT = "c" * 40


@pytest.fixture(scope="module")
def reproduce() -> ModuleType:
    return load_script("reproduce")


@pytest.fixture()
def base(reproduce: ModuleType) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((reproduce.RECORD_DIR / "results.json").read_text())
    record["provenance"] = {"commit": CURRENT, "code_commit": CURRENT, "dirty": False}
    return record


def _as(record: dict[str, Any], variant: str, **metrics: float) -> dict[str, Any]:
    """A record of `variant` whose runs are the original's runs with `metrics` set."""
    out = copy.deepcopy(record)
    out["runs"] = [
        {**run, "variant": variant, **metrics}
        for run in out["runs"]
        if run["variant"] == "original"
    ]
    out["costs"] = {variant: out["costs"]["original"]}
    out["command"] = f"python scripts/reproduce.py --threads 1 --variants {variant}"
    return out


def _write(directory: Path, records: dict[str, dict[str, Any]]) -> None:
    directory.mkdir()
    for name, record in records.items():
        (directory / name).write_text(json.dumps(record), encoding="utf-8")


def test_rows_of_several_records_name_their_command_and_code(
    reproduce: ModuleType, base: dict[str, Any], tmp_path: Path
) -> None:
    old = _as(base, "haar")
    old["provenance"] = {"commit": "d" * 40, "code_commit": "d" * 40, "dirty": False}
    directory = tmp_path / "reproduce"
    _write(directory, {"results.json": base, "polyphase.json": _as(base, "aps"), "h.json": old})
    text = reproduce.render_page(CURRENT, directory)
    lines = text.splitlines()
    assert lines[2].startswith("**Stale** records: `h.json` (haar):"), lines[2]
    assert (
        "`python scripts/reproduce.py --variants haar --threads 1 --json docs/reproduce/h.json`"
        in (lines[2])
    )
    assert (
        "| `polyphase.json` | aps | `python scripts/reproduce.py --threads 1 --variants aps` |"
        in (text)
    )
    for variant in ("original", "spd", "antialias", "aps", "haar"):
        assert f"| {variant} | 0, 1, 2 |" in text, variant


def test_another_recipe_or_a_variant_trained_twice_is_refused(
    reproduce: ModuleType, base: dict[str, Any]
) -> None:
    other = _as(base, "aps")
    other["config"] = {**other["config"], "epochs": 1}
    with pytest.raises(SystemExit, match="another recipe"):
        reproduce.combine({"results.json": base, "aps.json": other})
    with pytest.raises(SystemExit, match="both train `original`"):
        reproduce.combine({"results.json": base, "again.json": _as(base, "original")})


def test_papers_direction_is_computed_from_the_runs(
    reproduce: ModuleType, base: dict[str, Any]
) -> None:
    accuracies = {r["seed"]: r["accuracy"] for r in base["runs"] if r["variant"] == "original"}
    better = _as(base, "lip")
    for run in better["runs"]:
        run["accuracy"] = accuracies[run["seed"]] + 0.2
    same = _as(base, "softpool")
    exact = _as(base, "aps-circular", consistency_circular=1.0)
    short = _as(base, "lps", consistency_circular=1.0)
    short["runs"][1]["consistency_circular"] = 0.999
    results = reproduce.combine(
        {"results.json": base, "a": better, "b": same, "c": exact, "d": short}
    )
    lines = {line.split("`")[1]: line for line in reproduce.papers_direction(results)}
    assert "**agrees**" in lines["lip"] and "+20.0 points" in lines["lip"]
    assert "**not shown**" in lines["softpool"] and "+0.0 points" in lines["softpool"]
    assert "100.0 %, 100.0 %, 100.0 %" in lines["aps-circular"]
    assert lines["aps-circular"].endswith("**holds**.")
    assert "**agrees**" in lines["lps"]  # lps claims higher consistency, not exactly 100 %
    assert lines["haar"].endswith("not run.")
    exact["runs"][0]["consistency_circular"] = 0.9995
    results = reproduce.combine({"results.json": base, "c": exact})
    line = next(x for x in reproduce.papers_direction(results) if "`aps-circular`" in x)
    assert line.endswith("**does not hold**.")


def test_the_two_protocols_originals_are_cross_checked_seed_by_seed(
    reproduce: ModuleType, base: dict[str, Any]
) -> None:
    originals = [r for r in base["runs"] if r["variant"] == "original"]
    trained = [{**r, "policy": "original", "stage": "trained"} for r in originals]
    results = reproduce.combine({"results.json": base})
    results["pretrained"] = {
        "runs": copy.deepcopy(trained),
        "provenance": {"code_commit": "e" * 40},
    }
    (line,) = [x for x in reproduce._same_original(results) if x]
    assert "(code eeeeeeeeeeee) scores exactly as the `original` rows of `results.json`" in line
    results["pretrained"]["runs"][1]["consistency_crop"] += 0.001
    (line,) = [x for x in reproduce._same_original(results) if x]
    seeds = [r["seed"] for r in originals]
    assert f"matches on seeds {seeds[0]}, {seeds[2]} of" in line


def test_pretrained_records_of_other_policies_join_one_section(
    reproduce: ModuleType, tmp_path: Path
) -> None:
    first = json.loads((reproduce.RECORD_DIR / "pretrained.json").read_text())
    other = copy.deepcopy(first)
    other["config"]["policies"] = ["haar"]
    other["command"] = "python scripts/reproduce.py --protocol pretrained --heal-policies haar"
    other["runs"] = [r for r in other["runs"] if r["stage"] == "trained"] + [
        {**r, "policy": "haar"} for r in other["runs"] if r["policy"] == "spd"
    ]
    records = {"pretrained.json": first, "pretrained-haar.json": other}
    combined = reproduce.combine_pretrained(records)
    assert combined["config"]["policies"] == [*first["config"]["policies"], "haar"]
    assert sum(r["stage"] == "trained" for r in combined["runs"]) == len(
        first["config"]["original"]["seeds"]
    )
    section = "\n".join(reproduce.pretrained_section(combined))
    assert "| haar | healed |" in section and "--heal-policies haar` in" in section
    assert "- `haar`: largest logit difference from the original at step 0" in section
    other["runs"][0] = {**other["runs"][0], "accuracy": 0.5}
    with pytest.raises(SystemExit, match="scores otherwise"):
        reproduce.combine_pretrained(records)
    with pytest.raises(SystemExit, match="both patch `spd`"):
        reproduce.combine_pretrained({"pretrained.json": first, "again.json": first})
