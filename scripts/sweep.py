#!/usr/bin/env python
"""Coverage sweep: every torchvision and timm model through scan, every built-in policy and a
checkpoint round trip, with random weights; one JSON line per model, with its provenance.

    python scripts/sweep.py --source torchvision --threads 1      # all torchvision models
    python scripts/sweep.py --source timm --per-module 1          # one seeded pick per timm module
    python scripts/sweep.py --shard 2/4 --threads 1               # the 2nd of 4 independent jobs
    python scripts/sweep.py --merge out/sweep/shard-*.jsonl       # into docs/sweep-results.jsonl
    python scripts/sweep.py --rerun-failed --memory 22            # failures and skips again
    python scripts/sweep.py --glob 'resnet*' --rerun              # run recorded models again
    python scripts/sweep.py --compact                             # one line per model
    python scripts/pages.py                                       # docs/coverage.md (make docs)

Per model (`sweep_model`): build with random weights (seed 0), pick a reduced input size the
model accepts (see `candidate_sizes`), scan, then for each built-in policy in `configs/`:
patch an unpatched model in place (`surgeon.patch.patch` raises PatchError if an output shape
changes), check that a policy whose patched sites all transfer exactly reproduces the original
outputs (relative difference <= 1e-4, see `_exactness` for models that amplify rounding), save
the checkpoint with `surgeon.api.save`, drop the patched model, load the checkpoint back with
`surgeon.api.load` and require bit-identical outputs. Each policy's outcome is one of pass
(sites patched and verified), no sites (nothing for it to patch), skip (with its reason) or
fail.

Memory (`memory_plan`): while four float32 copies of the parameters fit the memory budget,
the unpatched model stays in memory and each policy patches a copy of it; a larger model is
built afresh (same seed) for each policy, so that one copy is in memory while it is patched
and two while its checkpoint loads (the weights read, then the model they are loaded into).
A model whose two copies exceed the budget (or `--max-params`) is skipped before it is built.

Each model runs in a worker subprocess (`--worker`) with a wall-time and memory budget, so a
hang or an out-of-memory model is killed and recorded instead of ending the sweep; one line
per model is appended and flushed to the results file, so an interrupted sweep resumes where it
stopped. `--shard K/N` takes every N-th model of the selection from the K-th, so N jobs
(a Slurm array, several machines, or one machine one after another) cover it once, each into
its own file (default out/sweep/shard-K-of-N.jsonl); `--merge` combines them (and the existing
results) into one file, the latest record of each model winning, in a fixed order.

Model-specific settings live in one place, `model_kwargs`: detection models are built with
their internal resize at the input size (`min_size`/`max_size`; SSDs keep their fixed size) and
fixed-size timm models with `img_size` set to the reduced input size; both are recorded with
the result and used by `surgeon.api.load` to build the source model again.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import fcntl
import fnmatch
import gc
import json
import os
import random
import re
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import commit_table, judged_line, script_command, short, stale_reason

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "sweep-results.jsonl"
COVERAGE = ROOT / "docs" / "coverage.md"
SHARDS = ROOT / "out" / "sweep"

REDUCED_SIDE = 64  # the spatial side tried first; the default size is the last resort
EXACT_TOLERANCE = 1e-4  # relative output difference allowed where every transfer is exact
ROUNDING = 1e-7  # float32's relative rounding at a site: the noise the calibration applies
AMPLIFICATION_MARGIN = 10.0  # the original must move at least 1/10 as much under that noise
BYTES_PER_PARAM = 4  # float32
KEEP_COPIES = 4  # kept original + patched copy + the reload's weights read and model built
LOAD_COPIES = 2  # a rebuilt model's reload: the weights read, then the model they fill
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_MEMORY_GIB = 22.0  # one worker on a 24 GiB machine, 2 GiB left for everything else
OUTCOMES = ("pass", "no sites", "skip", "fail")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Job:
    """One model to sweep."""

    source: str  # torchvision | timm | import (`package.module:factory`)
    name: str

    @property
    def key(self) -> str:
        """The model spec: `torchvision:resnet50`, `timm:resnet50`, `pkg.mod:factory`."""
        return self.name if self.source == "import" else f"{self.source}:{self.name}"


# ---------------------------------------------------------------------------------------------
# Which models: names, tasks, families, filters


@cache
def _timm_families() -> dict[str, str]:
    import timm

    return {
        name: module for module in timm.list_modules() for name in timm.list_models(module=module)
    }


def task_of(source: str, name: str) -> str:
    """The model's task: torchvision's sub-package (detection, video, ...) or classification."""
    if source == "torchvision":
        from surgeon.models import _torchvision_names

        return _torchvision_names()[name]
    return "classification"


def family_of(source: str, name: str) -> str:
    """The module that defines the model: `resnet`, `vision_transformer`, `faster_rcnn`, ..."""
    if source == "torchvision":
        from torchvision.models import get_model_builder

        return get_model_builder(name).__module__.rpartition(".")[2]
    if source == "import":
        return name.partition(":")[0]
    return _timm_families().get(name, "unknown")


def all_jobs(source: str | None = None) -> list[Job]:
    """Every torchvision model, then every timm architecture (or those of one source)."""
    jobs: list[Job] = []
    if source in (None, "torchvision"):
        import torchvision

        jobs += [Job("torchvision", n) for n in torchvision.models.list_models()]
    if source in (None, "timm"):
        import timm

        jobs += [Job("timm", n) for n in timm.list_models()]
    return jobs


def select_jobs(
    jobs: Sequence[Job],
    *,
    glob: str | None = None,
    family: str | None = None,
    sample: int | None = None,
    per_module: int | None = None,
    seed: int = 0,
    shard: tuple[int, int] | None = None,
) -> list[Job]:
    """Filter by name glob and family, take a seeded sample (`per_module` models from each
    defining module and/or `sample` models in all, kept in the original order), then the
    `shard` (k, n): every n-th model from the k-th (1-based), so n shards cover it once.

    The same library versions list the same models, so the same arguments select the same
    models on any machine."""
    chosen = [j for j in jobs if glob is None or fnmatch.fnmatchcase(j.name, glob)]
    if family is not None:
        chosen = [j for j in chosen if family_of(j.source, j.name) == family]
    if per_module is not None:
        rng = random.Random(seed)
        groups: dict[tuple[str, str], list[Job]] = defaultdict(list)
        for job in chosen:
            groups[(job.source, family_of(job.source, job.name))].append(job)
        picked = {
            job
            for members in groups.values()
            for job in rng.sample(members, min(per_module, len(members)))
        }
        chosen = [j for j in chosen if j in picked]
    if sample is not None and sample < len(chosen):
        keep = set(random.Random(seed).sample(range(len(chosen)), sample))
        chosen = [j for i, j in enumerate(chosen) if i in keep]
    if shard is not None:
        k, n = shard
        chosen = chosen[k - 1 :: n]
    return chosen


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N` (1 <= K <= N) as (K, N); argparse reports a ValueError as a usage error."""
    found = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if found is None or not 1 <= int(found.group(1)) <= int(found.group(2)):
        raise argparse.ArgumentTypeError(
            f"--shard takes K/N with 1 <= K <= N, e.g. 2/4, not {text!r}"
        )
    return int(found.group(1)), int(found.group(2))


# ---------------------------------------------------------------------------------------------
# Sizes and the model-specific settings (the one place for per-family special cases)


def reduced_size(
    default: Sequence[int], side: int = REDUCED_SIDE, max_frames: int | None = 8
) -> tuple[int, ...]:
    """The default input size with its smaller spatial side scaled to `side` (multiples of 8);
    video clips keep `max_frames` frames at most. Never larger than the default."""
    size = list(default)
    spatial = size[-2:]
    scale = min(1.0, side / min(spatial))
    size[-2:] = [max(8, round(s * scale / 8) * 8) if scale < 1 else s for s in spatial]
    if len(size) == 4 and max_frames is not None:
        size[1] = min(size[1], max_frames)
    return tuple(size)


def candidate_sizes(default: Sequence[int], side: int = REDUCED_SIDE) -> list[tuple[int, ...]]:
    """Input sizes to try in order: reduced (video: 8 frames), twice that (video: all frames),
    the default."""
    out: list[tuple[int, ...]] = []
    sizes = (
        reduced_size(default, side),
        reduced_size(default, side * 2, max_frames=None),
        tuple(default),
    )
    for size in sizes:
        if size not in out:
            out.append(size)
    return out


def fixed_input_size(source: str, name: str) -> bool:
    """True for timm models whose pretrained config says the input size is fixed (ViTs)."""
    if source != "timm":
        return False
    import timm

    cfg = timm.get_pretrained_cfg(name)
    return bool(cfg is not None and getattr(cfg, "fixed_input_size", False))


def model_kwargs(job: Job, size: Sequence[int] | None) -> dict[str, Any]:
    """Factory kwargs the sweep adds for a model at a given input size (recorded and replayed).

    - torchvision detection: the internal resize (800–1333 px by default) follows the input
      size instead, so the detector runs at the sweep's size; SSDs have one fixed `size`.
    - torchvision ViTs and timm models with a fixed input size: `image_size` / `img_size`
      set to the size used.
    """
    if size is None:
        return {}
    height, width = int(size[-2]), int(size[-1])
    if job.source == "torchvision" and task_of(job.source, job.name) == "detection":
        if job.name.startswith("ssd"):
            return {}  # SSD's transform size is part of its anchors
        return {"min_size": min(height, width), "max_size": max(height, width)}
    if job.source == "torchvision" and family_of(job.source, job.name) == "vision_transformer":
        return {"image_size": height} if height == width else {}
    if fixed_input_size(job.source, job.name):
        return {"img_size": height if height == width else [height, width]}
    return {}


def size_attempts(
    job: Job, default: Sequence[int], side: int = REDUCED_SIDE
) -> list[tuple[tuple[int, ...], dict[str, Any]]]:
    """(input size, factory kwargs) to try in order: each candidate size with `model_kwargs`;
    for timm, a reduced size is tried again with `img_size` when the model rejects it as
    built (position embeddings for its default size that the config does not declare fixed)."""
    attempts: list[tuple[tuple[int, ...], dict[str, Any]]] = []
    for size in candidate_sizes(default, side):
        kwargs = model_kwargs(job, size)
        attempts.append((size, kwargs))
        if job.source == "timm" and not kwargs and size != tuple(default):
            height, width = int(size[-2]), int(size[-1])
            attempts.append((size, {"img_size": height if height == width else [height, width]}))
    return attempts


# ---------------------------------------------------------------------------------------------
# One model


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _reason(exc: BaseException) -> str:
    """A surgeon error's own message; anything else is a traceback-class failure."""
    from surgeon.errors import SurgeonError

    if isinstance(exc, SurgeonError):
        return str(exc).strip().splitlines()[0][:500]
    return "traceback: " + _one_line(exc)


def _leaves(value: Any) -> tuple[list[Any], str]:
    from torch.utils._pytree import tree_flatten

    leaves, spec = tree_flatten(value)
    return leaves, str(spec)


def _bit_identical(a: Any, b: Any) -> str | None:
    """None if the two outputs have the same structure and equal tensors bit for bit."""
    import torch

    la, sa = _leaves(a)
    lb, sb = _leaves(b)
    if sa != sb:
        return "the reloaded model's output structure differs"
    for i, (x, y) in enumerate(zip(la, lb, strict=True)):
        if isinstance(x, torch.Tensor):
            if not isinstance(y, torch.Tensor) or x.shape != y.shape or x.dtype != y.dtype:
                return f"output {i}: shape or dtype differs after reload"
            if not torch.equal(x, y) and not (
                x.is_floating_point()
                and torch.equal(x.isnan(), y.isnan())
                and torch.equal(x.nan_to_num(), y.nan_to_num())
            ):
                diff = (x.double() - y.double()).abs().max().item()
                return f"output {i} differs after reload (max abs {diff:.3g})"
    return None


def _forward(model: Any, args: tuple[Any, ...]) -> Any:
    import torch

    with torch.no_grad():
        return model(*args)


def _exactness(
    report: Any, original: Callable[[], Any], args: tuple[Any, ...]
) -> tuple[str | None, str | None]:
    """(why a policy that claims exact transfers is not exact or None, a note or None).

    Every exact site is checked on its own first. The whole-model check then allows for models
    that amplify rounding: some random-init networks (timm's efficientnetv2_m/l/xl) move their
    output far beyond the tolerance when a single layer's output changes in its last float32
    bit, so an exact transfer can still change the output. Such a difference passes only when both
    hold: every patched site is within `AMPLIFICATION_MARGIN` times float32 rounding
    (`ROUNDING`) of the original site, and the original model (built by `original()`, only
    when needed), with its patched sites' outputs perturbed by that fixed rounding, moves its
    output at least 1/`AMPLIFICATION_MARGIN` as much. The noise is fixed, not taken from the
    observed site error, so a site much worse than rounding cannot excuse itself; the record
    then says what was measured."""
    patched = [r for r in report.rows if r.status == "patched"]
    for row in patched:
        if row.transfer == "exact" and row.rel_diff is not None and row.rel_diff > EXACT_TOLERANCE:
            diff = f"{row.rel_diff:.2e}"
            return f"site {row.site}: transfer 'exact' but its output differs by {diff}", None
    all_exact = bool(patched) and all(r.transfer == "exact" for r in patched)
    if not all_exact or report.output_rel_diff <= EXACT_TOLERANCE:
        return None, None
    bound = AMPLIFICATION_MARGIN * ROUNDING
    worst = max(patched, key=lambda r: r.rel_diff or 0.0)
    site_diff = worst.rel_diff or 0.0
    if site_diff > bound:
        return (
            f"the output differs by {report.output_rel_diff:.2e} and site {worst.site}'s output "
            f"by {site_diff:.2e}, more than float32 rounding can explain "
            f"({AMPLIFICATION_MARGIN:g} x {ROUNDING:g}): an exact transfer that is not exact"
        ), None
    own = rounding_sensitivity(original(), args, [r.site for r in patched], ROUNDING)
    if own >= report.output_rel_diff / AMPLIFICATION_MARGIN:
        return None, (
            f"the output differs by {report.output_rel_diff:.2e} with every site exact to "
            f"{site_diff:.1e}: the original model amplifies rounding (perturbing its patched "
            f"sites' outputs by a relative {ROUNDING:.0e} moves its output by {own:.2e})"
        )
    return (
        f"every transfer is exact but the model output differs by "
        f"{report.output_rel_diff:.2e} (> {EXACT_TOLERANCE:g}; the original moves only "
        f"{own:.2e} under float32 rounding at its patched sites)"
    ), None


def rounding_sensitivity(
    model: Any, args: tuple[Any, ...], sites: Sequence[str], noise: float, seed: int = 0
) -> float:
    """Relative output change of `model` when the outputs of `sites` (module paths; a site
    that is no module, a functional call, perturbs the model inputs instead) are multiplied by
    1 + noise·N(0, 1): how much this model amplifies rounding-sized changes at those sites."""
    import torch
    from torch.utils._pytree import tree_map

    from surgeon.patch import _diff, _tensors

    generator = torch.Generator().manual_seed(seed)

    def perturb(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            scale = torch.randn(value.shape, generator=generator, dtype=torch.float64)
            return (value.double() * (1 + noise * scale)).to(value.dtype)
        return value

    reference = _forward(model, args)
    modules = dict(model.named_modules())
    hooks = [
        modules[s].register_forward_hook(lambda _m, _i, out: tree_map(perturb, out))
        for s in sites
        if s in modules
    ]
    inputs = args if len(hooks) == len(sites) else tree_map(perturb, args)
    try:
        moved = _forward(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return _diff(_tensors(reference), _tensors(moved))[1]


def builtin_policies() -> list[str]:
    """The stems of the built-in policies in configs/."""
    from surgeon.policy_loader import list_builtin_policies

    return [name for name, _ in list_builtin_policies()]


class Originals:
    """Unpatched models of one size for the policies to patch in place, one at a time.

    With `keep` the first model stays unpatched in memory and each policy gets a deep copy;
    without, each policy gets a fresh build from `rebuild` (same seed, same weights) and
    nothing else is held, so a model that does not fit twice over runs all the same."""

    def __init__(self, first: Any, rebuild: Callable[[], Any], *, keep: bool) -> None:
        self.keep = keep
        self._rebuild = rebuild
        self._kept = first if keep else None
        self._spare = None if keep else first  # the first build serves the first policy

    def fresh(self) -> Any:
        """A LoadedModel whose model no one else holds: patch it in place."""
        spare, self._spare = self._spare, None
        if spare is not None:
            return spare
        if self._kept is not None:
            return dataclasses.replace(self._kept, model=copy.deepcopy(self._kept.model))
        return self._rebuild()

    def put_back(self, loaded: Any) -> None:
        """Take back a model a policy left untouched (no edit made), for the next policy."""
        self._spare = loaded

    def original(self) -> Any:
        """The unpatched model (the kept one, else a fresh build) for the rounding check."""
        return self._kept.model if self._kept is not None else self._rebuild().model


def memory_plan(params: int, memory_gib: float, max_params: int | None = None) -> str | None:
    """How a model of `params` parameters runs under the budget: "keep" (the original kept
    beside each policy's copy), "rebuild" (built afresh per policy), or None: it cannot fit
    (its checkpoint reload alone holds two float32 copies) or exceeds `max_params`."""
    budget = memory_gib * 2**30
    if max_params is not None and params > max_params:
        return None
    if params * BYTES_PER_PARAM * LOAD_COPIES > budget:
        return None
    return "keep" if params * BYTES_PER_PARAM * KEEP_COPIES <= budget else "rebuild"


def _check_policy(
    originals: Originals,
    args: tuple[Any, ...],
    policy_name: str,
    progress: Progress,
    checked: dict[tuple[Any, ...], str] | None = None,
) -> dict[str, Any]:
    """Patch an unpatched model in place with one policy, verify, save, drop it, reload,
    compare; one result dict.

    `checked` maps the edits of policies already round-tripped on this model to their name: a
    policy whose edits are the same (spd and spd-all on a model without max pools; any two
    that patch nothing) would save the same checkpoint, so its round trip is not repeated."""
    from surgeon.api import load, save
    from surgeon.patch import patch, resolve_policy

    result: dict[str, Any] = {"status": "fail", "reason": ""}
    stage = "patch"
    try:
        policy = resolve_policy(policy_name)
        loaded = originals.fresh()
        progress(f"{policy_name}: patch")
        start = time.perf_counter()
        patched, report = patch(loaded.model, policy, args, model_name=loaded.spec.text)
        result["patch_s"] = round(time.perf_counter() - start, 3)
        result["patched"] = report.patched
        result["skipped"] = report.skipped
        result["transfers"] = dict(
            Counter(r.transfer for r in report.rows if r.status == "patched" and r.transfer)
        )
        result["output_rel_diff"] = report.output_rel_diff
        skips = Counter(r.note for r in report.rows if r.status == "skipped")
        if skips:
            result["skip_reasons"] = dict(skips)
        if report.notes:
            result["notes"] = list(report.notes)
        inexact, amplified = _exactness(report, originals.original, args)
        if inexact is not None:
            result["reason"] = inexact
            return result
        if amplified is not None:
            result["rounding"] = amplified
        edits = tuple((r.site, r.status, r.replacement, r.transfer) for r in report.rows)
        outcome = _passed(result, report)
        if checked is not None and edits in checked:
            result["roundtrip"] = f"as {checked[edits]} (the same edits)"
            if not report.ops:  # nothing was edited: the model is still the original
                originals.put_back(loaded)
            return outcome
        stage = "save"
        progress(f"{policy_name}: save + load")
        start = time.perf_counter()
        expected = _forward(patched, args)
        size = sum(t.numel() * t.element_size() for t in patched.state_dict().values())
        # a user factory (`pkg.mod:fn`, the sweep's own tests) is trusted: we built it
        trusted = [loaded.spec.text] if loaded.spec.source == "import" else []
        edited = bool(report.ops)
        with tempfile.TemporaryDirectory(prefix="surgeon-sweep-", dir=_scratch(size)) as tmp:
            directory = Path(tmp) / "ckpt"
            save(directory, patched, loaded, report, policy.to_dict())
            # the patched model (and the new layers the report's edits hold) are not needed
            # any more: drop them before the reload builds its own copy
            described = dataclasses.replace(loaded, model=None)
            del loaded, patched, report
            _release_memory()
            stage = "load"
            reloaded = load(directory, trust_import=trusted)
        stage = "compare"
        mismatch = _bit_identical(expected, _forward(reloaded, args))
        result["roundtrip_s"] = round(time.perf_counter() - start, 3)
        if mismatch is not None:
            result.update(status="fail", reason=mismatch)
            return result
        if not edited:  # the reloaded model is the original, bit for bit: the next one's
            originals.put_back(dataclasses.replace(described, model=reloaded))
        if checked is not None:
            checked[edits] = policy_name
        return outcome
    except Exception as exc:
        result["status"] = "fail"
        result["reason"] = (f"{stage}: " if stage != "patch" else "") + _reason(exc)
        if _not_applicable(exc, stage, policy_name):
            result["status"] = "skip"
        elif not _is_surgeon_error(exc):
            result["traceback"] = traceback.format_exc(limit=-8)
    return result


def _passed(result: dict[str, Any], report: Any) -> dict[str, Any]:
    """The outcome of a verified policy: pass when it patched sites, else no sites."""
    result["status"] = "pass" if report.patched else "no sites"
    patchify = sum(r.role == "patchify" and r.status != "patched" for r in report.rows)
    result["reason"] = (
        f"{report.patched} patched"
        + (f", {report.skipped} skipped" if report.skipped else "")
        + (f", {patchify} patchify conv(s) left alone" if patchify else "")
        + (", nothing to patch" if not report.patched and not report.skipped else "")
    )
    return result


MOVES_STRIDES = ("dilate", "relocate")


def _not_applicable(exc: BaseException, stage: str, policy_name: str) -> bool:
    """A policy that changes map sizes (dilate, relocate) and that patch() refuses because the
    model cannot run with them (a join whose other branch could not change, a position table
    built for the original size) does not apply to this model: a skip with patch()'s reason,
    not a failure. Any other policy keeps every map size, so the same refusal is a bug."""
    from surgeon.errors import PatchError
    from surgeon.patch import resolve_policy

    if stage != "patch" or not isinstance(exc, PatchError):
        return False
    if not str(exc).startswith("the patched model fails"):
        return False
    return any(rule.action in MOVES_STRIDES for rule in resolve_policy(policy_name).rules)


def _release_memory() -> None:
    """Free the policy's copies before the next one: collect, then hand freed heap back to the
    system (glibc keeps it otherwise, and a big model's RSS would creep up policy by policy)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _scratch(nbytes: int) -> str | None:
    """Where a round-trip checkpoint goes: RAM-backed for one under 1 GiB where there is such a
    directory (disk writes with their fsyncs take longer than the rest of the check), disk for
    larger ones, where they do not count against memory. A worker gets both from its parent,
    which deletes them with the worker: a killed worker cannot clean up after itself."""
    if nbytes < 2**30:
        return os.environ.get(_SHM_ENV) or (
            str(_SHM) if _SHM.is_dir() and os.access(_SHM, os.W_OK) else None
        )
    return os.environ.get(_DISK_ENV) or None


def _is_surgeon_error(exc: BaseException) -> bool:
    from surgeon.errors import SurgeonError

    return isinstance(exc, SurgeonError)


def _param_count(job: Job) -> int | None:
    """Parameters of the model built on the meta device (no memory, no init), if it builds."""
    import torch

    from surgeon.models import load_model

    try:
        with torch.device("meta"):
            model = load_model(job.key).model
    except Exception:  # some factories touch real data at build time; fall back to building
        return None
    return sum(p.numel() for p in model.parameters())


def _too_big(params: int, memory_gib: float, max_params: int | None) -> str:
    if max_params is not None and params > max_params:
        return f"{params / 1e9:.2f}B parameters: over --max-params {max_params:,}"
    need = params * BYTES_PER_PARAM * LOAD_COPIES / 2**30
    return (
        f"{params / 1e9:.2f}B parameters: reloading its checkpoint holds two float32 copies "
        f"({need:.1f} GiB), over the sweep's {memory_gib:g} GiB memory budget"
    )


def sweep_model(
    job: Job,
    *,
    policies: Sequence[str] | None = None,
    side: int = REDUCED_SIDE,
    memory_gib: float = DEFAULT_MEMORY_GIB,
    max_params: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Build, scan, patch with every policy, verify and round-trip one model: its record."""
    from surgeon.models import example_inputs, load_model
    from surgeon.scan import scan

    say = progress or (lambda _text: None)
    started = time.perf_counter()
    record: dict[str, Any] = {
        "source": job.source,
        "name": job.name,
        "task": task_of(job.source, job.name),
        "family": family_of(job.source, job.name),
        "status": "fail",
        "reason": "",
    }
    names = list(policies) if policies is not None else builtin_policies()
    try:
        say("size")
        params = _param_count(job)
        if params is not None and memory_plan(params, memory_gib, max_params) is None:
            reason = _too_big(params, memory_gib, max_params)
            record.update(
                status="skip",
                params=params,
                reason=reason,
                policies={p: {"status": "skip", "reason": reason} for p in names},
            )
            return record
        say("build")
        start = time.perf_counter()
        loaded = load_model(job.key, seed=0)
        record["build_s"] = round(time.perf_counter() - start, 3)
        record["params"] = sum(p.numel() for p in loaded.model.parameters())
        say(f"built {record['params'] / 1e6:.0f}M parameters")
        plan = memory_plan(record["params"], memory_gib, max_params)
        if plan is None:  # the meta-device count failed: the build says it now
            record.update(status="skip", reason=_too_big(record["params"], memory_gib, max_params))
            return record
        record["memory_plan"] = plan
        default = tuple(loaded.input_size)
        record["default_size"] = list(default)
        tried: list[str] = []
        chosen: tuple[Any, Any, tuple[int, ...], dict[str, Any]] | None = None
        for size, kwargs in size_attempts(job, default, side):
            say(f"try {'x'.join(map(str, size))}")
            model_at = loaded
            if kwargs:
                try:
                    model_at = load_model(job.key, kwargs=kwargs, seed=0)
                except Exception as exc:  # this model does not take the size kwarg: next size
                    tried.append(f"{'x'.join(map(str, size))} {kwargs}: {_one_line(exc)}")
                    continue
            model_at.input_size = size
            args = example_inputs(model_at.task, size)
            try:
                _forward(model_at.model, args)
            except Exception as exc:  # the original model rejects this size: try the next
                tried.append(f"{'x'.join(map(str, size))} {kwargs or ''}: {_one_line(exc)}")
                continue
            chosen = (model_at, args, size, kwargs)
            break
        if tried:
            record["sizes_rejected"] = tried
        if chosen is None:
            record["reason"] = (
                "the original model fails on every input size tried: " + tried[-1]
                if tried
                else "no input size to try"
            )
            return record
        loaded, args, size, kwargs = chosen
        del chosen
        record["input_size"] = list(size)
        record["kwargs"] = dict(loaded.spec.kwargs)
        say("scan")
        start = time.perf_counter()
        result = scan(loaded.model, args)
        record["scan_s"] = round(time.perf_counter() - start, 3)
        record["sites"] = len(result.sites)
        record["downsampling"] = len(result.downsampling)
        record["roles"] = dict(Counter(s.role for s in result.sites))
        record["found_by"] = sorted({s.found_by.split(" ")[0] for s in result.sites})
        record["regions"] = sorted({r.method for r in result.regions})
        del result

        def rebuild(kwargs: dict[str, Any] = kwargs, size: tuple[int, ...] = size) -> Any:
            say("rebuild")
            built = load_model(job.key, kwargs=kwargs or None, seed=0)
            built.input_size = size
            return built

        originals = Originals(loaded, rebuild, keep=plan == "keep")
        del loaded
        outcomes: dict[str, dict[str, Any]] = {}
        checked: dict[tuple[Any, ...], str] = {}
        for name in names:
            outcomes[name] = _check_policy(originals, args, name, say, checked)
            _release_memory()  # the policy's models are gone now: give their memory back
        record["policies"] = outcomes
        record["status"] = model_outcome(record)
        failing = [f"{n}: {o['reason']}" for n, o in outcomes.items() if o["status"] == "fail"]
        record["reason"] = "; ".join(failing) if failing else ""
        times = [o["patch_s"] for o in outcomes.values() if "patch_s" in o]
        if times:
            record["patch_median_s"] = round(statistics.median(times), 3)
    except Exception as exc:
        record["status"] = "fail"
        record["reason"] = _reason(exc)
        if not _is_surgeon_error(exc):
            record["traceback"] = traceback.format_exc(limit=-8)
    finally:
        record["total_s"] = round(time.perf_counter() - started, 3)
    return record


def policy_outcome(outcome: Mapping[str, Any]) -> str:
    """One policy's outcome class. Records written before "no sites" was its own class say
    "pass" with 0 patched: that is no sites too."""
    status = str(outcome.get("status", "fail"))
    if status == "pass" and outcome.get("patched") == 0:
        return "no sites"
    return status


def model_outcome(record: Mapping[str, Any]) -> str:
    """A model's outcome class: fail if any policy failed, else pass if any patched and
    verified sites, else no sites if any policy had nothing to patch, else skip (every policy
    skipped, or the model was not checked at all; its `reason` says why)."""
    policies = record.get("policies") or {}
    if not policies:  # stopped before any policy ran: a failure, or a skip with its reason
        status = str(record.get("status"))
        return status if status in OUTCOMES else "fail"
    outcomes = {policy_outcome(o) for o in policies.values()}
    for status in ("fail", "pass", "no sites"):
        if status in outcomes:
            return status
    return "skip"


# ---------------------------------------------------------------------------------------------
# The worker subprocess: one process runs models until it is killed or told to stop


def worker_main(out_fd: int, threads: int = 0) -> None:
    """Read jobs (JSON lines) on stdin; write stage and result messages to `out_fd`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    out = os.fdopen(out_fd, "w", buffering=1)

    def send(message: dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    import warnings

    import torch

    warnings.simplefilter("ignore")
    if threads:
        torch.set_num_threads(threads)
    send({"ready": True})
    for line in sys.stdin:
        if not line.strip():
            continue
        spec = json.loads(line)
        job = Job(spec["source"], spec["name"])
        record = sweep_model(
            job,
            policies=spec.get("policies"),
            side=int(spec.get("side", REDUCED_SIDE)),
            memory_gib=float(spec.get("memory_gib", DEFAULT_MEMORY_GIB)),
            max_params=spec.get("max_params"),
            progress=lambda text: send({"stage": text}),
        )
        send({"record": record})


def _rss_gib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


_SHM = Path("/dev/shm")
_SHM_ENV, _DISK_ENV = "SURGEON_SWEEP_SHM", "SURGEON_SWEEP_DISK"


class Worker:
    """A worker subprocess running `worker_main`; killed and replaced when a model overruns."""

    def __init__(self, nice: int = 0, threads: int = 0) -> None:
        shm = str(_SHM) if _SHM.is_dir() and os.access(_SHM, os.W_OK) else None
        self.scratch = [
            tempfile.mkdtemp(prefix="surgeon-sweep-", dir=shm),
            tempfile.mkdtemp(prefix="surgeon-sweep-"),
        ]
        read_fd, write_fd = os.pipe()
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(write_fd)]
        command += ["--threads", str(threads)]
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as the worker)
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            pass_fds=(write_fd,),
            text=True,
            cwd=ROOT,
            env={
                **os.environ,
                _SHM_ENV: self.scratch[0],
                _DISK_ENV: self.scratch[1],
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
                ),
            },
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )
        os.close(write_fd)
        self.messages = read_fd
        self.pending = b""  # bytes read past the last complete message
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.messages, selectors.EVENT_READ)

    def send(self, job: Job, settings: Mapping[str, Any]) -> None:
        """Start `job` with `settings` (policies, side, memory_gib, max_params)."""
        assert self.process.stdin is not None
        payload = {"source": job.source, "name": job.name, **settings}
        self.process.stdin.write(json.dumps(payload) + "\n")
        self.process.stdin.flush()

    def receive(self, timeout: float) -> dict[str, Any] | None:
        """The next message, None on timeout; raises EOFError when the worker died.

        Reads the pipe unbuffered: a buffered reader can hold a whole message the selector no
        longer sees, and the sweep would wait on it until the model's time budget ran out."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left < 0 or not self.selector.select(left):
                return None
            chunk = os.read(self.messages, 1 << 16)
            if not chunk:
                raise EOFError
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    def tail(self, lines: int = 3) -> str:
        self.log.seek(0)
        text = self.log.read().strip().splitlines()
        return " | ".join(text[-lines:])[-300:]

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.process.kill()
        self.process.wait()
        self.selector.close()
        os.close(self.messages)
        for directory in self.scratch:
            shutil.rmtree(directory, ignore_errors=True)
        self.log.close()


def run_in_worker(
    worker: Worker,
    job: Job,
    *,
    policies: Sequence[str] | None,
    side: int,
    timeout_s: float,
    memory_gib: float,
    on_stage: Progress,
    max_params: int | None = None,
) -> tuple[dict[str, Any], bool]:
    """Run one job in the worker; (record, worker still usable)."""
    started = time.monotonic()
    stages: list[str] = []
    settings = {"policies": policies, "side": side, "memory_gib": memory_gib}
    worker.send(job, {**settings, "max_params": max_params})
    peak = 0.0
    while True:
        elapsed = time.monotonic() - started
        try:
            message = worker.receive(min(1.0, max(0.0, timeout_s - elapsed)))
        except EOFError:
            code = worker.process.wait()
            if code == -signal.SIGKILL:  # we did not send it: the kernel's out-of-memory killer
                reason = (
                    f"out of memory: the kernel killed the worker during {_last(stages)} "
                    f"({_built(stages)}; the machine's memory is shared)"
                )
                record = _killed(job, reason, stages, skip=True)
            else:
                why = f"signal {-code}" if code < 0 else f"exit code {code}"
                record = _killed(job, f"the worker died ({why}) during {_last(stages)}", stages)
            record["worker_log"] = worker.tail()
            return record, False
        if message is None or "stage" in message:  # budgets are checked between messages
            peak = max(peak, _rss_gib(worker.process.pid))
            if peak > memory_gib:
                return _killed(
                    job,
                    f"over the sweep's {memory_gib:g} GiB memory budget during {_last(stages)} "
                    f"({_built(stages)})",
                    stages,
                    skip=True,
                ), False
            if time.monotonic() - started >= timeout_s:
                record = _killed(
                    job,
                    f"over the sweep's {timeout_s:g} s per-model budget during {_last(stages)} "
                    f"({_built(stages)})",
                    stages,
                    skip=True,
                )
                record["worker_log"] = worker.tail()
                return record, False
        if message is None:
            continue
        if "stage" in message:
            stages.append(str(message["stage"]))
            on_stage(str(message["stage"]))
        elif "record" in message:
            record = message["record"]
            record["wall_s"] = round(time.monotonic() - started, 3)
            record["peak_rss_gib"] = round(max(peak, _rss_gib(worker.process.pid)), 2)
            return record, True


def _last(stages: Sequence[str]) -> str:
    return stages[-1] if stages else "start-up"


def _built(stages: Sequence[str]) -> str:
    return next((s for s in stages if s.startswith("built")), "not built yet")


def _killed(job: Job, reason: str, stages: Sequence[str], *, skip: bool = False) -> dict[str, Any]:
    """The record of a model whose worker was killed: what was reached, and why it stopped."""
    record: dict[str, Any] = {
        "source": job.source,
        "name": job.name,
        "task": task_of(job.source, job.name),
        "family": family_of(job.source, job.name),
        "status": "skip" if skip else "fail",
        "reason": reason,
        "stages": list(stages)[-6:],
    }
    return record


# ---------------------------------------------------------------------------------------------
# Results file: append + flush per model, last record per model wins


def read_results(path: Path) -> dict[str, dict[str, Any]]:
    """Records by `source:name`; a later line for the same model replaces an earlier one, and a
    torn last line (an interrupted write) is ignored."""
    records: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return records
    with path.open(encoding="utf-8") as file:
        for line in file:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "source" in record and "name" in record:
                records[Job(record["source"], record["name"]).key] = record
    return records


def append_result(file: IO[str], record: dict[str, Any]) -> None:
    file.write(json.dumps(record, sort_keys=True) + "\n")
    file.flush()
    os.fsync(file.fileno())


class ResultsBusy(Exception):
    """A sweep is appending to the results file."""


def _lock(file: IO[str], path: Path) -> None:
    """Hold an exclusive lock on the results file while a sweep appends to it or it is compacted;
    compacting replaces the file, and a running sweep would go on appending to the old one."""
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ResultsBusy(f"{path} is in use by a running sweep; wait for it or stop it") from None


def _order(key: str) -> tuple[bool, str]:
    return key.split(":")[0] != "torchvision", key


def _write_results(path: Path, records: Mapping[str, Mapping[str, Any]]) -> None:
    """Replace the results file atomically: one line per model, torchvision first, by name."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as file:
        for key in sorted(records, key=_order):
            file.write(json.dumps(records[key], sort_keys=True) + "\n")
    tmp.replace(path)


def compact_results(path: Path) -> int:
    """Rewrite the results file with one line per model (the latest), atomically; refuses
    (ResultsBusy) while a sweep is appending to it."""
    with path.open("a", encoding="utf-8") as held:
        _lock(held, path)
        records = read_results(path)
        _write_results(path, records)
    return len(records)


def _when(record: Mapping[str, Any]) -> str:
    return str(record.get("finished") or (record.get("provenance") or {}).get("recorded") or "")


@dataclass(frozen=True)
class Merged:
    """What `merge_results` did: models in the merged file, records taken from the shard
    files, and shards missing from a K/N series (named as "K/N")."""

    models: int
    taken: int
    missing_shards: tuple[str, ...]


def merge_results(path: Path, shards: Sequence[Path]) -> Merged:
    """Merge shard files into the results file (kept as the base): per model the record that
    finished last wins, ties going to the larger JSON text, so any order of the same files
    gives the same file. Refuses (ResultsBusy) while a sweep appends to the results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as held:
        _lock(held, path)
        merged = read_results(path)
        taken = 0
        series: dict[int, set[int]] = defaultdict(set)
        for shard in sorted(set(shards)):
            for key, record in read_results(shard).items():
                spec = str((record.get("settings") or {}).get("shard") or "")
                if "/" in spec:
                    k, n = spec.split("/")
                    series[int(n)].add(int(k))
                old = merged.get(key)
                if old is None or (_when(record), json.dumps(record, sort_keys=True)) > (
                    _when(old),
                    json.dumps(old, sort_keys=True),
                ):
                    merged[key] = record
                    taken += 1
        _write_results(path, merged)
    missing = tuple(
        f"{k}/{n}" for n, seen in sorted(series.items()) for k in range(1, n + 1) if k not in seen
    )
    return Merged(len(merged), taken, missing)


def not_passed(jobs: Iterable[Job], records: Mapping[str, dict[str, Any]]) -> list[Job]:
    """The jobs whose recorded result is a failure or a skip (`--rerun-failed`); models with
    no record yet are left to a normal run."""
    return [
        j for j in jobs if j.key in records and model_outcome(records[j.key]) in ("fail", "skip")
    ]


def pending_jobs(
    jobs: Iterable[Job],
    done: Mapping[str, dict[str, Any]] | Iterable[str],
    *,
    policies: Sequence[str] = (),
    rerun: bool = False,
) -> list[Job]:
    """The jobs still to run: those with no record, or whose record ran policies but not all of
    `policies` (a policy added since); every job with `rerun`."""
    records = done if isinstance(done, Mapping) else {key: {} for key in done}

    def finished(job: Job) -> bool:
        record = records.get(job.key)
        if record is None:
            return False
        ran = record.get("policies")
        return not ran or set(policies) <= set(ran)

    return [j for j in jobs if rerun or not finished(j)]


def policy_files(names: Iterable[str]) -> list[Path]:
    """The YAML files of the built-in policies named (their hashes go into provenance)."""
    from surgeon.policy_loader import BUILTIN_POLICY_DIR

    return [
        path
        for name in names
        for path in (BUILTIN_POLICY_DIR / f"{name}.yaml", BUILTIN_POLICY_DIR / f"{name}.yml")
        if path.is_file()
    ]


def run_sweep(
    jobs: Sequence[Job],
    results: Path,
    *,
    policies: Sequence[str] | None = None,
    side: int = REDUCED_SIDE,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_gib: float = DEFAULT_MEMORY_GIB,
    max_params: int | None = None,
    nice: int = 0,
    threads: int = 0,
    rerun: bool = False,
    quiet: bool = False,
    command: Sequence[str] | None = None,
    shard: tuple[int, int] | None = None,
    listed: Mapping[str, int] | None = None,
) -> int:
    """Run the pending jobs in a worker subprocess, appending one record per model; returns the
    number of models run. Ctrl-C stops after killing the worker; finished records are kept.

    Each record carries the provenance of the worker that ran it (taken when the worker
    starts, as it imports the code), the settings of this run, its `shard` and how many
    models its source `listed` (the page's denominators)."""
    from provenance import provenance
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as RichProgress

    wanted = list(policies) if policies is not None else builtin_policies()
    todo = pending_jobs(jobs, read_results(results), policies=wanted, rerun=rerun)
    console = Console(stderr=True, quiet=quiet)
    console.print(
        f"{len(jobs)} models selected, {len(jobs) - len(todo)} already recorded, "
        f"{len(todo)} to run; results in {results}"
    )
    if not todo:
        return 0
    results.parent.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {
        "side": side,
        "timeout_s": timeout_s,
        "memory_gib": memory_gib,
        "max_params": max_params,
        "threads": threads,
        "shard": f"{shard[0]}/{shard[1]}" if shard else None,
    }
    argv = list(command) if command is not None else sys.argv
    worker: Worker | None = None
    prov: dict[str, Any] = {}
    done = 0
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with (
        results.open("a", encoding="utf-8") as file,
        RichProgress(*columns, console=console, transient=True) as bar,
    ):
        _lock(file, results)
        if results.stat().st_size and not results.read_bytes().endswith(b"\n"):
            file.write("\n")  # end a line torn by an interrupted write, so the next one is whole
        task = bar.add_task("starting", total=len(todo))
        try:
            for job in todo:
                bar.update(task, description=f"{job.key}")
                if worker is None:
                    prov = provenance(argv, policies=policy_files(wanted))
                    worker = Worker(nice, threads)
                    ready = worker.receive(120.0)
                    if not ready:
                        raise RuntimeError(f"the sweep worker did not start: {worker.tail()}")

                def stage(text: str, key: str = job.key) -> None:
                    bar.update(task, description=f"{key} [dim]{text}[/dim]")

                record, usable = run_in_worker(
                    worker,
                    job,
                    policies=policies,
                    side=side,
                    timeout_s=timeout_s,
                    memory_gib=memory_gib,
                    max_params=max_params,
                    on_stage=stage,
                )
                if not usable:
                    worker.stop()
                    worker = None
                record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
                record["settings"] = settings
                if listed is not None and job.source in listed:
                    record["listed"] = listed[job.source]
                record["provenance"] = prov
                append_result(file, record)
                done += 1
                bar.advance(task)
                console.print(_line(record))
        except KeyboardInterrupt:
            console.print(f"interrupted: {done} models recorded in {results}; run again to resume")
            raise
        finally:
            if worker is not None:
                worker.stop()
    return done


def _line(record: dict[str, Any]) -> str:
    mark = {
        "pass": "[green]pass[/green]",
        "no sites": "[cyan]no sites[/cyan]",
        "fail": "[red]FAIL[/red]",
        "skip": "[yellow]skip[/yellow]",
    }
    size = "x".join(map(str, record.get("input_size", []))) or "-"
    seconds = float(record.get("wall_s", record.get("total_s", 0.0)))
    text = (
        f"{mark.get(record['status'], record['status'])} {record['source']}:{record['name']} "
        f"{size} sites {record.get('sites', '-')} {seconds:.1f}s"
    )
    if record["status"] in ("fail", "skip") and record.get("reason"):
        text += f" [dim]{record['reason'][:160]}[/dim]"
    return text


# ---------------------------------------------------------------------------------------------
# docs/coverage.md


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |"
        for row in rows
    ]
    return lines


def is_traceback(record: Mapping[str, Any]) -> bool:
    """True when a record (or one of its policies) failed with a raw exception."""
    if "traceback" in record or str(record.get("reason", "")).startswith("traceback"):
        return True
    return any("traceback" in p for p in (record.get("policies") or {}).values())


def _provenance(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record's provenance; for a record written before records carried one, only its
    finishing time (its staleness reason is then that no commit was recorded)."""
    prov = record.get("provenance")
    return dict(prov) if prov else {"recorded": record.get("finished")}


def _ran_on(record: Mapping[str, Any], current: str) -> str:
    prov = _provenance(record)
    stale = " (stale)" if stale_reason(prov, current) is not None else ""
    return short(prov.get("commit")) + stale


def _listed(records: Sequence[Mapping[str, Any]], source: str) -> int | None:
    """How many models `source` listed, as the latest record that says so recorded it."""
    known = [r for r in records if r["source"] == source and isinstance(r.get("listed"), int)]
    return int(max(known, key=_when)["listed"]) if known else None


def _classes(counter: Counter[str]) -> list[int]:
    return [counter[c] for c in OUTCOMES]


def _policies(records: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({n for r in records for n in (r.get("policies") or {})})


def _sources(records: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({r["source"] for r in records}, key=lambda s: s != "torchvision")


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 7200 else f"{seconds / 60:.1f} min"


def coverage_numbers(records: Sequence[Mapping[str, Any]], current: str) -> dict[str, Any]:
    """The counts the page and the README quote, from the records alone."""
    per_source: dict[str, dict[str, Any]] = {}
    for source in _sources(records):
        mine = [r for r in records if r["source"] == source]
        per_source[source] = {
            "listed": _listed(records, source),
            "recorded": len(mine),
            "current": sum(stale_reason(_provenance(r), current) is None for r in mine),
            "classes": Counter(model_outcome(r) for r in mine),
            "tracebacks": sum(is_traceback(r) for r in mine),
        }
    per_policy: dict[str, Counter[str]] = {name: Counter() for name in _policies(records)}
    for record in records:
        for name, outcome in (record.get("policies") or {}).items():
            per_policy[name][policy_outcome(outcome)] += 1
    return {
        "sources": per_source,
        "policies": per_policy,
        "classes": Counter(model_outcome(r) for r in records),
        "recorded": len(records),
        "current": sum(s["current"] for s in per_source.values()),
        "tracebacks": sum(s["tracebacks"] for s in per_source.values()),
    }


def coverage_claim(records: Sequence[Mapping[str, Any]], current: str) -> str:
    """The README's coverage bullet (Markdown, wrapped), every number in it from the records."""
    numbers = coverage_numbers(records, current)
    of = ", ".join(
        f"{s['recorded']} {source} models"
        + (f" of the {s['listed']} listed" if s["listed"] is not None else "")
        for source, s in numbers["sources"].items()
    )
    c = numbers["classes"]
    policies = ", ".join(
        f"`{name}` {'/'.join(map(str, _classes(counts)))}"
        for name, counts in numbers["policies"].items()
    )
    stale = numbers["recorded"] - numbers["current"]
    freshness = (
        "Every record ran on the current code."
        if not stale
        else f"{numbers['current']} of the records ran on the current code; {stale} are stale "
        "(older code, or no commit recorded) until the sweep is run again."
    )
    text = (
        f"- **Coverage** ([docs/coverage.md](docs/coverage.md)): the sweep has records of {of}. "
        f"{c['pass']} pass (sites patched and verified, no policy failing), {c['no sites']} "
        f"have no site any built-in policy patches, {c['skip']} were skipped (each with its "
        f"reason) and {c['fail']} fail; {numbers['tracebacks']} tracebacks. Per policy "
        f"(pass/no sites/skip/fail): {policies}. {freshness}"
    )
    return textwrap.fill(text, width=100, subsequent_indent="  ", break_on_hyphens=False)


def render_coverage(records: Sequence[dict[str, Any]], current: str) -> str:
    """docs/coverage.md from the sweep records alone; staleness judged against `current`."""
    numbers = coverage_numbers(records, current)
    policies = _policies(records)
    lines = [
        "# Coverage: every torchvision and timm model",
        "",
        "Generated by `python scripts/pages.py` (`make docs`) from "
        "[`sweep-results.jsonl`](sweep-results.jsonl), one record per model: do not edit by "
        "hand. Every count and measurement on this page comes from those records (the "
        "thresholds are the sweep's constants).",
        "",
        judged_line(current),
        "",
        "Each model is built with random weights (seed 0), scanned, patched in place with every "
        "built-in policy, checked (output shapes unchanged; where every patched site transfers "
        f"exactly, outputs equal to a relative {EXACT_TOLERANCE:g}, unless every site is within "
        f"{AMPLIFICATION_MARGIN:g}x float32 rounding ({ROUNDING:g}) of the original and the "
        "original model itself moves at least "
        f"1/{AMPLIFICATION_MARGIN:g} as much when the same sites' outputs are perturbed by that "
        "rounding: see the section on models that amplify rounding), saved with "
        "`surgeon.api.save`, reloaded with `surgeon.api.load` and compared bit for bit. Inputs "
        f"are reduced (smaller side {REDUCED_SIDE} px, then {REDUCED_SIDE * 2} px, then the "
        "default) to the first size the original model accepts.",
        "",
        "Outcome of each policy on each model:",
        "",
        "- **pass**: sites were patched, verified and round-tripped.",
        "- **no sites**: nothing for this policy to patch (no downsampling site it changes, "
        "e.g. only non-overlapping patchify convolutions, or only max pools under `spd`); the "
        "model was still checked and round-tripped.",
        "- **skip**: the policy does not apply, with its reason: a policy that moves strides "
        "(`dilate`) refused by `patch()` because the model cannot run with them (a join whose "
        "other branch is a functional pool or a factorised conv, a position table built for "
        "the original map size), or the model over the sweep's memory, time or parameter "
        "budget. The same refusal from a policy that keeps map sizes is a failure.",
        "- **fail**: a policy raised, changed an output shape, broke an exact transfer or did not "
        "reload bit for bit. A reason starting with `traceback:` is an unexpected exception "
        "(counted under *tracebacks*).",
        "",
        "A model's outcome is *fail* if any policy failed, else *pass* if any policy patched "
        "sites, else *no sites* if any policy had nothing to patch, else *skip*.",
        "",
        "## Summary",
        "",
    ]
    rows = []
    for source, s in numbers["sources"].items():
        listed = "not recorded" if s["listed"] is None else s["listed"]
        rows.append(
            [
                source,
                listed,
                s["recorded"],
                s["current"],
                s["recorded"] - s["current"],
                *_classes(s["classes"]),
                s["tracebacks"],
            ]
        )
    lines += _md_table(
        ["source", "listed", "recorded", "current", "stale", *OUTCOMES, "tracebacks"], rows
    )
    wall = sum(float(r.get("wall_s", r.get("total_s", 0.0))) for r in records)
    patch_times = [float(r["patch_median_s"]) for r in records if "patch_median_s" in r]
    machines = Counter(
        f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores"
        for r in records
        if (m := _provenance(r).get("machine"))
    )
    lines += [
        "",
        "*listed*: the models the source's library listed when the latest record of it ran; "
        "*current* / *stale*: records that did / did not run on the code judged against above.",
        "",
        f"- Sum of per-model wall times: {_duration(wall)} for {len(records)} models.",
    ]
    if patch_times:
        lines.append(
            f"- Median per-model patch time: {statistics.median(patch_times):.2f} s (each model's "
            "median over its policies, `patch()` only, excluding building and copying)."
        )
    if machines:
        lines.append(
            "- Machines: "
            + "; ".join(f"{name} ({count} records)" for name, count in sorted(machines.items()))
            + "."
        )
    lines += ["", "## Per policy", ""]
    lines += _md_table(
        ["policy", *OUTCOMES],
        [[f"`{n}`", *_classes(c)] for n, c in numbers["policies"].items()],
    )
    lines += ["", "## Per family and policy", ""]
    lines += [
        "Families are the modules that define the models. Each policy cell counts "
        "pass / no sites / skip / fail.",
        "",
    ]
    families: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        families[f"{record['source']} / {record['family']}"].append(record)
    matrix = []
    for family, members in sorted(families.items()):
        cells = []
        for name in policies:
            counts = Counter(
                policy_outcome(r["policies"][name])
                for r in members
                if name in (r.get("policies") or {})
            )
            cells.append("/".join(map(str, _classes(counts))))
        model_counts = Counter(model_outcome(r) for r in members)
        matrix.append([family, len(members), "/".join(map(str, _classes(model_counts))), *cells])
    lines += _md_table(["source / family", "models", "model outcome", *policies], matrix)
    lines += ["", "## Per task", ""]
    tasks: dict[str, Counter[str]] = defaultdict(Counter)
    for record in records:
        tasks[f"{record['source']} / {record['task']}"][model_outcome(record)] += 1
    lines += _md_table(
        ["source / task", *OUTCOMES, "total"],
        [[t, *_classes(c), sum(c.values())] for t, c in sorted(tasks.items())],
    )
    lines += ["", "## Which code each record ran on", ""]
    lines += commit_table((_provenance(r) for r in records), current, what="models")
    failures = [r for r in records if model_outcome(r) == "fail"]
    lines += ["", f"## Failures ({len(failures)})", ""]
    lines += (
        _md_table(
            ["model", "ran on", "reason"],
            [[f"{r['source']}:{r['name']}", _ran_on(r, current), r["reason"]] for r in failures],
        )
        if failures
        else ["None."]
    )
    skips = [r for r in records if model_outcome(r) == "skip"]
    lines += ["", f"## Skipped ({len(skips)})", ""]
    lines += (
        _md_table(
            ["model", "ran on", "reason"],
            [[f"{r['source']}:{r['name']}", _ran_on(r, current), r["reason"]] for r in skips],
        )
        if skips
        else ["None."]
    )
    partial = [
        (r, n, o)
        for r in records
        if model_outcome(r) in ("pass", "no sites")
        for n, o in (r.get("policies") or {}).items()
        if policy_outcome(o) == "skip"
    ]
    if partial:
        lines += ["", f"## Policies skipped on models that pass ({len(partial)})", ""]
        lines += _md_table(
            ["model", "policy", "ran on", "reason"],
            [
                [f"{r['source']}:{r['name']}", n, _ran_on(r, current), o["reason"]]
                for r, n, o in partial
            ],
        )
    amplified = [
        (r, n, o)
        for r in records
        for n, o in (r.get("policies") or {}).items()
        if policy_outcome(o) == "pass" and "rounding" in o
    ]
    if amplified:
        lines += ["", "## Exact transfers in models that amplify rounding", ""]
        lines += [
            "Every site of these transfers exactly (within float32 rounding of the original "
            "site), yet the model output moved: at random initialisation these networks amplify "
            "a change in the last float32 bit of a layer, and the original model moves as much "
            "under the same rounding at the same sites (measured on the original; see "
            "`rounding` in the records).",
            "",
        ]
        lines += _md_table(
            ["model", "policy", "ran on", "what was measured"],
            [
                [f"{r['source']}:{r['name']}", n, _ran_on(r, current), o["rounding"]]
                for r, n, o in amplified
            ],
        )
    sizes = Counter(
        "default" if r.get("input_size") == r.get("default_size") else "reduced"
        for r in records
        if "input_size" in r
    )
    plans = Counter(str(r["memory_plan"]) for r in records if "memory_plan" in r)
    lines += [
        "",
        "## Input sizes and memory",
        "",
        f"{sizes['reduced']} models ran at a reduced size, {sizes['default']} needed their "
        "default size; each record's `input_size`, `kwargs` and `sizes_rejected` say which and "
        "why.",
    ]
    if plans:
        lines += [
            "",
            f"{plans['keep']} models kept their unpatched original in memory beside each "
            f"policy's copy; {plans['rebuild']} were built afresh for each policy (their "
            "parameters did not fit the memory budget four times over); each record's "
            "`memory_plan` and `peak_rss_gib` say which and how much.",
        ]
    lines += ["", *RUN_PLAN]
    return "\n".join(lines) + "\n"


RUN_PLAN = [
    "## How to re-run",
    "",
    "The sweep runs as independent shards (a Slurm array, several machines, or one machine one "
    "after another); each writes its own file, and the merge is the same whatever order the "
    "files come in. On one machine with 24 GiB and 2 cores, the plan is two shards side by "
    "side, one torch thread each, then the models they skipped for memory again, alone:",
    "",
    "```",
    "python scripts/sweep.py --shard 1/2 --threads 1 --memory 11 &",
    "python scripts/sweep.py --shard 2/2 --threads 1 --memory 11 &",
    "wait",
    "python scripts/sweep.py --merge out/sweep/shard-1-of-2.jsonl out/sweep/shard-2-of-2.jsonl",
    "python scripts/sweep.py --rerun-failed --threads 2 --memory 22 --timeout 1800",
    "python scripts/sweep.py --compact",
    "make docs",
    "```",
    "",
    "`--source timm --per-module 1` instead sweeps one seeded pick from each module that "
    "defines timm models (the same pick for the same timm version); models left out keep their "
    "older records, marked stale. A Slurm array runs `--shard $SLURM_ARRAY_TASK_ID/N` per "
    "task; `--compact` leaves one line per model in the results after a rerun appended to "
    "them. `--memory` is the worker's resident-memory budget in GiB: a model whose checkpoint "
    "reload alone (two float32 copies of its parameters) cannot fit is skipped before it is "
    "built, one that outgrows it is stopped and recorded as a skip, and a model whose "
    "parameters fit four times over keeps its unpatched original in memory (faster) while "
    "larger ones are built afresh for each policy. `--max-params N` skips models over N "
    "parameters outright.",
    "",
]


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--source", choices=("torchvision", "timm"), help="one model source")
    parser.add_argument("--glob", help="model name glob, e.g. 'resnet*'")
    parser.add_argument(
        "--family", help="model family (its defining module), e.g. resnet, vision_transformer"
    )
    parser.add_argument("--sample", type=int, help="a seeded random sample of N models")
    parser.add_argument(
        "--per-module", type=int, help="a seeded sample of N models per defining module"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for --sample and --per-module")
    parser.add_argument(
        "--shard",
        type=parse_shard,
        help="K/N: every N-th selected model from the K-th, as one of N independent jobs "
        "(default results file: out/sweep/shard-K-of-N.jsonl)",
    )
    parser.add_argument(
        "--policy", action="append", help="policy to run (repeatable; default: all built-in)"
    )
    parser.add_argument(
        "--results", type=Path, help="results JSONL file (default: docs/sweep-results.jsonl)"
    )
    parser.add_argument("--side", type=int, default=REDUCED_SIDE, help="reduced input side in px")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per model"
    )
    parser.add_argument(
        "--memory",
        type=float,
        default=DEFAULT_MEMORY_GIB,
        help="resident memory budget of the worker in GiB",
    )
    parser.add_argument("--max-params", type=int, help="skip models with more parameters than this")
    parser.add_argument("--nice", type=int, default=0, help="niceness of the worker process")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads in the worker (0: torch's default)"
    )
    parser.add_argument("--rerun", action="store_true", help="run models already recorded again")
    parser.add_argument(
        "--rerun-failed", action="store_true", help="run recorded failures and skips again"
    )
    parser.add_argument("--list", action="store_true", help="print the selected models and exit")
    parser.add_argument(
        "--compact", action="store_true", help="rewrite the results with one line per model"
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="SHARD",
        help="merge these results files (shards) into --results, then exit",
    )
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker, args.threads)
        return 0
    # SIGTERM (and SIGINT, which a background shell job ignores) stop the sweep like Ctrl-C
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    results = args.results or (
        SHARDS / f"shard-{args.shard[0]}-of-{args.shard[1]}.jsonl" if args.shard else RESULTS
    )
    try:
        if args.compact:
            print(f"{results}: {compact_results(results)} models")
            return 0
        if args.merge:
            missing = [str(p) for p in args.merge if not p.is_file()]
            if missing:
                print(f"no such results file: {', '.join(missing)}", file=sys.stderr)
                return 1
            merged = merge_results(results, args.merge)
            print(
                f"{results}: {merged.models} models, {merged.taken} records taken from "
                f"{len(args.merge)} file(s); render the pages with `make docs`"
            )
            if merged.missing_shards:
                print(f"missing shards: {', '.join(merged.missing_shards)}", file=sys.stderr)
                return 1
            return 0
        listing = all_jobs(args.source)
        jobs = select_jobs(
            listing,
            glob=args.glob,
            family=args.family,
            sample=args.sample,
            per_module=args.per_module,
            seed=args.seed,
            shard=args.shard,
        )
        if args.list:
            print("\n".join(j.key for j in jobs))
            return 0
        if args.rerun_failed:
            jobs = not_passed(jobs, read_results(results))
            args.rerun = True
        run_sweep(
            jobs,
            results,
            policies=args.policy,
            side=args.side,
            timeout_s=args.timeout,
            memory_gib=args.memory,
            max_params=args.max_params,
            nice=args.nice,
            threads=args.threads,
            rerun=args.rerun,
            shard=args.shard,
            listed=Counter(j.source for j in listing),
            command=script_command(__file__, argv),
        )
    except ResultsBusy as exc:
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
