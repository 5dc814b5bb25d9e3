"""When a layer may leave PyTorch's default dispatch for a faster route of its own.

The compiled kernels (`native.py`) and the direct oneDNN convolution (`onednn.py`) serve eager
inference only: what autograd, a tracer, a compiler, a tensor subclass or a dispatch or function
mode has to see (FlopCounterMode counts aten convolutions, FakeTensorMode has no data, exports
must contain plain ops) keeps the layers' PyTorch formulation.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

__all__ = ["inference_route"]

# tensor subclasses (FakeTensor, DTensor) must see aten ops; parameters are plain tensors
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def inference_route(*tensors: Tensor) -> bool:
    """Whether `tensors` (float32 CPU, plain tensors or parameters) may take a route that no
    autograd graph, tracer, compiler or dispatch/function mode observes."""
    if (
        is_in_torch_dispatch_mode()
        or torch._C._is_torch_function_mode_enabled()
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
    ):
        return False
    grad = torch.is_grad_enabled()
    return all(
        type(t) in _PLAIN
        and t.dtype == torch.float32
        and t.device.type == "cpu"
        and not (grad and t.requires_grad)
        for t in tensors
    )
