"""oneDNN-packed Linear layers: the plain layer's outputs to float rounding, every plain float32 Linear swapped."""

from __future__ import annotations

import pytest
import torch

from envs import packed_linear, tiny
from envs.packed_linear import PackedLinear, pack_linear_layers, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch has no oneDNN linear ops")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 48), (9, 48), (2, 5, 48)])
def test_packed_linear_matches_the_plain_layer(bias, shape):
    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 80, bias=bias)
    x = torch.randn(*shape)
    with torch.inference_mode():
        want, got = plain(x), PackedLinear(plain)(x)
    assert got.shape == want.shape == (*shape[:-1], 80)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.equal(got, torch.zeros_like(got))


def test_packed_linear_takes_a_non_contiguous_input():
    plain = torch.nn.Linear(16, 8)
    x = torch.randn(16, 6).t()  # (6, 16), a transposed view
    with torch.inference_mode():
        assert torch.allclose(PackedLinear(plain)(x), plain(x), atol=1e-5)


def test_pack_linear_layers_swaps_every_linear_of_a_tiny_llama_and_keeps_its_logits():
    model, _ = tiny.causal_lm(vocab_size=64)
    model.eval()
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    with torch.inference_mode():
        want = model(ids).logits
        assert pack_linear_layers(model) == len(linears) > 0
        got = model(ids).logits
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert isinstance(model.lm_head, PackedLinear)
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max().item())
    assert pack_linear_layers(model) == 0  # nothing left to pack


def test_pack_linear_layers_leaves_other_dtypes_and_missing_ops_alone(monkeypatch):
    half = torch.nn.Sequential(torch.nn.Linear(4, 4).to(torch.bfloat16))
    assert pack_linear_layers(half) == 0 and type(half[0]) is torch.nn.Linear
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    monkeypatch.setattr(packed_linear, "packing_available", lambda dtype=torch.float32: False)
    assert pack_linear_layers(plain) == 0 and type(plain[0]) is torch.nn.Linear


def test_a_cpu_that_cannot_pack_bfloat16_keeps_plain_layers_for_it_and_packs_float32(monkeypatch):
    """oneDNN refuses bfloat16 weights on a CPU with AVX2 alone: probed once, then nothing is swapped for bfloat16."""
    if not packing_available():
        pytest.skip("this torch has no oneDNN packing")
    reorder = packed_linear._reorder

    def avx2_only(weight):
        if weight.dtype == torch.bfloat16:
            raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or ...")
        return reorder(weight)

    monkeypatch.setattr(packed_linear, "_reorder", avx2_only)
    packed_linear._packs.cache_clear()
    try:
        assert not packing_available(torch.bfloat16) and packing_available(torch.float32)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        assert pack_linear_layers(model, torch.bfloat16) == 0 and type(model[0]) is torch.nn.Linear
        assert pack_linear_layers(model, torch.float32) == 1 and isinstance(model[0], PackedLinear)
    finally:
        packed_linear._packs.cache_clear()  # the next caller probes the real CPU again


@pytest.mark.skipif(
    not packing_available(torch.bfloat16), reason="this CPU's oneDNN cannot pack bfloat16 (AVX2 alone; needs AVX-512)"
)
def test_bfloat16_products_round_like_bfloat16_and_return_the_input_dtype():
    torch.manual_seed(0)
    plain = torch.nn.Linear(64, 96, bias=True)
    x = torch.randn(7, 64)
    layer = PackedLinear(plain, torch.bfloat16)
    with torch.inference_mode():
        got, want = layer(x), plain(x)
        rounded = torch.nn.functional.linear(
            x.bfloat16().float(), plain.weight.bfloat16().float(), plain.bias.bfloat16().float()
        )
    assert got.dtype == torch.float32 and layer.packed.dtype == torch.bfloat16
    assert not torch.allclose(got, want, atol=1e-5)  # the product really ran in bfloat16 ...
    assert torch.allclose(got, rounded, atol=2e-2 * want.abs().max().item())  # ... as bfloat16 inputs give
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
    assert "matmul=bfloat16" in repr(layer)
