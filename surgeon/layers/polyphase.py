"""Polyphase sampling: keep one of the s^d polyphase components of a map, chosen per sample.

A stride-s subsampling keeps the positions s*t of each spatial dim, which is polyphase
component 0. The other components start at offsets 1 .. s-1; a circular shift of the input
permutes them. A layer that picks its component from the content (APS: the largest norm; LPS:
a learned score) instead of always taking component 0 therefore commutes with circular shifts.

`PolyphaseSampling` holds what APS and LPS share: the optional circular blur, the circular
wrap of sizes the stride does not divide, the component view, the per-sample gather, and the
leader/follower link that lets a residual shortcut take its main path's component
(`share_phase`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgeon.errors import PatchError
from surgeon.layers.blur import binomial_filter
from surgeon.layers.shapes import per_dim

__all__ = ["ROLES", "PhaseLink", "PolyphaseSampling", "share_phase"]

ROLES = ("alone", "leader", "follower")
"""alone: selects for itself; leader: selects and hands its selection to its followers;
follower: takes its leader's selection of the same forward (see `share_phase`)."""

_NATIVE_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class PhaseLink:
    """The selection a leader made in its latest forward, waiting for its followers.

    A plain Python object held by the leader and each follower as an attribute, not a module:
    state dicts, `module.to()`, DDP and parameter lists never see it. `copy.deepcopy` of a model
    copies it once (the memo) so the copied leader and followers share a fresh link of their
    own; pickling keeps only the number of followers. Pending selections are kept per thread,
    so replicas run in threads (nn.DataParallel) do not read each other's.
    """

    def __init__(self, followers: int) -> None:
        self.followers = followers
        self._pending: dict[int, tuple[Tensor, Tensor | None, set[int]]] = {}

    def publish(self, index: Tensor, weights: Tensor | None) -> None:
        """Record the leader's selection; each follower may take it once."""
        self._pending[threading.get_ident()] = (index, weights, set(range(self.followers)))

    def take(self, slot: int, who: str) -> tuple[Tensor, Tensor | None]:
        """The selection the leader published for follower `slot` in this forward."""
        key = threading.get_ident()
        entry = self._pending.get(key)
        if entry is None or slot not in entry[2]:
            raise PatchError(
                f"{who} is a polyphase follower but its leader has not run since its last "
                "forward: the leader must run first in every forward (link the layer that "
                "runs first as the leader with share_phase)"
            )
        index, weights, waiting = entry
        waiting.discard(slot)
        if not waiting:  # every follower has its copy: drop the tensors (and their graph)
            del self._pending[key]
        return index, weights

    def __deepcopy__(self, memo: dict[int, Any]) -> PhaseLink:
        copied = PhaseLink(self.followers)
        memo[id(self)] = copied
        return copied

    def __getstate__(self) -> dict[str, Any]:
        return {"followers": self.followers}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["followers"])  # type: ignore[misc]


class PolyphaseSampling(nn.Module):
    """Base of APS and LPS: [circular blur] -> circular wrap -> per-sample component.

    Per spatial dim of length L and stride s the map is wrapped circularly on the right to
    T*s positions, T = ceil(L / s), and split into s^d components of T positions per dim:

        component (r_1, .., r_d)[t_1, .., t_d] = x[r_1 + s_1 t_1, .., r_d + s_d t_d]

    numbered row-major (index r_1 * s_2 * .. + .. + r_d, the order of `F.pixel_unshuffle`).
    The output has T = ceil(L / s) positions per dim: the length of every conv or pool with
    ceil_mode=False and stride s whose stride-1 form gives L. Component 0 never reads the wrap,
    so it equals the strided op's output exactly. For L divisible by s, a circular shift of the
    input permutes the components (each circularly shifted), so a selection by content gives a
    circular shift of the output; with L not divisible by s no exact counterpart exists.

    `filter_size` > 1 blurs first with the binomial filter at stride 1, circularly padded
    [(f-1)//2, f//2] (APS + LPF in the APS paper); the blurred map is what is selected from.

    Subclasses define `_select(view) -> (index, weights)`: per-sample component indices (N,)
    and, for soft selections in training, weights (N, s^d) that mix the components instead.
    """

    if TYPE_CHECKING:  # a class-level annotation is a string TorchScript cannot resolve
        filter: Tensor

    def __init__(
        self,
        channels: int,
        *,
        dims: int,
        stride: int | Sequence[int],
        filter_size: int,
        role: str,
    ) -> None:
        super().__init__()
        if dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.channels = channels
        self.dims = dims
        self.stride = per_dim(stride, dims, "stride")
        if min(self.stride) < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        self.phases = math.prod(self.stride)
        self.filter_size = filter_size
        self.role = role
        taps = binomial_filter(filter_size, dims)
        self.register_buffer(
            "filter", taps[None, None].repeat(channels, *([1] * (dims + 1))), persistent=False
        )
        self._link: PhaseLink | None = None
        self._slot = -1

    def extra_repr(self) -> str:
        text = f"{self.channels}, dims={self.dims}, stride={self.stride}"
        if self.filter_size > 1:
            text += f", filter_size={self.filter_size}"
        return text + f", role={self.role!r}"

    # ----------------------------------------------------------------------- forward

    def forward(self, x: Tensor) -> Tensor:
        if self.filter_size > 1:
            x = self._blur(x)
        view = self._components(self._wrap(x))
        if torch.jit.is_scripting():
            # the link is a Python object TorchScript cannot hold: only role "alone" scripts
            # (`__prepare_scriptable__` refuses the others)
            index, weights = self._select(view)
        else:
            index, weights = self._linked_selection(x, view)
        return self._gather(view, index, weights)

    def _select(self, view: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def _blur(self, x: Tensor) -> Tensor:
        # circular padding by index: wraps any number of times, so tiny maps work, and exports
        # as Mod + Gather with dynamic sizes
        left = (self.filter_size - 1) // 2
        right = self.filter_size // 2
        for i in range(self.dims):
            size = x.shape[2 + i]
            index = torch.arange(-left, size + right, device=x.device) % size
            x = x.index_select(2 + i, index)
        weight = self.filter if self.filter.dtype == x.dtype else self.filter.to(x.dtype)
        if self.dims == 1:
            return F.conv1d(x, weight, None, 1, 0, 1, self.channels)
        if self.dims == 2:
            return F.conv2d(x, weight, None, 1, 0, 1, self.channels)
        return F.conv3d(x, weight, None, 1, 0, 1, self.channels)

    def _wrap(self, x: Tensor) -> Tensor:
        # sizes the stride does not divide are wrapped circularly on the right; traces and
        # torch.export keep the gather for every size (a size check would freeze into the
        # graph, and the gathered length is a multiple of the stride by construction)
        for i in range(self.dims):
            size = x.shape[2 + i]
            stride = self.stride[i]
            if torch.jit.is_tracing() or torch.compiler.is_compiling() or size % stride != 0:
                blocks = (size + stride - 1) // stride
                index = torch.arange(blocks * stride, device=x.device) % size
                x = x.index_select(2 + i, index)
        return x

    def _components(self, x: Tensor) -> Tensor:
        """(N, C, T_1, s_1, .., T_d, s_d), component r at [..., t_i, r_i, ...] (a view of a
        contiguous map)."""
        shape = [x.shape[0], x.shape[1]]
        for i in range(self.dims):
            shape.append(x.shape[2 + i] // self.stride[i])
            shape.append(self.stride[i])
        return x.reshape(shape)

    def _batched(self, view: Tensor) -> Tensor:
        """The components as a batch (N * s^d, C, *T), sample-major: row n * s^d + r."""
        perm = [0]
        for i in range(self.dims):
            perm.append(3 + 2 * i)
        perm.append(1)
        shape = [view.shape[0] * self.phases, view.shape[1]]
        for i in range(self.dims):
            perm.append(2 + 2 * i)
            shape.append(view.shape[2 + 2 * i])
        return view.permute(perm).reshape(shape)

    def _gather(self, view: Tensor, index: Tensor, weights: Tensor | None) -> Tensor:
        if weights is not None:
            shape = [view.shape[0], 1]
            sums: list[int] = []
            for i in range(self.dims):
                shape.append(1)
                shape.append(self.stride[i])
                sums.append(3 + 2 * i)
            return (view * weights.to(view.dtype).reshape(shape)).sum(sums)
        batch = torch.arange(view.shape[0], device=view.device)
        # component index -> one offset per dim (row-major)
        offsets: list[Tensor] = []
        rest = index
        for i in range(self.dims - 1, -1, -1):
            offsets.insert(0, rest % self.stride[i])
            rest = rest // self.stride[i]
        if self.dims == 1:
            return view[batch, :, :, offsets[0]]
        if self.dims == 2:
            return view[batch, :, :, offsets[0], :, offsets[1]]
        return view[batch, :, :, offsets[0], :, offsets[1], :, offsets[2]]

    # ----------------------------------------------------------------------- the link

    @torch.jit.unused
    def _linked_selection(self, x: Tensor, view: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.role == "follower":
            return self._take(x)
        index, weights = self._select(view)
        if self.role == "leader" and self._link is not None:
            self._link.publish(index, weights)
        return index, weights

    @torch.jit.unused
    def _take(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        who = f"{type(self).__name__}(stride={self.stride})"
        if self._link is None:
            raise PatchError(
                f"{who} has role 'follower' but no leader: link it with "
                "share_phase(leader, [followers])"
            )
        index, weights = self._link.take(self._slot, who)
        if index.shape[0] != x.shape[0]:
            raise PatchError(
                f"{who} got a batch of {x.shape[0]} but its leader selected for "
                f"{index.shape[0]} samples: leader and follower must see the same batch"
            )
        return index, weights

    # ----------------------------------------------------------------------- constructors

    @staticmethod
    def _conv_site(conv: nn.Module) -> tuple[int, int, tuple[int, ...], bool]:
        """(out_channels, dims, stride, plain) of a strided conv; plain: its forward is
        PyTorch's own, so its padding is what `.padding` says (not timm's dynamic SAME)."""
        dims = next((d for d, t in enumerate(_NATIVE_CONVS, start=1) if isinstance(conv, t)), 0)
        if not dims:
            raise ValueError(f"{type(conv).__name__} is not an nn.Conv1d/2d/3d")
        assert isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        stride = tuple(conv.stride)
        if max(stride) == 1:
            raise ValueError(f"{type(conv).__name__} has stride {stride}: nothing to sample")
        plain = type(conv).forward is _NATIVE_CONVS[dims - 1].forward
        return conv.out_channels, dims, stride, plain

    @staticmethod
    def _pool_site(
        dims: int,
        kernel: int | Sequence[int],
        stride: int | Sequence[int] | None,
        ceil_mode: bool,
    ) -> tuple[int, ...]:
        """The stride of a pool a sampler can follow; ceil_mode pools are refused."""
        s = (
            per_dim(kernel, dims, "kernel")
            if stride is None or (isinstance(stride, Sequence) and len(stride) == 0)
            else per_dim(stride, dims, "stride")
        )
        if max(s) == 1:
            raise ValueError(f"the pool has stride {s}: nothing to sample")
        if ceil_mode:
            raise ValueError(
                "ceil_mode pools can give one position more than ceil(L / s), which a "
                "polyphase component cannot hold; set ceil_mode=False on the pool first"
            )
        return s

    # ----------------------------------------------------------------------- checkpoints

    @classmethod
    def link(cls, leader: nn.Module, followers: Sequence[nn.Module]) -> Callable[[], None]:
        """`share_phase(leader, followers)`, as the checkpoint's `link` edit calls it; returns
        a function that puts back the links the modules had before (ValueError, before any
        change, when they cannot be linked)."""
        modules = [leader, *followers]
        for module in modules:
            if not isinstance(module, cls):
                raise ValueError(f"{type(module).__name__} is not a {cls.__name__}")
        linked: list[PolyphaseSampling] = modules  # type: ignore[assignment]  # checked above
        saved = [(m, m._link, m._slot) for m in linked]
        share_phase(linked[0], linked[1:])

        def undo() -> None:
            for module, link, slot in saved:
                module._link, module._slot = link, slot

        return undo

    def __prepare_scriptable__(self) -> PolyphaseSampling:
        # torch.jit.script calls this on every submodule first: a linked sampler is refused
        # while scripting starts (a caller such as `surgeon export` then traces), not when the
        # scripted model first runs
        if self.role != "alone":
            raise RuntimeError(
                f"a polyphase sampler with role {self.role!r} cannot be scripted (its link to "
                "the other samplers is a Python object); trace the model instead"
            )
        return self

    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable) that rebuild this layer."""
        return {
            "channels": self.channels,
            "dims": self.dims,
            "stride": list(self.stride),
            "filter_size": self.filter_size,
            "role": self.role,
        }


def share_phase(leader: PolyphaseSampling, followers: Sequence[PolyphaseSampling]) -> None:
    """Make every follower take `leader`'s component selection in each forward.

    The leader must run before its followers in every forward (a residual block's main path
    before its shortcut, say); a follower that runs without a fresh selection from its leader
    raises PatchError. The link is a plain object on the modules (`PhaseLink`), not a
    submodule, so state dicts do not change; a checkpoint records it as its own edit naming
    the module paths (`surgeon.edits.Link`), and loading links them again through
    `PolyphaseSampling.link`. Linking again replaces the followers' previous link.
    """
    if not isinstance(leader, PolyphaseSampling):
        raise ValueError(f"the leader must be a polyphase sampler, got {type(leader).__name__}")
    if leader.role != "leader":
        raise ValueError(f"the leader has role {leader.role!r}; build it with role='leader'")
    if not followers:
        raise ValueError("share_phase needs at least one follower")
    if len({id(f) for f in followers}) != len(followers) or any(f is leader for f in followers):
        raise ValueError("the followers must be distinct modules, none of them the leader")
    for follower in followers:
        if type(follower) is not type(leader):
            raise ValueError(
                f"a {type(leader).__name__} leader cannot lead a {type(follower).__name__}"
            )
        if follower.role != "follower":
            raise ValueError(
                f"a follower has role {follower.role!r}; build it with role='follower'"
            )
        if follower.stride != leader.stride:
            raise ValueError(
                f"a follower has stride {follower.stride} but its leader {leader.stride}: "
                "they must split maps into the same components"
            )
    link = PhaseLink(len(followers))
    leader._link = link
    for slot, follower in enumerate(followers):
        follower._link = link
        follower._slot = slot
