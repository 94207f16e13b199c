"""KV-cache decoding with chunk-wise retrieval equals the full forward pass, step by step.

The reference is the full model run once on each example's final sequence with, for
every complete chunk, the neighbors the (deterministic) retriever gives for that
chunk's tokens: decoding must give the same logits (fp32 tolerance) at every step and
the same greedy tokens, across chunk boundaries, for prompts shorter than m, multiples
of m and neither, batched together.
"""

import functools

import jax
import numpy as np
import pytest

from retro_jax.inference import sampling as sampling_lib
from retro_jax.inference.generator import Generator, LiveNeighbors, bucket_length
from retro_jax.inference.sampling import SamplingConfig
from retro_jax.models import Retro, RetroConfig, decoding, init_params, layers

M = 4
VOCAB = 61
NEVER = None  # eos_id of parity runs: no early stop, every step is compared


def small_config(**overrides) -> RetroConfig:
  fields = dict(vocab_size=VOCAB, hidden_size=32, num_layers=4, num_heads=4, mlp_dim=64,
                chunk_length=M, num_neighbors=2, cca_layers=(2, 4),
                encoder_dropout_rate=0.0, max_length=64)
  fields.update(overrides)
  return RetroConfig(**fields)


CONFIGS = {
    "rope_mha": small_config(),
    "learned_gqa": small_config(position_embedding="learned", num_kv_heads=2,
                                encoder_position_embedding="learned"),
    "half_rope_gqa_swiglu_small_encoder": small_config(
        num_kv_heads=1, rotary_fraction=0.5, mlp_gated=True, mlp_activation="silu",
        norm_type="rmsnorm", tie_embeddings=False, encoder_hidden_size=16,
        encoder_num_heads=2, cca_layers=(1, 3)),
    # Window 3 < chunk length 4 < every sequence: decode steps must apply it too.
    "sliding_window_gqa": small_config(num_kv_heads=2, sliding_window=3),
}


@functools.lru_cache(maxsize=None)
def _params(config: RetroConfig):
  """Random parameters of the model's shapes (numpy: no init compilation); norm
  scales near 1 so that every layer matters."""
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  rng = np.random.RandomState(1)

  def draw(path, leaf):
    noise = rng.normal(0.0, 0.2, leaf.shape).astype(np.float32)
    is_scale = getattr(path[-1], "key", None) == "scale"
    return noise + 1.0 if is_scale else noise

  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def _generator(config: RetroConfig, eos_id=None, sync_every=16):
  """One generator per setting, so tests share its compiled steps."""
  return Generator(config, _params(config), CharVocab(), eos_id=eos_id,
                   sync_every=sync_every)


class CharVocab:
  """Lower-case letters and space as ids 3..29 (0 pad, 1 EOS): text round trips."""

  ALPHABET = " abcdefghijklmnopqrstuvwxyz"

  def encode(self, text):
    return [self.ALPHABET.index(c) + 3 for c in text.lower() if c in self.ALPHABET]

  def decode(self, ids):
    return "".join(self.ALPHABET[i - 3] if 3 <= i < 30 else "?" for i in map(int, ids))


class HashRetriever:
  """Deterministic neighbors of a chunk's tokens; records every query row.

  Some chunks get one neighbor masked, some none at all, to exercise the masks.
  """

  def __init__(self, vocab_size=VOCAB, k=2, r=2 * M):
    self.vocab_size, self.num_neighbors, self.r = vocab_size, k, r
    self.queries: list[tuple[tuple[int, ...], int]] = []

  def neighbors_of(self, chunk):
    chunk = tuple(int(t) for t in chunk)
    seed = hash(chunk) % (2 ** 31)
    tokens = np.random.RandomState(seed).randint(2, self.vocab_size,
                                                 (self.num_neighbors, self.r))
    mask = np.ones(self.num_neighbors, bool)
    if sum(chunk) % 5 == 0:
      mask[1] = False
    if sum(chunk) % 7 == 0:
      mask[:] = False
    return tokens.astype(np.int32), mask

  def __call__(self, chunk_tokens, chunk_index):
    tokens, masks, info = [], [], []
    for row in np.asarray(chunk_tokens):
      self.queries.append((tuple(int(t) for t in row), int(chunk_index)))
      t, msk = self.neighbors_of(row)
      tokens.append(t)
      masks.append(msk)
      info.append([{"chunk_id": int(t[j, 0]), "doc_id": j, "score": 1.0, "text": "x"}
                   for j in range(self.num_neighbors) if msk[j]])
    return np.stack(tokens), np.stack(masks), info


def _prompts(lengths, seed=0):
  rng = np.random.RandomState(seed)
  return [list(rng.randint(3, VOCAB, n)) for n in lengths]


def _reference_logits(config, params, sequences, retriever):
  """Full forward over each final sequence (padded into one batch) with the
  retriever's neighbors for every complete chunk: logits [batch, n, vocab]."""
  n = max(len(s) for s in sequences)
  n_pad = -(-n // M) * M
  tokens = np.zeros((len(sequences), n_pad), np.int32)
  neighbors = None
  if retriever is not None:
    neighbors = np.zeros((len(sequences), n_pad // M, retriever.num_neighbors,
                          retriever.r), np.int32)
    mask = np.zeros(neighbors.shape[:3], bool)
  for b, s in enumerate(sequences):
    tokens[b, :len(s)] = s
    for j in range(len(s) // M if retriever is not None else 0):
      neighbors[b, j], mask[b, j] = retriever.neighbors_of(s[j * M:(j + 1) * M])
  model = Retro(config)
  if retriever is None:
    return np.asarray(jax.jit(model.apply)({"params": params}, tokens))
  return np.asarray(jax.jit(lambda p, t, nb, mk: model.apply(
      {"params": p}, t, nb, neighbor_mask=mk))(params, tokens, neighbors, mask))


def _check_against_full_forward(config, lengths, new_tokens, retrieval, tolerance=1e-5):
  params = _params(config)
  retriever = HashRetriever() if retrieval else None
  prompts = _prompts(lengths)
  neighbors = LiveNeighbors(retriever) if retrieval else None
  result = _generator(config).generate_tokens(prompts, max_new_tokens=new_tokens,
                                              neighbors=neighbors, return_logits=True)
  assert result.logits.shape == (len(lengths), new_tokens, VOCAB)
  assert np.isfinite(result.logits).all()
  fed = [list(p) + list(t[:-1]) for p, t in zip(prompts, result.tokens)]
  if retrieval:
    # Every chunk completed by a fed token was retrieved exactly once per example.
    expected = sorted((tuple(s[j * M:(j + 1) * M]), j)
                      for s in fed for j in range(len(s) // M))
    assert sorted(retriever.queries) == expected
    assert sum(len(r) for r in result.retrievals) == len(expected)
  ref = _reference_logits(config, params, fed, HashRetriever() if retrieval else None)
  for b, length in enumerate(lengths):
    assert len(result.tokens[b]) == new_tokens
    want = ref[b, length - 1:length - 1 + new_tokens]
    np.testing.assert_allclose(result.logits[b], want, atol=tolerance, rtol=tolerance,
                               err_msg=f"example {b} (prompt length {length})")
    top2 = np.sort(want, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * tolerance   # no near-tie within the tolerance
    np.testing.assert_array_equal(result.tokens[b][clear], want.argmax(-1)[clear])
  return result


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kv_cache_decoding_equals_full_forward_with_live_retrieval(name):
  # m = 4: prompts of 1 and 3 tokens (shorter than m), a multiple of m, others; three
  # prompts complete a chunk at the same step (a boundary sub-batch padded to 4), two
  # others at another; 13 new tokens cross several chunk boundaries of every example.
  result = _check_against_full_forward(CONFIGS[name], [1, 8, 3, 7, 11, 5], 13, True)
  generated = [r for r in result.retrievals[1] if not r["in_prompt"]]
  assert [r["chunk_index"] for r in generated] == [2, 3, 4]   # positions 8..19 fed
  assert result.retrievals[1][0]["in_prompt"] and result.stats["boundary_steps"] > 0


@pytest.mark.parametrize("name", ["rope_mha", "learned_gqa"])
def test_kv_cache_decoding_equals_full_forward_without_retrieval(name):
  _check_against_full_forward(CONFIGS[name], [2, 9, 4], 10, False)


@pytest.mark.slow
def test_sliding_window_decoding_equals_full_forward_and_the_window_matters():
  """Mistral-style window: query i sees keys i - w < j <= i, in the full pass (one
  attention function, with or without attention dropout) and in cached decode steps."""
  config = CONFIGS["sliding_window_gqa"]
  _check_against_full_forward(config, [2, 9, 4], 10, False)
  tokens = np.asarray(_prompts([20])[0], np.int32)[None]
  params = _params(config)
  windowed = np.asarray(Retro(config).apply({"params": params}, tokens))
  full = np.asarray(Retro(config.replace(sliding_window=None)).apply({"params": params},
                                                                      tokens))
  np.testing.assert_allclose(windowed[:, :3], full[:, :3], atol=1e-5)  # i < w: same
  assert np.abs(windowed[:, 3:] - full[:, 3:]).max() > 1e-3
  with pytest.raises(ValueError, match="sliding_window"):
    small_config(sliding_window=0)
  # The attention function against an explicit reference; the dropout (explicit
  # softmax) path with a vanishing rate applies the same mask.
  rng = np.random.RandomState(0)
  q, k, v = (rng.normal(size=(2, 9, 4, 8)).astype(np.float32) for _ in range(3))
  i, j = np.arange(9)[:, None], np.arange(9)[None, :]
  visible = (j <= i) & (j > i - 3)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
  logits = np.where(visible, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  want = np.einsum("bhqk,bkhd->bqhd", probs / probs.sum(-1, keepdims=True), v)
  fused = layers.dot_product_attention(q, k, v, is_causal=True, sliding_window=3)
  dropped = layers.dot_product_attention(q, k, v, is_causal=True, sliding_window=3,
                                         dropout_rate=1e-9,
                                         dropout_rng=jax.random.PRNGKey(0))
  np.testing.assert_allclose(np.asarray(fused), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dropped), want, atol=1e-5)
  with pytest.raises(ValueError, match="is_causal"):
    layers.dot_product_attention(q, k, v, sliding_window=3)


def test_fixed_passages_are_read_by_every_chunk():
  config = CONFIGS["rope_mha"]
  params = _params(config)
  vocab = CharVocab()
  prompts = ["ab", "hello world", "x", "the river", "zorbia is", "where is it"]
  passages = [["zorbia", "quenton river"], ["vell"], ["a b c"], ["mount arrak", "goats"],
              ["clock"], ["rain water", "lira moss"]]
  result = _generator(config).generate(prompts, max_new_tokens=7, passages=passages,
                                       return_logits=True)
  assert np.isfinite(result.logits).all()
  # Reference: every chunk's neighbors are the tokenised passages (+ EOD, padded).
  fed = [vocab.encode(p) + list(t[:-1]) for p, t in zip(prompts, result.tokens)]
  n = max(len(f) for f in fed)
  tokens = np.zeros((len(fed), n), np.int32)
  nb = np.zeros((len(fed), n // M, 2, 2 * M), np.int32)
  mask = np.zeros((len(fed), n // M, 2), bool)
  for b, texts in enumerate(passages):
    tokens[b, :len(fed[b])] = fed[b]
    for j, text in enumerate(texts):
      ids = (vocab.encode(text) + [1])[:2 * M]  # + EOD
      nb[b, :, j, :len(ids)] = ids
      mask[b, :, j] = True
  ref = np.asarray(jax.jit(lambda *a: Retro(config).apply({"params": a[0]}, a[1], a[2],
                                                          neighbor_mask=a[3]))(
                                                              params, tokens, nb, mask))
  for b, prompt in enumerate(prompts):
    start = len(vocab.encode(prompt)) - 1
    np.testing.assert_allclose(result.logits[b], ref[b, start:start + 7], atol=1e-5,
                               rtol=1e-5)
    assert all(r["neighbors"][0]["text"] == passages[b][0] for r in result.retrievals[b])
  # The passages reach the model.
  without = _generator(config).generate(prompts, max_new_tokens=7, retrieval=False,
                                        return_logits=True)
  assert np.abs(without.logits - result.logits).max() > 1e-3


def test_eos_stops_each_example_and_the_rest_continue():
  config = CONFIGS["rope_mha"]
  prompts = _prompts([2, 9, 4], seed=3)
  free = _generator(config).generate_tokens(prompts, max_new_tokens=10)
  eos = int(free.tokens[0][4])  # the 5th token of example 0 becomes EOS
  stopped = _generator(config, eos_id=eos).generate_tokens(prompts, max_new_tokens=10)
  for b in range(3):
    hits = np.flatnonzero(free.tokens[b] == eos)
    cut = hits[0] if len(hits) else 10
    np.testing.assert_array_equal(stopped.tokens[b], free.tokens[b][:cut])
    assert stopped.finished[b] == bool(len(hits))
  assert stopped.finished[0] and len(stopped.tokens[0]) <= 4
  assert CharVocab().decode(stopped.tokens[0]) == stopped.texts[0]


def test_all_examples_stopping_ends_the_loop_early():
  config = CONFIGS["rope_mha"]
  prompts = _prompts([2, 9, 4], seed=5)
  first = _generator(config).generate_tokens(prompts, max_new_tokens=10)
  # Every example emits its own first token again only by chance; make each stop at
  # once by using the EOS id that example 0 emits first, on a batch of copies.
  copies = [prompts[0]] * 3
  eos = int(first.tokens[0][0])
  result = _generator(config, eos_id=eos, sync_every=2).generate_tokens(
      copies, max_new_tokens=10)
  assert result.finished == [True] * 3 and all(len(t) == 0 for t in result.tokens)
  assert result.stats["steps"] <= 3


# Sampling ----------------------------------------------------------------------------


@pytest.mark.slow
def test_top_k_1_equals_greedy_and_seeds_reproduce():
  generator = _generator(CONFIGS["rope_mha"])
  prompts = _prompts([2, 9, 4], seed=1)
  greedy = generator.generate_tokens(prompts, max_new_tokens=10)
  top1 = generator.generate_tokens(prompts, max_new_tokens=10,
                                   sampling=SamplingConfig(temperature=1.5, top_k=1, seed=4))
  for a, b in zip(greedy.tokens, top1.tokens):
    np.testing.assert_array_equal(a, b)
  hot = SamplingConfig(temperature=5.0, seed=7)
  one = generator.generate_tokens(prompts, max_new_tokens=10, sampling=hot)
  two = generator.generate_tokens(prompts, max_new_tokens=10, sampling=hot)
  other = generator.generate_tokens(prompts, max_new_tokens=10,
                                    sampling=SamplingConfig(temperature=5.0, seed=8))
  assert all(np.array_equal(a, b) for a, b in zip(one.tokens, two.tokens))
  assert not all(np.array_equal(a, b) for a, b in zip(one.tokens, other.tokens))
  assert not all(np.array_equal(a, b) for a, b in zip(one.tokens, greedy.tokens))


def test_top_p_keeps_the_smallest_nucleus():
  probs = np.array([[0.05, 0.5, 0.15, 0.3]])  # sorted: 0.5, 0.3, 0.15, 0.05
  logits = np.log(probs).astype(np.float32)
  kept = lambda p: np.isfinite(np.asarray(sampling_lib.filter_top_p(logits, p)))[0]
  np.testing.assert_array_equal(kept(0.4), [False, True, False, False])
  np.testing.assert_array_equal(kept(0.75), [False, True, False, True])
  np.testing.assert_array_equal(kept(0.9), [False, True, True, True])
  np.testing.assert_array_equal(kept(1.0), [True, True, True, True])
  # Kept logits are unchanged; sampling only ever picks kept tokens.
  filtered = np.asarray(sampling_lib.filter_top_p(logits, 0.75))
  np.testing.assert_array_equal(filtered[0, [1, 3]], logits[0, [1, 3]])
  config = SamplingConfig(temperature=1.0, top_p=0.75)
  draws = np.asarray(jax.vmap(lambda key: sampling_lib.sample(logits, key, config))(
      jax.random.split(jax.random.PRNGKey(0), 64)))
  assert set(draws.ravel().tolist()) == {1, 3}


def test_top_k_filter_and_config_errors():
  logits = np.array([[1.0, 4.0, 3.0, 2.0]], np.float32)
  out = np.asarray(sampling_lib.filter_top_k(logits, 2))
  np.testing.assert_array_equal(np.isfinite(out), [[False, True, True, False]])
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    SamplingConfig(temperature=-1.0)


def test_errors_name_the_argument():
  generator = _generator(CONFIGS["learned_gqa"])
  with pytest.raises(ValueError, match="max_length=64"):
    generator.generate_tokens([[3] * 60], max_new_tokens=10)
  with pytest.raises(ValueError, match="empty"):
    generator.generate_tokens([[3], []], max_new_tokens=2)
  wrong_r = HashRetriever(r=3 * M)
  with pytest.raises(ValueError, match="r=8"):
    generator.generate_tokens([[3] * 5], max_new_tokens=2, neighbors=LiveNeighbors(wrong_r))
  assert bucket_length(5, 4) == 8 and bucket_length(64, 64) == 64
  assert bucket_length(17 * 64, 64) == 32 * 64


@pytest.mark.parametrize("name", ["rope_mha", "learned_gqa"])
def test_one_query_attention_reducing_in_the_cache_layout_equals_full_forward(
    name, monkeypatch):
  # Large caches take the multiply + reduce path (layers.ONE_QUERY_REDUCE_MIN); force it
  # here, with live retrieval so that the CCA caches take it too.
  from retro_jax.models import layers  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(layers, "ONE_QUERY_REDUCE_MIN", 0)
  _check_against_full_forward(CONFIGS[name], [1, 8, 3, 7], 9, True)


@pytest.mark.slow
def test_bfloat16_decoding_equals_the_bfloat16_full_forward():
  # bf16 compute takes XLA:CPU's own paths on CPU (layers.matmul: float32 accumulation,
  # a single row padded to two; caches held in float32, decoding.cache_dtype): the
  # logits stay those of the bf16 full pass, to bf16 precision, batch 1 and batched.
  config = small_config(dtype="bfloat16")
  for lengths in ([5], [1, 8, 3, 7]):
    _check_against_full_forward(config, lengths, 9, True, tolerance=0.05)
  cache_dtype = decoding.cache_dtype(jax.numpy.bfloat16)
  assert cache_dtype == (np.float32 if jax.default_backend() == "cpu"
                         else jax.numpy.bfloat16)


def test_matrices_held_in_the_compute_dtype_give_bit_identical_logits():
  # The generator holds kernels and embedding tables in bf16 for bf16 compute
  # (decoding.params_for_decoding): every use casts them anyway, so the full pass (every
  # module: learned positions, encoder, CCA, untied output) is unchanged to the bit,
  # while norm scales and biases stay float32 (norms compute in float32).
  config = small_config(dtype="bfloat16", position_embedding="learned", use_bias=True,
                        tie_embeddings=False, encoder_position_embedding="learned")
  params = _params(config)
  held = decoding.params_for_decoding(params, config.compute_dtype)
  leaves = jax.tree_util.tree_leaves_with_path(held)
  assert {str(leaf.dtype) for _, leaf in leaves if leaf.ndim >= 2} == {"bfloat16"}
  assert {str(leaf.dtype) for _, leaf in leaves if leaf.ndim < 2} == {"float32"}
  prompts = _prompts([4, 8])
  tokens = np.asarray([p[:4] * 2 for p in prompts], np.int32)
  neighbors = np.random.RandomState(0).randint(2, VOCAB, (2, 2, 2, 2 * M)).astype(np.int32)
  apply = jax.jit(lambda p: Retro(config).apply({"params": p}, tokens, neighbors))
  np.testing.assert_array_equal(np.asarray(apply(held)), np.asarray(apply(params)))
  # Narrower weights than the compute dtype (param_dtype chosen for memory) stay.
  bf16 = jax.tree_util.tree_map(lambda leaf: leaf.astype(jax.numpy.bfloat16), params)
  held = decoding.params_for_decoding(bf16, jax.numpy.float32)
  assert {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(held)} == {"bfloat16"}
