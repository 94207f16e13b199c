"""Parity of HF GPT-2 / Llama-family decoders converted with `from_hf` (float32)."""

import json
import os
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from retro_jax.convert.hf import decoder_config, from_hf, load_hf_dir  # noqa: E402
from retro_jax.models import Retro, RetroConfig  # noqa: E402
from retro_jax.models import partitioning  # noqa: E402
from retro_jax.training import checkpoints  # noqa: E402
from retro_jax.utils import gin_utils  # noqa: E402


def _tokens(vocab, batch=2, n=37, seed=0):
  return np.random.RandomState(seed).randint(0, vocab, (batch, n)).astype(np.int32)


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _randomize(model, seed=0):
  """Every parameter random (HF initialises biases to 0 and norm weights to 1, which
  would hide a dropped bias or norm): weights and biases N(0, 0.2), norm weights
  1 + N(0, 0.2). Tied weights stay tied (in place)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g) * 0.2
      is_norm = ("norm" in name or ".ln_" in name) and name.endswith("weight")
      p.copy_(1.0 + noise if is_norm else noise)
  return model.eval()


def _max_diff(model, tokens, **overrides):
  config, params = from_hf(model, chunk_length=8, **overrides)
  ours = np.asarray(Retro(config).apply({"params": params}, tokens))
  ref = _hf_logits(model, tokens)
  assert ours.shape == ref.shape
  return float(np.abs(ours - ref).max()), config, params


def _check_parity(model, tokens, **overrides):
  diff, config, params = _max_diff(model, tokens, **overrides)
  assert diff < 1e-4
  return config, params


_LLAMA_SIZES = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=64, vocab_size=89,
                    bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _gpt2(**kw):
  torch.manual_seed(0)
  fields = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=89, n_positions=64,
                bos_token_id=0, eos_token_id=0)
  fields.update(kw)
  return _randomize(transformers.GPT2LMHeadModel(transformers.GPT2Config(**fields)))


def _llama_family(cls_name, **kw):
  torch.manual_seed(0)
  config = getattr(transformers, cls_name + "Config")(**{**_LLAMA_SIZES, **kw})
  return _randomize(getattr(transformers, cls_name + "ForCausalLM")(config))


@pytest.mark.slow
def test_gpt2_parity():
  model = _gpt2(n_layer=3, n_embd=48, n_head=4, vocab_size=101)
  tokens = _tokens(101)
  config, params = _check_parity(model, tokens, cca_layers=(2,))
  assert config.position_embedding == "learned" and config.use_bias
  # The retrieval parts are fresh and live: neighbors change the logits.
  neighbors = np.random.RandomState(1).randint(0, 101, (2, 37 // 8, 2, 16)).astype(np.int32)
  with_retrieval = np.asarray(Retro(config).apply({"params": params}, tokens, neighbors))
  assert np.abs(with_retrieval - _hf_logits(model, tokens)).max() > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_llama_gqa_parity(tied):
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      num_hidden_layers=3, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
      intermediate_size=96, vocab_size=97, rope_theta=5000.0, tie_word_embeddings=tied,
      bos_token_id=0, eos_token_id=0, pad_token_id=0)
  model = _randomize(transformers.LlamaForCausalLM(hf_config))
  config, _ = _check_parity(model, _tokens(97))
  assert config.kv_heads == 2 and config.mlp_gated and config.tie_embeddings == tied
  assert config.rope_theta == 5000.0 and config.sliding_window is None
  assert not config.has_qkv_bias and not config.has_attention_out_bias
  assert not config.use_bias


@pytest.mark.parametrize("attention_bias,mlp_bias", [(True, False), (True, True),
                                                     (False, True)])
@pytest.mark.slow
def test_llama_attention_and_mlp_bias_parity(attention_bias, mlp_bias):
  """attention_bias=True: biases on q, k, v AND o_proj; mlp_bias: on the SwiGLU MLP."""
  model = _llama_family("Llama", attention_bias=attention_bias, mlp_bias=mlp_bias)
  assert (model.model.layers[0].self_attn.o_proj.bias is not None) == attention_bias
  config, params = _check_parity(model, _tokens(89))
  assert config.has_qkv_bias == config.has_attention_out_bias == attention_bias
  assert config.use_bias == mlp_bias
  out = params["layers_0"]["self_attention"]["out"]
  assert ("bias" in out) == attention_bias
  assert ("bias" in params["layers_0"]["mlp"]["wo"]) == mlp_bias


@pytest.mark.slow   # multi-second (see pytest.ini)
def test_mistral_sliding_window_parity():
  tokens = _tokens(89)                           # 37 tokens, window 5
  model = _llama_family("Mistral", sliding_window=5)
  config, params = _check_parity(model, tokens)
  assert config.sliding_window == 5 and not config.has_qkv_bias
  # The window matters at this length: the same weights without it differ.
  full = np.asarray(Retro(config.replace(sliding_window=None)).apply(
      {"params": params}, tokens))
  assert np.abs(full - _hf_logits(model, tokens)).max() > 1e-2
  config, _ = _check_parity(_llama_family("Mistral", sliding_window=None), tokens)
  assert config.sliding_window is None


def test_qwen2_qkv_bias_parity_from_state_dict():
  model = _llama_family("Qwen2", tie_word_embeddings=False)
  tokens = _tokens(89)
  assert model.model.layers[0].self_attn.o_proj.bias is None
  hf_dict = model.config.to_dict()
  # use_sliding_window=False (the default): HF ignores sliding_window in every layer.
  hf_dict.update(use_sliding_window=False, sliding_window=5)
  config, params = from_hf((model.state_dict(), hf_dict), chunk_length=8)
  assert config.has_qkv_bias and not config.has_attention_out_bias
  assert config.sliding_window is None
  assert "bias" not in params["layers_0"]["self_attention"]["out"]
  ours = np.asarray(Retro(config).apply({"params": params}, tokens))
  assert np.abs(ours - _hf_logits(model, tokens)).max() < 1e-4


def test_qwen2_per_layer_sliding_window_is_refused():
  model = _llama_family("Qwen2", use_sliding_window=True, sliding_window=5,
                        max_window_layers=1)
  with pytest.raises(ValueError, match="use_sliding_window=True is not supported"):
    from_hf(model, chunk_length=8)


_FORBIDDEN_ROPE = [("rotary_fraction", 0.5), ("norm_zero_centered_gamma", True),
                   ("rope_theta", 500.0), ("norm_eps", 1e-3), ("qkv_bias", True),
                   ("attention_out_bias", True), ("sliding_window", 4),
                   ("final_norm", False), ("use_bias", True), ("num_kv_heads", 4),
                   ("head_dim", 16), ("position_embedding", "none"),
                   ("tie_embeddings", True), ("mlp_activation", "gelu")]
_FORBIDDEN_GPT2 = [("max_length", 128), ("norm_eps", 1e-3), ("sliding_window", 4),
                   ("qkv_bias", False), ("attention_out_bias", False),
                   ("norm_type", "rmsnorm"), ("final_norm", False)]


@pytest.mark.parametrize("family,field,value",
                         [("llama", f, v) for f, v in _FORBIDDEN_ROPE]
                         + [("gpt2", f, v) for f, v in _FORBIDDEN_GPT2])
def test_decoder_fields_may_not_be_overridden(family, field, value):
  model = _gpt2() if family == "gpt2" else _llama_family("Llama")
  with pytest.raises(ValueError, match=f"override {field}={value!r} contradicts"):
    from_hf(model, chunk_length=8, **{field: value})


@pytest.mark.slow
def test_allowed_overrides_keep_parity():
  model = _llama_family("Llama")
  retrieval = dict(num_neighbors=3, retrieved_length=12, cca_layers=(1, 2),
                   encoder_num_layers=1, encoder_hidden_size=16, encoder_num_heads=2,
                   encoder_mlp_dim=24, encoder_position_embedding="rope",
                   encoder_final_norm=True, encoder_cross_attention_residual="normed",
                   encoder_dropout_rate=0.0, cca_gate=0.5, init_std=0.01,
                   param_dtype="bfloat16", dtype="bfloat16", attention_impl="xla",
                   # Decoder fields given with the HF value are accepted.
                   hidden_size=32, rope_theta=10000.0, qkv_bias=False,
                   attention_out_bias=False, sliding_window=None)
  config = decoder_config(model.config, chunk_length=8, **retrieval)
  assert (config.encoder_width, config.retro_layers, config.dtype) == (16, (1, 2),
                                                                        "bfloat16")
  # Numerics that leave fp32 inference unchanged, and max_length of a RoPE model.
  config, _ = _check_parity(model, _tokens(89), cca_layers=(2,), max_length=64,
                            dropout_rate=0.1, attention_dropout_rate=0.1,
                            remat_policy="full")
  assert config.max_length == 64
  with pytest.raises(ValueError, match="RetroConfig has no field 'chunk_len'"):
    from_hf(model, chunk_len=8)


def test_unused_state_dict_keys_are_refused():
  model = _llama_family("Llama")
  state = dict(model.state_dict())
  # Known non-parameter buffers are fine.
  state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
  from_hf((state, model.config), chunk_length=8)
  # An o_proj bias the config does not announce would be dropped: refused.
  biased = dict(state, **{"model.layers.1.self_attn.o_proj.bias": torch.ones(32)})
  with pytest.raises(ValueError, match=r"does not use .*layers\.1\.self_attn\.o_proj"):
    from_hf((biased, model.config), chunk_length=8)
  extra = dict(state, **{"model.layers.0.extra_scale": torch.ones(32)})
  with pytest.raises(ValueError, match="1 state-dict key.*extra_scale"):
    from_hf((extra, model.config), chunk_length=8)
  # A tied model may carry lm_head.weight as a copy of the embedding, not another one.
  tied = _llama_family("Llama", tie_word_embeddings=True)
  state = dict(tied.state_dict())
  assert "lm_head.weight" in state
  _check_parity(tied, _tokens(89))
  state["lm_head.weight"] = state["lm_head.weight"] + 1.0
  with pytest.raises(ValueError, match="does not use.*lm_head.weight"):
    from_hf((state, tied.config), chunk_length=8)
  # GPT-2's causal-mask buffers (older checkpoints) are not parameters.
  gpt2 = _gpt2()
  state = dict(gpt2.state_dict())
  state["transformer.h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
  state["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
  from_hf((state, gpt2.config), chunk_length=8)
  state["transformer.h.0.attn.q_attn.weight"] = torch.ones(32, 32)
  with pytest.raises(ValueError, match="q_attn"):
    from_hf((state, gpt2.config), chunk_length=8)


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
  # HF settings that change the math and have no RetroConfig equivalent.
  gpt2 = hf_config.to_dict()
  for flag in ("add_cross_attention", "scale_attn_by_inverse_layer_idx",
               "reorder_and_upcast_attn"):
    with pytest.raises(ValueError, match=f"{flag}=True is not supported"):
      from_hf((model.state_dict(), dict(gpt2, **{flag: True})))
  with pytest.raises(ValueError, match="activation_function='gelu_fast'"):
    from_hf((model.state_dict(), dict(gpt2, activation_function="gelu_fast")))
  llama = _llama_family("Llama")
  cfg = llama.config.to_dict()
  scaled = dict(cfg, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                      "rope_theta": 10000.0})
  with pytest.raises(ValueError, match="rope type 'linear'"):
    from_hf((llama.state_dict(), scaled))
  with pytest.raises(ValueError, match="hidden_act='gelu'"):
    from_hf((llama.state_dict(), dict(cfg, hidden_act="gelu")))


@pytest.mark.slow
def test_import_local_dir_as_gpt_checkpoint_for_the_recipes(tmp_path):
  """A saved HF Llama (safetensors, bf16 on disk) -> the command line -> a GPT
  checkpoint + model.gin that the training/eval loaders read back with HF logits."""
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
  model = transformers.LlamaForCausalLM(hf_config).eval()
  hf_dir = tmp_path / "hf"
  model.to(torch.bfloat16).save_pretrained(hf_dir, safe_serialization=True)
  model = model.float()       # the bf16-rounded weights, as the import reads them
  (hf_dir / "tokenizer.model").write_bytes(b"not a real spm, copied as is")
  out = tmp_path / "gpt"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "-m", "retro_jax.convert.hf", f"--hf_dir={hf_dir}",
       f"--model_dir={out}", "--retro=chunk_length=8", "--retro=cca_layers=(2,)"],
      cwd=repo, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "retrofit.gin" in proc.stdout
  assert (out / "vocab" / "spm.model").read_bytes().startswith(b"not a real spm")
  with open(out / "checkpoints" / "0" / "meta" / "metadata", encoding="utf-8") as f:
    assert json.load(f)["model_type"] == "llama"
  gin.clear_config()
  try:
    gin_utils.parse_gin([str(out / "model.gin")])
    config = RetroConfig()
  finally:
    gin.clear_config()
  assert (config.num_layers, config.num_kv_heads, config.chunk_length,
          config.cca_layers) == (2, 2, 8, (2,))
  mesh = partitioning.make_mesh({"data": 1}, devices=jax.devices()[:1])
  params, _, has_retro = checkpoints.load_model_params(str(out), config, mesh)
  assert not has_retro        # a GPT checkpoint: retro-fitting adds encoder and CCA
  tokens = _tokens(97)
  ours = np.asarray(Retro(config).apply({"params": params}, tokens))
  assert np.abs(ours - _hf_logits(model, tokens)).max() < 1e-4
  proc = subprocess.run(
      [sys.executable, "-m", "retro_jax.convert.hf", f"--hf_dir={hf_dir}",
       f"--model_dir={out}"], cwd=repo, capture_output=True, text=True, check=False)
  assert proc.returncode != 0 and "already holds checkpoints" in proc.stderr
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load_hf_dir(str(tmp_path))
