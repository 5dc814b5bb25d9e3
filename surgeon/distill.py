"""Knowledge distillation from a teacher to a student: a loss to drop into any training loop.

    loss_fn = DistillLoss(temperature=2.0)
    with FeatureTap(student, ["layer2"]) as s, FeatureTap(teacher, ["layer2"]) as t:
        with torch.inference_mode():
            teacher_out = teacher(images)
        terms = loss_fn(student(images), teacher_out, labels=None,
                        student_features=s.outputs, teacher_features=t.outputs)
    terms.total.backward()

The terms, each averaged over the batch:

- **kd**: the KL divergence KL(p_t ‖ p_s) between the teacher's and the student's softmax at
  temperature T, times T² (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network":
  the gradient of the softened term scales as 1/T², so T² keeps its weight independent of T).
  It is computed on the model's *logits*: the output itself when it is a tensor of shape
  (batch, classes), otherwise the first floating-point tensor of that rank found in the output
  (dict values in order, then tuple/list items, depth first), so `{"logits": ..., "aux": ...}`
  and `(logits, features)` outputs work as they are.
- **output**: when the output has no (batch, classes) tensor (segmentation maps, feature
  pyramids, backbones), every floating-point tensor of the output is matched instead with the
  normalised MSE below; the KL term is then absent.
- **ce**: cross-entropy of the student's logits with `labels`, when given.
- **features**: the normalised MSE between student and teacher outputs of named modules,
  averaged over the modules: ‖s − t‖² / ‖t‖² per module (means over elements, the
  denominator detached), so a layer whose activations are 100× larger does not weigh 100×
  more. Zero when the student reproduces the teacher.

total = kd_weight·kd + output_weight·output + label_weight·ce + feature_weight·features.
Every term is computed in float32, whatever autocast ran the models in, and every term is
exactly zero with zero gradient when the student's outputs equal the teacher's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from surgeon.errors import UsageError

__all__ = [
    "DistillLoss",
    "DistillTerms",
    "FeatureTap",
    "find_logits",
    "floating_tensors",
    "kd_loss",
    "matching_outputs",
    "normalised_mse",
    "top1_agreement",
]


def floating_tensors(output: Any) -> list[Tensor]:
    """Every floating-point tensor in a model output, depth first: a tensor, dict values in
    order, tuple/list items (named tuples included). Other leaves are ignored."""
    found: list[Tensor] = []
    stack: list[Any] = [output]
    while stack:
        item = stack.pop()
        if isinstance(item, Tensor):
            if item.is_floating_point():
                found.append(item)
        elif isinstance(item, Mapping):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
    return found


def find_logits(output: Any) -> Tensor | None:
    """The (batch, classes) logits in a model output, or None when it has none (see above)."""
    for tensor in floating_tensors(output):
        if tensor.dim() == 2:
            return tensor
    return None


def _plain(tensor: Tensor) -> Tensor:
    """A float32 tensor usable by autograd: a teacher output made under inference_mode is an
    inference tensor, which autograd refuses to save for backward; clone it outside that mode."""
    if tensor.is_inference():
        tensor = tensor.clone()
    return tensor.float()


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), averaged over the batch (float32)."""
    if student_logits.shape != teacher_logits.shape:
        raise UsageError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape; distil models with the same classes"
        )
    t = temperature
    log_s = F.log_softmax(_plain(student_logits) / t, dim=-1)
    log_t = F.log_softmax(_plain(teacher_logits).detach() / t, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * (t * t)


def normalised_mse(student: Tensor, teacher: Tensor, eps: float = 1e-8) -> Tensor:
    """mean((s − t)²) / mean(t²): the MSE relative to the teacher's energy (float32)."""
    if student.shape != teacher.shape:
        raise UsageError(
            f"student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)} "
            "differ in shape; match features where both models agree in shape"
        )
    s = _plain(student)
    t = _plain(teacher).detach()
    return F.mse_loss(s, t) / t.pow(2).mean().clamp_min(eps)


def top1_agreement(student_output: Any, teacher_output: Any) -> Tensor | None:
    """How many images of the batch get the same top-1 class from both models (a 0-d long
    tensor, so it can be summed across processes), or None for outputs without logits."""
    s, t = find_logits(student_output), find_logits(teacher_output)
    if s is None or t is None:
        return None
    return (s.detach().argmax(-1) == t.detach().argmax(-1)).sum()


@dataclass(frozen=True)
class DistillTerms:
    """The loss to backpropagate and its parts (None where a term does not apply)."""

    total: Tensor
    kd: Tensor | None = None
    output: Tensor | None = None
    ce: Tensor | None = None
    features: Tensor | None = None

    def parts(self) -> dict[str, Tensor]:
        """{name: value} of the terms present, total included, detached."""
        named = {
            "loss": self.total,
            "kd": self.kd,
            "output": self.output,
            "ce": self.ce,
            "features": self.features,
        }
        return {k: v.detach() for k, v in named.items() if v is not None}


class DistillLoss(nn.Module):
    """The distillation loss of the module docstring; an nn.Module so it can be moved and
    printed like any criterion. It has no parameters."""

    def __init__(
        self,
        *,
        temperature: float = 2.0,
        kd_weight: float = 1.0,
        output_weight: float = 1.0,
        label_weight: float = 1.0,
        feature_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise UsageError(f"temperature must be positive, got {temperature}")
        for name, value in (
            ("kd_weight", kd_weight),
            ("output_weight", output_weight),
            ("label_weight", label_weight),
            ("feature_weight", feature_weight),
        ):
            if value < 0:
                raise UsageError(f"{name} must be 0 or more, got {value}")
        self.temperature = float(temperature)
        self.kd_weight = float(kd_weight)
        self.output_weight = float(output_weight)
        self.label_weight = float(label_weight)
        self.feature_weight = float(feature_weight)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, kd_weight={self.kd_weight}, "
            f"output_weight={self.output_weight}, label_weight={self.label_weight}, "
            f"feature_weight={self.feature_weight}"
        )

    def forward(
        self,
        student_output: Any,
        teacher_output: Any,
        *,
        labels: Tensor | None = None,
        student_features: Mapping[str, Tensor] | None = None,
        teacher_features: Mapping[str, Tensor] | None = None,
    ) -> DistillTerms:
        """The terms for one batch; `labels` (class indices) adds cross-entropy, the feature
        mappings (module name → output, e.g. `FeatureTap.outputs`) add feature matching."""
        s_logits, t_logits = find_logits(student_output), find_logits(teacher_output)
        total = torch.zeros((), device=_device_of(student_output))
        kd = output = ce = features = None
        if s_logits is not None and t_logits is not None:
            kd = kd_loss(s_logits, t_logits, self.temperature)
            total = total + self.kd_weight * kd
        else:
            s_all, t_all = floating_tensors(student_output), floating_tensors(teacher_output)
            pairs = list(zip(s_all, t_all, strict=False))
            if not pairs:
                raise UsageError("the models returned no floating-point tensor to distil")
            output = torch.stack([normalised_mse(s, t) for s, t in pairs]).mean()
            total = total + self.output_weight * output
        if labels is not None:
            if s_logits is None:
                raise UsageError(
                    "labels need class scores, but the model's output has no (batch, classes) "
                    "tensor; heal without labels"
                )
            ce = F.cross_entropy(_plain(s_logits), labels.to(s_logits.device))
            total = total + self.label_weight * ce
        if student_features is not None and teacher_features is not None:
            names = [name for name in student_features if name in teacher_features]
            if names:
                features = torch.stack(
                    [normalised_mse(student_features[n], teacher_features[n]) for n in names]
                ).mean()
                total = total + self.feature_weight * features
        return DistillTerms(total, kd, output, ce, features)


def _device_of(output: Any) -> torch.device:
    tensors = floating_tensors(output)
    return tensors[0].device if tensors else torch.device("cpu")


class FeatureTap:
    """Forward hooks that keep the outputs of named modules of a model, for feature matching.

    `outputs[name]` is the module's output on the last forward pass (the first floating-point
    tensor when the module returns several). Use it as a context manager, or call `close()`,
    so that the hooks are removed."""

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        modules = dict(model.named_modules())
        self.names: tuple[str, ...] = tuple(names)
        missing = [name for name in self.names if name not in modules]
        if missing:
            raise UsageError(
                f"no module named {', '.join(map(repr, missing))} in {type(model).__name__}; "
                "name modules as model.named_modules() does"
            )
        self.outputs: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = [
            modules[name].register_forward_hook(self._keeper(name)) for name in self.names
        ]

    def _keeper(self, name: str) -> Any:
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            tensors = floating_tensors(output)
            if tensors:
                self.outputs[name] = tensors[0]

        return keep

    def clear(self) -> None:
        """Forget the kept outputs (they hold the autograd graph of the last pass)."""
        self.outputs.clear()

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)


def matching_outputs(
    student: nn.Module, teacher: nn.Module, names: Sequence[str], example: Tensor
) -> list[str]:
    """For each name (a patched site), the first module to finish its forward at or after it
    whose output has the same shape in both models on `example`; deduplicated, in order.

    A patched site can change its own output's shape (anti-aliasing moves a conv's stride to
    a blur after the activation that follows), so the match moves to the first point where
    the student is back at the original's resolution: the activation holding the blur, the
    next conv, or the enclosing block. Only modules with the same name in both models, called
    once per forward, are candidates; a name with none after it is dropped."""
    s_calls, t_calls = _output_shapes(student, example), _output_shapes(teacher, example)
    s_count = {n: sum(1 for m, _ in s_calls if m == n) for n, _ in s_calls}
    t_shape = {n: shape for n, shape in t_calls}
    t_count = {n: sum(1 for m, _ in t_calls if m == n) for n, _ in t_calls}
    order = [n for n, _ in s_calls]
    s_shape = dict(s_calls)
    chosen: list[str] = []
    for name in names:
        if name not in order:
            continue
        for candidate in order[order.index(name) :]:
            if (
                s_count[candidate] == 1
                and t_count.get(candidate) == 1
                and s_shape[candidate] == t_shape[candidate]
            ):
                if candidate not in chosen:
                    chosen.append(candidate)
                break
    return chosen


def _output_shapes(model: nn.Module, example: Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(module name, output shape) of every submodule call, in the order calls finish."""
    calls: list[tuple[str, tuple[int, ...]]] = []

    def recorder(name: str) -> Any:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            tensors = floating_tensors(output)
            if tensors:
                calls.append((name, tuple(tensors[0].shape)))

        return record

    handles = [m.register_forward_hook(recorder(n)) for n, m in model.named_modules() if n]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for module, mode in modes:  # each as it was (BatchNorm may be frozen on purpose)
            module.training = mode
        for handle in handles:
            handle.remove()
    return calls
