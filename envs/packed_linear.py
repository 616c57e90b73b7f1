"""Inference-only Linear layers with weights pre-packed for oneDNN: the same float32 maths, about 1.5x faster decoding on a CPU.

``nn.Linear`` on a CPU calls MKL's GEMM on the weight as stored, which for the skinny inputs of
decoding (one token per sequence, 1-16 rows) streams the weight poorly: SmolLM2's LM head
(49152 x 576) takes 22 ms for 9 rows on one core. oneDNN with the weight reordered once into its
blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, what ``torch.compile`` with freezing does
for CPU linears) takes 8 ms; a whole SmolLM2 decoding step goes from 138 to 85 ms at 9 rows and
1.2-1.8x faster at 1-16 rows (``bench/serve_packed_bench.py``, results in ``bench/results/serve.md``).
Results equal the plain layer's to float rounding (about 3e-5 of a logit, the same greedy text);
the maths is float32 throughout. On a tiny model (weights that fit in cache) the packed call's
overhead makes it slower; the gain is for real models.

``matmul_dtype=torch.bfloat16`` packs a bfloat16 copy of the weight instead and runs each call's
product in bfloat16 (the input rounded to bfloat16, float32 accumulation inside oneDNN, the result
rounded to bfloat16 and returned in the input's dtype), so everything between the Linear layers
(norms, attention, the residual stream) stays float32. On CPUs with AVX-512 BF16 (``vdpbf16ps``) or AMX the product runs
natively: about 1.8x faster than the float32 packed one for SmolLM2's shapes at 8-16 rows, with half
the weight memory; with AVX-512 but no BF16 oneDNN emulates it, slower; with AVX2 alone it cannot
pack bfloat16 at all (``packing_available(torch.bfloat16)`` is then False and nothing is swapped).

:func:`pack_linear_layers` swaps every plain float32 ``nn.Linear`` of a model for a
:class:`PackedLinear` holding the packed copy. The packed layer has no parameters (it cannot be
trained or saved), so it is for models that only generate: the served policy. Where the private op
is missing (another torch build, a GPU) nothing is swapped and the model runs as before.
"""

from __future__ import annotations

from functools import cache

import torch


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked copy of a Linear weight (out, in)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight)


@cache
def _packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs a weight of this dtype on this CPU (bfloat16 needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)."""
    try:
        _reorder(torch.zeros(16, 16, dtype=dtype))
    except RuntimeError:
        return False
    return True


def packing_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch has the oneDNN linear ops packing needs, and this CPU packs weights of ``dtype``."""
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        has_ops = (
            torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise")
        )
    except (AttributeError, RuntimeError):  # pragma: no cover - depends on the torch build
        return False
    return has_ops and _packs(dtype)


class PackedLinear(torch.nn.Module):
    """``y = x W^T + b`` with ``W`` reordered once for oneDNN (in ``matmul_dtype``); inference only."""

    def __init__(self, linear: torch.nn.Linear, matmul_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.matmul_dtype = matmul_dtype
        weight = linear.weight.detach().to(matmul_dtype)
        self.register_buffer("packed", _reorder(weight), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().to(matmul_dtype)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(
            x.to(self.matmul_dtype).contiguous(), self.packed, self.bias, "none", [], ""
        )
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        dtype = str(self.matmul_dtype).removeprefix("torch.")
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN, matmul={dtype}"


def pack_linear_layers(model: torch.nn.Module, matmul_dtype: torch.dtype = torch.float32) -> int:
    """Replace every plain float32 CPU ``nn.Linear`` in ``model`` by a :class:`PackedLinear`; return how many (0 where this CPU cannot pack ``matmul_dtype``)."""
    if not packing_available(matmul_dtype):
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (
                type(child) is torch.nn.Linear
                and child.weight.dtype == torch.float32
                and child.weight.device.type == "cpu"
            ):
                setattr(parent, name, PackedLinear(child, matmul_dtype))
                swapped += 1
    return swapped
