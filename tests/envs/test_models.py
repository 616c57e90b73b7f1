"""Model loading: tiny models, HF directories, export round trip, clear errors, the embedded default."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from envs import tiny
from envs.models import ModelLoadError, export_pretrained, load_causal_lm, load_encoder


def test_tiny_model_saved_and_loaded_from_directory(tmp_path):
    model, tok = tiny.causal_lm()
    export_pretrained(model, tok, tmp_path / "tiny")
    again, tok2 = load_causal_lm(str(tmp_path / "tiny"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    ids = torch.tensor([tok("the film was great")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits)
        assert torch.allclose(model(ids).logits, plain(ids).logits)
    assert tok2.eos_token == tok.eos_token and tok2.chat_template == tok.chat_template


def test_missing_path_names_it(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_causal_lm(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_causal_lm(str(tmp_path))


def test_broken_directory_names_it(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        load_causal_lm(str(tmp_path))
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        load_encoder(str(tmp_path))


@pytest.mark.slow
def test_embedded_smollm2_loads_and_generates():
    model, tok = load_causal_lm("smollm2")
    assert model.config.vocab_size == 49152 and tok.eos_token == "<|im_end|>"
    ids = tok("The movie was", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_embedded_minilm_encoder_loads():
    encoder, tok = load_encoder("minilm")
    enc = tok(["a great film"], return_tensors="pt")
    assert encoder(**enc).last_hidden_state.shape[-1] == 384
