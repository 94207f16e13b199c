"""Import Hugging Face GPT-2 and Llama-family decoders as the decoder of a Retro model.

    config, params = from_hf(hf_model, chunk_length=64, cca_layers=(6, 9, 12))

``hf_model`` is a ``transformers`` model object (``GPT2LMHeadModel``,
``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``), or a
``(state_dict, config)`` pair where the state dict maps HF names to torch tensors or
numpy arrays and the config is a ``transformers`` config or its ``to_dict()``.
The returned decoder reproduces the HF logits with retrieval off; the Retro encoder and
CCA parameters are initialised fresh from ``rng`` (retro-fitting). Keyword overrides
set the retrieval fields of ``RetroConfig`` (and ``dtype``/``remat_policy`` etc.,
``OVERRIDABLE_FIELDS``); decoder fields come from the HF config only.

What cannot be reproduced exactly is refused with a ValueError: HF settings that
``RetroConfig`` cannot express (scaled RoPE, Qwen2's per-layer sliding windows, GPT-2
cross-attention, ...), state-dict keys the mapping does not use, overrides of decoder
fields. Mapped: Llama ``attention_bias`` (q/k/v/o biases) and ``mlp_bias``, Qwen2's
q/k/v biases, Mistral's ``sliding_window``.

Nothing is downloaded here: load the HF model from a local directory yourself
(``AutoModelForCausalLM.from_pretrained(path)``), or pass its state dict.

To retro-fit a local HF decoder with the training recipes, write it as a GPT checkpoint
(no torch needed: config.json + safetensors are read directly)::

    python -m retro_jax.convert.hf --hf_dir=/models/llama --model_dir=/runs/llama_gpt \
        --retro=cca_layers="(6, 9, 12)"
    python -m retro_jax.train --gin_file=gin/recipes/retrofit.gin \
        --gin_file=/runs/llama_gpt/model.gin --gin.INIT_CHECKPOINT=/runs/llama_gpt ...
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import json
import os
import re
import shutil
from typing import Any, Callable, Mapping

from absl import app
from absl import flags
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from safetensors import safe_open

from retro_jax.models import RetroConfig, init_params
from retro_jax.models import lm
from retro_jax.training import checkpoints as ckpt_lib
from retro_jax.utils.io import atomic_write_text

# The RetroConfig fields that ``from_hf`` overrides may set: retrieval (the encoder and
# CCA start fresh) and numerics. Every other field describes the HF decoder and comes
# from its config; an override of one of them must equal the HF value.
# ``max_length`` may also be overridden for RoPE models (it only bounds the length).
OVERRIDABLE_FIELDS = frozenset({
    "chunk_length", "num_neighbors", "retrieved_length", "cca_layers",
    "encoder_num_layers", "encoder_hidden_size", "encoder_num_heads",
    "encoder_mlp_dim", "encoder_position_embedding", "encoder_dropout_rate",
    "encoder_final_norm", "encoder_cross_attention_residual", "cca_gate",
    "dtype", "param_dtype", "remat_policy", "attention_impl", "dropout_rate",
    "attention_dropout_rate", "init_std"})


def _to_numpy(t: Any) -> np.ndarray:
  if hasattr(t, "detach"):  # torch.Tensor, without importing torch.
    return t.detach().cpu().float().numpy()
  return np.asarray(t, dtype=np.float32)


def _config_dict(config: Any) -> dict:
  if isinstance(config, Mapping):
    return dict(config)
  return config.to_dict()


class _UsageTracking(dict):
  """A state dict that records which keys the family mapping read."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.used: set[str] = set()

  def __getitem__(self, key):
    value = super().__getitem__(key)
    self.used.add(key)
    return value


def _rope_theta(cfg: Mapping[str, Any]) -> float:
  params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in ("default", None):
    raise ValueError(f"HF config rope type {rope_type!r} (rope_parameters/rope_scaling) "
                     "is not supported; only plain RoPE is")
  theta = cfg.get("rope_theta") or params.get("rope_theta")
  return float(theta if theta is not None else 10000.0)


# GPT-2 -------------------------------------------------------------------------------


_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                     "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}


def _gpt2_config(cfg: Mapping[str, Any]) -> dict:
  act = cfg.get("activation_function", "gelu_new")
  if act not in _GPT2_ACTIVATIONS:
    raise ValueError(f"GPT-2 config activation_function={act!r} is not supported")
  for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
               "add_cross_attention"):
    if cfg.get(flag):
      raise ValueError(f"GPT-2 config {flag}=True is not supported")
  if not cfg.get("scale_attn_weights", True):
    raise ValueError("GPT-2 config scale_attn_weights=False is not supported")
  d = cfg["n_embd"]
  return dict(vocab_size=cfg["vocab_size"], hidden_size=d, num_layers=cfg["n_layer"],
              num_heads=cfg["n_head"], mlp_dim=cfg.get("n_inner") or 4 * d,
              mlp_activation=_GPT2_ACTIVATIONS[act], mlp_gated=False,
              norm_type="layernorm", norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
              use_bias=True, position_embedding="learned", max_length=cfg["n_positions"],
              tie_embeddings=cfg.get("tie_word_embeddings", True))


def _gpt2_params(sd: Mapping[str, np.ndarray], c: RetroConfig) -> dict:
  d, h, hd = c.hidden_size, c.num_heads, c.dim_per_head
  p = "transformer." if "transformer.wte.weight" in sd else ""
  out = {("token_embedding", "embedding"): sd[p + "wte.weight"],
         ("position_embedding", "embedding"): sd[p + "wpe.weight"],
         ("final_norm", "scale"): sd[p + "ln_f.weight"],
         ("final_norm", "bias"): sd[p + "ln_f.bias"]}
  for i in range(c.num_layers):
    s, L = f"{p}h.{i}.", f"layers_{i}"
    qkv_w = sd[s + "attn.c_attn.weight"]  # Conv1D: [in, out] = [d, 3d]
    qkv_b = sd[s + "attn.c_attn.bias"]
    for j, name in enumerate(("query", "key", "value")):
      out[(L, "self_attention", name, "kernel")] = qkv_w[:, j * d:(j + 1) * d].reshape(d, h, hd)
      out[(L, "self_attention", name, "bias")] = qkv_b[j * d:(j + 1) * d].reshape(h, hd)
    out[(L, "self_attention", "out", "kernel")] = sd[s + "attn.c_proj.weight"].reshape(h, hd, d)
    out[(L, "self_attention", "out", "bias")] = sd[s + "attn.c_proj.bias"]
    out[(L, "pre_attention_norm", "scale")] = sd[s + "ln_1.weight"]
    out[(L, "pre_attention_norm", "bias")] = sd[s + "ln_1.bias"]
    out[(L, "pre_mlp_norm", "scale")] = sd[s + "ln_2.weight"]
    out[(L, "pre_mlp_norm", "bias")] = sd[s + "ln_2.bias"]
    out[(L, "mlp", "wi", "kernel")] = sd[s + "mlp.c_fc.weight"]
    out[(L, "mlp", "wi", "bias")] = sd[s + "mlp.c_fc.bias"]
    out[(L, "mlp", "wo", "kernel")] = sd[s + "mlp.c_proj.weight"]
    out[(L, "mlp", "wo", "bias")] = sd[s + "mlp.c_proj.bias"]
  if not c.tie_embeddings:
    out[("output_layer", "kernel")] = sd["lm_head.weight"].T
  return out


# Llama family ----------------------------------------------------------------------------


def _llama_config(cfg: Mapping[str, Any]) -> dict:
  model_type = cfg.get("model_type", "llama")
  if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
    raise ValueError(f"{model_type} config hidden_act={cfg.get('hidden_act')!r} is not "
                     "supported (SwiGLU needs 'silu')")
  sliding_window = None
  if model_type == "llama":
    # LlamaAttention: attention_bias puts biases on q, k, v and o; mlp_bias on the MLP.
    qkv_bias = out_bias = bool(cfg.get("attention_bias", False))
    mlp_bias = bool(cfg.get("mlp_bias", False))
  elif model_type == "mistral":
    # MistralAttention / MistralMLP have no biases; every layer uses the window.
    qkv_bias = out_bias = mlp_bias = False
    sliding_window = cfg.get("sliding_window")
  elif model_type == "qwen2":
    # Qwen2Attention: biases on q, k and v, none on o_proj; no MLP biases.
    qkv_bias, out_bias, mlp_bias = True, False, False
    if cfg.get("use_sliding_window", False):
      raise ValueError(
          "qwen2 config use_sliding_window=True is not supported: Qwen2 applies "
          "sliding_window only in the layers from max_window_layers="
          f"{cfg.get('max_window_layers')!r} on (layer_types), and RetroConfig has "
          "one window for every layer")
    # use_sliding_window=False: HF ignores sliding_window (every layer is full).
  else:
    raise ValueError(f"model_type={model_type!r} is not a Llama-family model")
  d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
  return dict(vocab_size=cfg["vocab_size"], hidden_size=d,
              num_layers=cfg["num_hidden_layers"], num_heads=heads,
              num_kv_heads=cfg.get("num_key_value_heads") or heads,
              head_dim=cfg.get("head_dim") or d // heads,
              mlp_dim=cfg["intermediate_size"], mlp_activation="silu", mlp_gated=True,
              norm_type="rmsnorm", norm_eps=cfg.get("rms_norm_eps", 1e-6),
              use_bias=mlp_bias, qkv_bias=qkv_bias, attention_out_bias=out_bias,
              position_embedding="rope", rope_theta=_rope_theta(cfg), rotary_fraction=1.0,
              sliding_window=sliding_window,
              max_length=cfg.get("max_position_embeddings", 2048),
              tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def _llama_params(sd: Mapping[str, np.ndarray], c: RetroConfig) -> dict:
  d, hd = c.hidden_size, c.dim_per_head
  p = "model." if "model.embed_tokens.weight" in sd else ""
  out = {("token_embedding", "embedding"): sd[p + "embed_tokens.weight"],
         ("final_norm", "scale"): sd[p + "norm.weight"]}
  for i in range(c.num_layers):
    s, L = f"{p}layers.{i}.", f"layers_{i}"
    for name, heads in (("q", c.num_heads), ("k", c.kv_heads), ("v", c.kv_heads)):
      ours = {"q": "query", "k": "key", "v": "value"}[name]
      w = sd[s + f"self_attn.{name}_proj.weight"]  # torch Linear: [out, in]
      out[(L, "self_attention", ours, "kernel")] = w.T.reshape(d, heads, hd)
      if c.has_qkv_bias:
        out[(L, "self_attention", ours, "bias")] = sd[s + f"self_attn.{name}_proj.bias"
                                                      ].reshape(heads, hd)
    out[(L, "self_attention", "out", "kernel")] = sd[s + "self_attn.o_proj.weight"].T.reshape(
        c.num_heads, hd, d)
    if c.has_attention_out_bias:
      out[(L, "self_attention", "out", "bias")] = sd[s + "self_attn.o_proj.bias"]
    out[(L, "pre_attention_norm", "scale")] = sd[s + "input_layernorm.weight"]
    out[(L, "pre_mlp_norm", "scale")] = sd[s + "post_attention_layernorm.weight"]
    for ours, theirs in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
      out[(L, "mlp", ours, "kernel")] = sd[s + f"mlp.{theirs}.weight"].T
      if c.use_bias:
        out[(L, "mlp", ours, "bias")] = sd[s + f"mlp.{theirs}.bias"]
  if not c.tie_embeddings:
    out[("output_layer", "kernel")] = sd["lm_head.weight"].T
  return out


# Non-parameter buffers that HF state dicts may hold (older checkpoints and models).
_GPT2_BUFFERS = re.compile(r"(^|\.)attn\.(masked_)?bias$")
_ROPE_BUFFERS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

_FAMILIES: dict[str, tuple[Callable, Callable, re.Pattern]] = {
    "gpt2": (_gpt2_config, _gpt2_params, _GPT2_BUFFERS),
    "llama": (_llama_config, _llama_params, _ROPE_BUFFERS),
    "mistral": (_llama_config, _llama_params, _ROPE_BUFFERS),
    "qwen2": (_llama_config, _llama_params, _ROPE_BUFFERS),
}


def decoder_config(hf_config: Any, **retro_overrides) -> RetroConfig:
  """The `RetroConfig` whose decoder is the HF model's, plus retrieval overrides.

  Only the fields in ``OVERRIDABLE_FIELDS`` (and ``max_length`` of a RoPE model) may
  differ from the values the HF config gives; any other override that differs is a
  ValueError naming the field.
  """
  cfg = _config_dict(hf_config)
  model_type = cfg.get("model_type")
  if model_type not in _FAMILIES:
    raise ValueError(f"HF model_type={model_type!r} is not supported; supported: "
                     f"{sorted(_FAMILIES)}")
  fields = _FAMILIES[model_type][0](cfg)
  base = RetroConfig(**fields)
  names = {f.name for f in dataclasses.fields(RetroConfig)}
  for field, value in retro_overrides.items():
    if field not in names:
      raise ValueError(f"from_hf: override {field}={value!r}: RetroConfig has no field "
                       f"{field!r}")
    allowed = field in OVERRIDABLE_FIELDS or (
        field == "max_length" and base.position_embedding == "rope")
    if not allowed and value != getattr(base, field):
      raise ValueError(
          f"from_hf: override {field}={value!r} contradicts the HF checkpoint "
          f"({getattr(base, field)!r}); only the retrieval and numerics fields "
          f"{sorted(OVERRIDABLE_FIELDS)} (and max_length with RoPE) may be overridden")
  fields.update(retro_overrides)
  return RetroConfig(**fields)


def _unused_keys(sd: _UsageTracking, config: RetroConfig, model_type: str) -> list[str]:
  """State-dict keys the mapping did not read, less known buffers and a tied head."""
  buffers = _FAMILIES[model_type][2]
  unused = []
  for key in sorted(set(sd) - sd.used):
    if buffers.search(key):
      continue
    if key == "lm_head.weight" and config.tie_embeddings:
      names = (("transformer.wte.weight", "wte.weight") if model_type == "gpt2"
               else ("model.embed_tokens.weight", "embed_tokens.weight"))
      embedding = next((dict.get(sd, n) for n in names if n in sd), None)
      if embedding is not None and np.array_equal(dict.get(sd, key), embedding):
        continue  # The tied head, saved as a copy of the embedding.
    unused.append(key)
  return unused


def from_hf(model: Any, *, rng: jax.Array | int = 0, **retro_overrides
            ) -> tuple[RetroConfig, dict]:
  """Converts an HF GPT-2 / Llama-family model into ``(RetroConfig, params)``.

  Refuses (ValueError) what the converted model could not reproduce exactly: HF config
  settings RetroConfig cannot express, state-dict keys the mapping does not use, and
  overrides of decoder fields.

  Args:
    model: a ``transformers`` model, or ``(state_dict, config)``.
    rng: seed or PRNGKey for the fresh encoder and CCA parameters.
    **retro_overrides: RetroConfig fields in ``OVERRIDABLE_FIELDS`` (chunk_length,
      num_neighbors, cca_layers, encoder_*, dtype, ...) and ``max_length`` for RoPE
      models. Other (decoder) fields may only be given with the HF model's value.
  Returns:
    The config and a plain parameter pytree for ``Retro(config).apply({'params': ...})``.
  """
  if isinstance(model, tuple):
    state_dict, hf_config = model
  else:
    state_dict, hf_config = model.state_dict(), model.config
  cfg = _config_dict(hf_config)
  config = decoder_config(cfg, **retro_overrides)
  model_type = cfg["model_type"]
  sd = _UsageTracking({k: _to_numpy(v) for k, v in state_dict.items()})
  try:
    converted = _FAMILIES[model_type][1](sd, config)
  except KeyError as e:
    raise ValueError(f"from_hf: state dict lacks {e.args[0]!r} for model_type="
                     f"{model_type!r}") from e
  unused = _unused_keys(sd, config, model_type)
  if unused:
    raise ValueError(f"from_hf: {len(unused)} state-dict key(s) that the {model_type} "
                     f"mapping does not use (the converted model would not be the HF "
                     f"model): {unused[:5]}")

  if isinstance(rng, int):
    rng = jax.random.PRNGKey(rng)
  fresh = traverse_util.flatten_dict(jax.device_get(init_params(config, rng)))
  decoder_keys = {k for k in fresh if not lm.is_retro_path(k)}
  missing = decoder_keys - set(converted)
  extra = set(converted) - decoder_keys
  if missing or extra:
    raise ValueError(f"from_hf: converted decoder does not match RetroConfig; missing "
                     f"{sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
  for key, value in converted.items():
    if value.shape != fresh[key].shape:
      raise ValueError(f"from_hf: {'/'.join(key)} has shape {value.shape} in the HF "
                       f"checkpoint, expected {fresh[key].shape}")
    fresh[key] = value.astype(fresh[key].dtype)
  return config, traverse_util.unflatten_dict(fresh)


# A local Hugging Face directory -> a GPT checkpoint the training recipes start from ----


def load_hf_dir(hf_dir: str) -> tuple[dict[str, np.ndarray], dict]:
  """``(state_dict, config)`` of a local HF checkpoint directory, without torch.

  Reads ``config.json`` and every ``*.safetensors`` file (sharded checkpoints too);
  bf16 / fp16 tensors are widened to float32.
  """
  config_path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{hf_dir}: no config.json (a Hugging Face checkpoint "
                            "directory has config.json and *.safetensors)")
  with open(config_path, encoding="utf-8") as f:
    config = json.load(f)
  files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"{hf_dir}: no *.safetensors files (save the model with "
                            "save_pretrained(..., safe_serialization=True))")
  state_dict = {}
  for path in files:
    with safe_open(path, framework="flax") as f:
      for name in f.keys():
        state_dict[name] = np.asarray(f.get_tensor(name).astype(np.float32))
  return state_dict, config


def import_checkpoint(hf_dir: str, model_dir: str, **retro_overrides) -> RetroConfig:
  """Writes a local HF decoder as a GPT checkpoint that the recipes start from.

  ``MODEL_DIR/checkpoints/0/params`` holds the decoder (a GPT checkpoint: retro-fitting
  adds a fresh encoder and CCA, ``gin/recipes/retrofit.gin``), ``MODEL_DIR/model.gin``
  the architecture (``RetroConfig`` bindings, with ``retro_overrides`` applied), and
  ``MODEL_DIR/vocab/spm.model`` the SentencePiece tokenizer when the HF directory has
  one (``tokenizer.model``, Llama family), for ``preprocess --vocab``.
  """
  state_dict, hf_config = load_hf_dir(hf_dir)
  config, params = from_hf((state_dict, hf_config), **retro_overrides)
  decoder, _ = lm.split_retro_params(params)
  decoder = traverse_util.unflatten_dict({k: np.asarray(v) for k, v in decoder.items()})
  directory = ckpt_lib.checkpoint_dir(model_dir)
  if os.path.isdir(directory) and os.listdir(directory):
    raise FileExistsError(f"{directory} already holds checkpoints; import into an empty "
                          "MODEL_DIR")
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=False))
  manager.save(0, args=ocp.args.Composite(
      params=ocp.args.StandardSave(decoder),
      meta=ocp.args.JsonSave({"step": 0, "imported_from": os.path.abspath(hf_dir),
                              "model_type": hf_config.get("model_type")})))
  manager.wait_until_finished()
  manager.close()
  atomic_write_text(os.path.join(model_dir, "model.gin"),
                    f"# Imported from {os.path.abspath(hf_dir)} by retro_jax.convert.hf\n"
                    + config.gin_bindings())
  tokenizer = os.path.join(hf_dir, "tokenizer.model")
  if os.path.isfile(tokenizer):
    os.makedirs(os.path.join(model_dir, "vocab"), exist_ok=True)
    shutil.copyfile(tokenizer, os.path.join(model_dir, "vocab", "spm.model"))
  return config


def main(argv) -> None:
  """``python -m retro_jax.convert.hf --hf_dir=DIR --model_dir=OUT [--retro=k=v ...]``."""
  del argv
  f = flags.FLAGS
  overrides = {}
  for item in f.retro:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--retro={item!r}: expected FIELD=VALUE (e.g. cca_layers=(6,9,12))")
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value
  config = import_checkpoint(f.hf_dir, f.model_dir, **overrides)
  print(f"wrote {f.model_dir}/checkpoints/0 and {f.model_dir}/model.gin "
        f"({config.num_layers} layers, width {config.hidden_size}, vocab "
        f"{config.vocab_size}); retro-fit it with:\n  python -m retro_jax.train "
        f"--gin_file=gin/recipes/retrofit.gin --gin_file={f.model_dir}/model.gin "
        f"--gin.INIT_CHECKPOINT={f.model_dir} --gin.MODEL_DIR=... "
        "--gin.RETRIEVAL_DIR=... --gin.TRAIN_STEPS=...")


if __name__ == "__main__":
  flags.DEFINE_string("hf_dir", None, "Local Hugging Face checkpoint directory "
                       "(config.json + *.safetensors).", required=True)
  flags.DEFINE_string("model_dir", None, "Where to write the GPT checkpoint.",
                       required=True)
  flags.DEFINE_multi_string("retro", [], "RetroConfig retrieval field FIELD=VALUE "
                             "(chunk_length, num_neighbors, cca_layers, encoder_*...).")
  app.run(main)
