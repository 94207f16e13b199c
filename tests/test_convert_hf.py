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


def test_import_local_dir_as_gpt_checkpoint_for_the_recipes(tmp_path):
  """A saved HF Llama (safetensors, bf16 on disk) -> the command line -> a GPT
  checkpoint + model.gin that the training/eval loaders read back with HF logits."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from retro_jax.models import RetroConfig  # pylint: disable=g-import-not-at-top
  from retro_jax.training import checkpoints, partitioning  # pylint: disable=g-import-not-at-top
  from retro_jax.utils import gin_utils  # pylint: disable=g-import-not-at-top
  import gin  # pylint: disable=g-import-not-at-top
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
    from retro_jax.convert.hf import load_hf_dir  # pylint: disable=g-import-not-at-top
    load_hf_dir(str(tmp_path))
