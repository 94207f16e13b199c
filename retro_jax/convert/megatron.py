r"""Megatron-LM / megatron-core RETRO (and GPT) checkpoints in and out of retro_jax.

    python -m retro_jax.convert.megatron --load=/ckpts/retro-8b-instruct-4k \
        --model_dir=/runs/ir8b \
        --tokenizer_model=/ckpts/retro-8b-instruct-4k/mt_nlg_plus_multilingual_ja_zh_the_stack_frac_015_256k.model
    python -m retro_jax.convert.megatron --export --model_dir=/runs/ir8b \
        --save=/ckpts/ir8b_mcore --tensor_parallel=4 [--layout=mcore|legacy]

Python: ``config, params = from_megatron(state_dict_or_rank_state_dicts, args)`` (like
``retro_jax.convert.hf.from_hf``); ``import_checkpoint`` / ``export_checkpoint`` for
directories. The files (directory, shards, tensor-parallel merges) are
``retro_jax.convert.megatron_files``.

Two key layouts, one canonical form. Every state dict is first renamed to the
megatron-core local-spec names, then mapped onto retro_jax parameters:

| legacy (Megatron-LM, released InstructRetro)     | megatron-core (canonical)                    |
|---|---|
| language_model.embedding.word_embeddings.weight  | embedding.word_embeddings.weight             |
| language_model.embedding.position_embeddings.*   | embedding.position_embeddings.weight         |
| language_model.encoder.layers.i.input_norm       | decoder.layers.i.input_layernorm             |
|   (older: input_layernorm)                       |   (TE: self_attention.linear_qkv.layer_norm_*) |
| ...self_attention.query_key_value / dense         | ...self_attention.linear_qkv / linear_proj  |
| ...post_attention_norm (a layer with inter_attention) | ...pre_cross_attn_layernorm              |
| ...post_attention_norm (other layers)             | ...pre_mlp_layernorm (TE: mlp.linear_fc1.layer_norm_*) |
| ...inter_attention.query / key_value / dense      | ...cross_attention.attn.linear_q / linear_kv / linear_proj |
| ...post_inter_attention_norm                      | ...pre_mlp_layernorm (encoder layer 0: pre_mlp_layernorm.norm) |
| ...mlp.dense_h_to_4h / dense_4h_to_h              | ...mlp.linear_fc1 / linear_fc2              |
| ...layers.f.retriever.layers.j.*                  | ...layers.f.cross_attention.encoder.layers.j.* |
| language_model.encoder.final_norm (final_layernorm) | decoder.final_layernorm                   |
| language_model.output_layer.weight                | output_layer.weight                          |

Canonical -> retro_jax (torch Linear weights are [out, in]; ours [in, ...out]):

    linear_qkv [groups*(heads/groups + 2)*hd, d]  rows per query group: its q heads, k, v
        -> self_attention/{query [d, H, hd], key, value [d, groups, hd]}
    linear_q [H*hd, d], linear_kv [H*2*hd, d] (rows per head: k, v)
        -> cca/attention or cross_attention/{query, key, value}
    linear_proj [d, H*hd] -> out [H, hd, d];  linear_fc1 [(2)ffn, d] -> wi | wi_0, wi_1
    linear_fc2 [d, ffn] -> wo;  norms -> scale (1p: stored as gamma - 1, as ours), bias
    output_layer [V, d] -> output_layer/kernel [d, V]

Semantics set from the checkpoint (``RetroConfig`` fields): the legacy code base has a
final norm (``final_norm``) and adds the encoder's cross-attention to the residual
stream (``encoder_cross_attention_residual='stream'``); megatron-core 0.12's Retro
decoder has no final norm and adds it to the normed input ('normed'); the legacy gate
``retro_attention_gate`` becomes ``cca_gate``. The architecture comes from the stored
``args``; which layers hold CCA, whether a final norm and learned positions exist come
from the keys present, and must agree with the args. Anything not understood (a key,
a shape, an argument) is an error naming it and its file. A checkpoint without
retrieval keys is a GPT: its decoder is imported (retro-fit it with
``gin/recipes/retrofit.gin``).

megatron-core's ``CCA`` adds its output bias only from position ``(n - 1) % m`` on
(and for n % m != 0 aligns chunks differently); retro_jax does the same for sequences
of whole chunks, which is what training and the parity tests use.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from typing import Any, Iterator, Mapping, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from tqdm import tqdm

from retro_jax.convert import megatron_files as files
from retro_jax.data import vocab as vocab_lib
from retro_jax.models import RetroConfig, abstract_params, default_cca_layers
from retro_jax.models import lm
from retro_jax.training import checkpoints as ckpt_lib
from retro_jax.utils.io import atomic_write_text

LEGACY = "legacy"
MCORE = "mcore"
LAYOUTS = (LEGACY, MCORE)
_ENC = "cross_attention.encoder.layers."


# Layouts -> canonical (megatron-core local-spec) names -------------------------------


def detect_layout(names: Sequence[str], where: str = "checkpoint") -> str:
  if any(n.startswith("language_model.") for n in names):
    return LEGACY
  if any(n.startswith(("decoder.", "embedding.")) for n in names):
    return MCORE
  raise ValueError(f"{where}: neither a legacy (language_model.*) nor a megatron-core "
                   f"(decoder.*, embedding.*) state dict; first keys {sorted(names)[:5]}")


_LEGACY_LAYER = (
    (r"input_(?:layer)?norm\.", "input_layernorm."),
    (r"self_attention\.query_key_value\.", "self_attention.linear_qkv."),
    (r"self_attention\.dense\.", "self_attention.linear_proj."),
    (r"inter_attention\.query\.", "cross_attention.attn.linear_q."),
    (r"inter_attention\.key_value\.", "cross_attention.attn.linear_kv."),
    (r"inter_attention\.dense\.", "cross_attention.attn.linear_proj."),
    (r"post_inter_attention_(?:layer)?norm\.", "pre_mlp_layernorm."),
    (r"mlp\.dense_h_to_4h\.", "mlp.linear_fc1."),
    (r"mlp\.dense_4h_to_h\.", "mlp.linear_fc2."),
)


def _legacy_layer_key(rest: str, has_cross: bool) -> Optional[str]:
  match = re.match(r"post_attention_(?:layer)?norm\.(weight|bias)$", rest)
  if match:
    norm = "pre_cross_attn_layernorm" if has_cross else "pre_mlp_layernorm"
    return f"{norm}.{match.group(1)}"
  for pattern, replacement in _LEGACY_LAYER:
    match = re.match(pattern + r"(weight|bias)$", rest)
    if match:
      return replacement + match.group(1)
  return None


def _legacy_canonical(name: str, cross_layers: set[str]) -> Optional[str]:
  body = name[len("language_model."):]
  fixed = {"embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
           "embedding.position_embeddings.weight": "embedding.position_embeddings.weight",
           "output_layer.weight": "output_layer.weight"}
  if body in fixed:
    return fixed[body]
  match = re.fullmatch(r"(?:encoder|transformer)\.final_(?:layer)?norm\.(weight|bias)", body)
  if match:
    return f"decoder.final_layernorm.{match.group(1)}"
  match = re.fullmatch(r"(?:encoder|transformer)\.layers\.(\d+)\.(?:retriever\.layers\.(\d+)\.)?(.+)",
                       body)
  if not match:
    return None
  layer, enc_layer, rest = match.groups()
  owner = f"{layer}" if enc_layer is None else f"{layer}.{enc_layer}"
  mapped = _legacy_layer_key(rest, owner in cross_layers)
  if mapped is None:
    return None
  if enc_layer is None:
    return f"decoder.layers.{layer}.{mapped}"
  return f"decoder.layers.{layer}.{_ENC}{enc_layer}.{mapped}"


def _mcore_canonical(name: str) -> str:
  name = re.sub(r"self_attention\.linear_qkv\.layer_norm_(weight|bias)$",
                r"input_layernorm.\1", name)
  name = re.sub(r"mlp\.linear_fc1\.layer_norm_(weight|bias)$", r"pre_mlp_layernorm.\1", name)
  return re.sub(r"pre_mlp_layernorm\.norm\.(weight|bias)$", r"pre_mlp_layernorm.\1", name)


def canonical_names(names: Sequence[str], layout: str, where: str) -> dict[str, str]:
  """canonical name -> the name in the file; unknown names are an error."""
  out, unknown = {}, []
  if layout == LEGACY:
    cross = set()
    for n in names:
      match = re.search(r"layers\.(\d+)\.(?:retriever\.layers\.(\d+)\.)?inter_attention\.", n)
      if match:
        cross.add(match.group(1) if match.group(2) is None
                  else f"{match.group(1)}.{match.group(2)}")
  for n in names:
    canonical = _legacy_canonical(n, cross) if layout == LEGACY else _mcore_canonical(n)
    if canonical is None:
      unknown.append(n)
    elif canonical in out:
      raise ValueError(f"{where}: {n} and {out[canonical]} are the same parameter "
                       f"({canonical})")
    else:
      out[canonical] = n
  if unknown:
    raise ValueError(f"{where}: unknown {layout} key(s) {unknown[:5]}"
                     f"{' ...' if len(unknown) > 5 else ''}")
  return out


# args -> RetroConfig ----------------------------------------------------------------------


_MISSING = object()


def _arg(args: Any, name: str, default: Any = _MISSING, where: str = "args") -> Any:
  value = getattr(args, name, None) if not isinstance(args, Mapping) else args.get(name)
  if value is None:
    if default is _MISSING:
      raise ValueError(f"{where}: args.{name} is missing (needed for the architecture)")
    return default
  return value


def _layer_indices(names: Sequence[str], pattern: str) -> list[int]:
  return sorted({int(m.group(1)) for n in names for m in [re.match(pattern, n)] if m})


def config_from_args(args: Any, names: Sequence[str], *, layout: str,
                     vocab_size: Optional[int] = None, where: str = "checkpoint",
                     **overrides) -> RetroConfig:
  """The RetroConfig of a checkpoint: Megatron-LM ``args`` and its canonical key names.

  ``vocab_size`` (the tokenizer's) drops the vocabulary padding rows; ``overrides``
  set numerics fields (dtype, param_dtype, remat_policy, attention_impl, ...).
  """
  a = lambda name, default=_MISSING: _arg(args, name, default, where)  # noqa: E731
  refuse = {"squared_relu": "squared-ReLU MLPs", "rotary_interleaved": "interleaved RoPE",
            "rope_scaling": "Llama-3.1 RoPE scaling", "qk_layernorm": "q/k layernorm",
            "apply_residual_connection_post_layernorm": "post-norm residuals",
            "num_experts": "mixture-of-experts MLPs"}
  for name, what in refuse.items():
    if a(name, False):
      raise ValueError(f"{where}: args.{name}={a(name)!r}: {what} are not supported")
  if a("rotary_seq_len_interpolation_factor", 1) not in (1, 1.0):
    raise ValueError(f"{where}: args.rotary_seq_len_interpolation_factor is not supported")
  if int(a("pipeline_model_parallel_size", 1)) != 1:
    raise ValueError(f"{where}: args.pipeline_model_parallel_size="
                     f"{a('pipeline_model_parallel_size')}: pipeline-parallel checkpoints "
                     "are not supported")
  hidden, heads = int(a("hidden_size")), int(a("num_attention_heads"))
  swiglu = bool(a("swiglu", False))
  normalization = a("normalization", "LayerNorm")
  if normalization not in ("LayerNorm", "RMSNorm"):
    raise ValueError(f"{where}: args.normalization={normalization!r} is not supported")
  ptype = a("position_embedding_type", "learned_absolute")
  rope = ptype == "rope" or bool(a("use_rotary_position_embeddings", False))
  learned_key = "embedding.position_embeddings.weight" in names
  if ptype not in ("rope", "learned_absolute", "none"):
    raise ValueError(f"{where}: args.position_embedding_type={ptype!r} is not supported")
  if rope and learned_key:
    raise ValueError(f"{where}: RoPE and learned position embeddings together are not "
                     "supported")
  if not rope and ptype == "learned_absolute" and a("add_position_embedding", True) \
      and not learned_key:
    raise ValueError(f"{where}: args ask for learned absolute positions but "
                     "embedding.position_embeddings.weight is missing")
  position = "rope" if rope else ("learned" if learned_key else "none")
  untie = bool(a("untie_embeddings_and_output_weights", False))
  if untie != ("output_layer.weight" in names):
    raise ValueError(f"{where}: args.untie_embeddings_and_output_weights={untie} but "
                     f"output_layer.weight is {'missing' if untie else 'present'}")
  num_layers = int(a("num_layers"))
  present_layers = _layer_indices(names, r"decoder\.layers\.(\d+)\.")
  if present_layers != list(range(num_layers)):
    raise ValueError(f"{where}: args.num_layers={num_layers} but the state dict has "
                     f"decoder layers {present_layers[:3]}...{present_layers[-3:]}")
  cca = [i + 1 for i in _layer_indices(names, r"decoder\.layers\.(\d+)\.cross_attention\.attn\.")]
  encoder_layers = _layer_indices(names, r"decoder\.layers\.\d+\." + re.escape(_ENC) + r"(\d+)\.")
  if cca and not encoder_layers:
    raise ValueError(f"{where}: CCA layers {cca} but no Retro encoder "
                     "(retriever / cross_attention.encoder) keys")
  owners = _layer_indices(names, r"decoder\.layers\.(\d+)\." + re.escape(_ENC))
  if cca and owners != [cca[0] - 1]:
    raise ValueError(f"{where}: the Retro encoder must live in the first CCA layer "
                     f"(layer {cca[0]}), found it in layer(s) {[o + 1 for o in owners]}")
  add_bias = bool(a("add_bias_linear", True))
  qkv_bias = add_bias or bool(a("add_qkv_bias", False))
  if cca and qkv_bias != add_bias:
    raise ValueError(f"{where}: args.add_qkv_bias without add_bias_linear: Megatron's "
                     "cross-attentions then have no q/k/v bias, which retro_jax cannot "
                     "represent in a Retro model")
  chunk = int(a("retro_gpt_chunk_length", 64))
  gqa = bool(a("group_query_attention", False))
  kv_heads = int(a("num_query_groups", heads)) if gqa else heads
  padded = int(a("padded_vocab_size"))
  if vocab_size is not None and not 0 < vocab_size <= padded:
    raise ValueError(f"{where}: tokenizer vocabulary {vocab_size} does not fit "
                     f"args.padded_vocab_size={padded}")
  fields = dict(
      vocab_size=vocab_size or padded, hidden_size=hidden, num_layers=num_layers,
      num_heads=heads, num_kv_heads=None if kv_heads == heads else kv_heads,
      head_dim=int(a("kv_channels", hidden // heads)),
      mlp_dim=int(a("ffn_hidden_size", 4 * hidden)),
      mlp_activation="silu" if swiglu else ("gelu_tanh" if a("openai_gelu", False) else "gelu"),
      mlp_gated=swiglu, norm_type="layernorm" if normalization == "LayerNorm" else "rmsnorm",
      norm_eps=float(a("norm_epsilon", a("layernorm_epsilon", 1e-5))),
      norm_zero_centered_gamma=bool(a("apply_layernorm_1p", False)), use_bias=add_bias,
      qkv_bias=None if qkv_bias == add_bias else qkv_bias, position_embedding=position,
      max_length=int(a("max_position_embeddings", a("seq_length", 2048))),
      rope_theta=float(a("rotary_base", 10000)),
      rotary_fraction=float(a("rotary_percent", 1.0)), tie_embeddings=not untie,
      init_std=float(a("init_method_std", 0.02)),
      dropout_rate=float(a("hidden_dropout", 0.0)),
      attention_dropout_rate=float(a("attention_dropout", 0.0)),
      final_norm="decoder.final_layernorm.weight" in names,
      chunk_length=chunk, num_neighbors=int(a("retro_num_neighbors", 2)),
      retrieved_length=int(a("retro_num_retrieved_chunks", 2)) * chunk,
      cca_layers=tuple(cca) if cca else tuple(default_cca_layers(num_layers)),
      encoder_num_layers=len(encoder_layers) or int(a("retro_encoder_layers", 2)),
      encoder_position_embedding="learned" if position == "learned" else "none",
      encoder_dropout_rate=float(a("retro_encoder_hidden_dropout", 0.1)),
      encoder_cross_attention_residual="stream" if layout == LEGACY else "normed",
      cca_gate=float(a("retro_attention_gate", 1.0)) if layout == LEGACY else 1.0)
  if cca and a("retro_encoder_layers", None) not in (None, len(encoder_layers)):
    raise ValueError(f"{where}: args.retro_encoder_layers={a('retro_encoder_layers')} but "
                     f"the state dict has {len(encoder_layers)} encoder layers")
  fields.update(overrides)
  return RetroConfig(**fields)


# Canonical tensors <-> retro_jax parameters -------------------------------------------------


def _heads_in(w: np.ndarray, heads: int) -> np.ndarray:
  """torch [heads*hd, d] -> ours [d, heads, hd]."""
  return w.reshape(heads, -1, w.shape[-1]).transpose(2, 0, 1)


def _heads_out(k: np.ndarray) -> np.ndarray:
  """ours [d, heads, hd] -> torch [heads*hd, d]."""
  return k.transpose(1, 2, 0).reshape(-1, k.shape[0])


def _norm_leaf(which: str) -> str:
  return "scale" if which == "weight" else "bias"


def _layer_params(rest: str, w: np.ndarray, c: RetroConfig, base: tuple[str, ...],
                  encoder: bool) -> list[tuple[tuple[str, ...], np.ndarray]]:
  """One canonical layer tensor (name relative to its layer) -> retro_jax leaves."""
  norms = {"input_layernorm": "pre_attention_norm", "pre_mlp_layernorm": "pre_mlp_norm",
           "pre_cross_attn_layernorm": "pre_cross_attention_norm" if encoder
           else "pre_cca_norm"}
  module, _, which = rest.rpartition(".")
  if module in norms:
    return [(base + (norms[module], _norm_leaf(which)), w)]
  heads, hd, d = c.num_heads, c.dim_per_head, c.hidden_size
  kernel = which == "weight"
  leaf = "kernel" if kernel else "bias"
  if module == "self_attention.linear_qkv":
    groups = heads if encoder else c.kv_heads
    per = heads // groups
    x = w.reshape(groups, per + 2, hd, *w.shape[1:])
    parts = {"query": x[:, :per].reshape(heads, hd, *w.shape[1:]), "key": x[:, per],
             "value": x[:, per + 1]}
    att = base + ("self_attention",)
    return [(att + (n, leaf), p.transpose(2, 0, 1) if kernel else p)
            for n, p in parts.items()]
  cross = base + (("cross_attention",) if encoder else ("cca", "attention"))
  if module == "cross_attention.attn.linear_q":
    return [(cross + ("query", leaf), _heads_in(w, heads) if kernel
             else w.reshape(heads, hd))]
  if module == "cross_attention.attn.linear_kv":
    x = w.reshape(heads, 2, hd, *w.shape[1:])
    return [(cross + (n, leaf), x[:, j].transpose(2, 0, 1) if kernel else x[:, j])
            for j, n in enumerate(("key", "value"))]
  if module in ("self_attention.linear_proj", "cross_attention.attn.linear_proj"):
    att = base + ("self_attention",) if module.startswith("self") else cross
    return [(att + ("out", leaf), w.T.reshape(heads, hd, d) if kernel else w)]
  mlp = base + ("mlp",)
  if module == "mlp.linear_fc1":
    if c.mlp_gated:
      gate, up = np.split(w, 2, axis=0)
      return [(mlp + ("wi_0", leaf), gate.T if kernel else gate),
              (mlp + ("wi_1", leaf), up.T if kernel else up)]
    return [(mlp + ("wi", leaf), w.T if kernel else w)]
  if module == "mlp.linear_fc2":
    return [(mlp + ("wo", leaf), w.T if kernel else w)]
  return []


def canonical_to_params(name: str, w: np.ndarray, c: RetroConfig
                        ) -> list[tuple[tuple[str, ...], np.ndarray]]:
  """One canonical tensor -> ``[(retro_jax param path, array)]`` ([] = not understood)."""
  if name == "embedding.word_embeddings.weight":
    return [(("token_embedding", "embedding"), w[:c.vocab_size])]
  if name == "embedding.position_embeddings.weight":
    return [(("position_embedding", "embedding"), w)]
  if name == "output_layer.weight":
    return [(("output_layer", "kernel"), w[:c.vocab_size].T)]
  match = re.fullmatch(r"decoder\.final_layernorm\.(weight|bias)", name)
  if match:
    return [(("final_norm", _norm_leaf(match.group(1))), w)]
  match = re.fullmatch(r"decoder\.layers\.(\d+)\.(?:" + re.escape(_ENC) + r"(\d+)\.)?(.+)",
                       name)
  if not match:
    return []
  layer, enc, rest = match.groups()
  base = (f"layers_{layer}",)
  if enc is not None:
    base += ("retro_encoder", f"layers_{enc}")
  return _layer_params(rest, w, c, base, encoder=enc is not None)


def params_to_canonical(params: Any, c: RetroConfig, padded_vocab: int) -> dict[str, np.ndarray]:
  """The inverse of ``canonical_to_params`` over a whole parameter tree."""
  flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
  heads, hd = c.num_heads, c.dim_per_head
  out: dict[str, np.ndarray] = {}

  def pad_vocab(w):
    return np.concatenate([w, np.zeros((padded_vocab - w.shape[0],) + w.shape[1:], w.dtype)])

  norms = {"pre_attention_norm": "input_layernorm", "pre_mlp_norm": "pre_mlp_layernorm",
           "pre_cca_norm": "pre_cross_attn_layernorm",
           "pre_cross_attention_norm": "pre_cross_attn_layernorm"}
  leaves = {"kernel": "weight", "bias": "bias", "scale": "weight"}
  for path, w in flat.items():
    parts = path.split("/")
    if parts[0] == "token_embedding":
      out["embedding.word_embeddings.weight"] = pad_vocab(w)
      continue
    if parts[0] == "position_embedding":
      out["embedding.position_embeddings.weight"] = w
      continue
    if parts[0] == "output_layer":
      out["output_layer.weight"] = pad_vocab(w.T)
      continue
    if parts[0] == "final_norm":
      out[f"decoder.final_layernorm.{leaves[parts[1]]}"] = w
      continue
    if parts[0] == "retro_encoder" or not parts[0].startswith("layers_"):
      raise ValueError(f"export: parameter {path} has no Megatron name")
    prefix = f"decoder.layers.{parts[0][len('layers_'):]}."
    rest = parts[1:]
    if rest[0] == "retro_encoder":
      prefix += f"{_ENC}{rest[1][len('layers_'):]}."
      rest = rest[2:]
    leaf = leaves[rest[-1]]
    if rest[0] in norms:
      out[f"{prefix}{norms[rest[0]]}.{leaf}"] = w
    elif rest[0] == "mlp":
      name = {"wi": "linear_fc1", "wi_0": "linear_fc1", "wi_1": "linear_fc1",
              "wo": "linear_fc2"}[rest[1]]
      out.setdefault(f"{prefix}mlp.{name}.{leaf}", {})[rest[1]] = w
    else:
      module = ("self_attention" if rest[0] == "self_attention"
                else "cross_attention.attn")
      out.setdefault(f"{prefix}{module}.{leaf}", {})[rest[-2]] = w
  final = {}
  for name, value in out.items():
    if not isinstance(value, dict):
      final[name] = value
      continue
    prefix, _, leaf = name.rpartition(".")
    kernel = leaf == "weight"
    if prefix.endswith("mlp.linear_fc1"):
      pieces = [value[k] for k in ("wi_0", "wi_1") if k in value] or [value["wi"]]
      final[name] = np.concatenate([p.T if kernel else p for p in pieces], axis=0)
    elif prefix.endswith("mlp.linear_fc2"):
      final[name] = value["wo"].T if kernel else value["wo"]
    elif prefix.endswith("self_attention"):
      q, k, v = value["query"], value["key"], value["value"]
      encoder = _ENC in prefix
      groups = heads if encoder else c.kv_heads
      per = heads // groups
      if kernel:
        q, k, v = (x.transpose(1, 2, 0) for x in (q, k, v))  # [heads, hd, d]
      q = q.reshape(groups, per, hd, *q.shape[2:])
      qkv = np.concatenate([q, k[:, None], v[:, None]], axis=1)
      final[f"{prefix}.linear_qkv.{leaf}"] = qkv.reshape(-1, *qkv.shape[3:])
      o = value["out"]
      final[f"{prefix}.linear_proj.{leaf}"] = o.reshape(heads * hd, -1).T if kernel else o
    else:  # cross-attention
      q, k, v, o = value["query"], value["key"], value["value"], value["out"]
      final[f"{prefix}.linear_q.{leaf}"] = _heads_out(q) if kernel else q.reshape(-1)
      if kernel:
        kv = np.stack([k.transpose(1, 2, 0), v.transpose(1, 2, 0)], axis=1)
      else:
        kv = np.stack([k, v], axis=1)
      final[f"{prefix}.linear_kv.{leaf}"] = kv.reshape(-1, *kv.shape[3:])
      final[f"{prefix}.linear_proj.{leaf}"] = o.reshape(heads * hd, -1).T if kernel else o
  return final


def _to_layout(canonical: dict[str, Any], layout: str) -> dict[str, Any]:
  """Canonical names -> a state dict of ``layout`` (legacy: nested language_model)."""
  cross = {m.group(1) for n in canonical
           for m in [re.match(r"(.*)cross_attention\.attn\.", n)] if m}
  if layout == MCORE:  # the encoder's RETRO layer wraps its MLP norm (RetroEncoderLayerNorm)
    return {re.sub(r"pre_mlp_layernorm\.(weight|bias)$", r"pre_mlp_layernorm.norm.\1", n)
            if _ENC in n and ".pre_mlp_layernorm." in n
            and n[:n.index("pre_mlp_layernorm")] in cross else n: v
            for n, v in canonical.items()}
  inverse = {"input_layernorm": "input_norm", "self_attention.linear_qkv":
             "self_attention.query_key_value", "self_attention.linear_proj":
             "self_attention.dense", "cross_attention.attn.linear_q": "inter_attention.query",
             "cross_attention.attn.linear_kv": "inter_attention.key_value",
             "cross_attention.attn.linear_proj": "inter_attention.dense",
             "pre_cross_attn_layernorm": "post_attention_norm",
             "mlp.linear_fc1": "mlp.dense_h_to_4h", "mlp.linear_fc2": "mlp.dense_4h_to_h"}
  encoder, embedding, output = {}, {}, {}
  for name, value in canonical.items():
    if name.startswith("embedding."):
      kind = name.split(".")[1]
      embedding[kind] = {"weight": value}
      continue
    if name == "output_layer.weight":
      output["weight"] = value
      continue
    if name.startswith("decoder.final_layernorm."):
      encoder["final_norm." + name.rsplit(".", 1)[1]] = value
      continue
    prefix, module, leaf = re.fullmatch(
        r"(decoder\.layers\.\d+\.(?:" + re.escape(_ENC) + r"\d+\.)?)(.+)\.(weight|bias)",
        name).groups()
    if module == "pre_mlp_layernorm":
      legacy_module = "post_inter_attention_norm" if prefix in cross else "post_attention_norm"
    else:
      legacy_module = inverse[module]
    legacy_prefix = prefix.replace("decoder.", "", 1).replace(_ENC, "retriever.layers.")
    encoder[f"{legacy_prefix}{legacy_module}.{leaf}"] = value
  tree = {"embedding": embedding, "encoder": encoder}
  if output:
    tree["output_layer"] = output
  return {"language_model": tree}


# In memory ---------------------------------------------------------------------------------


def param_shapes(config: RetroConfig, retro: bool) -> dict[tuple[str, ...], Any]:
  """Flat ``{path: ShapeDtypeStruct}`` of the parameters of ``config``."""
  return traverse_util.flatten_dict(nn.unbox(abstract_params(config, retrieval=retro)))


def _state_dicts(state_dict: Any) -> list[Mapping[str, Any]]:
  if isinstance(state_dict, Mapping):
    return [files.model_tensors(state_dict.get("model", state_dict))]
  return [files.model_tensors(s.get("model", s)) for s in state_dict]


def convert_tensors(ranks: Sequence[Mapping[str, Any]], args: Any, *,
                    vocab_size: Optional[int] = None, where: Sequence[str] = (),
                    **overrides) -> tuple[RetroConfig, dict, Iterator]:
  """The config, the flat parameter shapes it has (``param_shapes``: decoder only for
  a GPT checkpoint), and an iterator of ``(path, array)`` over every one of them,
  merging one tensor's ranks at a time."""
  files_where = list(where) or [f"rank {r}" for r in range(len(ranks))]
  names = list(ranks[0])
  for rank, sd in enumerate(ranks[1:], 1):
    if set(sd) != set(names):
      diff = sorted(set(sd) ^ set(names))
      raise ValueError(f"{files_where[rank]}: its keys differ from {files_where[0]}'s "
                       f"({diff[:5]})")
  layout = detect_layout(names, files_where[0])
  canonical = canonical_names(names, layout, files_where[0])
  tp = int(_arg(args, "tensor_model_parallel_size", len(ranks)))
  if tp != len(ranks):
    raise ValueError(f"{files_where[0]}: args.tensor_model_parallel_size={tp} but "
                     f"{len(ranks)} tensor-parallel shards were given")
  config = config_from_args(args, list(canonical), layout=layout, vocab_size=vocab_size,
                            where=files_where[0], **overrides)
  retro = any(".cross_attention.attn." in n for n in canonical)
  expected = param_shapes(config, retro)

  def generate():
    produced = set()
    for name in sorted(canonical):
      original = canonical[name]
      parts = [files.to_numpy(sd[original]) if hasattr(sd[original], "detach")
               else np.asarray(sd[original]) for sd in ranks]
      merged = files.merge_shards(name, parts, gated=config.mlp_gated, paths=files_where)
      del parts
      leaves = canonical_to_params(name, merged, config)
      if not leaves:
        raise ValueError(f"{files_where[0]}: {original} ({name}) has no retro_jax "
                         "parameter")
      for path, value in leaves:
        if path not in expected:
          raise ValueError(f"{files_where[0]}: {original} maps to {'/'.join(path)}, "
                           "which this architecture does not have")
        if tuple(value.shape) != tuple(expected[path].shape):
          raise ValueError(f"{files_where[0]}: {original} has shape "
                           f"{tuple(merged.shape)} (merged); {'/'.join(path)} needs "
                           f"{tuple(expected[path].shape)} by args")
        produced.add(path)
        yield path, value
      del merged, leaves, value  # before the next tensor is merged
    missing = sorted(set(expected) - produced)
    if missing:
      raise ValueError(f"{files_where[0]}: no tensor for {['/'.join(p) for p in missing[:5]]}"
                       f"{' ...' if len(missing) > 5 else ''}")

  return config, expected, generate()


def from_megatron(state_dict: Any, args: Any, *, vocab_size: Optional[int] = None,
                  **overrides) -> tuple[RetroConfig, dict]:
  """Converts a Megatron-LM / megatron-core state dict into ``(RetroConfig, params)``.

  Args:
    state_dict: one state dict (TP = 1; a ``model_optim_rng.pt`` dict or its
      ``'model'``), or a list of them, one per tensor-parallel rank; torch tensors or
      numpy arrays; legacy or megatron-core (local or transformer-engine) names.
    args: the checkpoint's ``args`` (argparse.Namespace or dict).
    vocab_size: the tokenizer's vocabulary (drops padding rows); None keeps
      ``padded_vocab_size``.
    **overrides: numerics RetroConfig fields (dtype, param_dtype, remat_policy, ...).
  """
  config, _, tensors = convert_tensors(_state_dicts(state_dict), args,
                                       vocab_size=vocab_size, **overrides)
  params = {path: value for path, value in tensors}
  return config, traverse_util.unflatten_dict(params)


# Directories --------------------------------------------------------------------------------


def _dtype_name(dtype: np.dtype) -> str:
  return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
      np.dtype(dtype).name, "float32")


def _copy_in_blocks(target: np.ndarray, source: np.ndarray,
                    block_bytes: int = 64 * 2 ** 20) -> None:
  """``target[...] = source`` (casting) in row blocks: assigning a transposed view in
  one go makes a temporary copy of the whole array."""
  if target.ndim == 0:
    target[...] = source
    return
  row = max(1, target.nbytes // max(1, target.shape[0]))
  step = max(1, block_bytes // row)
  for start in range(0, target.shape[0], step):
    target[start:start + step] = source[start:start + step]


def import_checkpoint(load_dir: str, model_dir: str, *, tokenizer_model: Optional[str] = None,
                      iteration: Optional[str] = None, **overrides) -> RetroConfig:
  """Converts a Megatron-LM checkpoint directory into a retro_jax model directory.

  Writes ``model_dir/checkpoints/0/{params, meta}`` (orbax; meta holds the RetroConfig),
  ``model_dir/model.gin`` and ``model_dir/vocab/spm.model`` (the tokenizer, when
  given). Streams: each tensor's shards are merged, written to a temporary memory-mapped file under
  ``model_dir`` and dropped, then orbax writes from those memory maps. The parameters
  keep the checkpoint's dtype (bf16 stays bf16) unless ``param_dtype`` is given.
  """
  iter_dir = files.iteration_dir(load_dir, iteration)
  paths = files.shard_paths(iter_dir)
  shards = [files.Shard(p) for p in paths]
  args = shards[0].args
  if args is None:
    raise ValueError(f"{paths[0]}: no 'args' entry; the architecture cannot be read")
  vocab_size = None
  if tokenizer_model is not None:
    vocab_size = vocab_lib.load_sentencepiece(tokenizer_model).get_piece_size()
  directory = ckpt_lib.checkpoint_dir(model_dir)
  if os.path.isdir(directory) and os.listdir(directory):
    raise FileExistsError(f"{directory} already holds checkpoints; import into an empty "
                          "--model_dir")
  first = next(iter(shards[0].tensors.values()))
  source_dtype = _dtype_name(files.to_numpy(first[:1]).dtype)
  overrides.setdefault("param_dtype", source_dtype)
  overrides.setdefault("dtype", "bfloat16" if source_dtype == "bfloat16" else "float32")
  config, expected, tensors = convert_tensors([s.tensors for s in shards], args,
                                              vocab_size=vocab_size, where=paths,
                                              **overrides)
  retro = any(lm.is_retro_path(path) for path in expected)
  scratch = os.path.join(model_dir, ".megatron_import")
  shutil.rmtree(scratch, ignore_errors=True)
  os.makedirs(scratch)
  flat = {}
  target = np.dtype(config.params_dtype)
  # No tqdm(...) or enumerate(...) around the iterator: both keep the previous item (a
  # view of the last merged tensor) alive while the next one is merged.
  progress = tqdm(total=len(expected), unit="param", desc=f"merging {len(paths)} shard(s)")
  for path, value in tensors:
    out = os.path.join(scratch, f"{len(flat):06d}.bin")  # raw: .npy cannot say bfloat16
    mm = np.memmap(out, mode="w+", dtype=target, shape=value.shape)
    _copy_in_blocks(mm, value)
    mm.flush()
    shape = value.shape
    del mm, value
    flat[path] = np.memmap(out, mode="r", dtype=target, shape=shape)
    progress.update(1)
  progress.close()
  largest = max(v.nbytes for v in flat.values())
  # orbax's default numpy handler deep-copies every array before writing (the whole
  # model in memory); these arrays are read-only memory maps, so write from them.
  registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=True,
                                                      enable_async_checkpointing=False),
      item_handlers={"params": ocp.PyTreeCheckpointHandler(
          type_handler_registry=registry, save_concurrent_gb=(largest + 2 ** 20) / 1e9),
                     "meta": ocp.JsonCheckpointHandler()})
  manager.save(0, args=ocp.args.Composite(
      params=ocp.args.PyTreeSave(traverse_util.unflatten_dict(flat),
                                 ocdbt_target_data_file_size=128 * 2 ** 20),
      meta=ocp.args.JsonSave({"step": 0, "imported_from": os.path.abspath(iter_dir),
                              "format": "megatron", "retro": retro,
                              **ckpt_lib.config_meta(config)})))
  manager.wait_until_finished()
  manager.close()
  del flat
  shutil.rmtree(scratch, ignore_errors=True)
  atomic_write_text(os.path.join(model_dir, "model.gin"),
                    f"# Imported from {os.path.abspath(iter_dir)} by "
                    "retro_jax.convert.megatron\n" + config.gin_bindings())
  if tokenizer_model is not None:
    os.makedirs(os.path.join(model_dir, "vocab"), exist_ok=True)
    shutil.copyfile(tokenizer_model, os.path.join(model_dir, "vocab", "spm.model"))
  logging.info("imported %s (%s, %d shards) into %s", iter_dir,
               "Retro" if retro else "GPT", len(paths), model_dir)
  return config


def megatron_args(config: RetroConfig, *, tensor_parallel: int, padded_vocab: int,
                  layout: str, make_vocab_size_divisible_by: int) -> argparse.Namespace:
  """The Megatron-LM ``args`` that describe ``config`` (what ``config_from_args`` reads)."""
  c = config
  return argparse.Namespace(
      num_layers=c.num_layers, hidden_size=c.hidden_size, ffn_hidden_size=c.mlp_dim,
      num_attention_heads=c.num_heads, group_query_attention=c.kv_heads != c.num_heads,
      num_query_groups=c.kv_heads, kv_channels=c.dim_per_head,
      position_embedding_type={"rope": "rope", "learned": "learned_absolute",
                               "none": "none"}[c.position_embedding],
      add_position_embedding=c.position_embedding == "learned",
      use_rotary_position_embeddings=c.position_embedding == "rope",
      rotary_percent=c.rotary_fraction, rotary_base=c.rope_theta,
      normalization="LayerNorm" if c.norm_type == "layernorm" else "RMSNorm",
      apply_layernorm_1p=c.norm_zero_centered_gamma, norm_epsilon=c.norm_eps,
      layernorm_epsilon=c.norm_eps, swiglu=c.mlp_gated,
      openai_gelu=c.mlp_activation == "gelu_tanh", add_bias_linear=c.use_bias,
      add_qkv_bias=c.has_qkv_bias, untie_embeddings_and_output_weights=not c.tie_embeddings,
      padded_vocab_size=padded_vocab, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
      max_position_embeddings=c.max_length, init_method_std=c.init_std,
      tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=1,
      hidden_dropout=c.dropout_rate, attention_dropout=c.attention_dropout_rate,
      retro_add_retriever=True, retro_encoder_layers=c.encoder_num_layers,
      retro_num_neighbors=c.num_neighbors,
      retro_num_retrieved_chunks=c.neighbor_length // c.chunk_length,
      retro_gpt_chunk_length=c.chunk_length,
      retro_encoder_hidden_dropout=c.encoder_dropout_rate,
      retro_encoder_attention_dropout=c.attention_dropout_rate,
      retro_attention_gate=c.cca_gate, use_legacy_models=layout == LEGACY,
      bf16=c.param_dtype == "bfloat16", fp16=c.param_dtype == "float16")


def _check_exportable(c: RetroConfig, layout: str) -> None:
  want = {"final_norm": layout == LEGACY,
          "encoder_cross_attention_residual": "stream" if layout == LEGACY else "normed"}
  for field, value in want.items():
    if getattr(c, field) != value:
      raise ValueError(
          f"export --layout={layout}: RetroConfig.{field}={getattr(c, field)!r}, but "
          f"{'legacy Megatron-LM' if layout == LEGACY else 'megatron-core'} computes "
          f"{field}={value!r}; the exported model would compute something else "
          f"(use --layout={MCORE if layout == LEGACY else LEGACY})")
  if layout == MCORE and c.cca_gate != 1.0:
    raise ValueError(f"export --layout=mcore: megatron-core has no CCA gate "
                     f"(RetroConfig.cca_gate={c.cca_gate})")
  same_as_decoder = {"encoder_hidden_size": c.hidden_size, "encoder_num_heads": c.num_heads,
                     "encoder_mlp_dim": c.mlp_dim, "attention_out_bias": c.use_bias}
  for field, decoder_value in same_as_decoder.items():
    if getattr(c, field, None) not in (None, decoder_value):
      raise ValueError(f"export: RetroConfig.{field}={getattr(c, field)!r}: Megatron's "
                       "encoder and attention share the decoder's value")
  for field, value in (("encoder_final_norm", False), ("sliding_window", None)):
    if getattr(c, field, value) != value:
      raise ValueError(f"export: RetroConfig.{field}={getattr(c, field)!r} has no "
                       "Megatron equivalent")
  if c.position_embedding == "learned" and c.encoder_position_embedding != "learned":
    raise ValueError("export: Megatron's encoder reads the learned positions too "
                     "(RetroConfig.encoder_position_embedding must be 'learned')")
  if c.position_embedding != "learned" and c.encoder_position_embedding != "none":
    raise ValueError(f"export: RetroConfig.encoder_position_embedding="
                     f"{c.encoder_position_embedding!r} has no Megatron equivalent")


def to_megatron(config: RetroConfig, params: Any, *, tensor_parallel: int = 1,
                layout: str = MCORE, make_vocab_size_divisible_by: int = 128
                ) -> tuple[list[dict[str, Any]], argparse.Namespace]:
  """``(per-rank state dicts of numpy arrays, args)`` for ``params`` (a Retro model)."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}: must be one of {LAYOUTS}")
  _check_exportable(config, layout)
  multiple = make_vocab_size_divisible_by * tensor_parallel
  padded = -(-config.vocab_size // multiple) * multiple
  canonical = params_to_canonical(params, config, padded)
  ranks = [dict() for _ in range(tensor_parallel)]
  for name, value in canonical.items():
    for rank, part in enumerate(files.split_tensor(name, value, tensor_parallel,
                                                   gated=config.mlp_gated)):
      ranks[rank][name] = part
  args = megatron_args(config, tensor_parallel=tensor_parallel, padded_vocab=padded,
                       layout=layout, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
  return [_to_layout(r, layout) for r in ranks], args


def export_checkpoint(model_dir: str, save_dir: str, *, tensor_parallel: int = 1,
                      layout: str = MCORE, model_config: Optional[RetroConfig] = None,
                      make_vocab_size_divisible_by: int = 128) -> list[str]:
  """Writes a retro_jax Retro checkpoint as a Megatron-LM checkpoint directory
  (``save_dir/release/mp_rank_XX/model_optim_rng.pt``); returns the shard paths."""
  config = model_config or ckpt_lib.stored_model_config(model_dir)
  if config is None:
    raise ValueError(f"{model_dir}: its checkpoint stores no RetroConfig; pass "
                     "model_config (or --gin_file with the model's gin)")
  if not ckpt_lib.has_retro_params(model_dir):
    raise ValueError(f"{model_dir}: a decoder-only (GPT) checkpoint; export takes a "
                     "Retro model")
  shapes = param_shapes(config, retro=True)
  abstract = traverse_util.unflatten_dict(
      {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in shapes.items()})
  params = jax.device_get(ckpt_lib.load_params(model_dir, abstract))
  ranks, args = to_megatron(config, params, tensor_parallel=tensor_parallel, layout=layout,
                            make_vocab_size_divisible_by=make_vocab_size_divisible_by)
  torch_ranks = [jax.tree_util.tree_map(lambda v: files.from_numpy(np.asarray(v)), r)
                 for r in ranks]
  return files.write_checkpoint(save_dir, torch_ranks, args)


# Command line --------------------------------------------------------------------------------


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  if f.export:
    if not f.save:
      raise ValueError("--export needs --save=DIR (the Megatron checkpoint to write)")
    paths = export_checkpoint(f.model_dir, f.save, tensor_parallel=f.tensor_parallel,
                              layout=f.layout)
    print(f"wrote {len(paths)} shard(s) under {f.save} ({f.layout} layout)")
    return
  if not f.load:
    raise ValueError("--load=DIR (a Megatron-LM checkpoint directory) is required")
  overrides = {}
  if f.param_dtype:
    overrides["param_dtype"] = f.param_dtype
  if f.dtype:
    overrides["dtype"] = f.dtype
  config = import_checkpoint(f.load, f.model_dir, tokenizer_model=f.tokenizer_model,
                             iteration=f.iteration, **overrides)
  print(f"wrote {f.model_dir}: {config.num_layers} layers, width {config.hidden_size}, "
        f"vocab {config.vocab_size}, CCA layers {config.retro_layers}, params "
        f"{config.param_dtype}")


if __name__ == "__main__":
  flags.DEFINE_string("load", None, "Megatron-LM checkpoint directory to import.")
  flags.DEFINE_string("model_dir", None, "retro_jax model directory.", required=True)
  flags.DEFINE_string("tokenizer_model", None, "SentencePiece model of the checkpoint "
                       "(copied to MODEL_DIR/vocab/spm.model; drops vocab padding).")
  flags.DEFINE_string("iteration", None, "Iteration to import (default: the tracker's).")
  flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16", "float16"],
                     "Stored parameter dtype (default: the checkpoint's).")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                     "Compute dtype written to the model config.")
  flags.DEFINE_bool("export", False, "Export MODEL_DIR to a Megatron checkpoint.")
  flags.DEFINE_string("save", None, "--export: Megatron checkpoint directory to write.")
  flags.DEFINE_integer("tensor_parallel", 1, "--export: tensor-parallel ranks.")
  flags.DEFINE_enum("layout", MCORE, list(LAYOUTS), "--export: key layout.")
  app.run(main)
