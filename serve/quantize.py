"""Serving dtypes: load any exported policy in float32, bfloat16 or int8 (dynamic quantisation of its Linear layers).

int8 uses PyTorch's dynamic quantisation: every ``nn.Linear`` (attention, MLP and the LM head) keeps int8
weights and quantises its input per call; embeddings and norms stay float32. It is the fast CPU path
here (fbgemm/x86 kernels with AVX2); torchao's int8 configs were slower on this CPU. PyTorch marks
``quantize_dynamic`` deprecated in favour of torchao, so a torch without it fails loudly, naming the
setting. Because the activations of each call share one scale, an int8 sequence's logits depend
slightly on which other sequences share its batch (about 1% of the logit scale on the tiny test
model), so a seeded request is reproducible exactly only in float32 and bfloat16. bfloat16 halves
memory but is emulated on CPUs without AVX-512 BF16 or AMX (slower than float32).
"""

from __future__ import annotations

import warnings

import torch

from envs.models import ModelSettings, load_causal_lm
from envs.packed_linear import pack_linear_layers

SERVE_DTYPES = ("float32", "bfloat16", "int8")


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
    """(causal LM in eval mode in the serving dtype, tokenizer) for a model spec or exported directory.

    ``pack``: float32 Linear layers get oneDNN-packed weights (:mod:`envs.packed_linear`; same maths, faster).
    """
    if dtype not in SERVE_DTYPES:
        raise ValueError(f"serve.dtype must be one of {SERVE_DTYPES}, got {dtype!r}")
    lm, tok = load_causal_lm(model.policy, "bfloat16" if dtype == "bfloat16" else "float32", model.tiny_vocab_size)
    if dtype == "bfloat16":
        lm = lm.to(torch.bfloat16)  # 'tiny' is built in float32 whatever it is asked for
    elif dtype == "int8":
        lm = quantize_int8(lm.float())
    elif pack:
        pack_linear_layers(lm)
    return lm.eval(), tok
