"""scripts/bench_deploy.py renders its section from the record alone: rows per path, misses
marked and explained by their generated profiles, stale records said to be stale."""

from __future__ import annotations

from typing import Any

from tests.conftest import load_script

bench_deploy = load_script("bench_deploy")


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


def _record(provenance: dict[str, Any]) -> dict[str, Any]:
    profile = bench_deploy.compare(
        {"conv a": {"ms": 10.0, "category": "convolution"}},
        {
            "conv a": {"ms": 11.0, "category": "convolution"},
            "Pad b": {"ms": 4.0, "category": "copies, padding, rearrangement"},
        },
    )
    return {
        "provenance": provenance,
        "settings": {
            "size": 224,
            "batches": [8],
            "threads": 1,
            "clock": "CPU time of the one thread",
            "rounds": 10,
            "load_before": "0.1/0.1/0.1",
            "load_after": "0.2/0.1/0.1",
            "record": "docs/deploy-benchmark.json",
        },
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
                "why": bench_deploy.why(profile, 1.26),
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


CURRENT = {"commit": None, "recorded": "2026-12-07T00:00:00+00:00", "command": "x"}


def test_rows_are_grouped_by_path_with_the_folded_model_beside_the_patched_one() -> None:
    text = bench_deploy.section(_record(CURRENT))
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


def test_a_miss_is_explained_by_its_generated_profile() -> None:
    text = bench_deploy.section(_record(CURRENT))
    assert "**resnet50 antialias, onnxruntime** (÷ MACs 1.20, antialias+fold)." in text
    assert "The extra time went to copies, padding, rearrangement 0.0 → 4.0 ms (new, 80%)" in text
    assert "| `Pad b` | 0.00 | 4.00 |" in text
    assert "SpaceToDepth faster on 1 of 1 layers." in text
    assert "| onnxruntime | blur | pad | 3 |" in text


def test_a_record_without_a_commit_is_marked_stale() -> None:
    text = bench_deploy.section(_record(CURRENT))
    assert text.splitlines()[2].startswith("**Stale** (no commit recorded)")


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
