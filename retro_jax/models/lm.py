"""The language model around the pure ``Retro`` module (t5x's ``BaseTransformerModel``).

The one place that knows the model's contract with training, evaluation, inference
and the converters: which parameters are Retro's, what a batch holds, the loss and its
weights, and how parameters are initialised (abstractly, or directly into their
shardings through ``retro_jax.models.partitioning``).

Parameters: a Retro tree is a GPT decoder plus the parameters that retro-fitting adds,
those with a name in ``RETRO_PARAM_NAMES`` on their path (the Retro encoder, CCA and
the norms in front of CCA). A GPT checkpoint holds the decoder alone.

Batches (one host's slice of the global batch, numpy; ``validate_batch``)::

    decoder_input_tokens   int32   [batch, n]
    decoder_target_tokens  int32   [batch, n]      (the next token of each input)
    decoder_loss_weights   float32 [batch, n]
    neighbor_tokens        int32   [batch, n//m, k, r]   (Retro batches only)
    neighbor_mask          bool    [batch, n//m, k]      (Retro batches only)

Loss: weighted sums over tokens (``lm_loss_sums``): cross-entropy, z-loss, correct
predictions and the weight; callers divide by the weight of the whole batch.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from retro_jax.models import partitioning
from retro_jax.models.config import RetroConfig
from retro_jax.models.retro import Retro

RETRO_PARAM_NAMES = ("cca", "retro_encoder", "pre_cca_norm")
TOKEN_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")
NEIGHBOR_FEATURES = ("neighbor_tokens", "neighbor_mask")


# Which parameters are Retro's ------------------------------------------------------------


def is_retro_path(names: Iterable[Any]) -> bool:
  """Whether a parameter with these names on its path belongs to the Retro part."""
  return any(n in RETRO_PARAM_NAMES for n in names)


def _path_names(path) -> list[str]:
  """The names along a pytree key path (dict keys, attribute names, indices)."""
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
  return names


def param_groups(params: Any) -> Any:
  """'retro' or 'decoder' for every leaf of a parameter tree."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "retro" if is_retro_path(_path_names(path)) else "decoder", params)


def has_retro_params(params: Any) -> bool:
  """Whether a parameter tree holds the Retro part (a GPT tree does not)."""
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  return any(is_retro_path(_path_names(path)) for path, _ in paths)


def split_retro_params(params: Any) -> tuple[dict, dict]:
  """Splits a parameter tree into (decoder, retro-only) flat dicts keyed by tuples."""
  flat = traverse_util.flatten_dict(params)
  decoder = {k: v for k, v in flat.items() if not is_retro_path(k)}
  retro = {k: v for k, v in flat.items() if is_retro_path(k)}
  return decoder, retro


def replace_params(params: Any, replacement: Any) -> Any:
  """``params`` with the leaves that ``replacement`` (a tree of some of its paths) holds
  put in, e.g. a checkpoint's decoder into a fresh Retro tree."""
  merged = traverse_util.flatten_dict(params)
  for key, value in traverse_util.flatten_dict(replacement).items():
    merged[key] = value
  return traverse_util.unflatten_dict(merged)


def param_count(params: Any) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


# Batches and loss --------------------------------------------------------------------------


def validate_batch(batch: dict[str, np.ndarray], config: RetroConfig, retrieval: bool,
                   where: str = "batch") -> None:
  """Checks the features' presence, ranks, dtypes and agreement; names the culprit."""
  for key in TOKEN_FEATURES:
    if key not in batch:
      raise ValueError(f"{where}: missing feature {key!r} (has {sorted(batch)})")
  tokens = batch["decoder_input_tokens"]
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"{where}: decoder_input_tokens must be int [batch, n]; got "
                     f"{tokens.dtype}{list(tokens.shape)}")
  for key in TOKEN_FEATURES[1:]:
    if batch[key].shape != tokens.shape:
      raise ValueError(f"{where}: {key} has shape {list(batch[key].shape)}, expected "
                       f"{list(tokens.shape)} like decoder_input_tokens")
  if not retrieval:
    return
  for key in NEIGHBOR_FEATURES:
    if key not in batch:
      raise ValueError(f"{where}: a Retro run needs feature {key!r}; set retrieval=False "
                       "for a GPT run")
  b, n = tokens.shape
  nb = batch["neighbor_tokens"]
  expected = (b, n // config.chunk_length)
  if nb.ndim != 4 or nb.shape[:2] != expected or nb.shape[3] != config.neighbor_length:
    raise ValueError(f"{where}: neighbor_tokens has shape {list(nb.shape)}, expected "
                     f"[{b}, {n // config.chunk_length}, k, {config.neighbor_length}]")
  if batch["neighbor_mask"].shape != nb.shape[:3]:
    raise ValueError(f"{where}: neighbor_mask has shape {list(batch['neighbor_mask'].shape)}"
                     f", expected {list(nb.shape[:3])}")


def lm_loss_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                 z_loss: float = 0.0) -> dict[str, jax.Array]:
  """Weighted sums over tokens of cross-entropy, z-loss and accuracy.

  Args:
    logits: float32 [batch, n, vocab]; targets: int [batch, n]; weights: [batch, n].
  Returns:
    {'loss': sum w*CE, 'z_loss': sum w*z*logsumexp^2, 'correct': sum w*[argmax==t],
     'weight': sum w}.
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  ce = log_z - target_logit
  weights = weights.astype(jnp.float32)
  return {
      "loss": jnp.sum(ce * weights),
      "z_loss": jnp.sum(z_loss * jnp.square(log_z) * weights),
      "correct": jnp.sum((jnp.argmax(logits, -1) == targets) * weights),
      "weight": jnp.sum(weights),
  }


# Initialisation ------------------------------------------------------------------------------


def dummy_inputs(config: RetroConfig, batch: int = 1, num_chunks: int = 2
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Token and neighbor arrays that create every parameter when passed to ``init``."""
  tokens = np.zeros((batch, num_chunks * config.chunk_length), np.int32)
  neighbors = np.zeros((batch, num_chunks, config.num_neighbors, config.neighbor_length),
                       np.int32)
  return tokens, neighbors


class RetroLM:
  """``Retro(config)`` with its batch contract, loss and initialisation.

  Args:
    config: the architecture.
    retrieval: whether batches carry neighbors and the forward pass reads them.
    retro_params: whether the parameter tree holds the encoder and CCA (default:
      ``retrieval``). A Retro tree run without retrieval is InstructRetro's SFT of the
      decoder of a Retro model, at the cost of its GPT decoder.
  """

  def __init__(self, config: RetroConfig, *, retrieval: bool = True,
               retro_params: Optional[bool] = None):
    self.config = config
    self.module = Retro(config)
    self.retrieval = retrieval
    self.retro_params = retrieval if retro_params is None else retro_params
    if retrieval and not self.retro_params:
      raise ValueError("RetroLM: retrieval=True needs retro_params (encoder and CCA)")

  # Parameters ------------------------------------------------------------------------

  def init_boxed(self, rng: jax.Array) -> dict:
    """Fresh parameters, boxed with their logical axes (``nn.unbox`` gives arrays,
    ``nn.get_partition_spec`` the axes); the decoder's alone without retro_params."""
    tokens, neighbors = dummy_inputs(self.config)
    return self.module.init(rng, tokens, neighbors if self.retro_params else None)["params"]

  def sharded_abstract_params(self, mesh: Mesh,
                              rules: Sequence[tuple[str, Any]] = partitioning.LOGICAL_AXIS_RULES
                              ) -> tuple[Any, Any]:
    """``(abstract, shardings)`` of the parameters on ``mesh``: ``jax.ShapeDtypeStruct``
    leaves carrying their shardings (to restore a checkpoint into)."""
    return partitioning.sharded_abstract(self.init_boxed, mesh, rules)

  # Batches and loss ------------------------------------------------------------------

  def validate_batch(self, batch: dict[str, np.ndarray], where: str = "batch") -> None:
    validate_batch(batch, self.config, self.retrieval, where)

  def logits(self, params: Any, batch: dict, rng: Optional[jax.Array] = None) -> jax.Array:
    """float32 [batch, n, vocab]; ``rng`` (dropout) makes it a training forward pass."""
    deterministic = rng is None
    neighbors = batch["neighbor_tokens"] if self.retrieval else None
    mask = batch["neighbor_mask"] if self.retrieval else None
    return self.module.apply({"params": params}, batch["decoder_input_tokens"], neighbors,
                             neighbor_mask=mask, deterministic=deterministic,
                             rngs=None if deterministic else {"dropout": rng})

  def loss_sums(self, params: Any, batch: dict, *, z_loss: float = 0.0,
                rng: Optional[jax.Array] = None) -> dict:
    """``lm_loss_sums`` of a batch; ``rng`` (dropout) makes it a training forward pass."""
    return lm_loss_sums(self.logits(params, batch, rng), batch["decoder_target_tokens"],
                        batch["decoder_loss_weights"], z_loss)

  def class_loss_sums(self, params: Any, batch: dict, weights: jax.Array) -> dict:
    """``lm_loss_sums`` of one forward pass under several weightings [classes, batch, n];
    each sum has a leading [classes] axis."""
    logits = self.logits(params, batch)
    return jax.vmap(lambda w: lm_loss_sums(logits, batch["decoder_target_tokens"], w)
                    )(weights)


def init_params(config: RetroConfig, rng: jax.Array) -> dict:
  """Plain (unboxed) parameter pytree of a freshly initialised Retro model."""
  return nn.unbox(RetroLM(config).init_boxed(rng))


def abstract_params(config: RetroConfig, retrieval: bool = True) -> dict:
  """The parameter tree's shapes and dtypes (``jax.ShapeDtypeStruct``, boxed with their
  logical axes) without allocating it; ``retrieval=False``: the decoder's alone."""
  return jax.eval_shape(RetroLM(config, retrieval=retrieval).init_boxed,
                        jax.random.PRNGKey(0))
