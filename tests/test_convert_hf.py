"""Parity of HF GPT-2 / Llama-family decoders converted with `from_hf` (float32)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from retro_jax.convert.hf import from_hf  # noqa: E402
from retro_jax.models import Retro  # noqa: E402


def _tokens(vocab, batch=2, n=37, seed=0):
  return np.random.RandomState(seed).randint(0, vocab, (batch, n)).astype(np.int32)


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _check_parity(model, tokens, **overrides):
  config, params = from_hf(model, chunk_length=8, **overrides)
  ours = np.asarray(Retro(config).apply({"params": params}, tokens))
  ref = _hf_logits(model, tokens)
  assert ours.shape == ref.shape
  assert np.abs(ours - ref).max() < 1e-4
  return config, params


def test_gpt2_parity():
  torch.manual_seed(0)
  hf_config = transformers.GPT2Config(n_layer=3, n_embd=48, n_head=4, vocab_size=101,
                                      n_positions=64, bos_token_id=0, eos_token_id=0)
  model = transformers.GPT2LMHeadModel(hf_config).eval()
  tokens = _tokens(101)
  config, params = _check_parity(model, tokens, cca_layers=(2,))
  assert config.position_embedding == "learned" and config.use_bias
  # The retrieval parts are fresh and live: neighbors change the logits.
  neighbors = np.random.RandomState(1).randint(0, 101, (2, 37 // 8, 2, 16)).astype(np.int32)
  with_retrieval = np.asarray(Retro(config).apply({"params": params}, tokens, neighbors))
  assert np.abs(with_retrieval - _hf_logits(model, tokens)).max() > 1e-4


@pytest.mark.parametrize("tied", [False, True])
def test_llama_gqa_parity(tied):
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      num_hidden_layers=3, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
      intermediate_size=96, vocab_size=97, rope_theta=5000.0, tie_word_embeddings=tied,
      bos_token_id=0, eos_token_id=0, pad_token_id=0)
  model = transformers.LlamaForCausalLM(hf_config).eval()
  config, _ = _check_parity(model, _tokens(97))
  assert config.kv_heads == 2 and config.mlp_gated and config.tie_embeddings == tied
  assert config.rope_theta == 5000.0


def test_qwen2_qkv_bias_parity_from_state_dict():
  torch.manual_seed(0)
  hf_config = transformers.Qwen2Config(
      num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
      intermediate_size=64, vocab_size=89, tie_word_embeddings=False,
      bos_token_id=0, eos_token_id=0, pad_token_id=0)
  model = transformers.Qwen2ForCausalLM(hf_config).eval()
  tokens = _tokens(89)
  config, params = from_hf((model.state_dict(), model.config.to_dict()), chunk_length=8)
  assert config.has_qkv_bias
  ours = np.asarray(Retro(config).apply({"params": params}, tokens))
  assert np.abs(ours - _hf_logits(model, tokens)).max() < 1e-4


def test_unsupported_and_contradicting_inputs_are_named():
  hf_config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50,
                                      n_positions=32, bos_token_id=0, eos_token_id=0)
  model = transformers.GPT2LMHeadModel(hf_config)
  with pytest.raises(ValueError, match="override hidden_size=32 contradicts"):
    from_hf(model, hidden_size=32)
  state = dict(model.state_dict())
  del state["transformer.h.0.mlp.c_fc.weight"]
  with pytest.raises(ValueError, match="lacks 'transformer.h.0.mlp.c_fc.weight'"):
    from_hf((state, hf_config), chunk_length=8)
  with pytest.raises(ValueError, match="model_type='bert'"):
    from_hf((state, {"model_type": "bert"}))
