"""Optimiser: AdamW with warmup + cosine/linear/constant decay, clipping, decay masks.

Retro parameters are split in two groups (``retro_jax.models.lm.param_groups``):
``retro`` (the Retro encoder, CCA and the norms in front of CCA: what retro-fitting
adds) and ``decoder`` (everything a GPT checkpoint has). Per group one may scale the
learning rate or freeze it:

* ``trainable='all'``: InstructRetro retro-fitting (decoder unfrozen) and pretraining.
* ``trainable='retro'``: the original RETRO "retrofitting" with a frozen decoder.
* ``trainable='decoder'``: InstructRetro SFT (encoder and CCA untouched, not even by
  weight decay).

Weight decay applies to matrices (kernels, embeddings), not to biases and norm scales.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import gin
import jax
import optax

from retro_jax.models.lm import param_groups

_TRAINABLE = ("all", "decoder", "retro")
_SCHEDULES = ("cosine", "linear", "constant")


def decay_mask(params: Any) -> Any:
  """True for leaves that get weight decay: matrices and embeddings (ndim >= 2)."""
  return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW settings (Megatron InstructRetro retro-fit: lr 9e-6 -> 9e-7 cosine, betas
  (0.9, 0.95), wd 0.1, clip 1.0).

  Attributes:
    learning_rate: Peak learning rate.
    warmup_steps: Linear warmup from 0.
    decay_steps: Steps of the decay phase after warmup; None = the run's train steps.
    schedule: 'cosine', 'linear' or 'constant' after warmup.
    min_learning_rate_ratio: Final learning rate / peak.
    b1, b2, eps: Adam moments.
    weight_decay: Decoupled weight decay (on matrices only).
    grad_clip_norm: Global-norm clipping; 0 disables.
    trainable: 'all', 'decoder' (freeze encoder + CCA) or 'retro' (freeze decoder).
    retro_lr_multiplier: Learning-rate factor for the retro group (new parameters).
  """

  learning_rate: float = 3e-4
  warmup_steps: int = 100
  decay_steps: Optional[int] = None
  schedule: str = "cosine"
  min_learning_rate_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip_norm: float = 1.0
  trainable: str = "all"
  retro_lr_multiplier: float = 1.0

  def __post_init__(self):
    if self.trainable not in _TRAINABLE:
      raise ValueError(f"OptimizerConfig.trainable={self.trainable!r}: must be one of "
                       f"{_TRAINABLE}")
    if self.schedule not in _SCHEDULES:
      raise ValueError(f"OptimizerConfig.schedule={self.schedule!r}: must be one of "
                       f"{_SCHEDULES}")
    if self.learning_rate < 0 or self.warmup_steps < 0:
      raise ValueError("OptimizerConfig.learning_rate and warmup_steps must be >= 0")


def learning_rate_schedule(config: OptimizerConfig, train_steps: int) -> optax.Schedule:
  peak = config.learning_rate
  end = peak * config.min_learning_rate_ratio
  decay = config.decay_steps or max(1, train_steps - config.warmup_steps)
  if config.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay, alpha=config.min_learning_rate_ratio)
  elif config.schedule == "linear":
    after = optax.linear_schedule(peak, end, decay)
  else:
    after = optax.constant_schedule(peak)
  if config.warmup_steps == 0:
    return after
  warmup = optax.linear_schedule(0.0, peak, config.warmup_steps)
  return optax.join_schedules([warmup, after], [config.warmup_steps])


def frozen_groups(config: OptimizerConfig) -> dict[str, bool]:
  """Which parameter groups (``param_groups`` labels) ``config.trainable`` freezes."""
  return {"decoder": config.trainable == "retro", "retro": config.trainable == "decoder"}


def stop_frozen_gradients(config: OptimizerConfig, params: Any) -> Any:
  """``params`` with ``jax.lax.stop_gradient`` on the frozen groups' leaves.

  Differentiating through this, the gradients of frozen weights are symbolic zeros:
  their weight-gradient matmuls (the tied logits, every frozen layer's kernels, the
  embedding scatter) are never computed, while activation gradients still flow through
  frozen layers to the trainable ones below them. The optimizer zeroes frozen groups'
  gradients anyway; this only saves their cost.
  """
  frozen = frozen_groups(config)
  if not any(frozen.values()):
    return params
  return jax.tree_util.tree_map(
      lambda x, group: jax.lax.stop_gradient(x) if frozen[group] else x,
      params, param_groups(params))


def make_optimizer(config: OptimizerConfig, train_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer, learning-rate schedule of the decoder group)."""
  schedule = learning_rate_schedule(config, train_steps)

  def adamw(multiplier: float) -> optax.GradientTransformation:
    lr = schedule if multiplier == 1.0 else (lambda step: multiplier * schedule(step))
    return optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps,
                       weight_decay=config.weight_decay, mask=decay_mask)

  frozen = frozen_groups(config)
  # Frozen gradients are zeroed before clipping, so they do not shrink the others.
  chain = [optax.multi_transform(
      {g: optax.set_to_zero() if frozen[g] else optax.identity() for g in frozen},
      param_groups)]
  if config.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  multipliers = {"decoder": 1.0, "retro": config.retro_lr_multiplier}
  chain.append(optax.multi_transform(
      {g: optax.set_to_zero() if frozen[g] else adamw(multipliers[g]) for g in frozen},
      param_groups))
  return optax.chain(*chain), schedule
