"""The sharded train and eval steps and the training loop.

Batches come from a *batch source*: any object with ``get_batch(step) -> dict`` that
returns this host's slice of the global batch for ``step`` as numpy arrays, a pure
function of the step (so a resumed run sees exactly the batches of an uninterrupted
one, and resuming never replays the stream). Features:

    decoder_input_tokens   int32   [batch, n]
    decoder_target_tokens  int32   [batch, n]      (the next token of each input)
    decoder_loss_weights   float32 [batch, n]
    neighbor_tokens        int32   [batch, n//m, k, r]   (Retro batches only)
    neighbor_mask          bool    [batch, n//m, k]      (Retro batches only)

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
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from retro_jax.models import Retro, RetroConfig, dummy_inputs
from retro_jax.models.flops import count_flops, peak_tflops
from retro_jax.models import partitioning
from retro_jax.training.optimizers import OptimizerConfig, make_optimizer

NEIGHBOR_FEATURES = ("neighbor_tokens", "neighbor_mask")
TOKEN_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")


class BatchSource(Protocol):

  def get_batch(self, step: int) -> dict[str, np.ndarray]:
    ...


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


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


def batch_to_global(batch: dict[str, np.ndarray], sharding: NamedSharding,
                    retrieval: bool) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays sharded over the batch axes."""
  keys = TOKEN_FEATURES + (NEIGHBOR_FEATURES if retrieval else ())
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
          for k in keys}


def model_loss_sums(model: Retro, params: Any, batch: dict, *, retrieval: bool,
                    z_loss: float = 0.0, rng: Optional[jax.Array] = None) -> dict:
  """Loss sums of a batch; ``rng`` (dropout) makes it a training forward pass."""
  deterministic = rng is None
  neighbors = batch["neighbor_tokens"] if retrieval else None
  mask = batch["neighbor_mask"] if retrieval else None
  logits = model.apply({"params": params}, batch["decoder_input_tokens"], neighbors,
                       neighbor_mask=mask, deterministic=deterministic,
                       rngs=None if deterministic else {"dropout": rng})
  return lm_loss_sums(logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"],
                      z_loss)


def summarize_eval_sums(totals: dict[str, float]) -> dict[str, float]:
  weight = max(totals.get("weight", 0.0), 1.0)
  loss = totals["loss"] / weight
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
          "accuracy": totals["correct"] / weight, "tokens": totals["weight"]}


class Evaluator:
  """Held-out loss / perplexity of a model over a batch source (jitted once)."""

  def __init__(self, config: RetroConfig, mesh: jax.sharding.Mesh, param_shardings: Any, *,
               retrieval: bool, rules=partitioning.LOGICAL_AXIS_RULES):
    self.config, self.mesh, self.rules, self.retrieval = config, mesh, rules, retrieval
    self.batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    model = Retro(config)
    self._step = jax.jit(
        lambda params, batch: model_loss_sums(model, params, batch, retrieval=retrieval),
        in_shardings=(param_shardings, self.batch_sharding))


    def class_sums(params, batch, weights):
      """Loss sums of one forward pass under several weightings [classes, batch, n]."""
      logits = model.apply({"params": params}, batch["decoder_input_tokens"],
                           batch["neighbor_tokens"] if retrieval else None,
                           neighbor_mask=batch["neighbor_mask"] if retrieval else None)
      return jax.vmap(lambda w: lm_loss_sums(logits, batch["decoder_target_tokens"], w)
                      )(weights)

    self.class_weight_sharding = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp")))
    self._class_step = jax.jit(class_sums, in_shardings=(
        param_shardings, self.batch_sharding, self.class_weight_sharding))

  def evaluate(self, params: Any, source: BatchSource, num_batches: int) -> dict[str, float]:
    totals: dict[str, float] = {}
    for i in range(num_batches):
      batch = source.get_batch(i)
      if i == 0:
        validate_batch(batch, self.config, self.retrieval, "eval batch")
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
    for i in range(num_batches):
      batch = source.get_batch(i)
      if i == 0:
        validate_batch(batch, self.config, self.retrieval, "eval batch")
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
    self.model = Retro(model_config)
    self.mesh = mesh
    self.rules = rules
    self.retrieval = retrieval
    # The parameter tree holds the encoder and CCA (a Retro model) even when the steps
    # run without retrieval: InstructRetro's SFT trains the decoder of a Retro model
    # with retrieval off, at the cost of its GPT decoder.
    self.retro_params = retrieval if retro_params is None else retro_params
    if retrieval and not self.retro_params:
      raise ValueError("Trainer: retrieval=True needs retro_params (encoder and CCA)")
    self.z_loss = z_loss
    self.grad_accum_steps = grad_accum_steps
    self.seed = seed
    self.optimizer, self.schedule = make_optimizer(optimizer_config, train_steps)
    abstract = jax.eval_shape(self._init_boxed, jax.random.PRNGKey(0))
    self.state_shardings = partitioning.logical_shardings(abstract, mesh, rules)
    self.abstract_state = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.unbox(abstract), self.state_shardings)
    self.batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    self._train_step = None
    self._evaluator: Optional[Evaluator] = None

  # Initialisation -------------------------------------------------------------------

  def _init_boxed(self, rng: jax.Array) -> TrainState:
    tokens, neighbors = dummy_inputs(self.config)
    variables = self.model.init(rng, tokens, neighbors if self.retro_params else None)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.optimizer.init(params))

  def init_state(self, rng: Optional[jax.Array] = None) -> TrainState:
    """A fresh state, created directly in its shardings."""
    rng = jax.random.PRNGKey(self.seed) if rng is None else rng
    with partitioning.activation_sharding(self.mesh, self.rules):
      return jax.jit(lambda r: nn.unbox(self._init_boxed(r)),
                     out_shardings=self.state_shardings)(rng)

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
        sums = model_loss_sums(self.model, p, micro, retrieval=self.retrieval,
                               z_loss=self.z_loss, rng=rng)
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
      validate_batch(batch, self.config, self.retrieval, "train batch")
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
