"""The policy model: rules, matching, and which rule decided each site (`decide`).

A policy is a list of rules. Each rule has a `match` block (and optionally an `exclude` block)
tested against `Site` records, and an action with parameters. Precedence is deliberately
simple: a matching `keep` rule always wins, otherwise the first matching rule in file order
decides, and a site no rule matches is left unchanged. Rules only see sites of their `role`
(`downsample` unless the match says otherwise). Policies are read from YAML (with the line of
every field, for errors) by `surgeon.policy_loader`.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

from surgeon.errors import PolicyError, did_you_mean
from surgeon.schema import ActionSchema, coerce_param
from surgeon.sites import Op, Role, Site

__all__ = [
    "ANY_ROLE",
    "DEFAULT_ROLE",
    "GROUP_KINDS",
    "INT_MATCH_KEYS",
    "KEEP",
    "KEEP_SCHEMA",
    "MATCH_KEYS",
    "OPS",
    "PADDINGS",
    "ROLES",
    "Decision",
    "GroupKind",
    "GroupsCondition",
    "IntCondition",
    "Match",
    "Padding",
    "Policy",
    "Rule",
    "check_strict",
    "decide",
    "location",
    "unused_rules",
]

KEEP = "keep"
"""The action that leaves a site unchanged; always known, takes no parameters, always wins."""

KEEP_SCHEMA = ActionSchema(KEEP, {}, "leave the site unchanged")
OPS: tuple[str, ...] = get_args(Op)
ROLES: tuple[str, ...] = get_args(Role)
ANY_ROLE = "any"
DEFAULT_ROLE = "downsample"
GroupKind = Literal["depthwise", "grouped", "dense"]
GROUP_KINDS: tuple[str, ...] = get_args(GroupKind)
INT_MATCH_KEYS = (
    "stride",
    "kernel",
    "in_channels",
    "out_channels",
    "stage_in",
    "stage_out",
    "dims",
)
MATCH_KEYS = ("op", *INT_MATCH_KEYS, "groups", "role", "name", "functional")
Padding = Literal["keep", "circular"]
PADDINGS: tuple[str, ...] = get_args(Padding)
"""A policy's `padding`: `keep` every layer's own, or make every padded conv and pool of the
model `circular` (what exact invariance to circular shifts needs: APS, LPS)."""


def location(source: str, line: int) -> str:
    """`file:line`, or just the file when the line is unknown (0)."""
    return f"{source}:{line}" if line else source


# ---------------------------------------------------------------------------------------------
# Conditions and rules


@dataclass(frozen=True)
class IntCondition:
    """An integer test: one of `values`, or else within `min`..`max` (inclusive; None is open)."""

    values: tuple[int, ...] = ()
    min: int | None = None
    max: int | None = None

    def matches(self, value: int) -> bool:
        """True when `value` passes the test."""
        if self.values:
            return value in self.values
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def to_data(self) -> int | list[int] | dict[str, int]:
        """The YAML form: an int, a list of ints or a {min, max} range."""
        if self.values:
            return self.values[0] if len(self.values) == 1 else list(self.values)
        return {k: v for k, v in (("min", self.min), ("max", self.max)) if v is not None}


@dataclass(frozen=True)
class GroupsCondition:
    """A test on a convolution's groups: a number test and/or kinds (depthwise, grouped, dense).

    `dense` is groups == 1, `depthwise` is one group per input channel (see
    `Site.is_depthwise`), `grouped` is any other groups > 1.
    """

    numbers: IntCondition | None = None
    kinds: tuple[GroupKind, ...] = ()

    def matches(self, site: Site) -> bool:
        """True when the site's groups pass the number test or are one of the kinds."""
        if self.numbers is not None and self.numbers.matches(site.groups):
            return True
        return _group_kind(site) in self.kinds

    def to_data(self) -> int | str | list[int | str] | dict[str, int]:
        """The YAML form: an int, a kind, a list of both, or a {min, max} range."""
        if self.numbers is not None and not self.numbers.values:
            bounds = (("min", self.numbers.min), ("max", self.numbers.max))
            return {key: value for key, value in bounds if value is not None}
        items: list[int | str] = [*(self.numbers.values if self.numbers else ()), *self.kinds]
        return items[0] if len(items) == 1 else items


def _group_kind(site: Site) -> GroupKind:
    if site.is_depthwise:
        return "depthwise"
    return "dense" if site.groups == 1 else "grouped"


@dataclass(frozen=True)
class Match:
    """The conditions of a `match` or `exclude` block; unset (None) fields accept anything.

    All set fields must hold. `stride` and `kernel` test the site's largest stride and kernel
    size (`Site.max_stride`, `Site.max_kernel`).
    `name` holds fnmatch globs and `re:`-prefixed regular expressions (full match); any may
    match. `role` None means `downsample` in a `match` block and any role in an `exclude` block.
    """

    op: tuple[str, ...] | None = None
    stride: IntCondition | None = None
    kernel: IntCondition | None = None
    in_channels: IntCondition | None = None
    out_channels: IntCondition | None = None
    stage_in: IntCondition | None = None
    stage_out: IntCondition | None = None
    dims: IntCondition | None = None
    groups: GroupsCondition | None = None
    role: tuple[str, ...] | None = None
    name: tuple[str, ...] | None = None
    functional: bool | None = None

    @property
    def is_empty(self) -> bool:
        """True when no condition is set (the block matches every site of its role)."""
        return all(getattr(self, key) is None for key in MATCH_KEYS)

    def matches(self, site: Site, *, default_role: str | None = DEFAULT_ROLE) -> bool:
        """True when every set condition holds for `site`.

        `default_role` is the role required when `role` is unset; None accepts any role.
        """
        roles = self.role if self.role is not None else (default_role,)
        if ANY_ROLE not in roles and None not in roles and site.role not in roles:
            return False
        if self.op is not None and site.op not in self.op:
            return False
        if self.functional is not None and site.functional != self.functional:
            return False
        numbers = (
            (self.stride, site.max_stride),
            (self.kernel, site.max_kernel),
            (self.in_channels, site.in_channels),
            (self.out_channels, site.out_channels),
            (self.stage_in, site.stage_in),
            (self.stage_out, site.stage_out),
            (self.dims, site.dims),
        )
        if any(cond is not None and not cond.matches(value) for cond, value in numbers):
            return False
        if self.groups is not None and not self.groups.matches(site):
            return False
        return self.name is None or any(_name_matches(p, site.name) for p in self.name)

    def to_dict(self) -> dict[str, Any]:
        """The YAML form of the set conditions (single values unwrapped from lists)."""
        out: dict[str, Any] = {}
        for key in MATCH_KEYS:
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, IntCondition | GroupsCondition):
                out[key] = value.to_data()
            elif isinstance(value, tuple):
                out[key] = value[0] if len(value) == 1 else list(value)
            else:
                out[key] = value
        return out


def _name_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


@dataclass(frozen=True)
class Rule:
    """One rule of a policy. `index` is 1-based in file order; `line` is 0 when unknown.

    `params` are fully resolved: the action's defaults, under the policy's `defaults` for the
    action, under the rule's own params.
    """

    index: int
    name: str
    match: Match
    exclude: Match | None
    action: str
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)
    line: int = field(default=0, compare=False)

    @property
    def label(self) -> str:
        """How messages refer to the rule: `rule 2 (spd-convs)`, or `rule 2` when unnamed."""
        default = f"rule {self.index}"
        return default if self.name == default else f"{default} ({self.name})"

    def matches(self, site: Site) -> bool:
        """True when the site passes `match` and is not caught by `exclude`."""
        return self.match.matches(site) and not self.excludes(site)

    def excludes(self, site: Site) -> bool:
        """True when the `exclude` block catches the site (whatever `match` says)."""
        return self.exclude is not None and self.exclude.matches(site, default_role=None)

    def to_dict(self) -> dict[str, Any]:
        """The YAML form of the rule, with resolved params."""
        out: dict[str, Any] = {} if self.name == f"rule {self.index}" else {"name": self.name}
        out["match"] = self.match.to_dict()
        if self.exclude is not None:
            out["exclude"] = self.exclude.to_dict()
        out["action"] = self.action
        if self.params:
            out["params"] = dict(self.params)
        return out


@dataclass(frozen=True)
class Policy:
    """A validated policy. Equality ignores `source` and rule line numbers.

    `padding` applies to the whole model, after the rules' actions: `circular` makes every
    padded convolution and pool pad circularly (`surgeon.rewrites.padding`)."""

    name: str
    description: str
    rules: tuple[Rule, ...]
    source: str = field(default="<dict>", compare=False)
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, hash=False)
    padding: Padding = "keep"

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-ready dict that `policy_from_dict` turns back into an equal Policy."""
        out: dict[str, Any] = {"name": self.name, "description": self.description}
        if self.padding != "keep":
            out["padding"] = self.padding
        if self.defaults:
            out["defaults"] = {action: dict(p) for action, p in self.defaults.items()}
        out["rules"] = [rule.to_dict() for rule in self.rules]
        return out

    def location(self, rule: Rule) -> str:
        """`file:line` of a rule (just the file when the line is unknown)."""
        return location(self.source, rule.line)

    def with_params(
        self, action: str, overrides: Mapping[str, Any], schema: ActionSchema | None = None
    ) -> Policy:
        """A copy in which every rule with `action` (and the policy's defaults for it) takes
        `overrides`, e.g. `--output-stride 16` for `dilate`; values are checked against
        `schema` when one is given. PolicyError if no rule names the action."""
        if not any(rule.action == action for rule in self.rules):
            raise PolicyError(
                f"{self.source}: policy {self.name!r} has no rule with action {action!r}, so "
                f"{', '.join(overrides)} would change nothing"
            )
        checked: dict[str, Any] = {}
        for key, value in overrides.items():
            if schema is not None:
                spec = schema.params.get(key)
                if spec is None:
                    hint = did_you_mean(key, list(schema.params))
                    raise PolicyError(
                        f"{action}.{key}: unknown parameter{hint}; allowed: "
                        f"{', '.join(schema.params)}"
                    )
                value, problem = coerce_param(spec, value)
                if problem is not None:
                    raise PolicyError(f"{action}.{key}: {problem}")
            checked[key] = value
        rules = tuple(
            replace(rule, params={**rule.params, **checked}) if rule.action == action else rule
            for rule in self.rules
        )
        defaults = dict(self.defaults)
        if action in defaults:
            defaults[action] = {**defaults[action], **checked}
        return replace(self, rules=rules, defaults=defaults)


@dataclass(frozen=True)
class Decision:
    """What the policy decided for one site, and why.

    `action` is None when no rule matched and `keep` when a keep rule decided; `params` are
    the deciding rule's resolved params (empty when there is none).
    """

    site: str
    action: str | None
    params: Mapping[str, Any] = field(hash=False)
    rule_index: int | None
    rule_name: str | None
    reason: str

    @property
    def changes_site(self) -> bool:
        """True when an action other than keep applies to the site."""
        return self.action is not None and self.action != KEEP

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        out = asdict(self)
        out["params"] = dict(self.params)
        return out


# ---------------------------------------------------------------------------------------------
# Deciding


def decide(policy: Policy, sites: Iterable[Site]) -> list[Decision]:
    """One Decision per site, in site order: a matching keep rule wins, else the first match."""
    decisions = []
    for site in sites:
        matched = [rule for rule in policy.rules if rule.matches(site)]
        keep = next((rule for rule in matched if rule.action == KEEP), None)
        if keep is not None:
            other = next((rule for rule in matched if rule.action != KEEP), None)
            reason = (
                f"keep {keep.label} wins over {other.label}"
                if other is not None
                else f"matched {keep.label}"
            )
            decisions.append(_decision(site, keep, reason))
        elif matched:
            decisions.append(_decision(site, matched[0], f"matched {matched[0].label}"))
        else:
            decisions.append(Decision(site.name, None, {}, None, None, _unmatched(policy, site)))
    return decisions


def _decision(site: Site, rule: Rule, reason: str) -> Decision:
    return Decision(site.name, rule.action, dict(rule.params), rule.index, rule.name, reason)


def _unmatched(policy: Policy, site: Site) -> str:
    excluded_by = next(
        (r for r in policy.rules if r.match.matches(site) and r.excludes(site)),
        None,
    )
    if excluded_by is not None:
        return f"no rule matched; {excluded_by.label} excluded it"
    if site.role != DEFAULT_ROLE:
        return f"role {site.role}: not a downsampling site"
    return "no rule matched"


def unused_rules(policy: Policy, decisions: Iterable[Decision]) -> list[Rule]:
    """Rules that decided no site: they matched nothing, or a keep or earlier rule won."""
    used = {d.rule_index for d in decisions}
    return [rule for rule in policy.rules if rule.index not in used]


def check_strict(policy: Policy, decisions: Iterable[Decision]) -> None:
    """Raise PolicyError when any rule decided no site (strict mode)."""
    unused = unused_rules(policy, decisions)
    if not unused:
        return
    first, rest = unused[0], unused[1:]
    message = f"{policy.location(first)}: {first.label} decided no site"
    if rest:
        others = ", ".join(f"{r.label} at line {r.line}" if r.line else r.label for r in rest)
        message += f", nor did {others}"
    fix = "fix its match or remove it" if not rest else "fix their matches or remove them"
    raise PolicyError(f"{message}; strict mode treats unused rules as errors ({fix})")
