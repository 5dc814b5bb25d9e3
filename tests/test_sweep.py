"""scripts/sweep.py: a fast subset of the coverage sweep, and resumable results."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import load_script


@pytest.fixture(scope="module")
def sweep() -> ModuleType:
    return load_script("sweep")


def _check(sweep: ModuleType, source: str, name: str, side: int = 32, status: str = "pass") -> dict:
    record = sweep.sweep_model(sweep.Job(source, name), side=side)
    assert not sweep.is_traceback(record), (
        f"{source}:{name}: {record.get('traceback', record['reason'])}"
    )
    failing = {
        p: o["reason"]
        for p, o in record.get("policies", {}).items()
        if o["status"] not in ("pass", "no sites")
    }
    assert record["status"] == status, f"{source}:{name}: {record['reason']} {failing}"
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


def test_vit_patchify_conv_is_left_alone_and_counts_as_no_sites(sweep: ModuleType) -> None:
    record = _check(sweep, "timm", "test_vit", status="no sites")
    assert record["roles"].get("patchify") == 1
    for name, outcome in record["policies"].items():
        assert outcome["patched"] == 0, f"{name} patched a ViT's patch embedding"
        assert outcome["status"] == "no sites", f"{name}: {outcome}"
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
    # convnext's downsamplers are patchify convs: `haar` is the built-in policy that takes them
    _check(sweep, source, name, status="pass")


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


def test_per_module_picks_the_same_models_every_time(
    sweep: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = [sweep.Job("timm", f"{module}_{i}") for module in "abc" for i in range(5)]
    monkeypatch.setattr(sweep, "family_of", lambda source, name: name.split("_")[0])
    picked = sweep.select_jobs(jobs, per_module=1)
    assert sorted(j.name.split("_")[0] for j in picked) == ["a", "b", "c"]
    assert picked == sweep.select_jobs(list(jobs), per_module=1), "the pick must be seeded"


def test_shards_cover_the_selection_once_and_each_is_deterministic(sweep: ModuleType) -> None:
    jobs = [sweep.Job("timm", f"net{i}") for i in range(23)]
    shards = [sweep.select_jobs(jobs, shard=(k, 4)) for k in range(1, 5)]
    assert sorted(j.name for shard in shards for j in shard) == sorted(j.name for j in jobs)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1, "shards are balanced"
    assert shards[1] == sweep.select_jobs(jobs, shard=(2, 4))
    assert sweep.parse_shard("3/4") == (3, 4)
    for bad in ("0/4", "5/4", "4", "a/b"):
        with pytest.raises(argparse.ArgumentTypeError, match="K/N"):
            sweep.parse_shard(bad)


def _record(name: str, finished: str, status: str = "pass", **extra: object) -> dict:
    policies = {"spd": {"status": status, "patched": 1, "reason": "1 patched"}}
    return {
        "source": "timm",
        "name": name,
        "task": "classification",
        "family": "resnet",
        "status": status,
        "reason": "",
        "finished": finished,
        "policies": policies,
        **extra,
    }


def test_merge_takes_the_latest_record_per_model_in_any_order(
    sweep: ModuleType, tmp_path: Path
) -> None:
    base, one, two = (tmp_path / n for n in ("results.jsonl", "s1.jsonl", "s2.jsonl"))
    shard1 = {"settings": {"shard": "1/3"}}
    shard2 = {"settings": {"shard": "2/3"}}
    for path, records in (
        (base, [_record("a", "2026-01-01"), _record("old", "2026-01-01")]),
        (one, [_record("a", "2026-02-01", "fail", **shard1), _record("b", "2026-02-01", **shard1)]),
        (two, [_record("a", "2026-01-15", **shard2), _record("c", "2026-02-02", **shard2)]),
    ):
        with path.open("w", encoding="utf-8") as file:
            for record in records:
                sweep.append_result(file, record)
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(base.read_bytes())
    merged = sweep.merge_results(base, [one, two])
    assert merged.models == 4 and merged.missing_shards == ("3/3",), merged
    records = sweep.read_results(base)
    assert records["timm:a"]["status"] == "fail", "the record that finished last wins"
    assert "timm:old" in records, "models no shard ran keep their record"
    sweep.merge_results(copy, [two, one])
    assert copy.read_bytes() == base.read_bytes(), "the merge depends on the files' order"


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


CURRENT = "c" * 40


def test_coverage_page_counts_each_outcome_class_and_marks_stale_records(
    sweep: ModuleType,
) -> None:
    current = {"commit": "d" * 40, "code_commit": CURRENT, "dirty": False, "command": "sweep"}
    old = {**current, "commit": "e" * 40, "code_commit": "f" * 40}
    records = [
        {
            **_record("a", "2026-02-01"),
            "source": "torchvision",
            "listed": 2,
            "provenance": current,
            "wall_s": 60.0,
            "policies": {
                "spd": {"status": "pass", "patched": 3, "reason": "3 patched", "rounding": "amp"},
                "dilate": {"status": "skip", "reason": "refused: the join in layer4"},
            },
        },
        # written before "no sites" had its own class: a pass with nothing patched
        {
            **_record("b", "2026-01-01"),
            "policies": {"spd": {"status": "pass", "patched": 0, "reason": "nothing to patch"}},
        },
        {
            **_record("c", "2026-02-01", "fail"),
            "listed": 10,
            "provenance": old,
            "reason": "spd: traceback: KeyError: 'x'",
            "policies": {
                "spd": {"status": "fail", "reason": "traceback: KeyError", "traceback": ""}
            },
        },
        {**_record("d", "2026-02-01", "skip"), "reason": "over the budget", "policies": {}},
    ]
    page = sweep.render_coverage(records, CURRENT)
    assert f"judged against `{CURRENT}`" in page
    assert "| torchvision | 2 | 1 | 1 | 0 | 1 | 0 | 0 | 0 | 0 |" in page
    assert "| timm | 10 | 3 | 0 | 3 | 0 | 1 | 1 | 1 | 1 |" in page
    assert "| `spd` | 1 | 1 | 0 | 1 |" in page  # pass / no sites / skip / fail
    assert "| `dilate` | 0 | 0 | 1 | 0 |" in page
    assert "| timm:c | eeeeeeeeee (stale) | spd: traceback: KeyError: 'x' |" in page
    assert "| timm:d | — (stale) | over the budget |" in page
    assert "| torchvision:a | dilate | dddddddddd | refused: the join in layer4 |" in page
    assert "| dddddddddd | cccccccccc | no | 1 |" in page and "| current |" in page
    assert "stale: no commit recorded" in page
    assert page == sweep.render_coverage(list(records), CURRENT), "rendering is deterministic"

    claim = " ".join(sweep.coverage_claim(records, CURRENT).split())  # unwrapped
    assert "1 pass" in claim and "1 have no site" in claim and "1 fail" in claim, claim
    assert "1 of the records ran on the current code; 3 are stale" in claim, claim


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
    assert f"by a relative {sweep.ROUNDING:.0e}" in spd["rounding"], "the noise is fixed"


def test_a_chaotic_model_with_a_transfer_wrong_by_1e_5_still_fails(
    sweep: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from surgeon.layers.spd import SpaceToDepthConv

    exact = SpaceToDepthConv.from_conv.__func__  # type: ignore[attr-defined]

    def off_by_1e_5(cls: type, conv: object, **kwargs: object) -> object:
        layer, transfer = exact(cls, conv, **kwargs)
        with torch.no_grad():
            layer.conv.weight.mul_(1 + 1e-5)  # still claims an exact transfer
        return layer, transfer

    monkeypatch.setattr(SpaceToDepthConv, "from_conv", classmethod(off_by_1e_5))
    record = sweep.sweep_model(
        sweep.Job("import", "tests.sweep_fakes:chaotic"), side=16, policies=["spd"]
    )
    spd = record["policies"]["spd"]
    assert spd["status"] == "fail", f"a 1e-5 error hid behind the chaotic model: {spd}"
    assert "more than float32 rounding can explain" in spd["reason"], spd["reason"]
    assert record["status"] == "fail"


def test_a_model_level_difference_the_original_cannot_explain_fails(sweep: ModuleType) -> None:
    from types import SimpleNamespace

    import torch

    from tests.sweep_fakes import tiny

    model = tiny().eval()
    row = SimpleNamespace(status="patched", transfer="exact", rel_diff=1e-7, site="0")
    report = SimpleNamespace(rows=[row], output_rel_diff=0.3)
    reason, note = sweep._exactness(report, lambda: model, (torch.randn(1, 3, 16, 16),))
    assert note is None
    assert reason is not None and "the original moves only" in reason
    # a site that is not exact fails on its own, before any calibration
    row.rel_diff = 1e-2
    reason, _ = sweep._exactness(report, lambda: model, (torch.randn(1, 3, 16, 16),))
    assert reason is not None and reason.startswith("site 0:")


def test_calibration_never_runs_for_a_site_worse_than_rounding(sweep: ModuleType) -> None:
    from types import SimpleNamespace

    def never() -> None:
        raise AssertionError("the original model was built for a site worse than rounding")

    row = SimpleNamespace(status="patched", transfer="exact", rel_diff=1e-5, site="conv")
    report = SimpleNamespace(rows=[row], output_rel_diff=0.5)
    reason, note = sweep._exactness(report, never, ())
    assert note is None and reason is not None and "site conv" in reason, reason


def test_models_that_do_not_fit_are_skipped_before_they_are_built(sweep: ModuleType) -> None:
    job = sweep.Job("import", "tests.sweep_fakes:huge")
    # counted on the meta device: were that to fail, the sweep would build 40 GB for real
    assert sweep._param_count(job) == 10_000_000_000
    record = sweep.sweep_model(job, memory_gib=24)
    assert record["status"] == "skip", record
    assert "two float32 copies" in record["reason"] and "24 GiB" in record["reason"], record
    assert "build_s" not in record, "a model that cannot fit must not be built"
    capped = sweep.sweep_model(sweep.Job("import", "tests.sweep_fakes:tiny"), max_params=10)
    assert capped["status"] == "skip" and "--max-params" in capped["reason"], capped


def test_memory_plan_keeps_the_original_only_while_four_copies_fit(sweep: ModuleType) -> None:
    gib = 2**30
    assert sweep.memory_plan(gib // 16, memory_gib=1.0) == "keep"  # 4 bytes x 4 copies = 1 GiB
    assert sweep.memory_plan(gib // 16 + 1, memory_gib=1.0) == "rebuild"
    assert sweep.memory_plan(gib // 8, memory_gib=1.0) == "rebuild"  # the reload: 2 copies
    assert sweep.memory_plan(gib // 8 + 1, memory_gib=1.0) is None
    assert sweep.memory_plan(100, memory_gib=1.0, max_params=99) is None


def test_a_model_built_afresh_per_policy_gives_the_same_outcomes(sweep: ModuleType) -> None:
    job = sweep.Job("import", "tests.sweep_fakes:tiny")
    policies = ["spd", "antialias"]
    kept = sweep.sweep_model(job, side=16, policies=policies)
    rebuilt = sweep.sweep_model(job, side=16, memory_gib=1e-5, policies=policies)  # ~11 KB
    assert (kept["memory_plan"], rebuilt["memory_plan"]) == ("keep", "rebuild")
    assert {n: o["status"] for n, o in rebuilt["policies"].items()} == {
        n: o["status"] for n, o in kept["policies"].items()
    }
    assert rebuilt["status"] == "pass", rebuilt["reason"]


def test_a_model_no_policy_edits_is_built_once_even_when_built_per_policy(
    sweep: ModuleType,
) -> None:
    stages: list[str] = []
    record = sweep.sweep_model(
        sweep.Job("import", "tests.sweep_fakes:plain"),
        side=16,
        memory_gib=2e-6,  # 2 KiB: no room to keep an original beside each policy's model
        policies=["spd", "antialias", "allconv"],
        progress=stages.append,
    )
    assert record["memory_plan"] == "rebuild" and record["status"] == "no sites", record
    # the reloaded checkpoint of an unedited model is the original: the next policy takes it
    assert "rebuild" not in stages, stages


def test_outcome_classes_of_records_old_and_new(sweep: ModuleType) -> None:
    assert sweep.policy_outcome({"status": "pass", "patched": 0}) == "no sites"
    assert sweep.policy_outcome({"status": "no sites", "patched": 0}) == "no sites"
    assert sweep.policy_outcome({"status": "pass", "patched": 2}) == "pass"
    both = {"spd": {"status": "pass", "patched": 0}, "dilate": {"status": "skip"}}
    assert sweep.model_outcome({"status": "pass", "policies": both}) == "no sites"
    assert sweep.model_outcome({"status": "skip", "reason": "killed"}) == "skip"
    assert sweep.model_outcome({"status": "fail", "reason": "build"}) == "fail"
    records = {"timm:a": {"status": "pass", "policies": both}, "timm:b": {"status": "skip"}}
    jobs = [sweep.Job("timm", "a"), sweep.Job("timm", "b")]
    assert sweep.not_passed(jobs, records) == jobs[1:], "no sites is not rerun as a failure"


def test_each_record_carries_its_provenance_and_run_settings(
    sweep: ModuleType, tmp_path: Path
) -> None:
    shard = tmp_path / "shard-1-of-1.jsonl"
    job = sweep.Job("import", "tests.sweep_fakes:tiny")
    command = ["scripts/sweep.py", "--shard", "1/1"]
    ran = sweep.run_sweep(
        [job],
        shard,
        policies=["spd"],
        side=16,
        quiet=True,
        command=command,
        shard=(1, 1),
        listed={"import": 1},
    )
    assert ran == 1
    record = sweep.read_results(shard)[job.key]
    assert record["status"] == "pass", record["reason"]
    prov = record["provenance"]
    assert prov["command"] == "scripts/sweep.py --shard 1/1"
    head = sys.modules["provenance"].git("rev-parse", "HEAD")  # None outside a repository
    assert prov["commit"] == head and isinstance(prov["dirty"], bool), prov
    assert set(prov["policies"]) == {"spd"} and "torch" in prov["versions"]
    assert record["settings"]["shard"] == "1/1" and record["listed"] == 1
    assert record["settings"]["memory_gib"] == sweep.DEFAULT_MEMORY_GIB
    results = tmp_path / "results.jsonl"
    assert sweep.merge_results(results, [shard]).models == 1
    assert sweep.read_results(results)[job.key] == record
