"""Serving dtypes: load any exported policy in float32, bfloat16 or int8 (dynamic quantisation of its Linear layers).

int8 uses PyTorch's dynamic quantisation: every ``nn.Linear`` (attention, MLP and the LM head) keeps int8
weights and quantises its input per call; embeddings and norms stay float32. It is the fast CPU path
here (fbgemm/x86 kernels with AVX2); torchao's int8 configs were slower on this CPU. PyTorch marks
``quantize_dynamic`` deprecated in favour of torchao, so a torch without it fails loudly, naming the
setting. Because the activations of each call share one scale, an int8 sequence's logits depend
slightly on which other sequences share its batch (about 1% of the logit scale on the tiny test
model), so a seeded request is reproducible exactly only in float32 and bfloat16.

bfloat16 on a CPU keeps the model in float32 and packs every Linear layer's weight in bfloat16
(:mod:`envs.packed_linear` with ``matmul_dtype=torch.bfloat16``): only the products run in
bfloat16, norms, attention and the residual stream stay float32. That is fast where the CPU has
AVX-512 BF16 or AMX and emulated (slower than float32) elsewhere; where oneDNN cannot pack
bfloat16 (no such op, or a CPU with AVX2 alone) the whole model is cast to bfloat16 instead.
"""

from __future__ import annotations

import warnings

import torch

from envs.models import ModelSettings, load_causal_lm
from envs.packed_linear import pack_linear_layers, packing_available

SERVE_DTYPES = ("float32", "bfloat16", "int8")


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX) and oneDNN packing is available."""
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch builds
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16")) and packing_available(torch.bfloat16)


def resolve_dtype(dtype: str) -> str:
    """The serving dtype ``serve.dtype`` names: 'auto' is bfloat16 where the CPU does it natively, else float32."""
    if dtype == "auto":
        return "bfloat16" if native_bf16() else "float32"
    if dtype not in SERVE_DTYPES:
        raise ValueError(f"serve.dtype must be 'auto' or one of {SERVE_DTYPES}, got {dtype!r}")
    return dtype


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every Linear layer dynamically quantised to int8."""
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as err:  # pragma: no cover - depends on the torch release
        raise RuntimeError(
            "serve.dtype=int8 needs torch.ao.quantization.quantize_dynamic, which this torch lacks; "
            "use serve.dtype=float32"
        ) from err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the torchao migration notice
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions", category=UserWarning)
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8).eval()


def load_policy(model: ModelSettings, dtype: str = "float32", pack: bool = True):
    """(causal LM in eval mode in the serving dtype ('auto' resolved), tokenizer) for a model spec or exported directory.

    ``pack``: Linear layers get oneDNN-packed weights (:mod:`envs.packed_linear`): float32 ones the same
    maths, faster; for bfloat16 the products in bfloat16 and the rest of the model in float32.
    """
    dtype = resolve_dtype(dtype)
    lm, tok = load_causal_lm(model.policy, "float32", model.tiny_vocab_size)
    if dtype == "int8":
        return quantize_int8(lm).eval(), tok
    matmul = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    packed = pack and pack_linear_layers(lm, matmul) > 0
    if matmul == torch.bfloat16 and not packed:
        lm = lm.to(torch.bfloat16)  # no bfloat16 packing here: the whole model in bfloat16
    return lm.eval(), tok
