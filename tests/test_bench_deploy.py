"""The "Deployment paths" section of docs/benchmarks.md is rendered from bench_deploy's record
alone (scripts/bench_page.py): rows per path, misses marked and explained by their profiles,
stale records said to be stale."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import load_script

bench_deploy = load_script("bench_deploy")
bench_page = load_script("bench_page")


def _row(path: str, policy: str, per_mac: float, *, folded: bool = False, **extra: Any) -> dict:
    return {
        "model": "resnet50",
        "batch": 8,
        "path": path,
        "policy": policy,
        "folded": folded,
        "best": 100.0 * per_mac,
        "median": 101.0,
        "ratio": per_mac,
        "mac_ratio": 1.0,
        "per_mac": per_mac,
        "sites": 7,
        "macs": 1,
        **extra,
    }


def _record(commit: str | None) -> dict[str, Any]:
    profile = bench_deploy.compare(
        {"conv a": {"ms": 10.0, "category": "convolution"}},
        {
            "conv a": {"ms": 11.0, "category": "convolution"},
            "Pad b": {"ms": 4.0, "category": "copies, padding, rearrangement"},
        },
    )
    return {
        "provenance": {
            "commit": commit,
            "code_commit": commit,
            "dirty": False,
            "recorded": "2026-12-07T00:00:00+00:00",
            "command": "scripts/bench_deploy.py",
            "versions": {"torch": "2.x"},
            "machine": {"cpu": "test CPU", "cores": 2},
        },
        "quick": False,
        "settings": {"size": 224, "batches": [8], "threads": 1, "rounds": 10},
        "load": {"before": [0.1, 0.1, 0.1], "after": [0.2, 0.1, 0.1]},
        "rows": [
            _row("eager", "original", 1.0),
            _row("eager", "spd", 1.05, fold="0/7"),
            _row("onnxruntime", "original", 1.0, check_rel_diff=1e-7),
            _row("onnxruntime", "antialias", 1.3, check_rel_diff=2e-7),
            _row("onnxruntime", "antialias", 1.2, folded=True, fold="7/10", check_rel_diff=3e-7),
        ],
        "profiles": [
            {
                "model": "resnet50",
                "policy": "antialias",
                "path": "onnxruntime",
                "variant": "antialias+fold",
                "per_mac": 1.2,
                "mac_ratio": 1.26,
                **profile,
            }
        ],
        "spd_rearrangements": [
            {
                "layer": "resnet50 conv1",
                "shape": [8, 3, 224, 224],
                "ms": {"SpaceToDepth": 1.0, "Reshape/Transpose": 2.0},
            }
        ],
        "folds": [
            {"path": "onnxruntime", "layers": [{"kind": "blur", "form": "pad"}] * 3},
        ],
        "skipped": [{"path": "cuda-graphs", "reason": "no CUDA device"}],
    }


CURRENT = "c" * 40


def _section(record: dict[str, Any], tmp_path: Path) -> str:
    (tmp_path / "deploy.json").write_text(json.dumps(record))
    page = bench_page.render_benchmarks(CURRENT, tmp_path)
    return page.split("## Deployment paths")[1].split("\n## ")[0]


def test_rows_are_grouped_by_path_with_the_folded_model_beside_the_patched_one(
    tmp_path: Path,
) -> None:
    text = _section(_record(CURRENT), tmp_path)
    assert "### eager" in text and "### onnxruntime" in text
    assert "| resnet50 | 8 | spd | 7 | 1.00 | 105.0 | 1.05 | 1.05 | as patched (0/7) | — |" in text
    assert (
        "| resnet50 | 8 | antialias | 7 | 1.00 | 130.0 | 1.30 | **1.30** | 120.0 (7/10) "
        "| **1.20** | 3.0e-07 |" in text
    )
    assert "Rows above 1.1 at batch 8 (folded where a fold applies): none." in text
    assert "(folded where a fold applies): resnet50 antialias." in text
    assert "cuda-graphs: not run (no CUDA device)." in text
    assert "ONNX files whose check exceeded 1e-05: none." in text
    assert "Load average (1/5/15 min) before: 0.1/0.1/0.1, after: 0.2/0.1/0.1." in text
    assert "**Stale**" not in text


def test_a_miss_is_explained_by_its_profile(tmp_path: Path) -> None:
    text = _section(_record(CURRENT), tmp_path)
    assert "**resnet50 antialias, onnxruntime** (÷ MACs 1.20, antialias+fold)." in text
    assert "The extra time went to copies, padding, rearrangement 0.0 → 4.0 ms (new, 80%)" in text
    assert "against a MAC ratio of 1.26." in text
    assert "| `Pad b` | 0.00 | 4.00 |" in text
    assert "SpaceToDepth faster on 1 of 1 layers." in text
    assert "| onnxruntime | blur | pad | 3 |" in text


def test_a_record_of_older_code_is_marked_stale(tmp_path: Path) -> None:
    text = _section(_record("d" * 40), tmp_path)
    assert "**Stale**" in text and "python scripts/bench_deploy.py" in text, text


def test_without_a_record_the_section_says_which_command_makes_it(tmp_path: Path) -> None:
    page = bench_page.render_benchmarks(CURRENT, tmp_path)
    section = page.split("## Deployment paths")[1].split("\n## ")[0]
    assert "No record yet: `python scripts/bench_deploy.py` writes" in section, section


def test_operations_are_sorted_into_kinds() -> None:
    category = bench_deploy.category
    assert category("aten::mkldnn_convolution", [[8, 64, 56, 56], [64, 1, 3, 3]]) == (
        "depthwise convolution"
    )
    assert category("Conv", [[8, 64, 56, 56], [128, 64, 3, 3]]) == "convolution"
    assert category("If", []) == "copies, padding, rearrangement"
    assert category("SpaceToDepth", []) == "copies, padding, rearrangement"
    assert category("## Call CompiledFxGraph abc ##", []) == "Inductor's generated kernels"
    assert category("aten::relu_", []) == "normalisation, activation, elementwise"


def _part(model: str, commit: str, *, threads: int = 1) -> dict[str, Any]:
    record = _record(commit)
    record["rows"] = [{**row, "model": model} for row in record["rows"]]
    record["profiles"] = [{**p, "model": model} for p in record["profiles"]]
    record["settings"] = {**record["settings"], "threads": threads}
    record["provenance"] = {**record["provenance"], "command": f"scripts/bench_deploy.py {model}"}
    return record


def test_parts_run_as_separate_commands_combine_into_one_section(tmp_path: Path) -> None:
    (tmp_path / "deploy.json").write_text(json.dumps(_part("resnet50", CURRENT)))
    (tmp_path / "deploy-mobilenet.json").write_text(json.dumps(_part("mobilenet", "d" * 40)))
    page = bench_page.render_benchmarks(CURRENT, tmp_path)
    text = page.split("## Deployment paths")[1].split("\n## ")[0]
    assert "Made of 2 records, each one command's run:" in text
    assert "- [`records/bench/deploy.json`](records/bench/deploy.json)" in text
    mobilenet = next(line for line in text.splitlines() if "deploy-mobilenet.json" in line)
    assert "**Stale**" in mobilenet and "`python scripts/bench_deploy.py mobilenet`" in mobilenet
    resnet = next(line for line in text.splitlines() if "records/bench/deploy.json" in line)
    assert "**Stale**" not in resnet
    assert "| resnet50 | 8 | spd | 7 |" in text and "| mobilenet | 8 | spd | 7 |" in text
    assert "(folded where a fold applies): resnet50 antialias, mobilenet antialias." in text
    assert text.count("cuda-graphs: not run (no CUDA device).") == 1


def test_a_single_part_links_its_own_record(tmp_path: Path) -> None:
    (tmp_path / "deploy-mobilenet.json").write_text(json.dumps(_part("mobilenet", CURRENT)))
    page = bench_page.render_benchmarks(CURRENT, tmp_path)
    assert "Made of 1 record, each one command's run:" in page
    assert "[`records/bench/deploy-mobilenet.json`]" in page


def test_parts_timing_the_same_rows_or_on_other_threads_are_refused(tmp_path: Path) -> None:
    (tmp_path / "deploy.json").write_text(json.dumps(_part("resnet50", CURRENT)))
    (tmp_path / "deploy-again.json").write_text(json.dumps(_part("resnet50", CURRENT)))
    with pytest.raises(ValueError, match="two deploy records time resnet50 at batch 8 on eager"):
        bench_page.render_benchmarks(CURRENT, tmp_path)
    (tmp_path / "deploy-again.json").write_text(json.dumps(_part("vit", CURRENT, threads=2)))
    with pytest.raises(ValueError, match=r"ran on \[1, 2\] threads"):
        bench_page.render_benchmarks(CURRENT, tmp_path)


def test_a_part_name_is_checked() -> None:
    with pytest.raises(SystemExit):
        bench_deploy.main(["--part", "Mobile Net", "--quick"])


def test_a_variant_surgeon_refused_to_export_is_listed_with_its_error(tmp_path: Path) -> None:
    record = _record(CURRENT)
    record["failures"] = [
        {
            "model": "resnet50d",
            "batch": 1,
            "path": "onnxruntime",
            "variant": "allconv",
            "error": "the onnx export of ResNet fails at input 2x3x169x169: Add\nmore",
        }
    ]
    text = _section(record, tmp_path)
    assert "Variants surgeon refused to build for their path" in text
    assert (
        "- resnet50d at batch 1, onnxruntime, allconv: the onnx export of ResNet fails at "
        "input 2x3x169x169: Add\n" in text
    )
