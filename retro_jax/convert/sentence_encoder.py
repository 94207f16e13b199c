"""Reads a sentence-transformers BERT checkpoint: its settings and its weights as Flax.

A local sentence-transformers directory becomes a ``SentenceEncoderSpec`` (the
encoder's ``BertConfig``, pooling, normalisation, truncation length and the files the
vectors depend on) and the parameters of ``retro_jax.models.bert.BertEncoder``. Files
read::

    modules.json                 Transformer -> Pooling [-> Normalize] (without it:
                                 mean pooling, no normalisation, as sentence-transformers)
    config.json                  BERT hyper-parameters (model_type 'bert')
    model.safetensors            weights (numpy, no torch)
    tokenizer.json               the fast tokenizer (checked here, loaded by the embedder)
    sentence_bert_config.json    max_seq_length, do_lower_case
    <pooling dir>/config.json    pooling: cls, max, mean, mean_sqrt_len_tokens,
                                 weightedmean, lasttoken (concatenated if several)

Errors name the file and the field.

    spec = read_sentence_encoder_spec(model_dir)
    params = load_bert_params(spec)            # for BertEncoder(spec.bert)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from absl import logging
import numpy as np
from safetensors.numpy import load_file

from retro_jax.models.bert import POOLING_MODES, BertConfig

# Hugging Face hidden_act -> our Mlp's activation name.
_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_fast": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}
# sentence-transformers' legacy boolean pooling keys, in its concatenation order.
_LEGACY_POOLING_KEYS = (("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max"),
                        ("pooling_mode_mean_tokens", "mean"),
                        ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
                        ("pooling_mode_weightedmean_tokens", "weightedmean"),
                        ("pooling_mode_lasttoken", "lasttoken"))


def _read_json(path: str, what: str) -> dict[str, Any]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: {what} not found")
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e


def _field(cfg: Mapping[str, Any], key: str, path: str, kind=int) -> Any:
  if key not in cfg:
    raise ValueError(f"{path}: missing field {key!r}")
  try:
    return kind(cfg[key])
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: field {key!r} = {cfg[key]!r} is not a {kind.__name__}") from e


def bert_config_from_hf(cfg: Mapping[str, Any], path: str = "config.json") -> BertConfig:
  """A ``BertConfig`` from a Hugging Face BERT ``config.json`` dict; errors name ``path``
  and the field."""
  model_type = cfg.get("model_type", "bert")
  if model_type != "bert":
    raise ValueError(f"{path}: model_type {model_type!r} is not supported (the Flax "
                     "sentence encoder implements BERT: model_type 'bert')")
  position_type = cfg.get("position_embedding_type", "absolute")
  if position_type != "absolute":
    raise ValueError(f"{path}: position_embedding_type {position_type!r} is not "
                     "supported (only 'absolute')")
  act = _field(cfg, "hidden_act", path, str)
  if act not in _HF_ACTIVATIONS:
    raise ValueError(f"{path}: hidden_act {act!r} is not supported; known: "
                     f"{sorted(_HF_ACTIVATIONS)}")
  return BertConfig(vocab_size=_field(cfg, "vocab_size", path),
                    hidden_size=_field(cfg, "hidden_size", path),
                    num_layers=_field(cfg, "num_hidden_layers", path),
                    num_heads=_field(cfg, "num_attention_heads", path),
                    intermediate_size=_field(cfg, "intermediate_size", path),
                    max_position_embeddings=_field(cfg, "max_position_embeddings", path),
                    type_vocab_size=_field(cfg, "type_vocab_size", path),
                    layer_norm_eps=_field(cfg, "layer_norm_eps", path, float),
                    activation=_HF_ACTIVATIONS[act])


@dataclasses.dataclass(frozen=True)
class SentenceEncoderSpec:
  """What a sentence-transformers directory asks for, with the files it came from."""

  model_dir: str
  transformer_dir: str
  bert: BertConfig
  max_seq_length: int
  do_lower_case: bool
  pooling: tuple[str, ...]          # in sentence-transformers' concatenation order
  normalize: bool
  files: tuple[str, ...]            # every file the embeddings depend on

  @property
  def dim(self) -> int:
    return self.bert.hidden_size * len(self.pooling)


def _module_kind(entry: Mapping[str, Any]) -> str:
  return str(entry.get("type", "")).rsplit(".", 1)[-1]


def _pooling_modes(path: str) -> tuple[str, ...]:
  """The pooling modes of a Pooling module's config.json, in concatenation order."""
  cfg = _read_json(path, "pooling config")
  if "pooling_mode" in cfg:                        # sentence-transformers >= 5
    named = cfg["pooling_mode"]
    modes = (named,) if isinstance(named, str) else tuple(named)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown:
      raise ValueError(f"{path}: pooling_mode {unknown} is not supported; known: "
                       f"{POOLING_MODES}")
  else:
    modes = tuple(mode for key, mode in _LEGACY_POOLING_KEYS if cfg.get(key))
  if not modes:   # sentence-transformers falls back to mean pooling
    logging.warning("%s: no pooling mode enabled; using mean pooling", path)
    modes = ("mean",)
  return modes


def read_sentence_encoder_spec(model_dir: str) -> SentenceEncoderSpec:
  """Reads and validates the configuration files of a sentence-transformers directory."""
  model_dir = os.path.abspath(os.fspath(model_dir))
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f"{model_dir}: embedder directory not found")
  modules_path = os.path.join(model_dir, "modules.json")
  files = []
  if os.path.exists(modules_path):
    modules = _read_json(modules_path, "modules list")
    if not isinstance(modules, list) or not modules:
      raise ValueError(f"{modules_path}: expected a non-empty list of modules")
    kinds = [_module_kind(m) for m in modules]
    if kinds[0] != "Transformer":
      raise ValueError(f"{modules_path}: the first module is {modules[0].get('type')!r}, "
                       "expected a sentence_transformers Transformer")
    unsupported = [k for k in kinds[1:] if k not in ("Pooling", "Normalize")]
    if unsupported or kinds.count("Pooling") != 1:
      raise ValueError(f"{modules_path}: modules {kinds} are not supported; expected "
                       "Transformer, Pooling and an optional Normalize")
    transformer_dir = os.path.join(model_dir, modules[0].get("path", ""))
    pooling_path = os.path.join(model_dir, modules[kinds.index("Pooling")].get("path", ""),
                                "config.json")
    pooling = _pooling_modes(pooling_path)
    normalize = "Normalize" in kinds
    files += [modules_path, pooling_path]
  else:
    logging.warning("%s: no modules.json; using mean pooling without normalisation "
                    "(what sentence-transformers does for a plain BERT directory)",
                    model_dir)
    transformer_dir, pooling, normalize = model_dir, ("mean",), False
  config_path = os.path.join(transformer_dir, "config.json")
  bert = bert_config_from_hf(_read_json(config_path, "BERT config"), config_path)
  st_path = os.path.join(transformer_dir, "sentence_bert_config.json")
  if not os.path.exists(st_path) and os.path.exists(os.path.join(model_dir,
                                                                 "sentence_bert_config.json")):
    st_path = os.path.join(model_dir, "sentence_bert_config.json")
  st_cfg = _read_json(st_path, "sentence-transformers config") if os.path.exists(st_path) else {}
  max_seq_length = st_cfg.get("max_seq_length") or bert.max_position_embeddings
  max_seq_length = int(max_seq_length)
  if not 2 <= max_seq_length <= bert.max_position_embeddings:
    raise ValueError(f"{st_path}: max_seq_length={max_seq_length} must be in [2, "
                     f"max_position_embeddings={bert.max_position_embeddings}]")
  for name in ("model.safetensors", "tokenizer.json"):
    path = os.path.join(transformer_dir, name)
    if not os.path.exists(path):
      hint = (" (convert pytorch_model.bin with safetensors; torch is not used here)"
              if name == "model.safetensors" else
              " (save the fast tokenizer with tokenizer.save_pretrained)")
      raise FileNotFoundError(f"{path}: not found{hint}")
  files = [config_path] + ([st_path] if st_cfg else []) + files + [
      os.path.join(transformer_dir, "tokenizer.json"),
      os.path.join(transformer_dir, "model.safetensors")]
  return SentenceEncoderSpec(model_dir=model_dir, transformer_dir=transformer_dir, bert=bert,
                             max_seq_length=max_seq_length,
                             do_lower_case=bool(st_cfg.get("do_lower_case", False)),
                             pooling=pooling, normalize=normalize, files=tuple(files))


def bert_params_from_hf(tensors: Mapping[str, np.ndarray], config: BertConfig,
                        path: str = "model.safetensors") -> dict[str, Any]:
  """Hugging Face ``BertModel`` tensors -> the parameters of ``BertEncoder``.

  Accepts names with or without a ``bert.`` prefix; the pooler is not used.
  """
  prefix = "bert." if "bert.embeddings.word_embeddings.weight" in tensors else ""
  d, h, hd = config.hidden_size, config.num_heads, config.head_dim

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    key = prefix + name
    if key not in tensors:
      raise ValueError(f"{path}: missing tensor {key!r}")
    value = np.asarray(tensors[key], np.float32)
    if value.shape != shape:
      raise ValueError(f"{path}: tensor {key!r} has shape {value.shape}, config.json "
                       f"implies {shape}")
    return value

  def norm(name: str) -> dict[str, np.ndarray]:
    return {"scale": get(f"{name}.weight", (d,)), "bias": get(f"{name}.bias", (d,))}

  params: dict[str, Any] = {
      "word_embeddings": {"embedding": get("embeddings.word_embeddings.weight",
                                           (config.vocab_size, d))},
      "position_embeddings": {"embedding": get("embeddings.position_embeddings.weight",
                                               (config.max_position_embeddings, d))},
      "token_type_embeddings": {"embedding": get("embeddings.token_type_embeddings.weight",
                                                 (config.type_vocab_size, d))},
      "embeddings_norm": norm("embeddings.LayerNorm"),
  }
  f = config.intermediate_size
  for i in range(config.num_layers):
    p = f"encoder.layer.{i}."
    attention = {
        proj: {"kernel": get(f"{p}attention.self.{proj}.weight", (d, d)).T.reshape(d, h, hd),
               "bias": get(f"{p}attention.self.{proj}.bias", (d,)).reshape(h, hd)}
        for proj in ("query", "key", "value")}
    attention["out"] = {
        "kernel": get(f"{p}attention.output.dense.weight", (d, d)).T.reshape(h, hd, d),
        "bias": get(f"{p}attention.output.dense.bias", (d,))}
    params[f"layers_{i}"] = {
        "attention": attention,
        "attention_norm": norm(f"{p}attention.output.LayerNorm"),
        "mlp": {"wi": {"kernel": get(f"{p}intermediate.dense.weight", (f, d)).T,
                       "bias": get(f"{p}intermediate.dense.bias", (f,))},
                "wo": {"kernel": get(f"{p}output.dense.weight", (d, f)).T,
                       "bias": get(f"{p}output.dense.bias", (d,))}},
        "mlp_norm": norm(f"{p}output.LayerNorm"),
    }
  return params


def load_bert_params(spec: SentenceEncoderSpec) -> dict[str, Any]:
  """The float32 ``BertEncoder`` parameters from the directory's ``model.safetensors``."""
  weights_path = os.path.join(spec.transformer_dir, "model.safetensors")
  return bert_params_from_hf(load_file(weights_path), spec.bert, weights_path)
