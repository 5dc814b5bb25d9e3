"""scripts/sweep.py: a fast subset of the coverage sweep, and resumable results."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import load_script


@pytest.fixture(scope="module")
def sweep() -> ModuleType:
    return load_script("sweep")


def _check(sweep: ModuleType, source: str, name: str, side: int = 32) -> dict:
    record = sweep.sweep_model(sweep.Job(source, name), side=side)
    assert not sweep.is_traceback(record), (
        f"{source}:{name}: {record.get('traceback', record['reason'])}"
    )
    failing = {
        p: o["reason"] for p, o in record.get("policies", {}).items() if o["status"] != "pass"
    }
    assert record["status"] == "pass", f"{source}:{name}: {record['reason']} {failing}"
    assert set(record["policies"]) == set(sweep.builtin_policies())
    return record


# A few small models per kind: plain conv nets, depthwise nets, ViT-style, and the odd ones.
FAST = [
    ("timm", "test_resnet"),
    ("timm", "test_efficientnet"),
    ("torchvision", "squeezenet1_1"),
]


@pytest.mark.parametrize(("source", "name"), FAST)
def test_fast_subset_patches_and_round_trips_with_every_policy(
    sweep: ModuleType, source: str, name: str
) -> None:
    _check(sweep, source, name)


def test_vit_patchify_conv_is_left_alone_and_said_so(sweep: ModuleType) -> None:
    record = _check(sweep, "timm", "test_vit")
    assert record["roles"].get("patchify") == 1
    for name, outcome in record["policies"].items():
        assert outcome["patched"] == 0, f"{name} patched a ViT's patch embedding"
        assert "1 patchify conv(s) left alone" in outcome["reason"], outcome["reason"]
    # every policy leaves the model as it is: one checkpoint round trip checks them all
    first, *others = record["policies"].values()
    assert "roundtrip_s" in first and "roundtrip" not in first
    assert all(o["roundtrip"].endswith("(the same edits)") for o in others)


# One per task (detection, segmentation, video, optical flow, quantizable) and two odd timm
# families: about 40 s on 2 cores, in the default suite.
TASKS = [
    ("torchvision", "fasterrcnn_mobilenet_v3_large_320_fpn"),
    ("torchvision", "lraspp_mobilenet_v3_large"),
    ("torchvision", "r3d_18"),
    ("torchvision", "raft_small"),
    ("torchvision", "quantized_mobilenet_v2"),
    ("timm", "test_convnext"),
    ("timm", "test_byobnet"),
]


@pytest.mark.parametrize(("source", "name"), TASKS)
def test_each_task_patches_and_round_trips(sweep: ModuleType, source: str, name: str) -> None:
    _check(sweep, source, name)


def test_reduced_sizes_shrink_the_smaller_side_and_keep_the_default_last(sweep: ModuleType) -> None:
    assert sweep.candidate_sizes((3, 224, 224)) == [(3, 64, 64), (3, 128, 128), (3, 224, 224)]
    assert sweep.candidate_sizes((3, 299, 299), 64)[-1] == (3, 299, 299)
    assert sweep.reduced_size((3, 16, 112, 112)) == (3, 8, 64, 64)
    assert sweep.candidate_sizes((3, 32, 32)) == [(3, 32, 32)]


def test_select_jobs_filters_and_samples_deterministically(sweep: ModuleType) -> None:
    jobs = [sweep.Job("timm", f"net{i}") for i in range(50)]
    first = sweep.select_jobs(jobs, sample=7, seed=3)
    assert first == sweep.select_jobs(jobs, sample=7, seed=3) and len(first) == 7
    assert [j.name for j in sweep.select_jobs(jobs, glob="net4*")] == [
        "net4",
        *(f"net4{i}" for i in range(10)),
    ]


@pytest.mark.slow  # spawns worker processes with real budgets: run with `pytest -m slow`
def test_results_resume_skips_recorded_models_and_survives_a_torn_line(
    sweep: ModuleType, tmp_path: Path
) -> None:
    results = tmp_path / "results.jsonl"
    jobs = [sweep.Job("import", f"tests.sweep_fakes:{n}") for n in ("tiny", "hang", "broken")]
    # the hanging model is killed at its budget and recorded; the next run resumes after it
    assert sweep.run_sweep(jobs[1:2], results, timeout_s=3, quiet=True) == 1
    assert sweep.run_sweep(jobs, results, policies=["spd"], timeout_s=300, quiet=True) == 2
    records = sweep.read_results(results)
    assert sorted(records) == sorted(j.key for j in jobs)
    tiny, hang, broken = (records[j.key] for j in jobs)
    assert tiny["status"] == "pass", tiny["reason"]
    assert hang["status"] == "skip" and "per-model budget" in hang["reason"], hang
    assert broken["status"] == "fail" and "broken on purpose" in broken["reason"], broken.get(
        "worker_log"
    )
    assert not sweep.is_traceback(broken), "a build failure must be a one-line reason"

    # a torn last line (an interrupted write) is ignored; recorded models are not run again
    with results.open("a", encoding="utf-8") as file:
        file.write('{"source": "import", "name": "tests.sweep')
    assert len(sweep.read_results(results)) == 3
    assert sweep.run_sweep(jobs, results, policies=["spd"], quiet=True) == 0

    # compaction keeps the latest record per model
    with results.open("a", encoding="utf-8") as file:
        file.write("\n" + json.dumps({**tiny, "reason": "again"}) + "\n")
    assert sweep.compact_results(results) == 3
    lines = results.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and sweep.read_results(results)[jobs[0].key]["reason"] == "again"


def test_resume_runs_only_models_without_a_complete_record(
    sweep: ModuleType, tmp_path: Path
) -> None:
    results = tmp_path / "results.jsonl"
    jobs = [sweep.Job("timm", name) for name in ("a", "b", "c", "d")]
    both = {"spd": {"status": "pass"}, "antialias": {"status": "pass"}}
    with results.open("w", encoding="utf-8") as file:
        sweep.append_result(
            file, {"source": "timm", "name": "a", "status": "pass", "policies": both}
        )
        sweep.append_result(
            file, {"source": "timm", "name": "b", "status": "skip", "reason": "big"}
        )
        sweep.append_result(
            file, {"source": "timm", "name": "c", "status": "pass", "policies": {"spd": {}}}
        )
        file.write('{"source": "timm", "name": "d", "sta')  # torn by an interrupted write
    records = sweep.read_results(results)
    assert sorted(records) == ["timm:a", "timm:b", "timm:c"], "a torn line must be ignored"
    # c ran before antialias existed; d has no record
    todo = sweep.pending_jobs(jobs, records, policies=["spd", "antialias"])
    assert [j.name for j in todo] == ["c", "d"]
    assert sweep.pending_jobs(jobs, records, policies=["spd"], rerun=True) == jobs
    # nothing pending: no worker is started
    assert sweep.run_sweep(jobs[:2], results, policies=["spd", "antialias"], quiet=True) == 0

    # compaction keeps the latest record per model, and never under a running sweep
    with results.open("a", encoding="utf-8") as file:
        file.write("\n" + json.dumps({"source": "timm", "name": "b", "status": "pass"}) + "\n")
    with results.open("a", encoding="utf-8") as held:
        sweep._lock(held, results)
        with pytest.raises(sweep.ResultsBusy):
            sweep.compact_results(results)
    assert sweep.compact_results(results) == 3
    assert len(results.read_text(encoding="utf-8").splitlines()) == 3
    assert sweep.read_results(results)["timm:b"]["status"] == "pass"


def test_coverage_report_counts_and_lists_every_failure(sweep: ModuleType) -> None:
    records = [
        {
            "source": "torchvision",
            "name": "a",
            "task": "classification",
            "family": "resnet",
            "status": "pass",
            "reason": "",
            "wall_s": 60.0,
            "patch_median_s": 1.0,
            "policies": {
                "spd": {"status": "pass", "reason": "3 patched", "rounding": "amplifies it"}
            },
        },
        {
            "source": "timm",
            "name": "b",
            "task": "classification",
            "family": "vit",
            "status": "fail",
            "reason": "spd: traceback: KeyError: 'x'",
            "wall_s": 60.0,
            "policies": {
                "spd": {"status": "fail", "reason": "traceback: KeyError: 'x'", "traceback": "..."}
            },
        },
        {
            "source": "timm",
            "name": "c",
            "task": "classification",
            "family": "vit",
            "status": "skip",
            "reason": "1.24B parameters: too big",
            "wall_s": 1.0,
        },
    ]
    page = sweep.render_coverage(records, {"torchvision": 1, "timm": 10})
    assert "| torchvision | 1 | 0 | 0 | 1 of 1 | 0 |" in page
    assert "| timm | 0 | 1 | 1 | 2 of 10 | 1 |" in page
    assert "| timm:b | spd: traceback: KeyError: 'x' |" in page
    assert "| timm:c | 1.24B parameters: too big |" in page
    assert "| timm / vit | 0 | 1 | 1 | 2 |" in page
    assert "| torchvision:a | spd | amplifies it |" in page
    assert "2.0 min for 3 models" in page


def test_a_refusal_is_a_skip_only_for_policies_that_change_map_sizes(sweep: ModuleType) -> None:
    from surgeon.errors import PatchError

    refused = PatchError("the patched model fails in layer4.0 (BasicBlock): RuntimeError: …")
    assert sweep._not_applicable(refused, "patch", "dilate")
    # spd, antialias and allconv keep every map size: the same refusal is a bug
    assert not sweep._not_applicable(refused, "patch", "spd")
    assert not sweep._not_applicable(refused, "save", "dilate")
    bug = PatchError("the patched model's output shapes differ from the original's")
    assert not sweep._not_applicable(bug, "patch", "dilate")
    assert not sweep._not_applicable(RuntimeError("boom"), "patch", "dilate")


def test_rerun_failed_selects_recorded_non_passes_only(sweep: ModuleType) -> None:
    jobs = [sweep.Job("timm", name) for name in ("a", "b", "c", "d")]
    records = {
        "timm:a": {"status": "pass"},
        "timm:b": {"status": "fail"},
        "timm:c": {"status": "skip"},
    }
    assert [j.name for j in sweep.not_passed(jobs, records)] == ["b", "c"]


def test_exact_transfers_in_a_model_that_amplifies_rounding_pass_with_a_note(
    sweep: ModuleType,
) -> None:
    record = sweep.sweep_model(sweep.Job("import", "tests.sweep_fakes:chaotic"), side=16)
    spd = record["policies"]["spd"]
    assert spd["status"] == "pass", spd["reason"]
    assert spd["output_rel_diff"] > sweep.EXACT_TOLERANCE  # the output did move ...
    assert "amplifies rounding" in spd["rounding"]  # ... and the record says why that is fine


def test_a_model_level_difference_the_original_cannot_explain_fails(sweep: ModuleType) -> None:
    from types import SimpleNamespace

    import torch

    from tests.sweep_fakes import tiny

    model = tiny().eval()
    row = SimpleNamespace(status="patched", transfer="exact", rel_diff=1e-7, site="0")
    report = SimpleNamespace(rows=[row], output_rel_diff=0.3)
    reason, note = sweep._exactness(report, model, (torch.randn(1, 3, 16, 16),))
    assert note is None
    assert reason is not None and "the original moves only" in reason
    # a site that is not exact fails on its own, before any calibration
    row.rel_diff = 1e-2
    reason, _ = sweep._exactness(report, model, (torch.randn(1, 3, 16, 16),))
    assert reason is not None and reason.startswith("site 0:")
