"""`patch`: apply a policy to a model in place, verify it, and describe every change."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from surgeon.edits import EditError, EditOp, ModelEditor
from surgeon.errors import PatchError
from surgeon.policy import KEEP, Decision, Policy, check_strict, decide, unused_rules
from surgeon.policy_loader import BUILTIN_POLICY_DIR, load_policy
from surgeon.rewrites import (
    Edit,
    ModelPlan,
    ModelRewrite,
    SkipSite,
    Target,
    action_schemas,
    get_rewrite,
)
from surgeon.rewrites.padding import PaddingChange, circular_padding, map_sizes
from surgeon.scan import ScanResult, scan_analysis
from surgeon.sites import Site
from surgeon.submodules import count_params
from surgeon.trace import Analysis, analyse, counted_forward, snapshot

__all__ = ["PatchReport", "SiteRow", "patch", "resolve_policy"]


@dataclass(frozen=True)
class SiteRow:
    """One line of the diff: a site, what the policy decided, and what changed."""

    site: str
    op: str
    role: str
    status: str  # patched | kept | skipped | unmatched | not-a-site
    action: str | None
    rule: str | None
    reason: str
    replacement: str
    in_shape: tuple[int, ...]
    out_shape_before: tuple[int, ...]
    out_shape_after: tuple[int, ...] | None
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    transfer: str | None
    max_abs_diff: float | None
    rel_diff: float | None
    note: str = ""


@dataclass(frozen=True)
class PatchReport:
    """Everything `patch` did, in a form the report renderers and checkpoint manifest share."""

    model: str
    policy: str
    input_shapes: tuple[tuple[int, ...], ...]
    rows: tuple[SiteRow, ...]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    keys_added: tuple[str, ...]
    keys_removed: tuple[str, ...]
    keys_renamed: tuple[tuple[str, str], ...]
    output_max_abs_diff: float
    output_rel_diff: float
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    decisions: tuple[Decision, ...] = field(default=(), repr=False)
    sites: tuple[Site, ...] = field(default=(), repr=False)
    ops: tuple[EditOp, ...] = field(default=(), repr=False, compare=False)
    """The edit plan: every change made to the model, in order (what a checkpoint records)."""
    padding: tuple[PaddingChange, ...] = ()
    """With the policy's `padding: circular`: every padded layer, changed or kept and why."""

    @property
    def patched(self) -> int:
        return sum(r.status == "patched" for r in self.rows)

    @property
    def skipped(self) -> int:
        return sum(r.status == "skipped" for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, stable field names (documented in docs/report.md)."""
        data = asdict(replace(self, ops=()))
        del data["ops"]  # modules, not JSON: the checkpoint records them by layer type and args
        data["decisions"] = [d.to_dict() for d in self.decisions]
        data["sites"] = [s.to_dict() for s in self.sites]
        data["summary"] = {"patched": self.patched, "skipped": self.skipped}
        return data


def resolve_policy(policy: Policy | str | Path) -> Policy:
    """A Policy from a Policy, a built-in name (`spd`) or a YAML path."""
    if isinstance(policy, Policy):
        return policy
    return load_policy(policy, action_schemas())


def _as_args(example_input: Any) -> tuple[Any, ...]:
    if example_input is None:
        return (torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)),)
    return example_input if isinstance(example_input, tuple) else (example_input,)


def _tensors(value: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(value)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _plain(value: Any) -> Any:
    """`value` with every OrderedDict as a dict: a forward that fx rewrote (a replaced call in
    the model's own forward) returns the OrderedDict it built (torchvision's segmentation
    models) as a dict literal, the same keys in the same order."""
    if isinstance(value, OrderedDict) or type(value) is dict:
        return {key: _plain(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_plain(item) for item in value)
    return value


def _structure(value: Any) -> list[Any]:
    leaves, spec = tree_flatten(_plain(value))
    return [str(spec), [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t) for t in leaves]]


def _failing_module(exc: BaseException, model: nn.Module) -> tuple[str, str] | None:
    """(path, class name) of the innermost module of `model` whose forward was running when
    `exc` was raised, or None when it came from outside every module."""
    names = {id(m): n for n, m in model.named_modules()}
    where = None
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            where = (names[id(owner)], type(owner).__name__)
        tb = tb.tb_next
    return where


def _failure(exc: BaseException, model: nn.Module, unchanged: Mapping[str, str]) -> str:
    """One line: where the patched model fails, why, and the sites inside that module the
    policy left unchanged (a policy that moves or removes strides must change every branch of
    a join alike, so one skipped branch breaks the join). A PatchError raised by one of
    surgeon's layers (a polyphase follower that ran before its leader) says itself what is
    wrong."""
    first = (str(exc).strip().splitlines() or [""])[0][:160]
    where = _failing_module(exc, model)
    text = "the patched model fails"
    if isinstance(exc, PatchError):
        if where is not None:
            text += f" in {where[0] or '<model>'} ({where[1]})"
        return f"{text}: {first}"
    if where is not None:
        path, cls = where
        text += f" in {path or '<model>'} ({cls})"
        inside = [
            f"{name} ({why})"
            for name, why in unchanged.items()
            if not path or name == path or name.startswith((f"{path}.", f"{path}:"))
        ]
        if inside:
            text += f", where {'; '.join(inside[:2])} stayed unchanged"
    return (
        f"{text}: {type(exc).__name__}: {first}; strides moved or removed must change every "
        "branch of a join alike, and layers built for the original map sizes (position tables, "
        "attention windows) cannot follow them"
    )


def _leading_sizes_differ(reference: Any, output: Any) -> bool:
    """True when two outputs have the same structure, dtypes and ranks, and their shapes differ
    only in the leading dimension of some tensors: a detector's number of detections (boxes
    N×4, scores N, masks N×1×H×W), which depends on the values and not on the layers."""
    ref_leaves, ref_spec = tree_flatten(reference)
    out_leaves, out_spec = tree_flatten(output)
    if str(ref_spec) != str(out_spec):
        return False
    for a, b in zip(ref_leaves, out_leaves, strict=True):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return False
        if isinstance(a, torch.Tensor) and (
            a.dtype != b.dtype or a.dim() != b.dim() or a.dim() == 0 or a.shape[1:] != b.shape[1:]
        ):
            return False
    return True


def _diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(max absolute difference, that divided by the reference's max magnitude)."""
    worst, scale = 0.0, 0.0
    for x, y in zip(a, b, strict=True):
        if x.is_floating_point() and x.numel() and x.shape == y.shape:
            worst = max(worst, (x.double() - y.double()).abs().max().item())
            scale = max(scale, x.double().abs().max().item())
    return worst, (worst / scale if scale else worst)


def _run(
    model: nn.Module, args: tuple[Any, ...], hooks: Mapping[str, Callable[..., None]]
) -> tuple[Any, dict[str, int]]:
    handles = [model.get_submodule(p).register_forward_hook(h) for p, h in hooks.items()]
    try:
        return counted_forward(model, args)
    finally:
        for handle in handles:
            handle.remove()


def _capture(store: dict[str, tuple[Any, Any]], path: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        # copies: an in-place activation after the site (ReLU(inplace=True)) would change them
        if path not in store:
            store[path] = snapshot(args, output)

    return hook


def patch(
    model: nn.Module,
    policy: Policy | str | Path,
    example_input: Any = None,
    *,
    strict: bool = False,
    seed: int = 0,
    model_name: str = "",
) -> tuple[nn.Module, PatchReport]:
    """Apply `policy` to `model` in place and verify the result on `example_input`.

    Returns the patched model (the same object unless a functional call in the model's own
    forward had to be rewritten, which makes it a GraphModule) and the report, whose `ops` are
    the edits made. Raises PatchError if an output shape changed. All or nothing: when anything
    raises (a PatchError, an analysis error, Ctrl-C), every edit is undone and `model` is left
    exactly as it was (same module objects, same parameter tensors, same training flags).
    """
    resolved = resolve_policy(policy)
    args = _as_args(example_input)
    modes = {module: module.training for module in model.modules()}
    editor = ModelEditor(model)
    try:
        patched, report = _patch(editor, resolved, args, strict, seed, model_name)
    except BaseException:
        editor.rollback()
        _restore_modes(modes)
        raise
    # the caller's training mode: the root's for new modules, each original module's own
    patched.train(modes[model])
    _restore_modes(modes)
    return patched, report


def _restore_modes(modes: Mapping[nn.Module, bool]) -> None:
    for module, training in modes.items():
        module.training = training


def _patch(
    editor: ModelEditor,
    resolved: Policy,
    args: tuple[Any, ...],
    strict: bool,
    seed: int,
    model_name: str,
) -> tuple[nn.Module, PatchReport]:
    model = editor.model
    model.eval()
    analysis = analyse(model, args, reference=True)
    editor.analysis = analysis
    result: ScanResult = scan_analysis(analysis, args)
    decisions = decide(resolved, result.sites)
    if strict:
        check_strict(resolved, decisions)
    by_site = {d.site: d for d in decisions}
    targets = [s for s in result.sites if by_site[s.name].changes_site and s.module]

    kept = analysis.reference
    if kept is not None and all(s.module in kept.captured for s in targets):
        reference, flops_before, captured = kept.output, kept.flops, kept.captured
    else:  # a target the analysis run did not copy (a module site with children): run again
        captured = {}
        reference, flops_before = _run(
            model, args, {s.module: _capture(captured, s.module) for s in targets}
        )
    before_params = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    params_before = count_params(model)
    sizes = map_sizes(analysis) if resolved.padding == "circular" else {}

    torch.manual_seed(seed)
    edits: dict[str, Edit] = {}
    skipped: dict[str, str] = {}
    chosen: list[tuple[Site, Decision]] = []
    for site in result.sites:
        decision = by_site[site.name]
        if not decision.changes_site:
            continue
        if site.calls > 1:
            skipped[site.name] = (
                f"the module is called at {site.calls} places; replacing it would change all"
            )
            continue
        chosen.append((site, decision))
    # model-level rewrites plan from the analysis of the untouched model, so they go first
    for action, plan in _model_plans(analysis, chosen).items():
        for name, outcome in plan.outcomes.items():
            if isinstance(outcome, Edit):
                edits[name] = outcome
            else:
                skipped[name] = outcome
        rewrite = get_rewrite(action)
        assert isinstance(rewrite, ModelRewrite)
        try:
            rewrite.apply(editor, plan)
        except EditError as exc:
            raise PatchError(f"could not apply the {action} plan: {exc}") from exc
    for site, decision in chosen:
        rewrite = get_rewrite(str(decision.action))
        if isinstance(rewrite, ModelRewrite):
            continue
        mark = editor.mark()
        try:
            edits[site.name] = rewrite.apply(editor, site, decision.params)
        except (SkipSite, EditError) as exc:  # whatever the rewrite changed is undone
            editor.rollback(mark)
            skipped[site.name] = str(exc)
    try:
        patched = editor.finish()
    except EditError as exc:
        raise PatchError(f"could not rewrite functional sites: {exc}") from exc
    padding: tuple[PaddingChange, ...] = ()
    if resolved.padding == "circular":
        calls = [s for s in result.sites if s.functional and s.name not in edits]
        try:
            padding = circular_padding(editor, calls, sizes)
        except EditError as exc:
            raise PatchError(f"could not make the padding circular: {exc}") from exc
        patched = editor.model

    site_outputs: dict[str, tuple[Any, Any]] = {}
    # where each edit's output shape can be read: its output module, else its last new module
    # (antialias's blur after the activation), which keeps the site's output shape
    probes = {
        name: e.output_module or (e.modules[-1] if e.modules else None) for name, e in edits.items()
    }
    hooks = {path: _capture(site_outputs, path) for path in probes.values() if path}
    try:
        output, flops_after = _run(patched, args, hooks)
    except Exception as exc:  # the model's own code fails: RuntimeError, IndexError, assert
        unchanged = {d.site: d.reason for d in decisions if d.action == KEEP} | skipped
        raise PatchError(_failure(exc, patched, unchanged)) from exc
    if _structure(output) != _structure(reference):
        culprit = next(
            (
                name
                for name, path in probes.items()
                if path in site_outputs
                and tuple(_tensors(site_outputs[path][1])[0].shape) != _site(result, name).out_shape
            ),
            None,
        )
        # Every patched site kept its output shape, so sizes that differ only in the leading
        # dim come from the values (how many boxes pass the score threshold), not the layers.
        sites_checked = all(path in site_outputs for path in probes.values())
        if culprit is None and sites_checked and _leading_sizes_differ(reference, output):
            editor.notes.append(
                "the number of detections changed (the outputs' leading sizes depend on the "
                "values); every patched site's output shape was checked instead, and the output "
                "difference covers only the outputs whose shapes still agree"
            )
        else:
            where = f" at site {culprit}" if culprit else ""
            raise PatchError(
                f"the patched model's output shapes differ from the original's{where}; "
                "this is a bug in surgeon, please report it with the model and policy"
            )
    max_abs, rel = _diff(_tensors(reference), _tensors(output))

    after = patched.state_dict(keep_vars=True)
    after_ids = {id(t): k for k, t in after.items()}
    renamed = tuple(
        (old, after_ids[i])
        for i, old in before_params.items()
        if i in after_ids and after_ids[i] != old
    )
    removed = tuple(old for i, old in before_params.items() if i not in after_ids)
    added = tuple(k for i, k in after_ids.items() if i not in before_params)

    rows = []
    for site in result.sites:
        decision = by_site[site.name]
        edit = edits.get(site.name)
        rows.append(
            _row(
                site,
                decision,
                edit,
                skipped.get(site.name),
                patched,
                captured,
                site_outputs,
                flops_after,
            )
        )
    # an unused rule of the user's own policy is a likely mistake; a built-in policy's rules
    # are written for every kind of model, and most models leave some of them unused
    builtin = Path(resolved.source).parent == BUILTIN_POLICY_DIR
    warnings = [
        f"{r.label} ({resolved.location(r)}) matched no site"
        for r in unused_rules(resolved, decisions)
        if not builtin
    ]
    report = PatchReport(
        model=model_name or type(model).__name__,
        policy=resolved.name,
        input_shapes=result.input_shapes,
        rows=tuple(rows),
        params_before=params_before,
        params_after=count_params(patched),
        macs_before=flops_before[""] // 2,
        macs_after=flops_after[""] // 2,
        keys_added=added,
        keys_removed=removed,
        keys_renamed=renamed,
        output_max_abs_diff=max_abs,
        output_rel_diff=rel,
        notes=tuple(editor.notes),
        warnings=tuple(warnings),
        decisions=tuple(decisions),
        sites=result.sites,
        ops=tuple(editor.ops),
        padding=padding,
    )
    return patched, report


def _model_plans(
    analysis: Analysis, chosen: Sequence[tuple[Site, Decision]]
) -> dict[str, ModelPlan]:
    """The plan of every model-level action the policy chose, from all its sites at once."""
    targets: dict[str, list[Target]] = {}
    for site, decision in chosen:
        if isinstance(get_rewrite(str(decision.action)), ModelRewrite):
            targets.setdefault(str(decision.action), []).append(Target(site, decision.params))
    plans = {}
    for action, items in targets.items():
        rewrite = get_rewrite(action)
        assert isinstance(rewrite, ModelRewrite)
        plans[action] = rewrite.plan(analysis, items)
    return plans


def _site(result: ScanResult, name: str) -> Site:
    return next(s for s in result.sites if s.name == name)


def _row(
    site: Site,
    decision: Decision,
    edit: Edit | None,
    skip_reason: str | None,
    patched: nn.Module,
    captured: Mapping[str, tuple[Any, Any]],
    site_outputs: Mapping[str, tuple[Any, Any]],
    flops_after: Mapping[str, int],
) -> SiteRow:
    rule = (
        f"{decision.rule_index}" + (f" ({decision.rule_name})" if decision.rule_name else "")
        if decision.rule_index
        else None
    )
    base = dict(
        site=site.name,
        op=site.type_name,
        role=site.role,
        action=decision.action,
        rule=rule,
        reason=decision.reason,
        in_shape=site.in_shape,
        out_shape_before=site.out_shape,
        params_before=site.params,
        macs_before=site.macs,
    )
    if edit is None:
        status = (
            "skipped"
            if skip_reason
            else "kept"
            if decision.action
            else "not-a-site"
            if site.role != "downsample"
            else "unmatched"
        )
        return SiteRow(
            **base,  # type: ignore[arg-type]
            status=status,
            replacement="" if not skip_reason else "—",
            out_shape_after=site.out_shape,
            params_after=site.params,
            macs_after=site.macs,
            transfer=None,
            max_abs_diff=None,
            rel_diff=None,
            note=skip_reason or "",
        )
    new_params = sum(count_params(patched.get_submodule(p)) for p in edit.modules)
    macs_after = sum(flops_after.get(p, 0) for p in edit.modules) // 2
    out_after: tuple[int, ...] | None = None
    max_abs: float | None = None
    rel: float | None = None
    if edit.output_module and edit.output_module in site_outputs:
        out_after = tuple(_tensors(site_outputs[edit.output_module][1])[0].shape)
        # a rewrite that changes resolution on purpose (dilate, relocate) has no comparable output
        if site.module in captured and out_after == site.out_shape:
            inputs, expected = captured[site.module]
            with torch.no_grad():
                got = patched.get_submodule(edit.output_module)(*inputs)
            if [t.shape for t in _tensors(got)] == [t.shape for t in _tensors(expected)]:
                max_abs, rel = _diff(_tensors(expected), _tensors(got))
    return SiteRow(
        **base,  # type: ignore[arg-type]
        status="patched",
        replacement=edit.replacement,
        out_shape_after=out_after,
        params_after=new_params,
        macs_after=macs_after,
        transfer=edit.transfer,
        max_abs_diff=max_abs,
        rel_diff=rel,
        note=edit.note,
    )
