"""Retro model: RETRO semantics (CCA shift, gating), shapes, sharding, golden numbers."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from retro_jax.models import Retro, RetroConfig, default_cca_layers, init_params, param_count
from retro_jax.models import cca
from retro_jax.models import layers
from retro_jax.models import lm
from retro_jax.models import partitioning

M = 4  # chunk length of the small test models


def small_config(**overrides) -> RetroConfig:
  fields = dict(vocab_size=61, hidden_size=32, num_layers=4, num_heads=4, mlp_dim=64,
                chunk_length=M, num_neighbors=2, cca_layers=(1, 3), encoder_dropout_rate=0.0)
  fields.update(overrides)
  return RetroConfig(**fields)


@functools.lru_cache(maxsize=None)
def _params(config: RetroConfig):
  return init_params(config, jax.random.PRNGKey(0))


def _apply(config, tokens, neighbors=None, *, jit=True, **kw):
  """Logits as numpy. ``jit=False`` runs op by op: two different jitted programs may
  fuse (and so round) differently, so bitwise claims are checked eagerly."""
  fn = functools.partial(Retro(config).apply, **kw)
  if jit:
    fn = jax.jit(fn)
  return np.asarray(fn({"params": _params(config)}, tokens, neighbors))


def _inputs(batch, n, k=2, config=None, seed=0):
  config = config or small_config()
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, config.vocab_size, (batch, n)).astype(np.int32)
  neighbors = rng.randint(0, config.vocab_size,
                          (batch, n // config.chunk_length, k, config.neighbor_length)
                          ).astype(np.int32)
  return tokens, neighbors


# The CCA shift ------------------------------------------------------------------------


def test_token_to_neighbor_chunk_map_matches_megatron():
  m = 64
  t = np.arange(200)
  j = cca.neighbor_chunk_of_token(t, m)
  assert (j[:63] == -1).all()           # tokens 0..m-2 see nothing
  assert j[63] == 0 and j[126] == 0     # last token of chunk 0 .. token m-2 of chunk 1
  assert j[127] == 1                    # last token of chunk 1 sees chunk 1
  # Megatron: pad = (ns - 1) % m = 63 for a training sequence.
  assert (2048 - 1) % m == 63


def test_query_chunk_layout_roundtrip():
  m, n = 4, 14  # 3 complete chunks and a partial one
  x = jnp.arange(n)[None, :, None].astype(jnp.float32) + 1.0
  q = cca.tokens_to_query_chunks(x, m, n // m)
  assert q.shape == (1, 3, 4, 1)
  np.testing.assert_array_equal(q[0, :, :, 0], [[4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 0]])
  back = cca.query_chunks_to_tokens(q, n)
  expected = np.concatenate([np.zeros(m - 1), np.arange(m - 1, n) + 1.0])
  np.testing.assert_array_equal(back[0, :, 0], expected)


@pytest.mark.slow
@pytest.mark.parametrize("n", [16, 18])  # a multiple of m, and a trailing partial chunk
def test_causality_tokens_and_neighbors(n):
  """Position i never depends on tokens > i nor on neighbors that are not causal for i;
  and it does depend on chunk j's neighbors from the first allowed token on."""
  config = small_config()
  tokens, neighbors = _inputs(1, n)
  num_chunks = n // M
  base = _apply(config, tokens, neighbors)

  for p in range(0, n, 3):
    changed = tokens.copy()
    changed[0, p] = (changed[0, p] + 1) % config.vocab_size
    out = _apply(config, changed, neighbors)
    np.testing.assert_array_equal(out[0, :p], base[0, :p])
    assert np.abs(out[0, p:] - base[0, p:]).max(axis=-1).min() > 0

  for j in range(num_chunks):
    changed = neighbors.copy()
    changed[0, j] = (changed[0, j] + 7) % config.vocab_size
    out = _apply(config, tokens, changed)
    first = (j + 1) * M - 1  # the last token of chunk j
    np.testing.assert_array_equal(out[0, :first], base[0, :first])
    assert np.abs(out[0, first] - base[0, first]).max() > 1e-6
    # Deeper tokens see chunk j's neighbors through later layers' self-attention.
    assert np.abs(out[0, first:] - base[0, first:]).max(axis=-1).min() > 0


@pytest.mark.slow
def test_causality_gradient_wrt_neighbor_embeddings():
  """d logits[i] / d (embedded neighbors of chunk j) is exactly zero when j is not causal
  for i, and nonzero for i's own causal chunk."""
  config = small_config()
  n = 16
  tokens, neighbors = _inputs(1, n)
  params = _params(config)

  def forward(neighbor_delta):
    # Adds neighbor_delta [1, L, k, r, d] to the embedded neighbors (the 4-D lookup of
    # the shared embedding), leaving the token embeddings untouched.
    def intercept(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if (context.module.name == "token_embedding" and context.method_name == "__call__"
          and args[0].ndim == 4):
        out = out + neighbor_delta
      return out
    with nn.intercept_methods(intercept):
      return Retro(config).apply({"params": params}, tokens, neighbors)

  delta = jnp.zeros(neighbors.shape + (config.hidden_size,))
  logits, vjp = jax.vjp(forward, delta)
  for i in (0, M - 2, M - 1, 2 * M - 1, n - 1):
    (grad,) = vjp(jnp.zeros_like(logits).at[0, i].set(1.0))
    grad_per_chunk = np.abs(np.asarray(grad[0])).reshape(n // M, -1).max(axis=1)
    causal_chunk = cca.neighbor_chunk_of_token(i, M)
    for j in range(n // M):
      if j > causal_chunk:
        assert grad_per_chunk[j] == 0.0, (i, j)
    if causal_chunk >= 0:
      assert grad_per_chunk[causal_chunk] > 0.0, i


# Gating ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_retrieval_off_equals_gpt_decoder_exactly():
  config = small_config()
  tokens, neighbors = _inputs(2, 18)
  gpt = _apply(config, tokens, None, jit=False)
  assert np.isfinite(gpt).all()
  for mask_shape in ((2,), (2, 4), (2, 4, 2)):
    off = _apply(config, tokens, neighbors, neighbor_mask=np.zeros(mask_shape, bool),
                 jit=False)
    np.testing.assert_array_equal(off, gpt)
    jitted = _apply(config, tokens, neighbors, neighbor_mask=np.zeros(mask_shape, bool))
    np.testing.assert_allclose(jitted, gpt, atol=1e-6, rtol=0)
  on = _apply(config, tokens, neighbors)
  assert np.abs(on - gpt).max() > 1e-4


@pytest.mark.slow
def test_per_example_and_per_chunk_masks():
  config = small_config()
  tokens, neighbors = _inputs(2, 16)
  gpt = _apply(config, tokens, None, jit=False)
  on = _apply(config, tokens, neighbors)
  # Example 0 off, example 1 on.
  mixed = _apply(config, tokens, neighbors, neighbor_mask=np.array([False, True]), jit=False)
  np.testing.assert_array_equal(mixed[0], gpt[0])
  np.testing.assert_allclose(mixed[1], on[1], atol=1e-6)
  # A masked chunk's neighbor tokens do not matter.
  mask = np.ones((2, 4), bool)
  mask[:, 2] = False
  scrambled = neighbors.copy()
  scrambled[:, 2] = 0
  np.testing.assert_array_equal(
      _apply(config, tokens, neighbors, neighbor_mask=mask),
      _apply(config, tokens, scrambled, neighbor_mask=mask))


def test_masked_neighbor_equals_fewer_neighbors():
  """Masking neighbor 1 of every chunk is the same as retrieving only neighbor 0."""
  config = small_config()
  tokens, neighbors = _inputs(1, 16)
  mask = np.zeros((1, 4, 2), bool)
  mask[..., 0] = True
  masked = _apply(config, tokens, neighbors, neighbor_mask=mask)
  single = _apply(config, tokens, neighbors[:, :, :1])
  np.testing.assert_allclose(masked, single, atol=1e-5)


# Errors ---------------------------------------------------------------------------------


def test_shape_errors_name_argument_and_expected_shape():
  config = small_config()
  params = {"params": _params(config)}
  tokens, neighbors = _inputs(2, 16)
  model = Retro(config)
  with pytest.raises(ValueError, match=r"tokens must be int \[batch, n\]"):
    model.apply(params, tokens[0])
  with pytest.raises(ValueError, match=r"neighbor_tokens has shape \[2, 3, 2, 8\]; "
                     r"expected \[batch=2, n//m=4, k, r=8\]"):
    model.apply(params, tokens, neighbors[:, :3])
  with pytest.raises(ValueError, match=r"neighbor_tokens must be int"):
    model.apply(params, tokens, neighbors[..., 0])
  with pytest.raises(ValueError, match=r"neighbor_mask has shape \[2, 3\]"):
    model.apply(params, tokens, neighbors, neighbor_mask=np.ones((2, 3), bool))


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match=r"RetroConfig.num_kv_heads=3"):
    RetroConfig(num_heads=4, num_kv_heads=3, hidden_size=32)
  with pytest.raises(ValueError, match=r"RetroConfig.cca_layers=\(0,\)"):
    RetroConfig(num_layers=4, cca_layers=(0,))
  with pytest.raises(ValueError, match=r"RetroConfig.norm_type='batchnorm'"):
    RetroConfig(norm_type="batchnorm")


# Golden numbers -----------------------------------------------------------------------


def test_default_cca_schedule():
  assert default_cca_layers(12) == (6, 9, 12)
  assert default_cca_layers(24) == (9, 12, 15, 18, 21, 24)
  assert default_cca_layers(32) == tuple(range(9, 31, 3)) and len(default_cca_layers(32)) == 8
  assert len(default_cca_layers(48)) == 14


def test_megatron_golden_cca_parameter_count():
  """Megatron tests/unit_tests/transformer/test_retro_attention.py: 12 layers, h=16,
  4 heads, k=2, m=4, r=8, biases: the decoder CCA module with its 2-layer encoder has
  8768 parameters, the encoder cross-attention 1088, an encoder norm 32."""
  config = RetroConfig(vocab_size=32, hidden_size=16, num_layers=12, num_heads=4,
                       mlp_dim=64, use_bias=True, chunk_length=4, num_neighbors=2,
                       position_embedding="learned", max_length=32)
  assert config.first_retro_layer == 6
  params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  first = params["layers_5"]
  assert param_count(first["cca"]) + param_count(first["retro_encoder"]) == 8768
  encoder0 = first["retro_encoder"]["layers_0"]
  assert param_count(encoder0["cross_attention"]) == 1088
  assert param_count(encoder0["pre_mlp_norm"]) == 32
  assert "retro_encoder" not in params["layers_8"]


# The wrapper's parameter facts ----------------------------------------------------------------


def test_retro_params_are_exactly_what_the_gpt_tree_lacks():
  """split/groups/has agree with the module: the decoder part of a Retro tree is the
  GPT tree (same paths, shapes), the Retro part is non-empty and holds the encoder and
  CCA of every CCA layer."""
  config = small_config(mlp_gated=True, tie_embeddings=False)
  retro_tree = nn.unbox(lm.abstract_params(config))
  gpt_tree = nn.unbox(lm.abstract_params(config, retrieval=False))
  decoder, retro = lm.split_retro_params(retro_tree)
  gpt = traverse_util.flatten_dict(gpt_tree)
  assert {k: v.shape for k, v in decoder.items()} == {k: v.shape for k, v in gpt.items()}
  assert {k[0] for k in retro} == {f"layers_{i - 1}" for i in config.retro_layers}
  assert any("retro_encoder" in k for k in retro)
  groups = traverse_util.flatten_dict(lm.param_groups(retro_tree))
  assert {k for k, g in groups.items() if g == "retro"} == set(retro)
  assert lm.has_retro_params(retro_tree) and not lm.has_retro_params(gpt_tree)
  merged = lm.replace_params(retro_tree, traverse_util.unflatten_dict(
      {k: "gpt" for k in gpt}))
  assert {k for k, v in traverse_util.flatten_dict(merged).items() if v == "gpt"} == set(gpt)


def test_retro_lm_needs_retro_params_for_retrieval():
  with pytest.raises(ValueError, match="retrieval=True needs retro_params"):
    lm.RetroLM(small_config(), retrieval=True, retro_params=False)
  assert lm.RetroLM(small_config(), retrieval=False).retro_params is False
  assert lm.RetroLM(small_config(), retrieval=False, retro_params=True).retro_params


# Options ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    dict(norm_type="rmsnorm", mlp_gated=True, mlp_activation="silu", num_kv_heads=2,
         tie_embeddings=False),
    dict(position_embedding="learned", encoder_position_embedding="learned", max_length=32,
         use_bias=True),
    dict(norm_zero_centered_gamma=True, rotary_fraction=0.5, encoder_hidden_size=16,
         encoder_num_heads=2, encoder_position_embedding="rope", remat_policy="full"),
])
@pytest.mark.slow
def test_architecture_options_run_and_gate(overrides):
  config = small_config(**overrides)
  tokens, neighbors = _inputs(2, 16)
  gpt = _apply(config, tokens, None, jit=False)
  on = _apply(config, tokens, neighbors)
  off = _apply(config, tokens, neighbors, neighbor_mask=np.zeros((2,), bool), jit=False)
  assert np.isfinite(on).all()
  np.testing.assert_array_equal(off, gpt)
  assert np.abs(on - gpt).max() > 1e-5


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params():
  config = small_config(dtype="bfloat16")
  params = _params(config)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  tokens, neighbors = _inputs(2, 16)
  out = _apply(config, tokens, neighbors)
  ref = _apply(small_config(), tokens, neighbors)
  assert out.dtype == np.float32 and np.isfinite(out).all()
  assert np.abs(out - ref).max() < 0.1


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("transpose_w", [False, True])
def test_matmul_in_bfloat16_is_the_rounded_float32_product(rows, transpose_w):
  # On CPU bf16 takes its own path (float32 accumulation, one row padded to two): the
  # result is the float32 product of the bf16 operands, rounded once to bf16.
  rng = np.random.RandomState(rows)
  x = rng.normal(size=(rows, 48)).astype(np.float32)
  w = rng.normal(size=(48, 40)).astype(np.float32)
  y = jax.jit(lambda x, w: layers.matmul(x, w.T if transpose_w else w, jnp.bfloat16,
                                         transpose_w=transpose_w))(x, w)
  assert y.shape == (rows, 40) and y.dtype == jnp.bfloat16
  bf = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))
  want = bf(bf(x) @ bf(w))
  np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2 ** -7, atol=1e-6)


@pytest.mark.slow
def test_remat_matches_no_remat_gradients():
  tokens, neighbors = _inputs(2, 16)
  grads = []
  for policy in ("none", "dots"):
    config = small_config(remat_policy=policy)
    params = _params(small_config())

    def loss(p):
      return Retro(config).apply({"params": p}, tokens, neighbors).mean()

    grads.append(jax.jit(jax.grad(loss))(params))
  for a, b in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1])):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_dropout_is_active_only_when_not_deterministic():
  config = small_config(dropout_rate=0.5, encoder_dropout_rate=0.5)
  tokens, neighbors = _inputs(1, 16)
  params = {"params": _params(config)}
  model = Retro(config)
  a = model.apply(params, tokens, neighbors, deterministic=False,
                  rngs={"dropout": jax.random.PRNGKey(1)})
  b = model.apply(params, tokens, neighbors, deterministic=False,
                  rngs={"dropout": jax.random.PRNGKey(2)})
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
  np.testing.assert_array_equal(model.apply(params, tokens, neighbors),
                                model.apply(params, tokens, neighbors))


# Sharding -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_sharded_mesh_matches_single_device():
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  config = small_config(num_kv_heads=2, mlp_gated=True, mlp_activation="silu",
                        tie_embeddings=False, vocab_size=64)
  mesh = partitioning.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  variables, shardings = partitioning.sharded_init(
      lambda r: Retro(config).init(r, *_inputs(1, 8, config=config)), jax.random.PRNGKey(0),
      mesh)
  flat = traverse_util.flatten_dict(shardings["params"], sep="/")
  assert flat["layers_0/self_attention/query/kernel"].spec == P("fsdp", "tensor", None)
  assert flat["layers_0/mlp/wo/kernel"].spec == P("tensor", "fsdp")
  assert flat["token_embedding/embedding"].spec == P("tensor", "fsdp")
  query = variables["params"]["layers_0"]["self_attention"]["query"]["kernel"]
  assert len(query.addressable_shards) == 8
  assert query.addressable_shards[0].data.shape == (16, 2, 8)

  tokens, neighbors = _inputs(4, 16, config=config)
  with partitioning.activation_sharding(mesh):
    sharded = jax.jit(lambda v, t, nb: Retro(config).apply(v, t, nb))(variables, tokens,
                                                                        neighbors)
  single = Retro(config).apply(jax.device_get(variables), tokens, neighbors)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5)


def test_mesh_shape_resolution():
  assert partitioning.resolve_mesh_shape({"data": -1, "tensor": 2}, 8) == {
      "data": 4, "fsdp": 1, "tensor": 2}
  with pytest.raises(ValueError, match="needs 6 devices"):
    partitioning.resolve_mesh_shape({"data": 3, "tensor": 2}, 8)
  with pytest.raises(ValueError, match="unknown axes"):
    partitioning.resolve_mesh_shape({"model": 2}, 8)
