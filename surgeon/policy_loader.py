"""YAML (or Python data) -> validated `Policy`, with the file, line and field of every error.

Action parameters are validated against `ActionSchema`s passed in by the caller, so this module
knows nothing about the rewrites themselves. Every error is a one-line `PolicyError` that names
the file, the line and the field, e.g.
`configs/x.yaml:7: rules[1].params.filter_size: 9 is out of range (allowed 1..7)`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, cast

import yaml

from surgeon.errors import PolicyError, describe_value, did_you_mean, one_line, show_value
from surgeon.policy import (
    ANY_ROLE,
    GROUP_KINDS,
    KEEP,
    KEEP_SCHEMA,
    MATCH_KEYS,
    OPS,
    PADDINGS,
    ROLES,
    GroupKind,
    GroupsCondition,
    IntCondition,
    Match,
    Padding,
    Policy,
    Rule,
    location,
)
from surgeon.schema import TYPE_NAMES, ActionSchema, coerce_param

__all__ = [
    "BUILTIN_POLICY_DIR",
    "list_builtin_policies",
    "load_policy",
    "parse_policy",
    "policy_from_dict",
    "resolve_policy_path",
]

_PACKAGE = Path(__file__).resolve().parent
BUILTIN_POLICY_DIR = (
    _PACKAGE / "configs" if (_PACKAGE / "configs").is_dir() else _PACKAGE.parent / "configs"
)
"""Where built-in policies live: `<repo>/configs/<stem>.yaml`, installed as `surgeon/configs/`
(pyproject.toml maps the one onto the other; a source checkout reads the repository's)."""

_ACTION_ALIASES = {"ignore": KEEP}
_TOP_KEYS = ("name", "description", "rules", "defaults", "padding")
_RULE_KEYS = ("name", "match", "exclude", "action", "params")
_RANGE_KEYS = ("min", "max")


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
    hint = did_you_mean(stem, builtins)
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
    return PolicyError(f"{where}: invalid YAML: {one_line(problem)}")


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
    segment = key if re.fullmatch(r"[A-Za-z0-9_\-]+", key) else f"[{show_value(key)}]"
    if not path:
        return segment
    return f"{path}{segment}" if segment.startswith("[") else f"{path}.{segment}"


def _error(source: str, line: int, path: str, message: str) -> PolicyError:
    where = location(source, line)
    return PolicyError(f"{where}: {path}: {message}" if path else f"{where}: {message}")


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
            raise _error(self.source, line, path, f"invalid value: {one_line(problem)}") from err
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
                    self.source, key_line, path, f"keys must be strings, got {show_value(shown)}"
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
                        raise _error(
                            source, 0, path, f"keys must be strings, got {show_value(key)}"
                        )
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
        self.actions[KEEP] = KEEP_SCHEMA

    def fail(self, node: _Node, message: str, *, at_key: bool = False) -> NoReturn:
        raise _error(self.source, node.key_line if at_key else node.line, node.path, message)

    def build(self, root: _Node) -> Policy:
        top = self.mapping(root, _TOP_KEYS, ("name", "description", "rules"), "the policy")
        name = self.string(top["name"], nonempty=True)
        description = self.string(top["description"])
        defaults = self.defaults(top["defaults"]) if "defaults" in top else {}
        padding = self.padding(top["padding"]) if "padding" in top else "keep"
        rules_node = top["rules"]
        if not isinstance(rules_node.value, list):
            self.fail(
                rules_node, f"expected a list of rules, got {describe_value(rules_node.value)}"
            )
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
        return Policy(name, description, rules, self.source, defaults, padding)

    # -- structure

    def mapping(
        self, node: _Node, allowed: Sequence[str], required: Sequence[str], what: str
    ) -> dict[str, _Node]:
        if not isinstance(node.value, dict):
            self.fail(node, f"expected {what} as a mapping, got {describe_value(node.value)}")
        items: dict[str, _Node] = node.value
        for key, child in items.items():
            if key not in allowed:
                hint = did_you_mean(key, allowed)
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
            self.fail(node, f"expected a string, got {describe_value(node.value)}")
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
                    self.fail(item, f"expected {what}, got {describe_value(item.value)}")
            return list(node.value)
        return [node]

    def padding(self, node: _Node) -> Padding:
        if not isinstance(node.value, str):
            self.fail(
                node,
                f"expected one of {', '.join(PADDINGS)}, got {describe_value(node.value)}",
            )
        if node.value not in PADDINGS:
            hint = did_you_mean(node.value, PADDINGS)
            self.fail(
                node,
                f"{show_value(node.value)} is not a padding{hint}; allowed: {', '.join(PADDINGS)}",
            )
        return cast(Padding, node.value)

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
            self.fail(node, f"unknown action {name!r}{did_you_mean(name, known)}; known: {listed}")
        return name

    def params(self, node: _Node, action: str) -> dict[str, Any]:
        schema = self.actions[action]
        if not isinstance(node.value, dict):
            self.fail(node, f"expected params as a mapping, got {describe_value(node.value)}")
        if not schema.params and node.value:
            first = next(iter(node.value.values()))
            self.fail(first, f"action {action!r} takes no parameters", at_key=True)
        out: dict[str, Any] = {}
        for key, child in node.value.items():
            spec = schema.params.get(key)
            if spec is None:
                hint = did_you_mean(key, list(schema.params))
                allowed = ", ".join(schema.params)
                self.fail(
                    child,
                    f"unknown parameter for action {action!r}{hint}; allowed: {allowed}",
                    at_key=True,
                )
            if isinstance(child.value, dict | list):
                self.fail(
                    child, f"expected {TYPE_NAMES[spec.type]}, got {describe_value(child.value)}"
                )
            value, problem = coerce_param(spec, child.value)
            if problem is not None:
                self.fail(child, problem)
            out[key] = value
        return out

    def defaults(self, node: _Node) -> dict[str, dict[str, Any]]:
        if not isinstance(node.value, dict):
            self.fail(
                node, f"expected a mapping of action -> params, got {describe_value(node.value)}"
            )
        out: dict[str, dict[str, Any]] = {}
        for key, child in node.value.items():
            action = _ACTION_ALIASES.get(key, key)
            if action not in self.actions:
                known = sorted(self.actions)
                self.fail(
                    child,
                    f"unknown action{did_you_mean(key, known)}; known: {', '.join(known)}",
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
        items = self.mapping(node, MATCH_KEYS, (), what)
        if exclude and not items:
            self.fail(node, "is empty, which excludes every site; remove it")
        fields: dict[str, Any] = {}
        for key, child in items.items():
            if key == "op":
                fields[key] = self.choices(child, OPS, "an operation")
            elif key == "role":
                fields[key] = self.choices(child, (*ROLES, ANY_ROLE), "a role")
            elif key == "groups":
                fields[key] = self.groups(child)
            elif key == "name":
                fields[key] = self.patterns(child)
            elif key == "functional":
                if not isinstance(child.value, bool):
                    self.fail(child, f"expected true or false, got {describe_value(child.value)}")
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
                    f"expected {what}, got {describe_value(item.value)}; "
                    f"allowed: {', '.join(allowed)}",
                )
            if item.value not in allowed:
                hint = did_you_mean(item.value, allowed)
                self.fail(
                    item,
                    f"{show_value(item.value)} is not {what}{hint}; allowed: {', '.join(allowed)}",
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
                self.fail(item, f"expected {forms}, got {describe_value(item.value)}")
            values.append(item.value)
        return IntCondition(values=tuple(dict.fromkeys(values)))

    def int_range(self, node: _Node) -> IntCondition:
        items = self.mapping(node, _RANGE_KEYS, (), "a range")
        if not items:
            self.fail(node, "empty range; give min, max or both")
        bounds: dict[str, int] = {}
        for key, child in items.items():
            if not _is_int(child.value):
                self.fail(child, f"expected an integer, got {describe_value(child.value)}")
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
            elif isinstance(item.value, str) and item.value in GROUP_KINDS:
                kinds.append(item.value)  # type: ignore[arg-type]  # checked against GroupKind
            elif isinstance(item.value, str):
                hint = did_you_mean(item.value, GROUP_KINDS)
                self.fail(
                    item, f"{show_value(item.value)} is not a groups value{hint}; allowed: {forms}"
                )
            else:
                self.fail(item, f"expected {forms}, got {describe_value(item.value)}")
        condition = IntCondition(values=tuple(dict.fromkeys(numbers))) if numbers else None
        return GroupsCondition(numbers=condition, kinds=tuple(dict.fromkeys(kinds)))

    def patterns(self, node: _Node) -> tuple[str, ...]:
        out: list[str] = []
        for item in self.items(node, "a glob, a 're:' regex or a list of them"):
            pattern = item.value
            if not isinstance(pattern, str):
                self.fail(item, f"expected a glob or 're:<regex>', got {describe_value(pattern)}")
            if pattern in ("", "re:"):
                self.fail(item, "empty pattern; it would match no site")
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as err:
                    self.fail(item, f"invalid regular expression {show_value(pattern)}: {err}")
            if pattern not in out:
                out.append(pattern)
        return tuple(out)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
