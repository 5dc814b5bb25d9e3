"""Site records: every operation that changes spatial resolution, where it is, and its arithmetic.

`find_sites(analysis)` turns the graphs of an Analysis into Site records; the rest of the
pipeline (policy, rewrites, report) works on Sites and never on the graphs directly. Calls are
normalised in `surgeon.calls`, neighbours read in `surgeon.neighbours`, stages computed in
`surgeon.strides`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import fx
from torch.utils.flop_counter import conv_flop_count

from surgeon.arithmetic import (
    conv_output_size,
    pool_output_size,
    same_padding,
    transposed_output_size,
)
from surgeon.calls import (
    UPSAMPLE_OPS,
    Call,
    Op,
    Role,
    meta_shape,
    module_call,
    node_call,
    settle,
    spatial,
)
from surgeon.neighbours import GraphView, Neighbour
from surgeon.strides import join_stage, measured_stages
from surgeon.trace import Analysis, Region

__all__ = [
    "UPSAMPLE_OPS",
    "Neighbour",
    "Op",
    "Role",
    "Site",
    "expected_output_shape",
    "find_sites",
]


@dataclass(frozen=True)
class Site:
    """One strided convolution or pooling operation found in a model.

    `name` is the qualified module path for module sites (`path#k` for the k-th extra call of a
    shared module); functional sites are named `owner:node` (the module whose forward makes the
    call, and the call's node name). `stage_in`/`stage_out` are the cumulative strides before and
    after the site. `after` is the single-consumer chain that follows the site (norm, activation)
    ending at the first other node; `before` is the node that feeds it. Rewrites use them to place
    layers (anti-aliasing blurs after the activation, as in Zhang 2019).

    Upsampling sites (role `upsample`: transposed convolutions, `interpolate`/`nn.Upsample` with a
    scale > 1, pixel shuffle) keep their step in `stride` (the transposed conv's stride, the
    rounded scale factor) and the exact factor in `scale`; `stage_out` is `stage_in` divided by it.

    `receptive_field` and `jump` are per spatial dimension, in pixels of the traced region's input,
    for one output position of the site, computed along the graph (Dumoulin & Visin):
    r_out = r_in + (k-1)·d·j_in and j_out = j_in·s for convolutions and pools; an upsampling site
    divides the jump by its factor (a transposed conv is a conv on the zero-inserted input:
    j_out = j_in/s, r_out = r_in + (k-1)·d·j_out). Joins take the largest receptive field. They are
    empty for sites seen only through hooks.
    """

    name: str
    op: Op
    role: Role
    dims: int
    type_name: str
    functional: bool
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    ceil_mode: bool
    in_channels: int
    out_channels: int
    bias: bool
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    stage_in: int
    stage_out: int
    macs: int
    params: int
    found_by: str
    module: str = ""  # qualified path of the module to edit ("" for functional sites)
    calls: int = 1
    before: tuple[Neighbour, ...] = field(default_factory=tuple)
    after: tuple[Neighbour, ...] = field(default_factory=tuple)
    padding_mode: str = "zeros"
    count_include_pad: bool = True
    divisor_override: int | None = None
    norm_type: float | None = None
    output_padding: tuple[int, ...] = ()  # transposed convolutions
    scale: tuple[float, ...] = ()  # upsampling factor per dimension (upsample sites)
    mode: str = ""  # interpolation mode (interpolate sites)
    output_size: tuple[int, ...] = ()  # an interpolate call's fixed `size`, when it gives one
    receptive_field: tuple[float, ...] = ()
    jump: tuple[float, ...] = ()

    @property
    def is_upsampling(self) -> bool:
        """True for transposed convolutions, interpolation and pixel shuffle."""
        return self.op in UPSAMPLE_OPS

    @property
    def is_depthwise(self) -> bool:
        """True for a convolution with one group per input channel."""
        return self.op == "conv" and self.groups > 1 and self.groups == self.in_channels

    @property
    def max_stride(self) -> int:
        return max(self.stride) if self.stride else 1

    @property
    def max_kernel(self) -> int:
        return max(self.kernel) if self.kernel else 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return asdict(self)


def expected_output_shape(site: Site) -> tuple[int, ...]:
    """The output shape the convolution arithmetic predicts from the site's parameters."""
    spatial_in = site.in_shape[-site.dims :]
    if site.op.startswith("adaptive"):
        return site.out_shape  # adaptive pools choose their own windows
    if site.op in ("interpolate", "pixel_shuffle"):
        if site.output_size:
            sizes = list(site.output_size)
        else:  # PyTorch: floor(size · scale), computed in double precision
            sizes = [math.floor(n * f) for n, f in zip(spatial_in, site.scale, strict=True)]
        return (*site.in_shape[: -site.dims - 1], site.out_channels, *sizes)
    out: list[int] = []
    for i, size in enumerate(spatial_in):
        k, s, d = site.kernel[i], site.stride[i], site.dilation[i]
        if site.op == "conv_transpose":
            assert not isinstance(site.padding, str)
            out.append(
                transposed_output_size(size, k, s, site.padding[i], d, site.output_padding[i])
            )
        elif site.padding == "same":
            lo, hi = same_padding(size, k, s, d)
            padded = size + lo + hi
            out.append(conv_output_size(padded, k, s, 0, d))
        elif site.op == "conv":
            assert not isinstance(site.padding, str)
            out.append(conv_output_size(size, k, s, site.padding[i], d))
        else:
            assert not isinstance(site.padding, str)
            out.append(pool_output_size(size, k, s, site.padding[i], d, site.ceil_mode))
    channels = site.out_channels
    return (*site.in_shape[: -site.dims - 1], channels, *out)


def _role(call: Call, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Role | None:
    spatial_in, spatial_out = spatial(in_shape, call.dims), spatial(out_shape, call.dims)
    if call.op in UPSAMPLE_OPS:
        # a stride-1 transposed conv only grows the map by k-1: a convolution, not an upsampler
        grows = (
            bool(spatial_in)
            and len(spatial_out) == len(spatial_in)
            and all(o >= i for o, i in zip(spatial_out, spatial_in, strict=True))
            and spatial_out != spatial_in
        )
        strided = call.op != "conv_transpose" or max(call.stride, default=1) > 1
        return "upsample" if grows and strided else None
    if call.op.startswith("adaptive"):
        if spatial_out and all(s == 1 for s in spatial_out) and spatial_in != spatial_out:
            return "global_pool"
        if (
            spatial_out
            and spatial_in
            and any(o < i for o, i in zip(spatial_out, spatial_in, strict=False))
        ):
            return "adaptive_pool"
        return None
    if max(call.stride, default=1) <= 1:
        if (
            call.op != "conv"
            and spatial_out
            and all(s == 1 for s in spatial_out)
            and any(s > 1 for s in spatial_in)
        ):
            return "global_pool"
        return None
    if spatial_out and all(s == 1 for s in spatial_out) and call.kernel == spatial_in:
        return "global_pool"
    if (
        call.op == "conv"
        and call.kernel == call.stride
        and call.padding in ((0,) * call.dims, "valid")
    ):
        return "patchify"
    return "downsample"


def _macs(call: Call, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> int:
    if call.op not in ("conv", "conv_transpose") or not call.weight_shape:
        return 0  # like torch.utils.flop_counter, pooling counts no multiply-accumulates
    if not in_shape or not out_shape:
        return 0
    transposed = call.op == "conv_transpose"
    flops = conv_flop_count(
        list(in_shape), list(call.weight_shape), list(out_shape), transposed=transposed
    )
    return flops // 2


def _make_site(
    name: str,
    module_path: str,
    call: Call,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    stage_in: float,
    found_by: str,
    calls: int = 1,
    before: tuple[Neighbour, ...] = (),
    after: tuple[Neighbour, ...] = (),
    field: tuple[tuple[float, ...], tuple[float, ...]] = ((), ()),
    stage_out: float | None = None,
) -> Site | None:
    call = settle(call, in_shape, out_shape)
    role = _role(call, in_shape, out_shape)
    if role is None:
        return None
    in_channels = call.in_channels or (in_shape[-call.dims - 1] if len(in_shape) > call.dims else 0)
    out_channels = call.out_channels or (
        out_shape[-call.dims - 1] if len(out_shape) > call.dims else 0
    )
    spatial_in, spatial_out = spatial(in_shape, call.dims), spatial(out_shape, call.dims)
    if call.op.startswith("adaptive") and spatial_in and spatial_out:
        stride = tuple(
            max(1, round(i / max(o, 1))) for i, o in zip(spatial_in, spatial_out, strict=False)
        )
        kernel = spatial_in if role == "global_pool" else stride
        call = replace(call, stride=stride, kernel=kernel)
    stage = max(1, round(stage_in))
    if role == "upsample":
        stage_after = max(1, round(stage_in / max(call.scale, default=1.0)))
    elif stage_out is not None:  # from the graph, per dimension (see StageVector)
        stage_after = max(1, round(stage_out))
    else:
        stage_after = stage * max(call.stride, default=1)
    receptive_field, jump = field
    if not jump and stage_in >= 1:  # no graph: the jump is the stage, per dimension
        jump = (float(stage_after),) * call.dims
    return Site(
        name=name,
        op=call.op,
        role=role,
        dims=call.dims,
        type_name=call.type_name,
        functional=call.functional,
        kernel=call.kernel,
        stride=call.stride,
        padding=call.padding,
        dilation=call.dilation,
        groups=call.groups,
        ceil_mode=call.ceil_mode,
        in_channels=int(in_channels),
        out_channels=int(out_channels),
        bias=call.bias,
        in_shape=in_shape,
        out_shape=out_shape,
        stage_in=stage,
        stage_out=stage_after,
        macs=_macs(call, in_shape, out_shape),
        params=call.params,
        found_by=found_by,
        module=module_path,
        calls=calls,
        before=before,
        after=after,
        padding_mode=call.padding_mode,
        count_include_pad=call.count_include_pad,
        divisor_override=call.divisor_override,
        norm_type=call.norm_type,
        output_padding=call.output_padding,
        scale=call.scale,
        mode=call.mode,
        output_size=tuple(call.size) if call.op == "interpolate" and call.size else (),
        receptive_field=receptive_field,
        jump=jump,
    )


def _fx_sites(view: GraphView, seen: Counter[str]) -> tuple[list[Site], set[str]]:
    region = view.region
    found: list[tuple[fx.Node, str, str, Call]] = []
    for node in view.nodes:
        call = node_call(node, view.root) if node.op in ("call_module", "call_function") else None
        module_path = region.qualify(str(node.target)) if node.op == "call_module" else ""
        if call is not None:
            found.append((node, module_path, region.owner(node), call))
    # upsampling sites are left to measured_stages, which divides where the map grows
    strides = {node: call.stride for node, _, _, call in found if call.op not in UPSAMPLE_OPS}
    stages = measured_stages(view, strides)
    fields = _fields(view, {node: call for node, _, _, call in found})
    sites: list[Site] = []
    # every module the graph called or traced through: hooks need not look at these again
    modules_seen = {region.qualify(str(n.target)) for n in view.nodes if n.op == "call_module"}
    for node, module_path, owner, call in found:
        src = node.args[0] if node.args else None
        in_shape = meta_shape(src) or ()
        out_shape = meta_shape(node) or ()
        if module_path:
            k = seen[module_path]
            seen[module_path] += 1
            name = module_path if k == 0 else f"{module_path}#{k}"
        else:
            name = f"{owner}:{node.name}" if owner else f":{node.name}"
        stage_vector = join_stage([i for i in node.all_input_nodes if i in stages], stages)
        neighbours = region.method == "fx"
        site = _make_site(
            name,
            module_path,
            call,
            in_shape,
            out_shape,
            max(stage_vector),
            region.label,
            calls=view.module_uses[node.target] if module_path else 1,
            before=view.before(node) if neighbours else (),
            after=view.after(node) if neighbours else (),
            field=fields.get(node, ((), ())),
            stage_out=None if node not in strides else max(stages[node]),
        )
        if site is not None:
            sites.append(site)
    return sites, modules_seen


Field = tuple[tuple[float, ...], tuple[float, ...]]  # (receptive field, jump) per dimension

_TAPS = {"linear": 2, "bilinear": 2, "trilinear": 2, "bicubic": 4}  # input samples per output


def _site_field(call: Call, node: fx.Node, src: Field) -> Field:
    """The receptive field and jump after one site, from those before it."""
    r_in, j_in = src
    in_shape = meta_shape(node.args[0] if node.args else None) or ()
    out_shape = meta_shape(node) or ()
    call = settle(call, in_shape, out_shape)
    dims = len(r_in)
    if call.op.startswith("adaptive"):
        sizes = zip(in_shape[-dims:], out_shape[-dims:], strict=False)
        windows = [(math.ceil(i / max(o, 1)), max(1, i // max(o, 1))) for i, o in sizes]
        kernel, stride = tuple(k for k, _ in windows), tuple(s for _, s in windows)
        dilation: tuple[int, ...] = (1,) * dims
    else:
        kernel, stride, dilation = call.kernel, call.stride, call.dilation
    if len(kernel) != dims or len(stride) != dims:
        return (), ()
    r_out, j_out = [], []
    for i in range(dims):
        if call.op == "conv_transpose":  # a conv with stride 1 on the zero-inserted input
            j = j_in[i] / stride[i]
            r = r_in[i] + (kernel[i] - 1) * dilation[i] * j
        elif call.op in ("interpolate", "pixel_shuffle"):
            factor = call.scale[i] if i < len(call.scale) else float(stride[i])
            j = j_in[i] / factor
            r = r_in[i] + (_TAPS.get(call.mode, 1) - 1) * j_in[i]
        else:
            j = j_in[i] * stride[i]
            r = r_in[i] + (kernel[i] - 1) * dilation[i] * j_in[i]
        r_out.append(float(r))
        j_out.append(float(j))
    return tuple(r_out), tuple(j_out)


def _fields(view: GraphView, calls: dict[fx.Node, Call]) -> dict[fx.Node, Field]:
    """(receptive field, jump) at every node's output, walking the graph from the region's
    inputs (receptive field 1, jump 1). Joins take the largest of each."""
    fields: dict[fx.Node, Field] = {}
    for node in view.nodes:
        shape = meta_shape(node)
        dims = len(shape) - 2 if shape is not None and len(shape) >= 3 else 0
        if node.op == "placeholder":
            fields[node] = ((1.0,) * dims, (1.0,) * dims)
            continue
        if node in calls:
            src = node.args[0] if node.args else None
            known = fields.get(src) if isinstance(src, fx.Node) else None
            if known and known[0]:
                fields[node] = _site_field(calls[node], node, known)
            continue
        sources = [i for i in node.all_input_nodes if i in fields and fields[i][0]]
        if dims and shape is not None:
            # a 1×1 map broadcast into a product (squeeze-excitation) does not join the field
            same = [i for i in sources if (meta_shape(i) or ())[2:] == shape[2:]]
            sources = same or [i for i in sources if len(fields[i][0]) == dims]
        inputs = [fields[i] for i in sources]
        if inputs:
            fields[node] = (
                tuple(max(values) for values in zip(*(f[0] for f in inputs), strict=True)),
                tuple(max(values) for values in zip(*(f[1] for f in inputs), strict=True)),
            )
    return fields


def find_sites(analysis: Analysis) -> list[Site]:
    """Every downsampling, patchify, global-pool and upsampling site, in execution order."""
    sites: list[Site] = []
    seen: Counter[str] = Counter()
    covered: set[str] = set()
    for region in analysis.regions:
        if region.method == "fx" and region.graph is not None:
            found, called = _fx_sites(GraphView(region, analysis), seen)
            sites += found
            covered |= called
        elif region.method == "export" and region.graph is not None:
            found, _ = _fx_sites(GraphView(region, analysis), Counter())
            # module sites inside an export region come from hooks below (exact module objects);
            # keep only the functional ones the graph adds
            sites += [s for s in found if s.functional]
    hooks = [r for r in analysis.regions if r.method == "hooks"]
    for name, module in analysis.model.named_modules():
        if name in covered or name not in analysis.calls:
            continue
        call = module_call(module)
        if call is None:
            continue
        records = analysis.calls[name]
        for k, record in enumerate(records):
            in_shape = record.in_shapes[0] if record.in_shapes else ()
            out_shape = record.out_shapes[0] if record.out_shapes else ()
            model_in = _model_input_shape(analysis)
            dims = call.dims or max(len(in_shape) - 2, 1)
            stage_in = _stage_from_shapes(model_in, in_shape, dims)
            site = _make_site(
                name if k == 0 else f"{name}#{k}",
                name,
                call,
                in_shape,
                out_shape,
                stage_in,
                _hooks_label(hooks, name),
                calls=len(records),
            )
            if site is not None:
                sites.append(site)
    if len(analysis.regions) > 1:
        order = {name: i for i, name in enumerate(analysis.order)}
        sites.sort(key=lambda s: order.get(s.module or s.name.split(":")[0], math.inf))
    return sites


def _hooks_label(hooks: list[Region], name: str) -> str:
    inside = [r for r in hooks if not r.path or name == r.path or name.startswith(r.path + ".")]
    return max(inside, key=lambda r: len(r.path)).label if inside else "hooks"


def _model_input_shape(analysis: Analysis) -> tuple[int, ...]:
    records = analysis.calls.get("", [])
    return records[0].in_shapes[0] if records and records[0].in_shapes else ()


def _stage_from_shapes(model_in: tuple[int, ...], site_in: tuple[int, ...], dims: int) -> float:
    a, b = spatial(model_in, dims), spatial(site_in, dims)
    if not a or not b or b[-1] <= 0:
        return 1.0
    ratio = a[-1] / b[-1]
    return float(2 ** round(math.log2(ratio))) if ratio >= 1 else 1.0
