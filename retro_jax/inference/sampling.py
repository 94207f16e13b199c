"""Next-token selection: greedy, temperature, top-k and top-p (nucleus) sampling.

    tokens = sample(logits, rng, SamplingConfig(temperature=0.7, top_p=0.9))

* ``temperature == 0``: greedy (argmax; the lowest id among ties), no randomness.
* ``temperature > 0``: sample from ``softmax(logits / temperature)`` after the filters:
  - ``top_k > 0`` keeps the ``top_k`` highest logits (and any tied with the k-th);
  - ``top_p < 1`` keeps the smallest set of highest-probability tokens whose total
    probability reaches ``top_p``: token i of the descending order is kept iff the
    probability of the tokens before it is < ``top_p`` (the most likely token is
    always kept). top-k applies first, top-p to what remains (as HF transformers).

Pure functions of (logits, key): jit them with the step; a seed reproduces a run.
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp

Array = jax.Array


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is chosen (see the module docstring).

  Attributes:
    temperature: 0 = greedy; > 0 divides the logits before sampling.
    top_k: keep the k most likely tokens (0 = no top-k filter).
    top_p: nucleus mass in (0, 1] (1 = no top-p filter).
    seed: PRNG seed of the run (step i uses ``fold_in(PRNGKey(seed), i)``).
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"SamplingConfig.temperature={self.temperature}: must be >= 0")
    if self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k={self.top_k}: must be >= 0 (0 = off)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingConfig.top_p={self.top_p}: must be in (0, 1]")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def filter_top_k(logits: Array, k: int) -> Array:
  """logits [..., vocab] with all but the k largest (and ties with the k-th) at -inf."""
  if k <= 0 or k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits >= kth, logits, -jnp.inf)


def filter_top_p(logits: Array, p: float) -> Array:
  """logits [..., vocab] outside the top-p nucleus at -inf (see the module docstring)."""
  if p >= 1.0:
    return logits
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = mass_before < p
  keep_sorted = keep_sorted.at[..., 0].set(True)
  # Back to vocabulary order: scatter the sorted decisions through the permutation.
  keep = jnp.zeros_like(keep_sorted).at[
      tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(keep_sorted)
  return jnp.where(keep, logits, -jnp.inf)


def sample(logits: Array, rng: Array, config: SamplingConfig) -> Array:
  """float logits [batch, vocab] -> int32 tokens [batch]."""
  logits = logits.astype(jnp.float32)
  if config.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / config.temperature
  logits = filter_top_k(logits, config.top_k)
  logits = filter_top_p(logits, config.top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
