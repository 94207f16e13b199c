"""Generation with a KV cache and chunk-wise retrieval, for a batch of prompts.

    generator = Generator(config, params, vocab, retriever=retriever)
    result = generator.generate(["The capital of Zorbia is"], max_new_tokens=32,
                                sampling=SamplingConfig(temperature=0.7, top_p=0.9))
    result.texts[0], result.retrievals[0]   # text, and which DB chunks it read

How one call runs (the chunk rule is ``retro_jax.models.cca``'s; the caches are
``retro_jax.models.decoding``'s):

1. The prompts are tokenised and right-padded to P (a multiple of m); the neighbors
   of every complete prompt chunk are retrieved (one retriever call per chunk index,
   batched over the prompts that have that chunk).
2. Prefill: one forward pass over the prompts fills the caches and gives the first
   new token of each example.
3. One token per step for every example, each at its own position. When the input
   token of an example is the last token of its chunk j, the host retrieves chunk j's
   neighbors before the step (the chunk's tokens are all known then), and the step
   encodes them for that example alone; this token and the next m-1 attend to them.
   Neighbors are computed once per chunk, never per token.
4. An example stops at EOS (later tokens are padding) or after ``max_new_tokens``; the
   call ends when every example stopped.

Special ids are the vocabulary's (``vocab_lib.special_ids``): generation stops at its
EOS (Megatron's EOD: 2 for NVIDIA's InstructRetro tokenizer, 1 for ours), passages end
with it, and padding is its pad id, or its EOS where it has no pad piece (Megatron pads
neighbors with EOD).

Neighbors come from one of (``generate``'s arguments):

* ``retriever``: live retrieval, a ``Retriever`` (or any callable with its contract
  ``(chunk_tokens [n, m], chunk_index) -> (tokens [n, k, r], mask [n, k], info)``);
* ``passages``: fixed user-given texts, each tokenised (plus EOD, then padded) into an
  r-token neighbor that every chunk of the example reads (Megatron's
  ``pad_neighbours_for_query_only``);
* neither, or ``retrieval=False``: the decoder alone ("encoder ablated").

jit variants: one prefill per (P, cache length), one step without a boundary, and one
boundary step per power-of-two count of rows at a boundary (so a boundary costs the
encoder for the rows at it, not for the whole batch).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.data import vocab as vocab_lib
from retro_jax.inference.sampling import SamplingConfig, sample
from retro_jax.models import Retro, RetroConfig
from retro_jax.models import cca
from retro_jax.models import decoding
from retro_jax.models import lm
from retro_jax.utils.compilation import forward_compiler_options

Array = jax.Array


# Neighbor sources --------------------------------------------------------------------


class LiveNeighbors:
  """Neighbors from a retriever callback, one call per completed chunk index.

  ``retriever(chunk_tokens [n, m], chunk_index) -> (tokens [n, k, r], mask [n, k],
  info)`` with ``info[i]`` a list of ``{"chunk_id", "doc_id", "score", "text"}``.
  """

  def __init__(self, retriever: Callable, num_neighbors: Optional[int] = None):
    self.retriever = retriever
    k = num_neighbors if num_neighbors is not None else getattr(retriever, "num_neighbors",
                                                                None)
    if k is None:
      raise ValueError("LiveNeighbors: pass num_neighbors for a retriever without a "
                       "num_neighbors attribute")
    self.num_neighbors = int(k)
    self.calls = 0

  def __call__(self, rows: np.ndarray, chunk_tokens: np.ndarray, chunk_index: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, list[list[dict]]]:
    del rows
    tokens = mask = None
    info: list[Any] = [None] * len(chunk_index)
    for j in np.unique(chunk_index):
      group = np.flatnonzero(chunk_index == j)
      got_tokens, got_mask, got_info = self.retriever(chunk_tokens[group], int(j))
      self.calls += 1
      got_tokens = np.asarray(got_tokens, np.int32)
      got_mask = np.asarray(got_mask, bool)
      if got_tokens.ndim != 3 or got_tokens.shape[:2] != (len(group), self.num_neighbors):
        raise ValueError(f"retriever returned neighbor tokens of shape "
                         f"{list(got_tokens.shape)}; expected [n={len(group)}, "
                         f"k={self.num_neighbors}, r]")
      if tokens is None:
        tokens = np.zeros((len(chunk_index),) + got_tokens.shape[1:], np.int32)
        mask = np.zeros((len(chunk_index), self.num_neighbors), bool)
      tokens[group], mask[group] = got_tokens, got_mask.reshape(len(group), -1)
      for i, row_info in zip(group, got_info):
        info[i] = list(row_info)
    return tokens, mask, info


class FixedNeighbors:
  """The same neighbors for every chunk of an example (user-given passages).

  Args:
    tokens: int [batch, k, r]; mask: bool [batch, k]; info: per example, per
      neighbor a dict (``{"doc_id": passage index, "text": passage}``).
  """

  def __init__(self, tokens: np.ndarray, mask: np.ndarray, info: list[list[dict]]):
    self.tokens, self.mask, self.info = np.asarray(tokens, np.int32), np.asarray(mask), info
    self.num_neighbors = self.tokens.shape[1]

  def __call__(self, rows: np.ndarray, chunk_tokens: np.ndarray, chunk_index: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, list[list[dict]]]:
    del chunk_tokens, chunk_index
    return self.tokens[rows], self.mask[rows], [list(self.info[r]) for r in rows]


def passages_to_neighbors(vocab: Any, passages: Sequence[Sequence[str]],
                          neighbor_length: int, *,
                          pad_id: Union[int, str] = vocab_lib.FROM_VOCAB,
                          eod_id: Union[int, str, None] = vocab_lib.FROM_VOCAB
                          ) -> FixedNeighbors:
  """Tokenises each example's passages into r-token neighbors (as the chunk DB stores
  a neighbor: text, EOD, then padding; cut at r tokens).

  Args:
    passages: per example, its passages (examples may have different counts; k is
      the largest count and missing ones are masked).
    pad_id, eod_id: default the vocabulary's pad and EOS ids (``_vocab_ids``);
      ``eod_id=None``: no EOD.
  """
  if vocab_lib.is_from_vocab(pad_id) or vocab_lib.is_from_vocab(eod_id):
    ids = _vocab_ids(vocab)
    pad_id = ids.pad if vocab_lib.is_from_vocab(pad_id) else pad_id
    eod_id = ids.eos if vocab_lib.is_from_vocab(eod_id) else eod_id
  batch = len(passages)
  k = max((len(p) for p in passages), default=0)
  if k == 0:
    raise ValueError("passages: every example has no passage; pass retrieval=False "
                     "for the decoder alone")
  tokens = np.full((batch, k, neighbor_length), pad_id, np.int32)
  mask = np.zeros((batch, k), bool)
  info: list[list[dict]] = []
  for b, example in enumerate(passages):
    tokens[b], mask[b] = vocab_lib.passage_neighbors(
        [vocab.encode(text) for text in example], neighbor_length, pad_id=pad_id,
        eod_id=eod_id, num_neighbors=k)
    info.append([{"chunk_id": -1, "doc_id": j, "score": None, "text": text}
                 for j, text in enumerate(example)])
  return FixedNeighbors(tokens, mask, info)


# Results ----------------------------------------------------------------------------


@dataclasses.dataclass
class GenerationResult:
  """Outputs of ``Generator.generate`` (lists indexed by example).

  Attributes:
    texts: the generated continuations (up to EOS, excluded).
    tokens: int32 arrays of the generated ids (up to EOS, excluded).
    finished: True where the example stopped at EOS.
    prompt_tokens: int32 arrays of the prompts' ids.
    retrievals: per example, one record per chunk whose neighbors were fetched
      (prompt chunks first): ``{"chunk_index", "first_position", "in_prompt", "query",
      "neighbors": [{"chunk_id", "doc_id", "score", "text"}]}``.
    logits: float32 [batch, steps, vocab]: the distribution each new token was chosen
      from (``return_logits=True`` only).
    stats: timings and counts of the call.
  """

  texts: list[str]
  tokens: list[np.ndarray]
  finished: list[bool]
  prompt_tokens: list[np.ndarray]
  retrievals: list[list[dict]]
  logits: Optional[np.ndarray] = None
  stats: dict = dataclasses.field(default_factory=dict)

  def to_json(self) -> list[dict]:
    """One JSON-friendly record per example."""
    return [{"text": t, "tokens": [int(i) for i in ids], "finished": f, "retrievals": r}
            for t, ids, f, r in zip(self.texts, self.tokens, self.finished,
                                    self.retrievals)]


# Helpers ----------------------------------------------------------------------------


def _vocab_ids(vocab: Any) -> vocab_lib.SpecialIds:
  """The vocabulary's special ids (``vocab_lib.special_ids``); a toy vocabulary that is
  no SentencePiece model and declares none (tests) is taken to be in our own layout."""
  return vocab_lib.special_ids(vocab, default=vocab_lib.OWN_LAYOUT)


def _tokenizer_size(vocab: Any, default: int) -> int:
  """Ids the tokenizer can decode: SentencePiece's piece count, seqio's vocab_size."""
  size = getattr(vocab, "get_piece_size", None) or getattr(vocab, "vocab_size", None)
  size = size() if callable(size) else size
  return int(size) if size else default


def _next_power_of_two(n: int) -> int:
  return 1 << max(0, int(n - 1).bit_length())


def bucket_length(n: int, quantum: int) -> int:
  """n rounded up to quantum * (a power of two) up to 16 quanta, then to 16 quanta.

  Limits the distinct shapes (and so compilations) that prompts and caches take.
  """
  units = -(-n // quantum)
  units = _next_power_of_two(units) if units <= 16 else -(-units // 16) * 16
  return units * quantum


# The generator ---------------------------------------------------------------------


class Generator:
  """Batched generation with a KV cache and chunk-wise retrieval (module docstring).

  Args:
    config: the model's ``RetroConfig``.
    params: its parameters (a Retro tree; a GPT tree works with retrieval off); its
      matrices are held in the compute dtype when that is narrower
      (``decoding.params_for_decoding``: the same logits, half the bytes per step with
      bf16 compute).
    vocab: ``encode(text) -> ids`` and ``decode(ids) -> text`` (SentencePiece, seqio).
    retriever: default live retriever of ``generate`` (None: no live retrieval).
    eos_id: end-of-sequence id (an example stops after it); default the vocabulary's
      EOS (``vocab_lib.special_ids``: Megatron's EOD); None: never stop early
      (benchmarks).
    pad_id: padding id; default the vocabulary's (its EOS where it has no pad piece).
    sync_every: steps between checks whether every example has stopped.

  Attributes:
    eod_id: the end-of-document id that passages end with (like DB chunks) and that
      is dropped from retrieval queries: ``eos_id``, or the vocabulary's EOS when
      ``eos_id`` is None.
  """

  def __init__(self, config: RetroConfig, params: Any, vocab: Any,
               retriever: Optional[Callable] = None, *,
               eos_id: Union[int, str, None] = vocab_lib.FROM_VOCAB,
               pad_id: Union[int, str] = vocab_lib.FROM_VOCAB,
               sync_every: int = 16):
    self.config, self.vocab = config, vocab
    self.params = decoding.params_for_decoding(params, config.compute_dtype)
    self.retriever = retriever
    ids = _vocab_ids(vocab)
    if vocab_lib.is_from_vocab(eos_id):
      eos_id = ids.eos
    self.eos_id = None if eos_id is None else int(eos_id)
    self.pad_id = ids.pad if vocab_lib.is_from_vocab(pad_id) else int(pad_id)
    self.eod_id = ids.eos if self.eos_id is None else self.eos_id
    self.sync_every = sync_every
    self._tokenizer_size = _tokenizer_size(vocab, config.vocab_size)
    # A GPT checkpoint (decoder only) can only generate with retrieval off.
    self.has_retro = lm.has_retro_params(params)

  # Public API -----------------------------------------------------------------------

  def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 32,
               sampling: Optional[SamplingConfig] = None,
               passages: Optional[Sequence[Sequence[str]]] = None,
               retrieval: bool = True, retriever: Optional[Callable] = None,
               align_prompts: bool = False, return_logits: bool = False
               ) -> GenerationResult:
    """Generates a continuation of each prompt.

    Args:
      prompts: texts (tokenised with ``vocab``; no BOS is added).
      max_new_tokens: new tokens per example at most.
      sampling: greedy by default.
      passages: per prompt, fixed passages read as neighbors by every chunk.
      retrieval: False runs the decoder alone (ignores passages and retrievers).
      retriever: live retriever for this call (default: the generator's).
      align_prompts: left-pad each prompt with ``pad_id`` to a multiple of m, so that
        its last token completes a chunk: the prompt's final chunk (holding its end,
        e.g. a question) is retrieved before the first new token, which then reads
        its neighbors (without it, a prompt shorter than m reads none for m - 1 - L
        new tokens). Megatron aligns chunks to the end of the sequence at inference
        in the same way. Retrieval records count positions after the padding.
      return_logits: also return each step's logits.
    """
    if isinstance(prompts, str):
      raise TypeError("generate: prompts must be a sequence of strings, not a string")
    prompt_tokens = [list(self.vocab.encode(p)) for p in prompts]
    neighbors = None
    if retrieval and passages is not None:
      if len(passages) != len(prompts):
        raise ValueError(f"generate: {len(passages)} passage lists for {len(prompts)} "
                         "prompts")
      neighbors = passages_to_neighbors(self.vocab, passages, self.config.neighbor_length,
                                        pad_id=self.pad_id, eod_id=self.eod_id)
    elif retrieval and (retriever or self.retriever) is not None:
      neighbors = LiveNeighbors(retriever or self.retriever)
    return self.generate_tokens(prompt_tokens, max_new_tokens=max_new_tokens,
                                sampling=sampling, neighbors=neighbors,
                                align_prompts=align_prompts, return_logits=return_logits)

  def generate_tokens(self, prompt_tokens: Sequence[Sequence[int]], *,
                      max_new_tokens: int = 32, sampling: Optional[SamplingConfig] = None,
                      neighbors: Optional[Union[LiveNeighbors, FixedNeighbors,
                                                Callable]] = None,
                      align_prompts: bool = False, return_logits: bool = False
                      ) -> GenerationResult:
    """``generate`` on token ids; ``neighbors(rows [S], chunk_tokens [S, m],
    chunk_index [S]) -> (tokens [S, k, r], mask [S, k], info)`` or None."""
    cfg = self.config
    sampling = sampling or SamplingConfig()
    m, r = cfg.chunk_length, cfg.neighbor_length
    batch = len(prompt_tokens)
    given_prompts = [np.asarray(p, np.int32) for p in prompt_tokens]
    if align_prompts:
      prompt_tokens = [[self.pad_id] * (-len(p) % m) + list(p) if len(p) else []
                       for p in prompt_tokens]
    lengths = np.array([len(p) for p in prompt_tokens], np.int32)
    if batch == 0:
      raise ValueError("generate: no prompts")
    if lengths.min() < 1:
      raise ValueError(f"generate: prompt {int(np.argmin(lengths))} is empty (tokenised "
                       "to no ids)")
    if max_new_tokens < 1:
      raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
    needed = int(lengths.max()) + max_new_tokens
    padded = bucket_length(int(lengths.max()), m)
    cache_length = max(bucket_length(needed, 64), padded)
    if cfg.position_embedding == "learned":
      if needed > cfg.max_length:
        raise ValueError(f"generate: the longest prompt ({int(lengths.max())} tokens) + "
                         f"max_new_tokens={max_new_tokens} exceeds RetroConfig.max_length="
                         f"{cfg.max_length} (learned positions)")
      cache_length = min(cache_length, cfg.max_length)
      padded = min(padded, cache_length)
    retrieval = neighbors is not None
    if retrieval and not self.has_retro:
      raise ValueError("generate: the parameters hold a decoder without Retro encoder/CCA "
                       "(a GPT checkpoint); generate with retrieval=False")
    seq = np.full((batch, cache_length), self.pad_id, np.int32)  # prompt + new tokens
    for b, p in enumerate(prompt_tokens):
      seq[b, :len(p)] = p
    retrievals: list[list[dict]] = [[] for _ in range(batch)]
    stats = {"retrieval_s": 0.0, "retrieved_chunks": 0, "boundary_steps": 0}
    start_time = time.perf_counter()

    def fetch_neighbors(rows: np.ndarray, positions: np.ndarray, in_prompt: bool):
      """Neighbors of the chunks that the tokens at ``positions`` [S] complete."""
      t0 = time.perf_counter()
      chunk = cca.neighbor_chunk_of_token(positions, m)
      chunk_tokens = np.stack([seq[b, j * m:(j + 1) * m] for b, j in zip(rows, chunk)])
      # Ids the tokenizer does not have (a vocabulary padded beyond it) have no text.
      chunk_tokens = np.where(chunk_tokens < self._tokenizer_size, chunk_tokens,
                              self.pad_id)
      tokens, mask, info = neighbors(rows, chunk_tokens, chunk)
      tokens = np.asarray(tokens, np.int32)
      if tokens.shape[-1] != r:
        raise ValueError(f"neighbors have {tokens.shape[-1]} tokens; the model reads "
                         f"r={r} (RetroConfig.retrieved_length; a chunk DB of chunk "
                         f"length {r // 2} gives 2*{r // 2})")
      for i, (b, j) in enumerate(zip(rows, chunk)):
        retrievals[b].append({
            "chunk_index": int(j), "first_position": int(j * m), "in_prompt": in_prompt,
            "query": self._decode_ids(chunk_tokens[i]), "neighbors": info[i]})
      stats["retrieval_s"] += time.perf_counter() - t0
      stats["retrieved_chunks"] += len(rows)
      return tokens, np.asarray(mask, bool)

    # 1. Neighbors of the complete prompt chunks, then prefill.
    prompt_neighbors = prompt_mask = None
    if retrieval:
      k = neighbors.num_neighbors
      num_chunks = padded // m
      prompt_neighbors = np.full((batch, num_chunks, k, r), self.pad_id, np.int32)
      prompt_mask = np.zeros((batch, num_chunks, k), bool)
      for j in range(int(lengths.max()) // m):
        rows = np.flatnonzero(lengths // m > j)
        tokens, mask = fetch_neighbors(rows, np.full(len(rows), (j + 1) * m - 1), True)
        prompt_neighbors[rows, j], prompt_mask[rows, j] = tokens, mask
    prompt_ids = seq[:, :padded]
    prefill = self._jit("prefill", retrieval, sampling)
    key = jax.random.PRNGKey(sampling.seed)
    eos = np.int32(-1 if self.eos_id is None else self.eos_id)
    token, logits, done, cache = prefill(self.params, prompt_ids, prompt_neighbors,
                                         prompt_mask, lengths, key, eos,
                                         cache_length=cache_length)
    new_tokens = [token]
    step_logits = [logits] if return_logits else None
    fetched = 0
    done_host = np.zeros(batch, bool)

    def sync():
      """Copies the new tokens to the host (waits for the device)."""
      nonlocal fetched, done_host
      for t in range(fetched, len(new_tokens)):
        seq[np.arange(batch), lengths + t] = np.asarray(new_tokens[t])
      fetched = len(new_tokens)
      done_host = np.asarray(done)

    # 2. One token per step.
    step = self._jit("step", retrieval, sampling)
    positions = lengths.copy()  # position of each example's next input token
    # The jitted step cannot check its traced positions against the caches (a
    # position >= cache_length would be dropped from the cache: wrong logits), so the
    # known lengths are checked here, once: the last step feeds position
    # length + max_new_tokens - 2.
    last = int(lengths.max()) + max_new_tokens - 2
    if max_new_tokens > 1 and last >= cache_length:
      raise ValueError(f"generate: decoding would reach position {last}, outside the "
                       f"cache of {cache_length} positions (prompt lengths "
                       f"{int(lengths.max())} + max_new_tokens={max_new_tokens})")
    for i in range(1, max_new_tokens):
      boundary = None
      at_boundary = cca.completes_chunk(positions, m) if retrieval else np.zeros(batch, bool)
      if at_boundary.any():
        sync()
        rows = np.flatnonzero(at_boundary & ~done_host)
        if len(rows):
          stats["boundary_steps"] += 1
          tokens, mask = fetch_neighbors(rows, positions[rows], False)
          boundary = self._pad_rows(rows, tokens, mask, batch)
      elif i % self.sync_every == 0:
        sync()
      if done_host.all():
        break
      token, logits, done, cache = step(self.params, cache, new_tokens[-1], positions,
                                        done, key, np.int32(i), eos, boundary)
      new_tokens.append(token)
      if return_logits:
        step_logits.append(logits)
      positions = positions + 1
    sync()
    stats["seconds"] = time.perf_counter() - start_time
    stats["steps"] = len(new_tokens)
    return self._result(given_prompts, seq, lengths, len(new_tokens), retrievals,
                        step_logits, stats)

  # Internals ------------------------------------------------------------------------

  def _decode_ids(self, ids: Sequence[int], drop_special: bool = True) -> str:
    """Text of ids, without ids the tokenizer lacks (and pad/EOD with drop_special)."""
    ids = [int(i) for i in ids if 0 <= i < self._tokenizer_size]
    if drop_special:
      ids = [i for i in ids if i != self.pad_id and i != self.eod_id]
    return self.vocab.decode(ids)

  @staticmethod
  def _pad_rows(rows: np.ndarray, tokens: np.ndarray, mask: np.ndarray, batch: int):
    """Pads the boundary rows to a power of two (at most batch); padding rows == batch."""
    size = min(_next_power_of_two(len(rows)), batch)
    pad = size - len(rows)
    rows = np.concatenate([rows, np.full(pad, batch)]).astype(np.int32)
    tokens = np.concatenate([tokens, np.zeros((pad,) + tokens.shape[1:], np.int32)])
    mask = np.concatenate([mask, np.zeros((pad,) + mask.shape[1:], bool)])
    return rows, tokens, mask

  def _result(self, prompt_tokens, seq, lengths, steps, retrievals, step_logits, stats
              ) -> GenerationResult:
    texts, tokens, finished = [], [], []
    for b, length in enumerate(lengths):
      ids = seq[b, length:length + steps]
      stop = np.flatnonzero(ids == self.eos_id) if self.eos_id is not None else []
      finished.append(bool(len(stop)))
      ids = ids[:stop[0]] if len(stop) else ids
      tokens.append(ids.astype(np.int32))
      texts.append(self._decode_ids(ids, drop_special=False))
    logits = None
    if step_logits is not None:
      logits = np.stack([np.asarray(x) for x in step_logits], axis=1)
    return GenerationResult(texts=texts, tokens=tokens, finished=finished,
                            prompt_tokens=prompt_tokens,
                            retrievals=retrievals, logits=logits, stats=stats)

  def _jit(self, kind: str, retrieval: bool, sampling: SamplingConfig) -> Callable:
    """The jitted prefill or step (shared by generators of the same model)."""
    rule = dataclasses.replace(sampling, seed=0)  # the seed is an argument, not a shape
    return _compiled(self.config, self.pad_id, kind, retrieval, rule)


@functools.lru_cache(maxsize=64)
def _compiled(config: RetroConfig, pad_id: int, kind: str, retrieval: bool,
              sampling: SamplingConfig) -> Callable:
  """jitted ``prefill(params, tokens, neighbor_tokens, neighbor_mask, lengths, key, eos,
  cache_length=)`` or ``step(params, cache, tokens, positions, done, key, index, eos,
  boundary)``; both return (next tokens [b], their logits [b, V], done [b], cache).

  ``eos`` is an int32 scalar (-1: none); an example is done after it and then emits
  ``pad_id``.
  """
  model = Retro(config)

  def finish(logits, done, rng, eos):
    token = sample(logits, rng, sampling)
    token = jnp.where(done, pad_id, token)
    return token, done | (token == eos)

  def prefill(params, tokens, neighbor_tokens, neighbor_mask, lengths, key, eos, *,
              cache_length):
    logits, variables = model.apply(
        {"params": params}, tokens, neighbor_tokens if retrieval else None,
        neighbor_mask=neighbor_mask if retrieval else None, lengths=lengths,
        cache_length=cache_length, method=Retro.prefill, mutable=["cache"])
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    token, done = finish(last, jnp.zeros(lengths.shape, bool),
                         jax.random.fold_in(key, 0), eos)
    return token, last, done, variables["cache"]

  def step(params, cache, tokens, positions, done, key, index, eos, boundary):
    kwargs = {}
    if boundary is not None:
      rows, neighbor_tokens, neighbor_mask = boundary
      kwargs = dict(rows=rows, neighbor_tokens=neighbor_tokens, neighbor_mask=neighbor_mask)
    logits, variables = model.apply(
        {"params": params, "cache": cache}, tokens[:, None], positions[:, None],
        retrieval=retrieval, method=Retro.decode_step, mutable=["cache"], **kwargs)
    logits = logits[:, 0]
    token, done = finish(logits, done, jax.random.fold_in(key, index), eos)
    return token, logits, done, variables["cache"]

  if kind == "prefill":
    return jax.jit(prefill, static_argnames=("cache_length",),
                   compiler_options=forward_compiler_options())
  return jax.jit(step, donate_argnums=(1,))
