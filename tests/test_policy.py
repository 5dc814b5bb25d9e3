"""Policy loading, validation errors (with line numbers), rule matching and precedence."""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st

from surgeon import policy as policy_module
from surgeon import policy_loader
from surgeon.errors import PolicyError
from surgeon.policy import (
    KEEP,
    Decision,
    GroupsCondition,
    IntCondition,
    Match,
    Policy,
    check_strict,
    decide,
    unused_rules,
)
from surgeon.policy_loader import (
    list_builtin_policies,
    load_policy,
    parse_policy,
    policy_from_dict,
    resolve_policy_path,
)
from surgeon.schema import ActionSchema, ParamSpec
from surgeon.sites import Role, Site

ACTIONS: dict[str, ActionSchema] = {
    "spd": ActionSchema(
        "spd",
        {
            "kernel_size": ParamSpec("kernel_size", int, 3, min=1, max=7),
            "init": ParamSpec("init", str, "transfer", choices=("transfer", "random")),
            "block_size": ParamSpec("block_size", int, 2, min=2),
        },
        "space-to-depth then a non-strided conv",
    ),
    "antialias": ActionSchema(
        "antialias",
        {
            "filter_size": ParamSpec("filter_size", int, 3, min=1, max=7),
            "pad_mode": ParamSpec("pad_mode", str, "reflect", choices=("reflect", "zeros")),
            "sigma": ParamSpec("sigma", float, None, min=0.0),
            "learnable": ParamSpec("learnable", bool, False),
        },
        "blur before subsampling",
    ),
    "pool": ActionSchema.of("pool", ParamSpec("stride", int, 2, min=1), help="re-stride a pool"),
}


def make_site(
    name: str = "layer1.0.conv1",
    *,
    op: str = "conv",
    role: str = "downsample",
    stride: int = 2,
    kernel: int = 3,
    groups: int = 1,
    in_channels: int = 16,
    out_channels: int = 32,
    stage_in: int = 1,
    dims: int = 2,
    functional: bool = False,
) -> Site:
    """A Site with consistent arithmetic for a 32x32 input; only the fields rules look at vary."""
    size = 32 // stage_in
    out = size // stride
    return Site(
        name=name,
        op=op,  # type: ignore[arg-type]
        role=role,  # type: ignore[arg-type]
        dims=dims,
        type_name="Conv2d" if op == "conv" else "MaxPool2d",
        functional=functional,
        kernel=(kernel,) * dims if kernel else (),
        stride=(stride,) * dims,
        padding=(kernel // 2,) * dims,
        dilation=(1,) * dims,
        groups=groups,
        ceil_mode=False,
        in_channels=in_channels,
        out_channels=out_channels,
        bias=False,
        in_shape=(1, in_channels, size, size),
        out_shape=(1, out_channels, out, out),
        stage_in=stage_in,
        stage_out=stage_in * stride,
        macs=0,
        params=0,
        found_by="test",
    )


def parse(text: str, actions: dict[str, ActionSchema] | None = None) -> Policy:
    return parse_policy(textwrap.dedent(text), "p.yaml", ACTIONS if actions is None else actions)


def error_of(text: str) -> str:
    with pytest.raises(PolicyError) as info:
        parse(text)
    return str(info.value)


HEADER = """\
name: test
description: a test policy
rules:
"""


def one_rule(rule: str) -> str:
    """A policy whose only rule is `rule` (indented under `rules:` starting at line 4)."""
    return HEADER + textwrap.indent(textwrap.dedent(rule), "  ")


# ---------------------------------------------------------------------------------------------
# Loading a valid policy


def test_full_example_loads_with_resolved_params_and_lines() -> None:
    policy = parse(
        """\
        name: spd
        description: SPD-Conv at every strided layer.
        defaults:
          spd: {init: random}
        rules:
          - name: stem-keep
            match: {op: conv, stage_in: 1}
            action: keep
          - match:
              op: [conv, avg_pool]
              stride: 2
              kernel: [1, 3]
              groups: depthwise
              in_channels: {min: 16}
              stage_out: {max: 32}
              dims: 2
              role: downsample
              name: "layer*.0.*"
              functional: false
            exclude: {name: "re:.*downsample.*"}
            action: spd
            params: {kernel_size: 5}
        """
    )
    assert policy.name == "spd"
    assert [r.name for r in policy.rules] == ["stem-keep", "rule 2"]
    assert [r.line for r in policy.rules] == [6, 9]
    stem, spd = policy.rules
    assert stem.action == KEEP and stem.params == {}
    assert spd.params == {"kernel_size": 5, "init": "random", "block_size": 2}
    assert spd.match.op == ("conv", "avg_pool")
    assert spd.match.stride == IntCondition(values=(2,))
    assert spd.match.in_channels == IntCondition(min=16)
    assert spd.match.groups == GroupsCondition(kinds=("depthwise",))
    assert spd.exclude == Match(name=("re:.*downsample.*",))


def test_ignore_is_an_alias_of_keep() -> None:
    policy = parse(one_rule("- {match: {}, action: ignore}"))
    assert policy.rules[0].action == KEEP


def test_float_param_accepts_an_integer_and_stores_a_float() -> None:
    policy = parse(one_rule("- {match: {}, action: antialias, params: {sigma: 1}}"))
    sigma = policy.rules[0].params["sigma"]
    assert sigma == 1.0 and isinstance(sigma, float)


def test_params_resolve_action_defaults_under_policy_defaults_under_rule_params() -> None:
    policy = parse(
        """\
        name: d
        description: defaults
        defaults:
          antialias: {filter_size: 5, pad_mode: zeros}
        rules:
          - {match: {op: conv}, action: antialias, params: {filter_size: 7}}
          - {match: {}, action: antialias}
          - {match: {}, action: spd}
        """
    )
    assert dict(policy.rules[0].params) == {
        "filter_size": 7,
        "pad_mode": "zeros",
        "sigma": None,
        "learnable": False,
    }
    assert policy.rules[1].params["filter_size"] == 5
    assert dict(policy.rules[2].params) == {"kernel_size": 3, "init": "transfer", "block_size": 2}


def test_keep_is_known_even_when_actions_is_empty() -> None:
    assert parse(one_rule("- {match: {}, action: keep}"), actions={}).rules[0].action == KEEP


# ---------------------------------------------------------------------------------------------
# Errors: each names the file, the line and the field


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (
            "- match: {op: conv}\n  action: spd\n  params:\n    kernel_size: 9\n",
            "p.yaml:7: rules[0].params.kernel_size: 9 is out of range (allowed 1..7)",
        ),
        (
            "- match: {}\n  action: pool\n  params: {stride: 0}\n",
            "p.yaml:6: rules[0].params.stride: 0 is out of range (allowed >= 1)",
        ),
        (
            "- match: {}\n  action: spd\n  params: {block_size: 1}\n",
            "p.yaml:6: rules[0].params.block_size: 1 is out of range (allowed >= 2)",
        ),
        (
            "- match: {}\n  action: spd\n  params: {init: zeros}\n",
            "p.yaml:6: rules[0].params.init: 'zeros' is not allowed (choose from 'transfer', "
            "'random')",
        ),
        (
            "- match: {}\n  action: spd\n  params: {kernel_size: three}\n",
            "p.yaml:6: rules[0].params.kernel_size: expected an integer, got 'three' (a string)",
        ),
        (
            "- match: {}\n  action: spd\n  params: {kernel_size: true}\n",
            "p.yaml:6: rules[0].params.kernel_size: expected an integer, got true",
        ),
        (
            "- match: {}\n  action: spd\n  params: {kernel_size: 2.5}\n",
            "p.yaml:6: rules[0].params.kernel_size: expected an integer, got 2.5",
        ),
        (
            "- match: {}\n  action: antialias\n  params: {sigma: .nan}\n",
            "p.yaml:6: rules[0].params.sigma: expected a finite number, got nan",
        ),
        (
            "- match: {}\n  action: antialias\n  params: {learnable: 1}\n",
            "p.yaml:6: rules[0].params.learnable: expected true or false, got 1",
        ),
        (
            "- match: {}\n  action: antialias\n  params:\n    filter_sise: 3\n",
            "p.yaml:7: rules[0].params.filter_sise: unknown parameter for action 'antialias' "
            "(did you mean 'filter_size'?); allowed: filter_size, pad_mode, sigma, learnable",
        ),
        (
            "- match: {}\n  action: antialias\n  params: [filter_size]\n",
            "p.yaml:6: rules[0].params: expected params as a mapping, got a list",
        ),
        (
            "- match: {}\n  action: keep\n  params: {filter_size: 3}\n",
            "p.yaml:6: rules[0].params.filter_size: action 'keep' takes no parameters",
        ),
        (
            "- match: {}\n  action: spdd\n",
            "p.yaml:5: rules[0].action: unknown action 'spdd' (did you mean 'spd'?); "
            "known: antialias, keep (alias ignore), pool, spd",
        ),
        (
            "- match: {}\n  action: [spd]\n",
            "p.yaml:5: rules[0].action: expected a string, got a list",
        ),
        (
            "- match: {}\n",
            "p.yaml:4: rules[0]: missing required key 'action' in a rule",
        ),
        (
            "- action: spd\n",
            "p.yaml:4: rules[0]: missing required key 'match' in a rule",
        ),
        (
            "- match: {}\n  action: spd\n  parms: {}\n",
            "p.yaml:6: rules[0].parms: unknown key (did you mean 'params'?); "
            "allowed keys: name, match, exclude, action, params",
        ),
        (
            "- match:\n  action: spd\n",
            "p.yaml:4: rules[0].match: expected a match block as a mapping, got null "
            "(use {} to match every site)",
        ),
        (
            "- match: conv\n  action: spd\n",
            "p.yaml:4: rules[0].match: expected a match block as a mapping, got 'conv' (a string)",
        ),
        (
            "- match:\n    op: conv\n    strid: 2\n  action: spd\n",
            "p.yaml:6: rules[0].match.strid: unknown key (did you mean 'stride'?); allowed keys: "
            "op, stride, kernel, in_channels, out_channels, stage_in, stage_out, dims, groups, "
            "role, name, functional",
        ),
        (
            "- match: {op: [conv, maxpool]}\n  action: spd\n",
            "p.yaml:4: rules[0].match.op[1]: 'maxpool' is not an operation (did you mean "
            "'max_pool'?); allowed: conv, max_pool, avg_pool, lp_pool, adaptive_avg_pool, "
            "adaptive_max_pool, conv_transpose, interpolate, pixel_shuffle",
        ),
        (
            "- match: {op: []}\n  action: spd\n",
            "p.yaml:4: rules[0].match.op: is an empty list, which matches nothing; remove the key",
        ),
        (
            "- match: {role: downsampling}\n  action: spd\n",
            "p.yaml:4: rules[0].match.role: 'downsampling' is not a role (did you mean "
            f"'downsample'?); allowed: {', '.join(get_args(Role))}, any",
        ),
        (
            "- match: {stride: two}\n  action: spd\n",
            "p.yaml:4: rules[0].match.stride: expected an integer, a list of integers or a range "
            "like {min: 2, max: 4}, got 'two' (a string)",
        ),
        (
            "- match:\n    stride: [2, 2.5]\n  action: spd\n",
            "p.yaml:5: rules[0].match.stride[1]: expected an integer, a list of integers or a "
            "range like {min: 2, max: 4}, got 2.5",
        ),
        (
            "- match:\n    kernel: {min: 5, max: 3}\n  action: spd\n",
            "p.yaml:5: rules[0].match.kernel: min 5 is greater than max 3",
        ),
        (
            "- match:\n    kernel: {min: 1, mx: 3}\n  action: spd\n",
            "p.yaml:5: rules[0].match.kernel.mx: unknown key (did you mean 'max'?); "
            "allowed keys: min, max",
        ),
        (
            "- match:\n    kernel: {}\n  action: spd\n",
            "p.yaml:5: rules[0].match.kernel: empty range; give min, max or both",
        ),
        (
            "- match: {groups: depthwize}\n  action: spd\n",
            "p.yaml:4: rules[0].match.groups: 'depthwize' is not a groups value (did you mean "
            "'depthwise'?); allowed: an integer, a range, depthwise, grouped or dense "
            "(or a list of these)",
        ),
        (
            "- match: {name: 're:layer[1'}\n  action: spd\n",
            "p.yaml:4: rules[0].match.name: invalid regular expression 're:layer[1': "
            "unterminated character set at position 5",
        ),
        (
            "- match: {name: ''}\n  action: spd\n",
            "p.yaml:4: rules[0].match.name: empty pattern; it would match no site",
        ),
        (
            "- match: {functional: maybe}\n  action: spd\n",
            "p.yaml:4: rules[0].match.functional: expected true or false, got 'maybe' (a string)",
        ),
        (
            "- match: {}\n  exclude: {}\n  action: spd\n",
            "p.yaml:5: rules[0].exclude: is empty, which excludes every site; remove it",
        ),
        (
            "- match: {}\n  name: ''\n  action: spd\n",
            "p.yaml:5: rules[0].name: must not be empty",
        ),
        (
            "- match:\n    op: conv\n    op: max_pool\n  action: spd\n",
            "p.yaml:6: rules[0].match.op: duplicate key (first at line 5)",
        ),
        (
            "- match: {}\n  action: spd\n  params:\n    kernel_size: 2001-02-30\n",
            "p.yaml:7: rules[0].params.kernel_size: invalid value: day is out of range for month",
        ),
        (
            "- match: {name: !!python/name:os.system x}\n  action: spd\n",
            "p.yaml:4: rules[0].match.name: invalid value: could not determine a constructor for "
            "the tag 'tag:yaml.org,2002:python/name:os.system'",
        ),
        (
            "- match: !custom {}\n  action: spd\n",
            "p.yaml:4: rules[0].match: unsupported YAML tag '!custom'",
        ),
        (
            "- <<: {match: {}}\n  action: spd\n",
            "p.yaml:4: rules[0]: YAML merge keys (<<) are not supported",
        ),
        (
            "- match: {1: conv}\n  action: spd\n",
            "p.yaml:4: rules[0].match: keys must be strings, got '1'",
        ),
    ],
)
def test_rule_errors_name_file_line_and_field(rule: str, expected: str) -> None:
    assert error_of(one_rule(rule)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "p.yaml: policy is empty; expected a mapping with name, description and rules"),
        ("# only a comment\n", "p.yaml: policy is empty; expected a mapping with name"),
        ("- a\n- b\n", "p.yaml:1: expected the policy as a mapping, got a list"),
        ("name: x\nrules: [\n", "p.yaml:3:1: invalid YAML: expected the node content"),
        ("name: x\n  bad: indent\n", "p.yaml:2:6: invalid YAML: mapping values are not allowed"),
        ("name: a\n---\nname: b\n", "p.yaml:2:1: invalid YAML: but found another document"),
        (
            "name: x\ndescription: \x1f\n",
            "p.yaml:2:14: invalid YAML: unacceptable character #x001f",
        ),
        ("name: x\ndescription: y\n", "p.yaml:1: missing required key 'rules' in the policy"),
        ("name: x\ndescription: y\nrules: []\n", "p.yaml:3: rules: is empty; a policy needs"),
        ("name: x\ndescription: y\nrules: {a: 1}\n", "p.yaml:3: rules: expected a list of rules"),
        ("name: x\nname: y\n", "p.yaml:2: name: duplicate key (first at line 1)"),
        ("name: 3\ndescription: y\nrules: []\n", "p.yaml:1: name: expected a string, got 3"),
        (
            "name: x\ndescripton: y\nrules: []\n",
            "p.yaml:2: descripton: unknown key (did you mean 'description'?); "
            "allowed keys: name, description, rules, defaults",
        ),
        (
            "name: x\ndescription: y\nrules: &r\n  - *r\n",
            "p.yaml:3: rules[0]: recursive YAML alias",
        ),
        (
            "name: x\ndescription: y\ndefaults:\n  spdd: {}\nrules: [{match: {}, action: spd}]\n",
            "p.yaml:4: defaults.spdd: unknown action (did you mean 'spd'?); "
            "known: antialias, keep, pool, spd",
        ),
        (
            "name: x\ndescription: y\ndefaults:\n  spd: {kernel_size: 8}\n"
            "rules: [{match: {}, action: spd}]\n",
            "p.yaml:4: defaults.spd.kernel_size: 8 is out of range (allowed 1..7)",
        ),
        (
            "name: x\ndescription: y\ndefaults: [spd]\nrules: [{match: {}, action: spd}]\n",
            "p.yaml:3: defaults: expected a mapping of action -> params, got a list",
        ),
        (
            "name: x\ndescription: y\nrules:\n  - {name: a, match: {}, action: spd}\n"
            "  - {name: a, match: {}, action: keep}\n",
            "p.yaml:5: rules[1]: duplicate rule name 'a' (also rule 1 at line 4)",
        ),
    ],
)
def test_document_errors_name_file_and_line(text: str, expected: str) -> None:
    message = error_of(text)
    assert message.startswith(expected), f"got {message!r}, wanted it to start with {expected!r}"
    assert "\n" not in message


def test_odd_keys_are_quoted_in_the_field_path() -> None:
    message = error_of(one_rule("- match: {'a b': 1}\n  action: spd\n"))
    assert message.startswith("p.yaml:4: rules[0].match['a b']: unknown key")


# ---------------------------------------------------------------------------------------------
# Matching


def one_match(match: dict[str, Any], exclude: dict[str, Any] | None = None) -> Policy:
    rule: dict[str, Any] = {"match": match, "action": "spd"}
    if exclude is not None:
        rule["exclude"] = exclude
    return policy_from_dict({"name": "m", "description": "", "rules": [rule]}, ACTIONS)


def matches(match: dict[str, Any], site: Site, exclude: dict[str, Any] | None = None) -> bool:
    return one_match(match, exclude).rules[0].matches(site)


@pytest.mark.parametrize(
    ("match", "site", "expected"),
    [
        ({}, make_site(), True),
        ({"op": "conv"}, make_site(op="max_pool"), False),
        ({"op": ["conv", "max_pool"]}, make_site(op="max_pool"), True),
        ({"stride": 2}, make_site(stride=2), True),
        ({"stride": [3, 4]}, make_site(stride=2), False),
        ({"stride": {"min": 2, "max": 4}}, make_site(stride=4), True),
        ({"stride": {"min": 3}}, make_site(stride=2), False),
        ({"kernel": {"max": 3}}, make_site(kernel=3), True),
        ({"kernel": {"max": 3}}, make_site(kernel=7), False),
        ({"kernel": 3}, replace(make_site(), kernel=(1, 3)), True),
        ({"in_channels": {"min": 32}}, make_site(in_channels=16), False),
        ({"out_channels": [32, 64]}, make_site(out_channels=64), True),
        ({"stage_in": 1}, make_site(stage_in=1), True),
        ({"stage_out": {"min": 8}}, make_site(stage_in=2, stride=2), False),
        ({"dims": 1}, make_site(dims=2), False),
        ({"groups": "depthwise"}, make_site(groups=16, in_channels=16), True),
        ({"groups": "depthwise"}, make_site(groups=4, in_channels=16), False),
        ({"groups": "grouped"}, make_site(groups=4, in_channels=16), True),
        ({"groups": "dense"}, make_site(groups=1), True),
        ({"groups": [4, "dense"]}, make_site(groups=4), True),
        ({"groups": {"min": 2}}, make_site(groups=1), False),
        ({"name": "layer*.0.*"}, make_site("layer2.0.conv1"), True),
        ({"name": "layer*.0.*"}, make_site("layer2.1.conv1"), False),
        ({"name": "Layer*"}, make_site("layer2.0.conv1"), False),
        ({"name": ["stem.*", "re:layer[34]\\..*"]}, make_site("layer3.0.conv1"), True),
        ({"name": "re:layer"}, make_site("layer3.0.conv1"), False),
        ({"functional": True}, make_site(functional=False), False),
        ({"functional": False}, make_site(functional=False), True),
    ],
)
def test_match_conditions(match: dict[str, Any], site: Site, expected: bool) -> None:
    assert matches(match, site) is expected, f"{match} on {site.name}: expected {expected}"


def test_match_requires_every_set_condition() -> None:
    site = make_site("layer1.0.conv1", stride=2, kernel=3)
    assert matches({"op": "conv", "stride": 2, "kernel": 3}, site)
    assert not matches({"op": "conv", "stride": 2, "kernel": 1}, site)


def test_stride_compares_against_the_largest_stride() -> None:
    site = replace(make_site(), stride=(1, 2))
    assert matches({"stride": 2}, site)
    assert not matches({"stride": 1}, site)


def test_rules_only_see_sites_of_their_role() -> None:
    patchify = make_site("patch_embed.proj", role="patchify", stride=16, kernel=16)
    pool = make_site("head.pool", op="adaptive_avg_pool", role="global_pool", kernel=0)
    assert not matches({}, patchify)
    assert not matches({}, pool)
    assert matches({"role": "patchify"}, patchify)
    assert not matches({"role": "patchify"}, make_site())
    assert matches({"role": "any"}, pool)
    assert matches({"role": ["global_pool", "downsample"]}, pool)


def test_exclude_removes_sites_the_match_accepts() -> None:
    site = make_site("layer2.0.downsample.0")
    assert matches({"op": "conv"}, site)
    assert not matches({"op": "conv"}, site, exclude={"name": "re:.*downsample.*"})
    assert matches({"op": "conv"}, make_site("layer2.0.conv1"), exclude={"name": "*downsample*"})


def test_exclude_without_role_applies_to_the_rules_role() -> None:
    patchify = make_site("patch_embed.proj", role="patchify")
    assert not matches({"role": "patchify"}, patchify, exclude={"name": "patch_embed.*"})
    assert matches({"role": "patchify"}, patchify, exclude={"name": "other.*"})


# ---------------------------------------------------------------------------------------------
# Deciding


PRECEDENCE = """\
name: p
description: precedence
rules:
  - name: spd-all
    match: {op: conv}
    action: spd
  - name: stem
    match: {stage_in: 1}
    action: keep
  - name: blur-pools
    match: {op: max_pool}
    action: antialias
  - name: spd-late
    match: {stage_in: {min: 4}}
    action: spd
    params: {kernel_size: 1}
"""


def test_keep_wins_over_earlier_and_later_rules() -> None:
    policy = parse(PRECEDENCE)
    stem_conv = make_site("conv1", stage_in=1)
    stem_pool = make_site("maxpool", op="max_pool", stage_in=1)
    conv_decision, pool_decision = decide(policy, [stem_conv, stem_pool])
    assert (conv_decision.action, conv_decision.rule_index) == (KEEP, 2)
    assert conv_decision.reason == "keep rule 2 (stem) wins over rule 1 (spd-all)"
    assert (pool_decision.action, pool_decision.rule_name) == (KEEP, "stem")
    assert pool_decision.reason == "keep rule 2 (stem) wins over rule 3 (blur-pools)"
    assert not conv_decision.changes_site


def test_first_matching_rule_decides_otherwise() -> None:
    policy = parse(PRECEDENCE)
    late_conv = make_site("layer3.0.conv1", stage_in=4)
    (decision,) = decide(policy, [late_conv])
    assert decision == Decision(
        site="layer3.0.conv1",
        action="spd",
        params={"kernel_size": 3, "init": "transfer", "block_size": 2},
        rule_index=1,
        rule_name="spd-all",
        reason="matched rule 1 (spd-all)",
    )
    assert decision.changes_site


def test_unmatched_sites_are_left_unchanged_with_a_reason() -> None:
    policy = parse(
        one_rule("- {match: {op: conv}, exclude: {name: 'skip.*'}, action: spd, name: convs}")
    )
    sites = [
        make_site("pool", op="avg_pool"),
        make_site("patch", role="patchify"),
        make_site("skip.conv"),
        make_site("conv"),
    ]
    decisions = decide(policy, sites)
    assert [d.site for d in decisions] == ["pool", "patch", "skip.conv", "conv"]
    assert [d.reason for d in decisions] == [
        "no rule matched",
        "role patchify: not a downsampling site",
        "no rule matched; rule 1 (convs) excluded it",
        "matched rule 1 (convs)",
    ]
    assert all(d.action is None and d.params == {} and d.rule_index is None for d in decisions[:3])


def test_unnamed_rules_are_called_rule_n() -> None:
    policy = parse(one_rule("- {match: {}, action: keep}\n- {match: {}, action: spd}"))
    (decision,) = decide(policy, [make_site()])
    assert decision.reason == "keep rule 1 wins over rule 2"
    assert decision.rule_name == "rule 1"


def test_decision_to_dict_is_json_ready() -> None:
    (decision,) = decide(parse(PRECEDENCE), [make_site(stage_in=4)])
    assert json.loads(json.dumps(decision.to_dict()))["params"]["kernel_size"] == 3


# ---------------------------------------------------------------------------------------------
# Unused rules and strict mode


def test_unused_rules_include_shadowed_and_unmatched_rules() -> None:
    policy = parse(PRECEDENCE)
    decisions = decide(policy, [make_site("conv1", stage_in=1), make_site("l3", stage_in=4)])
    assert [r.name for r in unused_rules(policy, decisions)] == ["blur-pools", "spd-late"]


def test_check_strict_names_every_unused_rule_and_its_line() -> None:
    policy = parse(PRECEDENCE)
    decisions = decide(policy, [make_site("conv1", stage_in=1), make_site("l3", stage_in=4)])
    with pytest.raises(PolicyError) as info:
        check_strict(policy, decisions)
    assert str(info.value) == (
        "p.yaml:10: rule 3 (blur-pools) decided no site, nor did rule 4 (spd-late) at line 13; "
        "strict mode treats unused rules as errors (fix their matches or remove them)"
    )


def test_check_strict_passes_when_every_rule_decided_a_site() -> None:
    policy = parse(PRECEDENCE)
    sites = [
        make_site("a", stage_in=2),
        make_site("b", stage_in=1),
        make_site("c", op="max_pool", stage_in=2),
        make_site("d", op="avg_pool", stage_in=4),
    ]
    decisions = decide(policy, sites)
    assert [d.rule_index for d in decisions] == [1, 2, 3, 4]
    check_strict(policy, decisions)


# ---------------------------------------------------------------------------------------------
# Serialisation


def test_to_dict_round_trips_through_policy_from_dict_and_json() -> None:
    policy = parse(
        """\
        name: rt
        description: round trip
        defaults: {antialias: {pad_mode: zeros}}
        rules:
          - name: stem
            match: {stage_in: 1, name: ["conv1", "re:stem\\\\..*"]}
            action: ignore
          - match: {op: [conv, max_pool], stride: {min: 2}, groups: [1, depthwise], kernel: 3}
            exclude: {role: any, functional: true}
            action: antialias
            params: {sigma: 0.5}
          - match: {groups: {max: 8}, role: patchify, dims: [2, 3]}
            action: spd
        """
    )
    data = json.loads(json.dumps(policy.to_dict()))
    again = policy_from_dict(data, ACTIONS, source_name=policy.source)
    assert again == policy
    assert again.to_dict() == policy.to_dict()
    assert [r.line for r in again.rules] == [0, 0, 0]


def test_policy_from_dict_errors_name_the_field_without_a_line() -> None:
    with pytest.raises(PolicyError) as info:
        policy_from_dict(
            {
                "name": "x",
                "description": "",
                "rules": [{"match": {"stride": 0.5}, "action": "spd"}],
            },
            ACTIONS,
        )
    assert str(info.value).startswith("<dict>: rules[0].match.stride: expected an integer")


def test_policy_from_dict_accepts_tuples() -> None:
    policy = policy_from_dict(
        {
            "name": "x",
            "description": "",
            "rules": ({"match": {"op": ("conv",)}, "action": "keep"},),
        },
        ACTIONS,
    )
    assert policy.rules[0].match.op == ("conv",)


# ---------------------------------------------------------------------------------------------
# Files and built-in policies


@pytest.fixture
def builtin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "spd.yaml").write_text(
        "name: spd\ndescription: SPD everywhere.\nrules: [{match: {}, action: spd}]\n"
    )
    (configs / "blur.yaml").write_text(
        "name: blur\ndescription: Blur pools.\nrules: [{match: {}, action: antialias}]\n"
    )
    (configs / "notes.txt").write_text("not a policy")
    monkeypatch.setattr(policy_loader, "BUILTIN_POLICY_DIR", configs)
    return configs


def test_builtin_policies_are_listed_with_descriptions(builtin_dir: Path) -> None:
    assert list_builtin_policies() == [("blur", "Blur pools."), ("spd", "SPD everywhere.")]


def test_builtin_name_resolves_to_the_configs_file(builtin_dir: Path) -> None:
    assert resolve_policy_path("spd") == builtin_dir / "spd.yaml"
    assert resolve_policy_path("spd.yaml") == builtin_dir / "spd.yaml"
    assert load_policy("blur", ACTIONS).rules[0].action == "antialias"


def test_existing_path_wins_over_builtin_name(
    builtin_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = tmp_path / "work"
    local.mkdir()
    (local / "spd").write_text("name: mine\ndescription: local\nrules: [{match: {}, action: keep}]")
    monkeypatch.chdir(local)
    assert resolve_policy_path("spd") == Path("spd")
    assert load_policy("spd", ACTIONS).name == "mine"


def test_unknown_policy_lists_builtins_and_suggests_a_path(builtin_dir: Path) -> None:
    with pytest.raises(PolicyError) as info:
        resolve_policy_path("spdd")
    message = str(info.value)
    assert "unknown policy 'spdd' (did you mean 'spd'?)" in message
    assert "built-in policies: blur, spd" in message
    assert "pass a path to a .yaml file" in message


def test_load_policy_errors_use_the_path_as_given(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(HEADER + "  - match: {op: conv}\n    action: spd\n    params: {init: x}\n")
    with pytest.raises(PolicyError, match=re.escape(f"{path}:6: rules[0].params.init: 'x'")):
        load_policy(path, ACTIONS)


def test_load_policy_rejects_non_utf8_files(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(PolicyError, match="not UTF-8 text"):
        load_policy(path, ACTIONS)


def test_schema_rejects_a_default_outside_its_own_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        ParamSpec("filter_size", int, 9, min=1, max=7)


# ---------------------------------------------------------------------------------------------
# Property: any document gives a Policy or a PolicyError, never another exception

SITES = [
    make_site("conv1", stage_in=1),
    make_site("layer1.0.conv2", groups=16, in_channels=16),
    make_site("maxpool", op="max_pool"),
    make_site("patch", role="patchify", stride=4, kernel=4),
    make_site("pool", op="adaptive_avg_pool", role="global_pool", kernel=0),
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["conv", "spd", "keep", "depthwise", "re:(", "re:a.*", "min", "any"]),
)
keys = st.one_of(
    st.text(max_size=6),
    st.sampled_from([*policy_loader._TOP_KEYS, *policy_loader._RULE_KEYS]),
    st.sampled_from([*policy_module.MATCH_KEYS, "min", "max", "kernel_size", "filter_size"]),
)
documents = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=24,
)


def int_values(low: int, high: int) -> st.SearchStrategy[Any]:
    ints = st.integers(low, high)
    return st.one_of(
        ints,
        st.lists(ints, min_size=1, max_size=3),
        st.fixed_dictionaries({}, optional={"min": ints, "max": ints}),
    )


match_blocks = st.fixed_dictionaries(
    {},
    optional={
        "op": st.sampled_from(policy_module.OPS) | st.lists(st.sampled_from(["conv", "max_pool"])),
        "stride": int_values(1, 4),
        "kernel": int_values(1, 7),
        "groups": st.sampled_from(["depthwise", "grouped", "dense", 1, [1, "depthwise"]]),
        "in_channels": int_values(1, 64),
        "stage_in": int_values(1, 8),
        "role": st.sampled_from(["downsample", "patchify", "global_pool", "any"]),
        "name": st.sampled_from(["*", "layer*", "re:conv.*", ["a", "re:b+"]]),
        "functional": st.booleans(),
    },
)
param_blocks = st.fixed_dictionaries(
    {},
    optional={
        "kernel_size": st.integers(0, 8),
        "init": st.sampled_from(["transfer", "random", "zero"]),
        "filter_size": st.integers(0, 8),
        "pad_mode": st.sampled_from(["reflect", "zeros"]),
        "sigma": st.floats(-1, 3),
    },
)
rules = st.fixed_dictionaries(
    {"match": match_blocks, "action": st.sampled_from(["spd", "antialias", "keep", "ignore"])},
    optional={"name": st.text(max_size=5), "exclude": match_blocks, "params": param_blocks},
)
near_valid = st.fixed_dictionaries(
    {
        "name": st.text(min_size=1, max_size=5),
        "description": st.text(max_size=10),
        "rules": st.lists(rules, min_size=1, max_size=4),
    },
    optional={"defaults": st.dictionaries(st.sampled_from(["spd", "antialias"]), param_blocks)},
)


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[Any]) -> Any:
    """A document with one random edit: replace, drop or misspell something somewhere."""
    doc = draw(base)
    parent: Any = None
    slot: Any = None
    node = doc
    while isinstance(node, dict | list) and node and draw(st.booleans()):
        slots = list(node) if isinstance(node, dict) else list(range(len(node)))
        parent, slot = node, draw(st.sampled_from(slots))
        node = node[slot]
    if parent is None:
        return doc
    edit = draw(st.sampled_from(["replace", "drop", "misspell"]))
    if edit == "replace":
        parent[slot] = draw(documents)
    elif edit == "drop":
        del parent[slot]
    elif isinstance(parent, dict):
        parent[str(slot) + draw(st.sampled_from(["s", "_", "x"]))] = parent.pop(slot)
    return doc


def check_outcome(make: Any) -> None:
    try:
        policy = make()
    except PolicyError as err:
        message = str(err)
        assert "\n" not in message, f"multi-line error: {message!r}"
        assert message.startswith(("fuzz.yaml", "<dict>")), f"no source in {message!r}"
        return
    assert isinstance(policy, Policy)
    decisions = decide(policy, SITES)
    assert len(decisions) == len(SITES)
    assert policy_from_dict(policy.to_dict(), ACTIONS) == policy


FUZZ = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@FUZZ
@given(st.one_of(documents, near_valid, mutated(near_valid)))
def test_any_document_gives_a_policy_or_a_policy_error(doc: Any) -> None:
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    check_outcome(lambda: parse_policy(text, "fuzz.yaml", ACTIONS))
    check_outcome(lambda: policy_from_dict(doc, ACTIONS))


@FUZZ
@given(st.text(max_size=80))
def test_any_text_gives_a_policy_or_a_policy_error(text: str) -> None:
    check_outcome(lambda: parse_policy(text, "fuzz.yaml", ACTIONS))


def test_near_valid_documents_reach_the_success_path() -> None:
    """Guards the property test: near-valid documents must sometimes load, with params."""

    def loads_with_params(doc: Any) -> bool:
        try:
            policy = policy_from_dict(doc, ACTIONS)
        except PolicyError:
            return False
        return any(rule.params for rule in policy.rules)

    doc = find(
        near_valid,
        loads_with_params,
        settings=settings(derandomize=True, database=None, phases=[Phase.generate]),
    )
    assert policy_from_dict(doc, ACTIONS).rules


def test_check_strict_without_line_numbers_names_the_source() -> None:
    policy = one_match({"op": "avg_pool"})
    with pytest.raises(PolicyError) as info:
        check_strict(policy, decide(policy, [make_site()]))
    assert str(info.value) == (
        "<dict>: rule 1 decided no site; strict mode treats unused rules as errors "
        "(fix its match or remove it)"
    )


def test_the_built_in_policies_ship_inside_the_package() -> None:
    """A wheel puts configs/ at surgeon/configs/, where BUILTIN_POLICY_DIR looks first."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "surgeon.configs" in setuptools["packages"]
    assert setuptools["package-dir"]["surgeon.configs"] == "configs"
    assert setuptools["package-data"]["surgeon.configs"] == ["*.yaml"]
    shipped = sorted(p.stem for p in (root / "configs").glob("*.yaml"))
    assert [name for name, _ in list_builtin_policies()] == shipped
