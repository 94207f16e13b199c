"""Training: retro-fit flow, sharding equivalence, resume, accumulation, NaN stop, multi-host."""

import json
import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

from retro_jax.models import Retro, abstract_params
from retro_jax.training.loop import train
from retro_jax.training import checkpoints as ckpt_lib
from retro_jax.models import partitioning
from retro_jax.training.optimizers import OptimizerConfig
from retro_jax.training.trainer import Trainer, read_metrics
from retro_jax.utils import provenance
from train_fixture import CONFIG, OPT, source as _source

pytestmark = [pytest.mark.slow,  # see pytest.ini
              pytest.mark.usefixtures("clean_gin")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(model_dir, split="train"):
  by_step = {}
  for row in read_metrics(model_dir, split):
    by_step[row["step"]] = row["loss"]  # a resumed run overwrites replayed steps
  return [by_step[s] for s in sorted(by_step)]


def test_retrofit_from_gpt_checkpoint(tmp_path):
  gpt_dir, retro_dir = str(tmp_path / "gpt"), str(tmp_path / "retro")
  train(model_dir=gpt_dir, train_steps=20, train_source=_source(retrieval=False),
        model_config=CONFIG, optimizer_config=OPT, retrieval=False, log_every=5,
        checkpoint_every=20)
  gpt_params = ckpt_lib.load_params(gpt_dir, nn.unbox(abstract_params(CONFIG,
                                                                      retrieval=False)))

  # The retro-fit initialisation reproduces the GPT exactly with retrieval off.
  trainer = Trainer(CONFIG, OPT, train_steps=1, mesh=partitioning.make_mesh())
  fresh = trainer.init_state().params
  init = ckpt_lib.retrofit_params(gpt_dir, fresh, trainer.abstract_state.params)
  flat_init, flat_gpt = traverse_util.flatten_dict(init), traverse_util.flatten_dict(gpt_params)
  assert set(flat_gpt) < set(flat_init)
  for key, value in flat_gpt.items():
    np.testing.assert_array_equal(np.asarray(flat_init[key]), np.asarray(value))
  batch = _source().get_batch(0)
  tokens = batch["decoder_input_tokens"]
  gpt_logits = Retro(CONFIG).apply({"params": jax.device_get(gpt_params)}, tokens)
  retro_off = Retro(CONFIG).apply({"params": jax.device_get(init)}, tokens,
                                  batch["neighbor_tokens"],
                                  neighbor_mask=np.zeros((8,), bool))
  np.testing.assert_array_equal(np.asarray(retro_off), np.asarray(gpt_logits))

  # Retro-fitting lowers the training loss.
  train(model_dir=retro_dir, train_steps=200, train_source=_source(), model_config=CONFIG,
        optimizer_config=OptimizerConfig(learning_rate=5e-3, warmup_steps=5),
        init_checkpoint=gpt_dir, init_mode="retrofit", log_every=20, checkpoint_every=200)
  losses = _losses(retro_dir)
  assert losses[-1] < losses[0] - 0.1, losses
  assert os.path.exists(os.path.join(retro_dir, "config.gin"))
  assert os.listdir(os.path.join(retro_dir, "tensorboard", "train"))


def _run_steps(trainer, steps, source):
  state = trainer.init_state()
  losses = []
  for s in range(steps):
    state, metrics = trainer.train_step(state, source.get_batch(s))
    losses.append(float(metrics["loss"] / metrics["weight"]))
  return losses, jax.device_get(state.params)


def test_one_device_equals_eight_fake_devices():
  one = Trainer(CONFIG, OPT, train_steps=3,
                mesh=partitioning.make_mesh({"data": 1}, devices=jax.devices()[:1]))
  eight = Trainer(CONFIG, OPT, train_steps=3,
                  mesh=partitioning.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  l1, p1 = _run_steps(one, 3, _source())
  l8, p8 = _run_steps(eight, 3, _source())
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p8)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_gradient_accumulation_equals_full_batch():
  mesh = partitioning.make_mesh({"data": 1}, devices=jax.devices()[:1])
  full = Trainer(CONFIG, OPT, train_steps=2, mesh=mesh)
  accum = Trainer(CONFIG, OPT, train_steps=2, mesh=mesh, grad_accum_steps=4)
  lf, pf = _run_steps(full, 2, _source())
  la, pa = _run_steps(accum, 2, _source())
  np.testing.assert_allclose(lf, la, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(pf), jax.tree_util.tree_leaves(pa)):
    np.testing.assert_allclose(a, b, atol=1e-5)


class _Interrupt(Exception):
  pass


def test_kill_and_resume_equals_uninterrupted(tmp_path):
  """A run killed after its step-3 checkpoint and resumed ends bit for bit where the
  uninterrupted run ends (losses of every step, parameters)."""
  kwargs = dict(train_steps=8, train_source=_source(), model_config=CONFIG,
                optimizer_config=OPT, log_every=1, checkpoint_every=3)
  train(model_dir=str(tmp_path / "a"), **kwargs)

  def crash(step, metrics):
    del metrics
    if step == 5:
      raise _Interrupt()

  with pytest.raises(_Interrupt):
    train(model_dir=str(tmp_path / "b"), step_callback=crash, **kwargs)
  assert ckpt_lib.Checkpointer(str(tmp_path / "b")).latest_step() == 3
  train(model_dir=str(tmp_path / "b"), **kwargs)
  assert _losses(str(tmp_path / "a")) == _losses(str(tmp_path / "b"))
  trainer = Trainer(CONFIG, OPT, train_steps=8, mesh=partitioning.make_mesh())
  pa = ckpt_lib.load_params(str(tmp_path / "a"), trainer.abstract_state.params)
  pb = ckpt_lib.load_params(str(tmp_path / "b"), trainer.abstract_state.params)
  for a, b in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Each start records the code it ran and the step it started from.
  starts = [json.loads(line) for line in open(tmp_path / "b" / "provenance.jsonl")]
  assert [(r["start_step"], r["train_steps"]) for r in starts] == [(0, 8), (3, 8)]
  assert all(r["code"] == provenance.code_version() for r in starts)


@pytest.mark.parametrize("trainable,frozen_group", [("retro", "decoder"),
                                                     ("decoder", "retro")])
def test_frozen_groups_do_not_move(trainable, frozen_group):
  mesh = partitioning.make_mesh({"data": 1}, devices=jax.devices()[:1])
  trainer = Trainer(CONFIG, OptimizerConfig(learning_rate=1e-2, warmup_steps=0,
                                            trainable=trainable), train_steps=2, mesh=mesh)
  state = trainer.init_state()
  before = traverse_util.flatten_dict(jax.device_get(state.params))
  for s in range(2):
    state, _ = trainer.train_step(state, _source().get_batch(s))
  after = traverse_util.flatten_dict(jax.device_get(state.params))
  retro_keys = {k for k in before if any(p in ("cca", "retro_encoder", "pre_cca_norm")
                                         for p in k)}
  for key in before:
    group = "retro" if key in retro_keys else "decoder"
    moved = not np.array_equal(before[key], after[key])
    if group == frozen_group:
      assert not moved, key
  assert any(not np.array_equal(before[k], after[k]) for k in before
             if (k in retro_keys) != (frozen_group == "retro"))


@pytest.mark.parametrize("trainable", ["retro", "decoder"])
def test_stopping_frozen_gradients_trains_as_differentiating_everything(trainable, monkeypatch):
  """The trainer stops gradients at frozen parameters (to skip their weight-gradient
  matmuls); the trained parameters equal those of a step that differentiates every
  parameter and lets the optimizer zero the frozen ones."""
  from retro_jax.training import trainer as trainer_lib
  mesh = partitioning.make_mesh({"data": 1}, devices=jax.devices()[:1])
  opt = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, trainable=trainable)

  def run():
    trainer = Trainer(CONFIG, opt, train_steps=2, mesh=mesh)
    state = trainer.init_state()
    for s in range(2):
      state, metrics = trainer.train_step(state, _source().get_batch(s))
    return jax.device_get(state.params), float(metrics["loss"])

  stopped, stopped_loss = run()
  monkeypatch.setattr(trainer_lib, "stop_frozen_gradients", lambda config, params: params)
  reference, reference_loss = run()
  assert stopped_loss == pytest.approx(reference_loss, rel=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(stopped)[0],
                          jax.tree_util.tree_leaves(reference)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_bad_batch_is_named():
  trainer = Trainer(CONFIG, OPT, train_steps=1, mesh=partitioning.make_mesh())
  batch = _source().get_batch(0)
  del batch["neighbor_mask"]
  with pytest.raises(ValueError, match="train batch: a Retro run needs feature 'neighbor_mask'"):
    trainer.train_step(trainer.init_state(), batch)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_with_jax_distributed_agree_with_one(tmp_path):
  worker = tmp_path / "worker.py"
  worker.write_text(f"""
import json, os, sys
sys.path.insert(0, {REPO!r})
from retro_jax.models import partitioning
partitioning.initialize_distributed()
import jax
from retro_jax.data.synthetic import SyntheticRetroSource
from retro_jax.models import RetroConfig
from retro_jax.training.optimizers import OptimizerConfig
from retro_jax.training.trainer import Trainer

config = RetroConfig(**{json.dumps({k: getattr(CONFIG, k) for k in (
    "vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_dim", "chunk_length",
    "encoder_dropout_rate", "encoder_position_embedding")})})
trainer = Trainer(config, OptimizerConfig(learning_rate=3e-3, warmup_steps=5), train_steps=2,
                  mesh=partitioning.make_mesh({{"data": -1, "tensor": 2}}))
source = SyntheticRetroSource(64, 32, 8, chunk_length=8)
state = trainer.init_state()
losses = []
for s in range(2):
  state, m = trainer.train_step(state, source.get_batch(s))
  losses.append(float(m["loss"] / m["weight"]))
print("RESULT " + json.dumps({{"pid": jax.process_index(), "n": jax.process_count(),
                              "losses": losses}}))
""")
  port = _free_port()
  procs = []
  for pid in range(2):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(pid), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs.append(subprocess.Popen([sys.executable, str(worker)], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  results = []
  for p in procs:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
    line = [l for l in out.splitlines() if l.startswith("RESULT ")][-1]
    results.append(json.loads(line[len("RESULT "):]))
  assert {r["pid"] for r in results} == {0, 1} and all(r["n"] == 2 for r in results)
  np.testing.assert_allclose(results[0]["losses"], results[1]["losses"], rtol=1e-6)
  single = Trainer(CONFIG, OPT, train_steps=2,
                   mesh=partitioning.make_mesh({"data": 2, "tensor": 2},
                                               devices=jax.devices()[:4]))
  expected, _ = _run_steps(single, 2, _source())
  np.testing.assert_allclose(results[0]["losses"], expected, rtol=1e-5)
