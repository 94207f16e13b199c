r"""The training run behind ``python -m retro_jax.train`` (t5x style): ``train``.

``train`` is gin-configurable (the entry point's configurable; gin files bind
``train.*``), plus the config dataclasses and batch sources it receives. The run:

1. builds the mesh (the entry point has started multi-host JAX if the job has several
   hosts);
2. restores the latest checkpoint in ``MODEL_DIR`` if there is one (resume), otherwise
   initialises: fresh, or from ``init_checkpoint`` with ``init_mode='retrofit'`` (decoder
   from the checkpoint, encoder and CCA fresh) or ``'params'`` (all parameters);
3. trains to ``train_steps``: the batch of step s is ``train_source.get_batch(s)``, so a
   resumed run continues with the same data order and reproduces the uninterrupted
   run's losses; metrics every ``log_every`` steps to the log, ``metrics.jsonl`` and
   TensorBoard; eval every ``eval_every`` steps; checkpoints every ``checkpoint_every``
   steps and at the end (async, keep the last ``keep_checkpoints``); each start or
   resume appends the code it runs to ``provenance.jsonl`` (``utils.provenance``);
4. stops with a clear error on a non-finite loss, gradient or parameter norm, naming the
   last good checkpoint: a checkpoint is saved only when its params and opt_state are
   finite (every value and the global norm), so the one named always resumes.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional

from absl import logging
import gin
import jax

from retro_jax.models import RetroConfig
from retro_jax.models import partitioning
from retro_jax.training import checkpoints as ckpt_lib
from retro_jax.training import trainer as trainer_lib
from retro_jax.training.optimizers import OptimizerConfig
from retro_jax.utils import provenance
from retro_jax.utils.io import atomic_write_text

_INIT_MODES = ("retrofit", "params")


def _init_state(trainer: trainer_lib.Trainer, init_checkpoint: Optional[str],
                init_mode: str) -> trainer_lib.TrainState:
  if init_checkpoint is None:
    return trainer.init_state()
  abstract_params = trainer.abstract_state.params
  if init_mode == "retrofit":
    fresh = trainer.init_state().params
    params = ckpt_lib.retrofit_params(init_checkpoint, fresh, abstract_params)
  else:
    params = ckpt_lib.load_params(init_checkpoint, abstract_params)
  logging.info("initialised from %s (%s)", init_checkpoint, init_mode)
  return trainer.state_from_params(params)


@gin.configurable
def train(*, model_dir: str = gin.REQUIRED, train_steps: int = gin.REQUIRED,
          train_source: Any = gin.REQUIRED, model_config: Optional[RetroConfig] = None,
          optimizer_config: Optional[OptimizerConfig] = None, retrieval: bool = True,
          retro_params: Optional[bool] = None,
          mesh_shape: Optional[dict] = None, init_checkpoint: Optional[str] = None,
          init_mode: str = "retrofit", eval_source: Any = None, eval_every: int = 0,
          eval_batches: int = 1, checkpoint_every: int = 1000, keep_checkpoints: int = 3,
          async_checkpointing: bool = True, log_every: int = 10, z_loss: float = 0.0,
          grad_accum_steps: int = 1, seed: int = 0,
          step_callback: Optional[Callable[[int, dict], None]] = None) -> dict:
  """Trains a Retro (or GPT, ``retrieval=False``) model; returns the last metrics.

  Args:
    model_dir: Output directory (checkpoints, metrics.jsonl, tensorboard, config.gin,
      provenance.jsonl).
    train_steps: Total optimizer steps of the run (resumes count toward it).
    train_source: Batch source with ``get_batch(step)`` (see retro_jax.training.trainer).
    model_config: The architecture; default ``RetroConfig()`` as bound by gin.
    optimizer_config: default ``OptimizerConfig()`` as bound by gin.
    retrieval: False trains the decoder alone (GPT pretraining, GPT-fitting).
    retro_params: Whether the parameters include the Retro encoder and CCA; default
      ``retrieval``. True with ``retrieval=False`` is InstructRetro's SFT: a Retro
      checkpoint's decoder trained with retrieval off (no neighbor features needed, the
      decoder's cost); the encoder and CCA are kept (freeze them with
      ``OptimizerConfig.trainable='decoder'``).
    mesh_shape: e.g. {'data': -1, 'fsdp': 1, 'tensor': 1}.
    init_checkpoint: Checkpoint (MODEL_DIR or step dir) to start from when MODEL_DIR has
      none; ``init_mode`` 'retrofit' (decoder only) or 'params' (everything).
    eval_source, eval_every, eval_batches: held-out loss/perplexity every N steps.
    step_callback: called as ``step_callback(step, metrics)`` after every step with the
      step's metrics (host floats).
  """
  if init_mode not in _INIT_MODES:
    raise ValueError(f"train.init_mode={init_mode!r}: must be one of {_INIT_MODES}")
  if train_steps <= 0:
    raise ValueError(f"train.train_steps={train_steps} must be positive")
  model_config = model_config or RetroConfig()
  optimizer_config = optimizer_config or OptimizerConfig()
  os.makedirs(model_dir, exist_ok=True)
  if jax.process_index() == 0:
    atomic_write_text(os.path.join(model_dir, "config.gin"), gin.config_str())

  mesh = partitioning.make_mesh(mesh_shape)
  trainer = trainer_lib.Trainer(model_config, optimizer_config, train_steps=train_steps,
                                mesh=mesh, retrieval=retrieval,
                                retro_params=retro_params, z_loss=z_loss,
                                grad_accum_steps=grad_accum_steps, seed=seed)
  checkpointer = ckpt_lib.Checkpointer(model_dir, keep=keep_checkpoints,
                                       async_save=async_checkpointing)
  writer = trainer_lib.MetricWriter(model_dir)
  start = checkpointer.latest_step()
  if start is not None:
    params, opt_state, meta = checkpointer.restore(start, trainer.abstract_state.params,
                                                   trainer.abstract_state.opt_state)
    state = trainer_lib.TrainState(
        step=jax.device_put(jax.numpy.asarray(start, jax.numpy.int32),
                            trainer.state_shardings.step),
        params=params, opt_state=opt_state)
    problem = ckpt_lib.state_problem(params, opt_state)
    if problem is not None:  # Written before saves were checked: it would diverge.
      earlier = [s for s in checkpointer.all_steps() if s < start]
      raise FloatingPointError(
          f"cannot resume from {checkpointer.directory}/{start}: {problem}. Remove that "
          f"step directory to resume from an earlier one ({earlier or 'none left'})")
    logging.info("resumed from %s at step %d (%s)", checkpointer.directory, start, meta)
  else:
    start = 0
    state = _init_state(trainer, init_checkpoint, init_mode)
  last_checkpoint = checkpointer.latest_step()
  if jax.process_index() == 0:
    # Which code trains which steps: one line per start or resume.
    provenance.record(model_dir, start_step=int(start), train_steps=int(train_steps))

  first = train_source.get_batch(start)
  seq_len = first["decoder_input_tokens"].shape[1]
  global_batch = first["decoder_input_tokens"].shape[0] * jax.process_count()
  k = first["neighbor_tokens"].shape[2] if retrieval else 0
  timer = trainer_lib.StepTimer(
      flops_per_step=trainer.train_flops_per_example(seq_len, k) * global_batch,
      tokens_per_step=global_batch * seq_len)
  interval: list[dict] = []
  last: dict = {}

  def finish_step(step: int, device_metrics: dict) -> None:
    nonlocal last
    metrics = {key: float(v) for key, v in jax.device_get(device_metrics).items()}
    # param_norm is the norm after the update: an overflow here (e.g. a huge learning
    # rate) stops before the diverged params can be saved as a "good" checkpoint.
    trainer_lib.check_finite(step, {"loss": trainer_lib.per_step_loss(metrics),
                                    "grad_norm": metrics["grad_norm"],
                                    "param_norm": metrics["param_norm"]}, last_checkpoint)
    interval.append(metrics)
    timer.tick()
    if step_callback is not None:
      step_callback(step, metrics)
    if step % log_every == 0 or step == train_steps:
      last = dict(trainer_lib.summarize_train_metrics(interval), **timer.report())
      interval.clear()
      writer.write("train", step, last)
      logging.info("step %d/%d: %s", step, train_steps,
                   ", ".join(f"{k}={v:.4g}" for k, v in last.items()))

  pending = None
  try:
    for step in range(start, train_steps):
      batch = first if step == start else train_source.get_batch(step)
      state, metrics = trainer.train_step(state, batch)
      if pending is not None:  # Fetch the previous step while this one runs.
        finish_step(*pending)
      pending = (step + 1, metrics)
      done = step + 1
      if done % checkpoint_every == 0 or done == train_steps:
        finish_step(*pending)
        pending = None
        problem = ckpt_lib.state_problem(state.params, state.opt_state)
        if problem is not None:
          raise FloatingPointError(
              f"non-finite state after step {done}: {problem}; stopping without saving "
              f"it. {trainer_lib.last_good_checkpoint_text(last_checkpoint)}")
        checkpointer.save(done, state.params, state.opt_state,
                          {"step": done, "time": time.time(),
                           **ckpt_lib.config_meta(model_config)})
        last_checkpoint = done
      if eval_source is not None and eval_every and (done % eval_every == 0
                                                    or done == train_steps):
        scores = trainer.evaluate(state.params, eval_source, eval_batches)
        writer.write("eval", done, scores)
        logging.info("eval at step %d: %s", done, scores)
        last.update({f"eval_{key}": v for key, v in scores.items()})
    if pending is not None:
      finish_step(*pending)
  finally:
    checkpointer.close()
  return last
