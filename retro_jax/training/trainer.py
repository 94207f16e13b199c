"""The sharded train and eval steps and the training loop.

Batches come from a *batch source*: any object with ``get_batch(step) -> dict`` that
returns this host's slice of the global batch for ``step`` as numpy arrays, a pure
function of the step (so a resumed run sees exactly the batches of an uninterrupted
one, and resuming never replays the stream). Their features, the loss and the
initialisation are the model's (``retro_jax.models.lm.RetroLM``).

The train step is jitted with explicit in/out shardings over a (data, fsdp, tensor)
mesh (``retro_jax.models.partitioning``); the state is donated. Gradient
accumulation splits the batch into micro-batches inside the step (``lax.scan``) and
normalises by the token count of the whole batch, so it equals the unsplit step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from retro_jax.models import RetroConfig, RetroLM
from retro_jax.models import partitioning
from retro_jax.models.flops import count_flops, peak_tflops
from retro_jax.models.lm import NEIGHBOR_FEATURES, TOKEN_FEATURES
from retro_jax.training.optimizers import OptimizerConfig, make_optimizer, stop_frozen_gradients
from retro_jax.utils.compilation import forward_compiler_options


class BatchSource(Protocol):

  def get_batch(self, step: int) -> dict[str, np.ndarray]:
    ...


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def batch_to_global(batch: dict[str, np.ndarray], sharding: NamedSharding,
                    retrieval: bool) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays sharded over the batch axes."""
  keys = TOKEN_FEATURES + (NEIGHBOR_FEATURES if retrieval else ())
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
          for k in keys}


def summarize_eval_sums(totals: dict[str, float]) -> dict[str, float]:
  weight = max(totals.get("weight", 0.0), 1.0)
  loss = totals.get("loss", 0.0) / weight
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
          "accuracy": totals.get("correct", 0.0) / weight,
          "tokens": totals.get("weight", 0.0)}


class Evaluator:
  """Held-out loss / perplexity of a model over a batch source (jitted once)."""

  def __init__(self, config: RetroConfig, mesh: jax.sharding.Mesh, param_shardings: Any, *,
               retrieval: bool, rules=partitioning.LOGICAL_AXIS_RULES):
    self.config, self.mesh, self.rules, self.retrieval = config, mesh, rules, retrieval
    self.lm = RetroLM(config, retrieval=retrieval)
    self.batch_sharding = partitioning.batch_sharding(mesh)
    options = forward_compiler_options()
    self._step = jax.jit(self.lm.loss_sums, in_shardings=(param_shardings,
                                                          self.batch_sharding),
                         compiler_options=options)
    self.class_weight_sharding = partitioning.batch_sharding(mesh, batch_dim=1)
    self._class_step = jax.jit(self.lm.class_loss_sums, in_shardings=(
        param_shardings, self.batch_sharding, self.class_weight_sharding),
                               compiler_options=options)

  def _scored_batches(self, source: BatchSource, num_batches: int):
    """The first ``num_batches`` batches, less those without a scored token (a source
    of one epoch pads past its end with such batches: their sums are all zero). On
    several processes every batch is scored, since each holds only its own rows."""
    for i in range(num_batches):
      batch = source.get_batch(i)
      if i == 0:
        self.lm.validate_batch(batch, "eval batch")
      if jax.process_count() == 1 and not np.any(batch["decoder_loss_weights"]):
        continue
      yield batch

  def evaluate(self, params: Any, source: BatchSource, num_batches: int) -> dict[str, float]:
    totals: dict[str, float] = {}
    for batch in self._scored_batches(source, num_batches):
      with partitioning.activation_sharding(self.mesh, self.rules):
        sums = self._step(params, batch_to_global(batch, self.batch_sharding, self.retrieval))
      for k, v in jax.device_get(sums).items():
        totals[k] = totals.get(k, 0.0) + float(v)
    return summarize_eval_sums(totals)

  def evaluate_classes(self, params: Any, source: BatchSource, num_batches: int,
                       classes: Mapping[str, Callable[[dict], np.ndarray]]
                       ) -> dict[str, dict[str, float]]:
    """``evaluate`` on classes of target tokens, one forward pass per batch.

    Args:
      classes: name -> ``mask_fn(batch) -> bool [batch, n]`` over the targets.
    Returns:
      name -> scores, plus ``'all'`` (every scored token, as ``evaluate``) and
      ``'other'`` (scored tokens in no class).
    """
    names = ["all", *classes, "other"]
    totals = {name: {} for name in names}
    for batch in self._scored_batches(source, num_batches):
      base = np.asarray(batch["decoder_loss_weights"], np.float32)
      masks = [np.asarray(fn(batch), bool) for fn in classes.values()]
      other = ~np.any(masks, axis=0) if masks else np.ones(base.shape, bool)
      weights = np.stack([base] + [base * m for m in masks] + [base * other])
      weights = jax.make_array_from_process_local_data(self.class_weight_sharding, weights)
      with partitioning.activation_sharding(self.mesh, self.rules):
        sums = jax.device_get(self._class_step(
            params, batch_to_global(batch, self.batch_sharding, self.retrieval), weights))
      for c, name in enumerate(names):
        for k, v in sums.items():
          totals[name][k] = totals[name].get(k, 0.0) + float(v[c])
    return {name: summarize_eval_sums(t) for name, t in totals.items()}


class Trainer:
  """Owns the model, optimizer, mesh, shardings and the jitted steps."""

  def __init__(self, model_config: RetroConfig, optimizer_config: OptimizerConfig, *,
               train_steps: int, mesh: jax.sharding.Mesh, retrieval: bool = True,
               retro_params: Optional[bool] = None,
               z_loss: float = 0.0, grad_accum_steps: int = 1, seed: int = 0,
               rules=partitioning.LOGICAL_AXIS_RULES):
    self.config = model_config
    # retro_params: the parameter tree holds the encoder and CCA (a Retro model) even
    # when the steps run without retrieval (InstructRetro's SFT; see ``RetroLM``).
    self.lm = RetroLM(model_config, retrieval=retrieval, retro_params=retro_params)
    self.mesh = mesh
    self.rules = rules
    self.retrieval = retrieval
    self.z_loss = z_loss
    self.grad_accum_steps = grad_accum_steps
    self.seed = seed
    self.optimizer_config = optimizer_config
    self.optimizer, self.schedule = make_optimizer(optimizer_config, train_steps)
    self.abstract_state, self.state_shardings = partitioning.sharded_abstract(
        self._init_boxed, mesh, rules)
    self.batch_sharding = partitioning.batch_sharding(mesh)
    self._train_step = None
    self._evaluator: Optional[Evaluator] = None

  # Initialisation -------------------------------------------------------------------

  def _init_boxed(self, rng: jax.Array) -> TrainState:
    params = self.lm.init_boxed(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.optimizer.init(params))

  def init_state(self, rng: Optional[jax.Array] = None) -> TrainState:
    """A fresh state, created directly in its shardings."""
    rng = jax.random.PRNGKey(self.seed) if rng is None else rng
    return partitioning.sharded_init(self._init_boxed, rng, self.mesh, self.rules,
                                     shardings=self.state_shardings)[0]

  def state_from_params(self, params: Any) -> TrainState:
    """A state at step 0 around given (sharded) parameters, with a fresh optimizer."""
    with partitioning.activation_sharding(self.mesh, self.rules):
      opt_state = jax.jit(self.optimizer.init,
                          out_shardings=self.state_shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state)

  # Steps ------------------------------------------------------------------------------

  def _train_step_fn(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    total_weight = jnp.maximum(jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32)), 1.0)
    step_rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), state.step)

    def micro_grads(params, micro, rng):
      def objective(p):
        p = stop_frozen_gradients(self.optimizer_config, p)
        sums = self.lm.loss_sums(p, micro, z_loss=self.z_loss, rng=rng)
        return (sums["loss"] + sums["z_loss"]) / total_weight, sums
      return jax.grad(objective, has_aux=True)(params)

    accum = self.grad_accum_steps
    if accum == 1:
      grads, sums = micro_grads(state.params, batch, step_rng)
    else:
      micro = jax.tree_util.tree_map(
          lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

      def body(carry, inputs):
        grads_acc, sums_acc = carry
        index, mb = inputs
        g, s = micro_grads(state.params, mb, jax.random.fold_in(step_rng, index))
        return (jax.tree_util.tree_map(jnp.add, grads_acc, g),
                jax.tree_util.tree_map(jnp.add, sums_acc, s)), None

      zeros_g = jax.tree_util.tree_map(jnp.zeros_like, state.params)
      zeros_s = {k: jnp.zeros((), jnp.float32) for k in ("loss", "z_loss", "correct", "weight")}
      (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_s), (jnp.arange(accum), micro))

    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(sums, grad_norm=optax.global_norm(grads),
                   param_norm=optax.global_norm(params),
                   learning_rate=self.schedule(state.step))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


  def train_step(self, state: TrainState, batch: dict[str, np.ndarray]
                 ) -> tuple[TrainState, dict]:
    if self._train_step is None:
      self.lm.validate_batch(batch, "train batch")
      b = batch["decoder_input_tokens"].shape[0]
      if b % self.grad_accum_steps:
        raise ValueError(f"grad_accum_steps={self.grad_accum_steps} must divide the "
                         f"per-host batch size {b}")
      self._train_step = jax.jit(self._train_step_fn,
                                 in_shardings=(self.state_shardings, self.batch_sharding),
                                 out_shardings=(self.state_shardings, None),
                                 donate_argnums=(0,))
    with partitioning.activation_sharding(self.mesh, self.rules):
      return self._train_step(state, batch_to_global(batch, self.batch_sharding,
                                                     self.retrieval))

  def evaluate(self, params: Any, source: BatchSource, num_batches: int) -> dict[str, float]:
    if self._evaluator is None:
      self._evaluator = Evaluator(self.config, self.mesh, self.state_shardings.params,
                                  retrieval=self.retrieval, rules=self.rules)
    return self._evaluator.evaluate(params, source, num_batches)

  def train_flops_per_example(self, seq_len: int, k: int) -> float:
    return count_flops(self.config, seq_len, num_neighbors=k, retrieval=self.retrieval).train


# Metrics output --------------------------------------------------------------------------


class MetricWriter:
  """Writes scalars to ``MODEL_DIR/metrics.jsonl`` and TensorBoard event files
  (``MODEL_DIR/tensorboard/<split>``); only process 0 writes."""

  def __init__(self, model_dir: str, enable_tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = os.path.join(model_dir, "metrics.jsonl")
    self._tf_writers: dict[str, Any] = {}
    self._tf = None
    if self.active and enable_tensorboard:
      try:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        tf.config.set_visible_devices([], "GPU")
        self._tf = tf
      except ImportError:
        logging.warning("tensorflow is not installed; no TensorBoard event files")
    self._dir = model_dir

  def write(self, split: str, step: int, scalars: dict[str, float]) -> None:
    if not self.active:
      return
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps({"split": split, "step": step, **scalars}) + "\n")
    if self._tf is not None:
      if split not in self._tf_writers:
        self._tf_writers[split] = self._tf.summary.create_file_writer(
            os.path.join(self._dir, "tensorboard", split))
      with self._tf_writers[split].as_default():
        for k, v in scalars.items():
          self._tf.summary.scalar(k, v, step=step)
      self._tf_writers[split].flush()


def read_metrics(model_dir: str, split: str = "train") -> list[dict]:
  path = os.path.join(model_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


@dataclasses.dataclass
class StepTimer:
  """Tokens/s, step time and MFU over a logging interval."""

  flops_per_step: float
  tokens_per_step: int
  peak: Optional[float] = dataclasses.field(
      default_factory=lambda: peak_tflops(jax.devices()[0].device_kind))
  _start: float = dataclasses.field(default_factory=time.perf_counter)
  _steps: int = 0

  def tick(self) -> None:
    self._steps += 1

  def report(self) -> dict[str, float]:
    elapsed = max(time.perf_counter() - self._start, 1e-9)
    step_time = elapsed / max(self._steps, 1)
    out = {"step_time_s": step_time, "tokens_per_s": self.tokens_per_step / step_time,
           "tflops_per_s": self.flops_per_step / step_time / 1e12}
    if self.peak:
      out["mfu"] = self.flops_per_step / step_time / (self.peak * 1e12 * jax.device_count())
    self._start, self._steps = time.perf_counter(), 0
    return out


def last_good_checkpoint_text(last_checkpoint: Optional[int]) -> str:
  if last_checkpoint is None:
    return ("There is no good checkpoint to resume from (none was saved with finite "
            "params and opt_state); restart with a fixed config")
  return (f"The last good checkpoint is step {last_checkpoint} (its params and opt_state "
          "are finite; no checkpoint was written after it)")


def check_finite(step: int, metrics: dict[str, float], last_checkpoint: Optional[int]) -> None:
  """Raises ``FloatingPointError`` on the first non-finite value of ``metrics`` (loss,
  grad_norm, param_norm...), naming the last checkpoint that resumes."""
  for key, value in metrics.items():
    if not math.isfinite(value):
      raise FloatingPointError(
          f"non-finite {key}={value} at step {step}; stopping. "
          f"{last_good_checkpoint_text(last_checkpoint)}")


def summarize_train_metrics(sums: Iterable[dict]) -> dict[str, float]:
  """Averages per-step metric dicts of an interval into loss, perplexity, accuracy..."""
  sums = list(sums)
  weight = max(sum(s["weight"] for s in sums), 1.0)
  loss = sum(s["loss"] for s in sums) / weight
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
          "z_loss": sum(s["z_loss"] for s in sums) / weight,
          "accuracy": sum(s["correct"] for s in sums) / weight,
          "grad_norm": sums[-1]["grad_norm"], "param_norm": sums[-1]["param_norm"],
          "learning_rate": sums[-1]["learning_rate"]}


def per_step_loss(metrics: dict[str, float]) -> float:
  return metrics["loss"] / max(metrics["weight"], 1.0)


Callback = Callable[[int, dict], None]
