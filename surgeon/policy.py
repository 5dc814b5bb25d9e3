"""YAML -> validated Policy; rule matching; which rule decided each site.

A policy is a list of rules. Each rule has a `match` block (and optionally an `exclude` block)
tested against `Site` records, and an action with parameters. Precedence is deliberately
simple: a matching `keep` rule always wins, otherwise the first matching rule in file order
decides, and a site no rule matches is left unchanged. Rules only see sites of their `role`
(`downsample` unless the match says otherwise).

Action parameters are validated against `ActionSchema`s passed in by the caller, so this module
knows nothing about the rewrites themselves. Every error is a one-line `PolicyError` that names
the file, the line and the field, e.g.
`configs/x.yaml:7: rules[1].params.filter_size: 9 is out of range (allowed 1..7)`.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeAlias, get_args

import yaml

from surgeon.errors import PolicyError
from surgeon.sites import Op, Role, Site

__all__ = [
    "BUILTIN_POLICY_DIR",
    "KEEP",
    "ActionSchema",
    "Decision",
    "GroupsCondition",
    "IntCondition",
    "Match",
    "ParamSpec",
    "Policy",
    "Rule",
    "check_strict",
    "decide",
    "list_builtin_policies",
    "load_policy",
    "parse_policy",
    "policy_from_dict",
    "resolve_policy_path",
    "unused_rules",
]

_PACKAGE = Path(__file__).resolve().parent
BUILTIN_POLICY_DIR = (
    _PACKAGE / "configs" if (_PACKAGE / "configs").is_dir() else _PACKAGE.parent / "configs"
)
"""Where built-in policies live: `<repo>/configs/<stem>.yaml`, installed as `surgeon/configs/`
(pyproject.toml maps the one onto the other; a source checkout reads the repository's)."""

KEEP = "keep"
"""The action that leaves a site unchanged; always known, takes no parameters, always wins."""

_ACTION_ALIASES = {"ignore": KEEP}
_OPS: tuple[str, ...] = get_args(Op)
_ROLES: tuple[str, ...] = get_args(Role)
_ANY_ROLE = "any"
_DEFAULT_ROLE = "downsample"
GroupKind = Literal["depthwise", "grouped", "dense"]
_GROUP_KINDS: tuple[str, ...] = get_args(GroupKind)

_TOP_KEYS = ("name", "description", "rules", "defaults")
_RULE_KEYS = ("name", "match", "exclude", "action", "params")
_INT_MATCH_KEYS = (
    "stride",
    "kernel",
    "in_channels",
    "out_channels",
    "stage_in",
    "stage_out",
    "dims",
)
_MATCH_KEYS = ("op", *_INT_MATCH_KEYS, "groups", "role", "name", "functional")
_RANGE_KEYS = ("min", "max")

ParamType: TypeAlias = "type[int] | type[float] | type[str] | type[bool]"

# ---------------------------------------------------------------------------------------------
# Action schemas


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of an action: its type, default and allowed values.

    `choices` restricts the value to a fixed set; `min`/`max` (inclusive) bound numbers.
    A `default` of None makes the parameter optional with no value unless a policy sets one.
    """

    name: str
    type: ParamType
    default: Any
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    help: str = ""

    def __post_init__(self) -> None:
        if self.type not in (int, float, str, bool):
            raise ValueError(f"ParamSpec {self.name!r}: type must be int, float, str or bool")
        if self.default is not None:
            _, problem = _coerce_param(self, self.default)
            if problem is not None:
                raise ValueError(f"ParamSpec {self.name!r}: default {problem}")


@dataclass(frozen=True)
class ActionSchema:
    """An action a policy may name, with the parameters it accepts."""

    name: str
    params: Mapping[str, ParamSpec] = field(default_factory=dict, hash=False)
    help: str = ""

    def __post_init__(self) -> None:
        for key, spec in self.params.items():
            if key != spec.name:
                raise ValueError(f"ActionSchema {self.name!r}: key {key!r} holds {spec.name!r}")

    @classmethod
    def of(cls, name: str, *params: ParamSpec, help: str = "") -> ActionSchema:
        """A schema from its parameters, keyed by their names."""
        return cls(name, {spec.name: spec for spec in params}, help)

    def defaults(self) -> dict[str, Any]:
        """Every parameter's default value, by name."""
        return {name: spec.default for name, spec in self.params.items()}


_KEEP_SCHEMA = ActionSchema(KEEP, {}, "leave the site unchanged")

_TYPE_NAMES: dict[type, str] = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
}


def _coerce_param(spec: ParamSpec, value: Any) -> tuple[Any, str | None]:
    """The value as the parameter's type, or a problem description (one line)."""
    if value is None and spec.default is None:
        return None, None
    wanted = spec.type
    ok = (
        isinstance(value, bool)
        if wanted is bool
        else (
            isinstance(value, int | float) and not isinstance(value, bool)
            if wanted is float
            else isinstance(value, wanted) and not isinstance(value, bool)
        )
    )
    if not ok:
        return value, f"expected {_TYPE_NAMES[wanted]}, got {_describe(value)}"
    if wanted is float:
        value = float(value)
        if not math.isfinite(value):
            return value, f"expected a finite number, got {value}"
    if spec.choices is not None and value not in spec.choices:
        allowed = ", ".join(_show(c) for c in spec.choices)
        return value, f"{_show(value)} is not allowed (choose from {allowed})"
    too_low = spec.min is not None and value < spec.min
    too_high = spec.max is not None and value > spec.max
    if too_low or too_high:
        if spec.min is not None and spec.max is not None:
            allowed = f"{_show(spec.min)}..{_show(spec.max)}"
        elif spec.min is not None:
            allowed = f">= {_show(spec.min)}"
        else:
            allowed = f"<= {_show(spec.max)}"
        return value, f"{_show(value)} is out of range (allowed {allowed})"
    return value, None


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
        return all(getattr(self, key) is None for key in _MATCH_KEYS)

    def matches(self, site: Site, *, default_role: str | None = _DEFAULT_ROLE) -> bool:
        """True when every set condition holds for `site`.

        `default_role` is the role required when `role` is unset; None accepts any role.
        """
        roles = self.role if self.role is not None else (default_role,)
        if _ANY_ROLE not in roles and None not in roles and site.role not in roles:
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
        for key in _MATCH_KEYS:
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
    """A validated policy. Equality ignores `source` and rule line numbers."""

    name: str
    description: str
    rules: tuple[Rule, ...]
    source: str = field(default="<dict>", compare=False)
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-ready dict that `policy_from_dict` turns back into an equal Policy."""
        out: dict[str, Any] = {"name": self.name, "description": self.description}
        if self.defaults:
            out["defaults"] = {action: dict(p) for action, p in self.defaults.items()}
        out["rules"] = [rule.to_dict() for rule in self.rules]
        return out

    def location(self, rule: Rule) -> str:
        """`file:line` of a rule (just the file when the line is unknown)."""
        return _location(self.source, rule.line)

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
                    hint = _did_you_mean(key, list(schema.params))
                    raise PolicyError(
                        f"{action}.{key}: unknown parameter{hint}; allowed: "
                        f"{', '.join(schema.params)}"
                    )
                value, problem = _coerce_param(spec, value)
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
    if site.role != _DEFAULT_ROLE:
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


# ---------------------------------------------------------------------------------------------
# Loading


def resolve_policy_path(name_or_path: str) -> Path:
    """The policy file for an existing path, or for the stem of a built-in policy."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.exists():
        raise PolicyError(f"{name_or_path}: not a file; pass a path to a .yaml file")
    stem = path.name.removesuffix(".yaml").removesuffix(".yml")
    if path.parent == Path("."):
        for suffix in (".yaml", ".yml"):
            candidate = BUILTIN_POLICY_DIR / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    builtins = [name for name, _ in list_builtin_policies()]
    hint = _did_you_mean(stem, builtins)
    known = ", ".join(builtins) if builtins else "(none)"
    raise PolicyError(
        f"unknown policy {name_or_path!r}{hint}: no such file and no built-in policy of that "
        f"name; built-in policies: {known}; or pass a path to a .yaml file"
    )


def list_builtin_policies() -> list[tuple[str, str]]:
    """(stem, description) of every built-in policy, sorted by stem."""
    if not BUILTIN_POLICY_DIR.is_dir():
        return []
    found: dict[str, str] = {}
    for path in sorted(BUILTIN_POLICY_DIR.iterdir()):
        if path.suffix not in (".yaml", ".yml") or not path.is_file() or path.stem in found:
            continue
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError):
            data = None
        description = data.get("description") if isinstance(data, dict) else None
        found[path.stem] = description if isinstance(description, str) else ""
    return sorted(found.items())


def load_policy(source: str | Path, actions: Mapping[str, ActionSchema]) -> Policy:
    """Read and validate a policy file (a path, or the stem of a built-in policy)."""
    path = resolve_policy_path(str(source))
    name = str(source) if path == Path(source) else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PolicyError(f"{name}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except OSError as err:
        raise PolicyError(f"{name}: cannot read policy file ({err.strerror})") from err
    return parse_policy(text, name, actions)


def parse_policy(text: str, source_name: str, actions: Mapping[str, ActionSchema]) -> Policy:
    """Validate a policy given as YAML text; `source_name` prefixes every error message."""
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as err:
        raise _invalid_yaml(source_name, text, err) from err
    try:
        try:
            root = loader.get_single_node()
        except (yaml.YAMLError, RecursionError) as err:
            raise _invalid_yaml(source_name, text, err) from err
        if root is None:
            raise PolicyError(
                f"{source_name}: policy is empty; expected a mapping with name, description "
                "and rules"
            )
        tree = _YamlTree(source_name, loader).convert(root, "")
    finally:
        loader.dispose()
    return _PolicyBuilder(source_name, actions).build(tree)


def _invalid_yaml(source: str, text: str, err: Exception) -> PolicyError:
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or "malformed document"
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
    elif isinstance(err, yaml.reader.ReaderError):
        line = text.count("\n", 0, err.position) + 1
        column = err.position - (text.rfind("\n", 0, err.position) + 1) + 1
        where = f"{source}:{line}:{column}"
        problem = f"unacceptable character #x{err.character:04x} ({err.reason})"
    elif isinstance(err, RecursionError):
        where, problem = source, "nested too deeply"
    else:
        where, problem = source, str(err)
    return PolicyError(f"{where}: invalid YAML: {_one_line(problem)}")


def policy_from_dict(
    data: Mapping[str, Any],
    actions: Mapping[str, ActionSchema],
    source_name: str = "<dict>",
) -> Policy:
    """Validate a policy given as Python data (the inverse of `Policy.to_dict`)."""
    tree = _python_tree(source_name, data, "", set())
    return _PolicyBuilder(source_name, actions).build(tree)


# ---------------------------------------------------------------------------------------------
# The validated tree: plain values with the line each came from


@dataclass
class _Node:
    """A value with its line; mappings hold `_Node`s by key, sequences a list of `_Node`s."""

    value: Any
    line: int
    path: str
    key_line: int = 0


def _child_path(path: str, key: str) -> str:
    segment = key if re.fullmatch(r"[A-Za-z0-9_\-]+", key) else f"[{_show(key)}]"
    if not path:
        return segment
    return f"{path}{segment}" if segment.startswith("[") else f"{path}.{segment}"


def _error(source: str, line: int, path: str, message: str) -> PolicyError:
    where = _location(source, line)
    return PolicyError(f"{where}: {path}: {message}" if path else f"{where}: {message}")


def _location(source: str, line: int) -> str:
    return f"{source}:{line}" if line else source


_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _YamlTree:
    """Turns a composed YAML node tree into `_Node`s, with safe_load's scalar semantics."""

    def __init__(self, source: str, loader: yaml.SafeLoader) -> None:
        self.source = source
        self.loader = loader
        self.active: set[int] = set()

    def convert(self, node: yaml.Node, path: str, key_line: int = 0) -> _Node:
        line = node.start_mark.line + 1
        if id(node) in self.active:
            raise _error(self.source, line, path, "recursive YAML alias")
        if isinstance(node, yaml.MappingNode | yaml.SequenceNode):
            expected = _MAP_TAG if isinstance(node, yaml.MappingNode) else _SEQ_TAG
            if node.tag != expected:
                raise _error(self.source, line, path, f"unsupported YAML tag {node.tag!r}")
            self.active.add(id(node))
            try:
                if isinstance(node, yaml.MappingNode):
                    value: Any = self._mapping(node, path)
                else:
                    value = [
                        self.convert(item, f"{path}[{i}]") for i, item in enumerate(node.value)
                    ]
            finally:
                self.active.discard(id(node))
            return _Node(value, line, path, key_line or line)
        try:
            scalar = self.loader.construct_object(node)
        except (yaml.YAMLError, ValueError, OverflowError) as err:
            problem = getattr(err, "problem", None) or str(err)
            raise _error(self.source, line, path, f"invalid value: {_one_line(problem)}") from err
        return _Node(scalar, line, path, key_line or line)

    def _mapping(self, node: yaml.MappingNode, path: str) -> dict[str, _Node]:
        items: dict[str, _Node] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE_TAG:
                raise _error(self.source, key_line, path, "YAML merge keys (<<) are not supported")
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STR_TAG:
                shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else "a collection"
                raise _error(
                    self.source, key_line, path, f"keys must be strings, got {_show(shown)}"
                )
            key = key_node.value
            child = _child_path(path, key)
            if key in items:
                raise _error(
                    self.source,
                    key_line,
                    child,
                    f"duplicate key (first at line {items[key].key_line})",
                )
            items[key] = self.convert(value_node, child, key_line)
        return items


def _python_tree(source: str, value: Any, path: str, active: set[int]) -> _Node:
    if isinstance(value, Mapping | list | tuple):
        if id(value) in active:
            raise _error(source, 0, path, "recursive data")
        active.add(id(value))
        try:
            if isinstance(value, Mapping):
                items: dict[str, _Node] = {}
                for key, item in value.items():
                    if not isinstance(key, str):
                        raise _error(source, 0, path, f"keys must be strings, got {_show(key)}")
                    items[key] = _python_tree(source, item, _child_path(path, key), active)
                return _Node(items, 0, path)
            return _Node(
                [_python_tree(source, v, f"{path}[{i}]", active) for i, v in enumerate(value)],
                0,
                path,
            )
        finally:
            active.discard(id(value))
    return _Node(value, 0, path)


# ---------------------------------------------------------------------------------------------
# Validation


class _PolicyBuilder:
    """Validates a `_Node` tree against the policy format and the action schemas."""

    def __init__(self, source: str, actions: Mapping[str, ActionSchema]) -> None:
        self.source = source
        self.actions: dict[str, ActionSchema] = {
            name: schema for name, schema in actions.items() if name not in _ACTION_ALIASES
        }
        self.actions[KEEP] = _KEEP_SCHEMA

    def fail(self, node: _Node, message: str, *, at_key: bool = False) -> NoReturn:
        raise _error(self.source, node.key_line if at_key else node.line, node.path, message)

    def build(self, root: _Node) -> Policy:
        top = self.mapping(root, _TOP_KEYS, ("name", "description", "rules"), "the policy")
        name = self.string(top["name"], nonempty=True)
        description = self.string(top["description"])
        defaults = self.defaults(top["defaults"]) if "defaults" in top else {}
        rules_node = top["rules"]
        if not isinstance(rules_node.value, list):
            self.fail(rules_node, f"expected a list of rules, got {_describe(rules_node.value)}")
        if not rules_node.value:
            self.fail(rules_node, "is empty; a policy needs at least one rule")
        rules = tuple(
            self.rule(item, index, defaults) for index, item in enumerate(rules_node.value, 1)
        )
        seen: dict[str, Rule] = {}
        for rule, item in zip(rules, rules_node.value, strict=True):
            if rule.name in seen:
                first = seen[rule.name]
                where = f" at line {first.line}" if first.line else ""
                self.fail(
                    item, f"duplicate rule name {rule.name!r} (also rule {first.index}{where})"
                )
            seen[rule.name] = rule
        return Policy(name, description, rules, self.source, defaults)

    # -- structure

    def mapping(
        self, node: _Node, allowed: Sequence[str], required: Sequence[str], what: str
    ) -> dict[str, _Node]:
        if not isinstance(node.value, dict):
            self.fail(node, f"expected {what} as a mapping, got {_describe(node.value)}")
        items: dict[str, _Node] = node.value
        for key, child in items.items():
            if key not in allowed:
                hint = _did_you_mean(key, allowed)
                self.fail(
                    child,
                    f"unknown key{hint}; allowed keys: {', '.join(allowed)}",
                    at_key=True,
                )
        missing = [key for key in required if key not in items]
        if missing:
            self.fail(node, f"missing required key {missing[0]!r} in {what}")
        return items

    def string(self, node: _Node, *, nonempty: bool = False) -> str:
        if not isinstance(node.value, str):
            self.fail(node, f"expected a string, got {_describe(node.value)}")
        if nonempty and not node.value.strip():
            self.fail(node, "must not be empty")
        return node.value

    def items(self, node: _Node, what: str) -> list[_Node]:
        """A scalar or a non-empty list of scalars, as a list of nodes."""
        if isinstance(node.value, dict):
            self.fail(node, f"expected {what}, got a mapping")
        if isinstance(node.value, list):
            if not node.value:
                self.fail(node, "is an empty list, which matches nothing; remove the key")
            for item in node.value:
                if isinstance(item.value, dict | list):
                    self.fail(item, f"expected {what}, got {_describe(item.value)}")
            return list(node.value)
        return [node]

    # -- rules

    def rule(self, node: _Node, index: int, defaults: Mapping[str, Mapping[str, Any]]) -> Rule:
        items = self.mapping(node, _RULE_KEYS, ("match", "action"), "a rule")
        name = self.string(items["name"], nonempty=True) if "name" in items else f"rule {index}"
        action = self.action(items["action"])
        match = self.match(items["match"], exclude=False)
        exclude = self.match(items["exclude"], exclude=True) if "exclude" in items else None
        given = self.params(items["params"], action) if "params" in items else {}
        params = {**self.actions[action].defaults(), **defaults.get(action, {}), **given}
        return Rule(index, name, match, exclude, action, params, node.line)

    def action(self, node: _Node) -> str:
        name = self.string(node)
        name = _ACTION_ALIASES.get(name, name)
        if name not in self.actions:
            known = sorted(self.actions)
            listed = ", ".join(f"{a} (alias ignore)" if a == KEEP else a for a in known)
            self.fail(node, f"unknown action {name!r}{_did_you_mean(name, known)}; known: {listed}")
        return name

    def params(self, node: _Node, action: str) -> dict[str, Any]:
        schema = self.actions[action]
        if not isinstance(node.value, dict):
            self.fail(node, f"expected params as a mapping, got {_describe(node.value)}")
        if not schema.params and node.value:
            first = next(iter(node.value.values()))
            self.fail(first, f"action {action!r} takes no parameters", at_key=True)
        out: dict[str, Any] = {}
        for key, child in node.value.items():
            spec = schema.params.get(key)
            if spec is None:
                hint = _did_you_mean(key, list(schema.params))
                allowed = ", ".join(schema.params)
                self.fail(
                    child,
                    f"unknown parameter for action {action!r}{hint}; allowed: {allowed}",
                    at_key=True,
                )
            if isinstance(child.value, dict | list):
                self.fail(child, f"expected {_TYPE_NAMES[spec.type]}, got {_describe(child.value)}")
            value, problem = _coerce_param(spec, child.value)
            if problem is not None:
                self.fail(child, problem)
            out[key] = value
        return out

    def defaults(self, node: _Node) -> dict[str, dict[str, Any]]:
        if not isinstance(node.value, dict):
            self.fail(node, f"expected a mapping of action -> params, got {_describe(node.value)}")
        out: dict[str, dict[str, Any]] = {}
        for key, child in node.value.items():
            action = _ACTION_ALIASES.get(key, key)
            if action not in self.actions:
                known = sorted(self.actions)
                self.fail(
                    child,
                    f"unknown action{_did_you_mean(key, known)}; known: {', '.join(known)}",
                    at_key=True,
                )
            out[action] = self.params(child, action)
        return out

    # -- match blocks

    def match(self, node: _Node, *, exclude: bool) -> Match:
        what = "an exclude block" if exclude else "a match block"
        if node.value is None:
            hint = "" if exclude else " (use {} to match every site)"
            self.fail(node, f"expected {what} as a mapping, got null{hint}")
        items = self.mapping(node, _MATCH_KEYS, (), what)
        if exclude and not items:
            self.fail(node, "is empty, which excludes every site; remove it")
        fields: dict[str, Any] = {}
        for key, child in items.items():
            if key == "op":
                fields[key] = self.choices(child, _OPS, "an operation")
            elif key == "role":
                fields[key] = self.choices(child, (*_ROLES, _ANY_ROLE), "a role")
            elif key == "groups":
                fields[key] = self.groups(child)
            elif key == "name":
                fields[key] = self.patterns(child)
            elif key == "functional":
                if not isinstance(child.value, bool):
                    self.fail(child, f"expected true or false, got {_describe(child.value)}")
                fields[key] = child.value
            else:
                fields[key] = self.int_condition(child)
        return Match(**fields)

    def choices(self, node: _Node, allowed: Sequence[str], what: str) -> tuple[str, ...]:
        out: list[str] = []
        for item in self.items(node, f"{what} or a list of them"):
            if not isinstance(item.value, str):
                self.fail(
                    item,
                    f"expected {what}, got {_describe(item.value)}; allowed: {', '.join(allowed)}",
                )
            if item.value not in allowed:
                hint = _did_you_mean(item.value, allowed)
                self.fail(
                    item,
                    f"{_show(item.value)} is not {what}{hint}; allowed: {', '.join(allowed)}",
                )
            if item.value not in out:
                out.append(item.value)
        return tuple(out)

    def int_condition(self, node: _Node) -> IntCondition:
        forms = "an integer, a list of integers or a range like {min: 2, max: 4}"
        if isinstance(node.value, dict):
            return self.int_range(node)
        values = []
        for item in self.items(node, forms):
            if not _is_int(item.value):
                self.fail(item, f"expected {forms}, got {_describe(item.value)}")
            values.append(item.value)
        return IntCondition(values=tuple(dict.fromkeys(values)))

    def int_range(self, node: _Node) -> IntCondition:
        items = self.mapping(node, _RANGE_KEYS, (), "a range")
        if not items:
            self.fail(node, "empty range; give min, max or both")
        bounds: dict[str, int] = {}
        for key, child in items.items():
            if not _is_int(child.value):
                self.fail(child, f"expected an integer, got {_describe(child.value)}")
            bounds[key] = child.value
        low, high = bounds.get("min"), bounds.get("max")
        if low is not None and high is not None and low > high:
            self.fail(node, f"min {low} is greater than max {high}")
        return IntCondition(min=low, max=high)

    def groups(self, node: _Node) -> GroupsCondition:
        forms = "an integer, a range, depthwise, grouped or dense (or a list of these)"
        if isinstance(node.value, dict):
            return GroupsCondition(numbers=self.int_range(node))
        numbers: list[int] = []
        kinds: list[GroupKind] = []
        for item in self.items(node, forms):
            if _is_int(item.value):
                numbers.append(item.value)
            elif isinstance(item.value, str) and item.value in _GROUP_KINDS:
                kinds.append(item.value)  # type: ignore[arg-type]  # checked against GroupKind
            elif isinstance(item.value, str):
                hint = _did_you_mean(item.value, _GROUP_KINDS)
                self.fail(
                    item, f"{_show(item.value)} is not a groups value{hint}; allowed: {forms}"
                )
            else:
                self.fail(item, f"expected {forms}, got {_describe(item.value)}")
        condition = IntCondition(values=tuple(dict.fromkeys(numbers))) if numbers else None
        return GroupsCondition(numbers=condition, kinds=tuple(dict.fromkeys(kinds)))

    def patterns(self, node: _Node) -> tuple[str, ...]:
        out: list[str] = []
        for item in self.items(node, "a glob, a 're:' regex or a list of them"):
            pattern = item.value
            if not isinstance(pattern, str):
                self.fail(item, f"expected a glob or 're:<regex>', got {_describe(pattern)}")
            if pattern in ("", "re:"):
                self.fail(item, "empty pattern; it would match no site")
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as err:
                    self.fail(item, f"invalid regular expression {_show(pattern)}: {err}")
            if pattern not in out:
                out.append(pattern)
        return tuple(out)


# ---------------------------------------------------------------------------------------------
# Message helpers


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _show(value: Any) -> str:
    """A short one-line rendering of a value for messages."""
    text = repr(value) if isinstance(value, str) else str(value)
    text = _one_line(text)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"{_show(value)} (a string)"
    if isinstance(value, int | float):
        return _show(value)
    return f"{_show(value)} ({type(value).__name__})"


def _one_line(text: str) -> str:
    return " ".join(text.split())
