"""Training fault tolerance (issue 17, items 4-5): the NaN guard names a checkpoint that
resumes (finite params and opt_state) or says there is none; an optimizer config change
gives a clear error at resume, with the params-only way out."""

import dataclasses
import math
import os

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from retro_jax.training.loop import train
from retro_jax.training import checkpoints as ckpt_lib
from retro_jax.models import partitioning
from retro_jax.training.optimizers import OptimizerConfig
from retro_jax.training.trainer import Trainer, read_metrics
from train_fixture import CONFIG, OPT, source as _source



pytestmark = pytest.mark.usefixtures("clean_gin")


def _run(model_dir, optimizer_config, train_steps, **kwargs):
  return train(model_dir=str(model_dir), train_steps=train_steps, train_source=_source(),
               model_config=CONFIG, optimizer_config=optimizer_config,
               checkpoint_every=1, log_every=1, **kwargs)


def _saved_params(model_dir, step):
  trainer = Trainer(CONFIG, OPT, train_steps=1, mesh=partitioning.make_mesh())
  path = os.path.join(ckpt_lib.checkpoint_dir(str(model_dir)), str(step))
  return ckpt_lib.load_params(path, trainer.abstract_state.params)


def _assert_finite(params):
  leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]
  assert all(np.isfinite(x).all() for x in leaves)
  assert math.isfinite(float(optax.global_norm(leaves)))


@pytest.mark.slow
def test_huge_lr_from_the_first_step_leaves_no_checkpoint_and_says_so(tmp_path):
  # lr 1e30: step 1's params are ~1e30 (finite values, global norm inf), step 2 NaN.
  # Before the fix step 1 was saved and named "last good"; resuming it diverged again.
  exploding = OptimizerConfig(learning_rate=1e30, warmup_steps=0, schedule="constant",
                              grad_clip_norm=0.0)
  with pytest.raises(FloatingPointError,
                     match=r"non-finite .* at step 1.*no good checkpoint"):
    _run(tmp_path, exploding, 10)
  assert ckpt_lib.Checkpointer(str(tmp_path)).all_steps() == []
  # A rerun with a sane config starts fresh (nothing diverged to resume from).
  _run(tmp_path, OPT, 2)
  assert all(math.isfinite(r["loss"]) for r in read_metrics(str(tmp_path), "train"))
  _assert_finite(_saved_params(tmp_path, 2))


@pytest.mark.slow
def test_stop_names_a_checkpoint_that_resumes(tmp_path):
  # Warmup from 0: step 1 uses lr 0 (params unchanged, good); step 2 uses lr ~3e29.
  exploding = OptimizerConfig(learning_rate=1e30, warmup_steps=3, schedule="constant",
                              grad_clip_norm=0.0)
  with pytest.raises(FloatingPointError, match=r"last good checkpoint is step 1\b"):
    _run(tmp_path, exploding, 10)
  steps = ckpt_lib.Checkpointer(str(tmp_path)).all_steps()
  assert steps == [1]
  _assert_finite(_saved_params(tmp_path, 1))
  # Resuming the named checkpoint with a sane learning rate trains on, finite.
  _run(tmp_path, dataclasses.replace(OPT, grad_clip_norm=0.0), 3)
  assert all(math.isfinite(r["loss"]) for r in read_metrics(str(tmp_path), "train")
             if r["step"] > 1)
  _assert_finite(_saved_params(tmp_path, 3))


@pytest.mark.slow   # multi-second (see pytest.ini)
def test_non_finite_state_is_never_saved_or_resumed(tmp_path):
  trainer = Trainer(CONFIG, OPT, train_steps=1, mesh=partitioning.make_mesh())
  state = trainer.init_state()
  assert ckpt_lib.state_problem(state.params, state.opt_state) is None
  huge = jax.tree_util.tree_map(lambda x: x * 0 + 1e30, state.params)
  nan_opt = jax.tree_util.tree_map(
      lambda x: x * np.nan if np.issubdtype(x.dtype, np.floating) else x, state.opt_state)
  assert "params global norm is inf" in ckpt_lib.state_problem(huge, state.opt_state)
  assert "opt_state have non-finite" in ckpt_lib.state_problem(state.params, nan_opt)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  with pytest.raises(FloatingPointError, match="not saving checkpoint step 1"):
    checkpointer.save(1, state.params, nan_opt, {"step": 1})
  # A diverged checkpoint written without the check (an older retro_jax) is refused.
  checkpointer.manager.save(1, args=ocp.args.Composite(
      params=ocp.args.StandardSave(huge), opt_state=ocp.args.StandardSave(state.opt_state),
      meta=ocp.args.JsonSave({"step": 1})), force=True)
  checkpointer.close()
  with pytest.raises(FloatingPointError, match=r"cannot resume from .*/1: params global"):
    _run(tmp_path, OPT, 2)


@pytest.mark.slow
def test_resume_after_clipping_change_is_a_clear_error(tmp_path):
  old, new = tmp_path / "clipped", tmp_path / "unclipped"
  _run(old, dataclasses.replace(OPT, grad_clip_norm=1.0), 2)
  unclipped = dataclasses.replace(OPT, grad_clip_norm=0.0)
  with pytest.raises(ValueError) as info:
    _run(old, unclipped, 4)
  message = str(info.value)
  assert "opt_state tree does not match" in message, message
  assert "OptimizerConfig" in message and "paths only in the checkpoint" in message
  assert f"--gin.INIT_CHECKPOINT={old}" in message
  assert "--gin.train.init_mode='params'" in message
  # The way out it names works: params only, fresh optimizer, new MODEL_DIR.
  _run(new, unclipped, 2, init_checkpoint=str(old), init_mode="params")
  _assert_finite(_saved_params(new, 2))
