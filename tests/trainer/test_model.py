"""The LLaMA model: shapes, KV-cache decoding, grouped-query attention, RoPE, checkpoints."""

import pytest
import torch

from trainer.checkpoint import load_model, save_model
from trainer.model import Config, LLaMA, apply_rope, build_rope_cache

pytestmark = pytest.mark.unit


def small_config(**overrides) -> Config:
    base = dict(
        vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64, max_seq_len=32
    )
    return Config(**{**base, **overrides})


def test_logits_have_one_row_per_position():
    model = LLaMA(small_config())
    idx = torch.randint(0, 50, (3, 7))
    assert model(idx).shape == (3, 7, 50)


def test_state_dict_uses_meta_names_and_no_biases():
    keys = set(LLaMA(small_config()).state_dict())
    assert "layers.1.attention.wq.weight" in keys
    assert "layers.0.feed_forward.w3.weight" in keys
    assert {"tok_embeddings.weight", "norm.weight", "output.weight"} <= keys
    assert not any(k.endswith("bias") or "rope" in k for k in keys)


def test_kv_cache_decoding_matches_full_forward():
    torch.manual_seed(0)
    model = LLaMA(small_config()).eval()
    idx = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        full = model(idx)
        model.setup_kv_cache(batch_size=2)
        steps = [model(idx[:, :4], torch.arange(4))]  # prefill, then one token at a time
        steps += [model(idx[:, t : t + 1], torch.tensor([t])) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_cache_needed_for_positions():
    with pytest.raises(RuntimeError, match="setup_kv_cache"):
        LLaMA(small_config())(torch.zeros(1, 2, dtype=torch.long), torch.arange(2))


def test_grouped_query_attention_equals_attention_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = LLaMA(small_config(n_head=4, n_kv_head=2)).eval()
    mha = LLaMA(small_config(n_head=4, n_kv_head=4)).eval()
    assert gqa.layers[0].attention.wk.weight.shape == (2 * 8, 32)
    state = gqa.state_dict()
    for key, value in state.items():
        if key.endswith(("attention.wk.weight", "attention.wv.weight")):
            # each key/value head serves two query heads: repeat its rows per head
            state[key] = value.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    idx = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx), mha(idx))


def test_rope_rotates_interleaved_pairs_like_complex_multiplication():
    config = small_config(n_embd=64, n_head=4)
    cos, sin = build_rope_cache(config, torch.device("cpu"))
    x = torch.randn(2, 5, 4, 16)  # (B, T, nh, hs)
    ours = apply_rope(x, cos[:5], sin[:5])

    hs = 16
    theta = 1.0 / (config.rope_base ** (torch.arange(0, hs, 2).float() / hs))
    freqs = torch.polar(torch.ones(5, hs // 2), torch.outer(torch.arange(5).float(), theta))
    pairs = torch.view_as_complex(x.reshape(2, 5, 4, hs // 2, 2))  # (x[2i], x[2i+1]) as one number
    reference = torch.view_as_real(pairs * freqs[None, :, None, :]).flatten(-2)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(ours[:, 0], x[:, 0])  # position 0 is not rotated


def test_config_presets_and_round_trip():
    config = Config.from_name("tiny", vocab_size=600)
    assert config.vocab_size == 600 and config.n_kv_head < config.n_head
    assert Config.from_dict(config.to_dict()) == config
    seven = Config.from_name("7B")
    assert (seven.n_layer, seven.n_embd, seven.intermediate_size) == (32, 4096, 11008)
    with pytest.raises(ValueError, match="unknown"):
        Config.from_dict({**config.to_dict(), "bias": True})
    with pytest.raises(ValueError, match="preset"):
        Config.from_name("70B")


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = LLaMA(small_config())
    save_model(model, tmp_path)
    loaded, config = load_model(tmp_path)
    assert config == model.config
    idx = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx), atol=0, rtol=0)
