"""Megatron import/export against NVIDIA's megatron-core 0.12.3 RetroModel.

The reference (tests/megatron_reference.py) runs megatron-core itself in subprocesses
(tensor-parallel ranks over gloo), with every parameter random, and writes Megatron-LM
checkpoint files and its logits; we convert the files and compare logits in float32.
"""

import json
import os
import shutil
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest

import torch  # pylint: disable=g-import-not-at-top
import megatron.core  # noqa: F401  pylint: disable=unused-import

from retro_jax.convert import megatron  # pylint: disable=g-import-not-at-top
from retro_jax.convert import megatron_files as files  # pylint: disable=g-import-not-at-top
from retro_jax.models import Retro, RetroConfig  # pylint: disable=g-import-not-at-top
from retro_jax.models import cca as cca_lib  # pylint: disable=g-import-not-at-top
from retro_jax.training import checkpoints as ckpt_lib  # pylint: disable=g-import-not-at-top
from retro_jax.models import partitioning  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(__file__))
import megatron_reference  # pylint: disable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.slow  # see pytest.ini

REFERENCE = os.path.join(os.path.dirname(__file__), "megatron_reference.py")
TOLERANCE = 1e-4

# (a) InstructRetro: half RoPE, LayerNorm-1p, SwiGLU, no biases, untied;
# (b) learned absolute positions + GELU; (c) biases on.
INSTRUCTRETRO = dict(rope=True, rotary_percent=0.5, layernorm_1p=True, swiglu=True,
                     bias=False, tied=False)
LEARNED_GELU = dict(rope=False, swiglu=False, bias=False, tied=True)
BIASES = dict(rope=False, swiglu=False, bias=True, tied=False)


def run_reference(directory, **spec):
  os.makedirs(directory, exist_ok=True)
  spec_path = os.path.join(directory, "spec.json")
  with open(spec_path, "w") as f:
    json.dump(spec, f)
  out = os.path.join(directory, "ckpt")
  result = subprocess.run([sys.executable, REFERENCE, spec_path, out], capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return out, dict(np.load(os.path.join(out, "reference.npz")))


_CACHE = {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """reference(name, **spec) -> (checkpoint dir, {'tokens', 'neighbors', 'logits'})."""

  def make(name, **spec):
    if name not in _CACHE:
      _CACHE[name] = run_reference(str(tmp_path_factory.mktemp(name)), **spec)
    return _CACHE[name]
  return make


def load_dir(path):
  shards = [files.Shard(p) for p in files.shard_paths(files.iteration_dir(path))]
  return [s.tensors for s in shards], shards[0].args


def logits_of(config, params, ref, retrieval=True):
  out = Retro(config).apply({"params": params}, ref["tokens"],
                            ref["neighbors"] if retrieval else None)
  return np.asarray(out)


def max_diff(a, b):
  return float(np.abs(a - b[..., :a.shape[-1]]).max())


@pytest.mark.parametrize("name,spec", [
    ("instructretro", INSTRUCTRETRO), ("learned_gelu", LEARNED_GELU), ("biases", BIASES)])
@pytest.mark.parametrize("tp", [1, 2])
def test_parity_with_megatron_core(reference, tmp_path, name, spec, tp):
  """Converted through the CLI's code path (files -> model dir -> loader), with neighbors."""
  ckpt, ref = reference(f"{name}_tp{tp}", tp=tp, **spec)
  model_dir = str(tmp_path / "model")
  config = megatron.import_checkpoint(ckpt, model_dir)
  assert config.final_norm is False and config.encoder_cross_attention_residual == "normed"
  assert ckpt_lib.stored_model_config(model_dir) == config
  mesh = partitioning.make_mesh({"data": 1}, devices=jax.devices()[:1])
  params, _, has_retro = ckpt_lib.load_model_params(model_dir, config, mesh)
  assert has_retro
  diff = max_diff(logits_of(config, params, ref), ref["logits"])
  assert diff < TOLERANCE, f"{name} tp={tp}: max |logits - megatron-core| = {diff}"


@pytest.mark.parametrize("name,spec", [("instructretro", INSTRUCTRETRO),
                                       ("learned_gelu", LEARNED_GELU)])
def test_retrieval_off_is_the_megatron_decoder(reference, name, spec):
  """With CCA contributing nothing in megatron-core (output projections zeroed), its
  logits are the decoder's: retro_jax with neighbor_tokens=None must give them."""
  ckpt, ref = reference(f"{name}_zero_cca", tp=2, zero_cca=True, **spec)
  config, params = megatron.from_megatron(*load_dir(ckpt))
  diff = max_diff(logits_of(config, params, ref, retrieval=False), ref["logits"])
  assert diff < TOLERANCE, diff


def test_legacy_layout_and_semantics(reference):
  """Legacy names (nested language_model, retriever, *_norm), TP=2, computing what
  legacy Megatron-LM computes (final norm; encoder residual = the stream)."""
  ckpt, ref = reference("legacy", tp=2, legacy=True, layout="legacy",
                        retro_layers=[2, 3], **INSTRUCTRETRO)
  config, params = megatron.from_megatron(*load_dir(ckpt))
  assert config.final_norm and config.encoder_cross_attention_residual == "stream"
  assert config.retro_layers == (2, 3)
  diff = max_diff(logits_of(config, params, ref), ref["logits"])
  assert diff < TOLERANCE, diff


def test_legacy_and_mcore_names_give_the_same_parameters(reference):
  """The same weights under both layouts (and the transformer-engine fused names)."""
  ckpt, _ = reference("instructretro_tp2", tp=2, **INSTRUCTRETRO)
  ranks, args = load_dir(ckpt)
  _, params = megatron.from_megatron(ranks, args)
  legacy = [files.flatten_state_dict(megatron_reference.legacy_state_dict(r))
            for r in ranks]
  legacy_config, legacy_params = megatron.from_megatron(legacy, args)
  te = []
  for r in ranks:
    renamed = {}
    for k, v in r.items():
      k = k.replace("input_layernorm.", "self_attention.linear_qkv.layer_norm_")
      if ".encoder.layers.0.pre_mlp_layernorm." not in k:  # that one stays unfused
        k = k.replace("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_")
      renamed[k] = v
    renamed["decoder.layers.0.self_attention.core_attention._extra_state"] = None
    te.append(renamed)
  te_config, te_params = megatron.from_megatron(te, args)
  flat = jax.tree_util.tree_leaves_with_path(params)
  for other in (legacy_params, te_params):
    other_flat = dict(jax.tree_util.tree_leaves_with_path(other))
    assert set(other_flat) == {p for p, _ in flat}
    for path, value in flat:
      np.testing.assert_array_equal(value, other_flat[path])
  assert te_config.encoder_cross_attention_residual == "normed"
  assert legacy_config.encoder_cross_attention_residual == "stream"


def test_parity_fails_on_wrong_retro_semantics(reference, monkeypatch):
  """The parity test can fail: the encoder's residual or its conditioning states wrong."""
  ckpt, ref = reference("instructretro_tp1", tp=1, **INSTRUCTRETRO)
  config, params = megatron.from_megatron(*load_dir(ckpt))
  wrong = config.replace(encoder_cross_attention_residual="stream")
  assert max_diff(logits_of(wrong, params, ref), ref["logits"]) > 1e-2
  real = cca_lib.tokens_to_chunks
  monkeypatch.setattr(cca_lib, "tokens_to_chunks",
                      lambda x, m, n: real(jax.numpy.roll(x, 1, axis=1), m, n))
  assert max_diff(logits_of(config, params, ref), ref["logits"]) > 1e-2


def test_vocab_padding_is_dropped(reference):
  ckpt, ref = reference("vocab100", tp=2, token_vocab=100, **LEARNED_GELU)
  config, params = megatron.from_megatron(*load_dir(ckpt), vocab_size=100)
  assert config.vocab_size == 100
  assert params["token_embedding"]["embedding"].shape[0] == 100
  diff = max_diff(logits_of(config, params, ref), ref["logits"])
  assert diff < TOLERANCE, diff


@pytest.mark.parametrize("layout", ["mcore", "legacy"])
def test_export_round_trip(reference, tmp_path, layout):
  """retro_jax -> Megatron files (TP=2) -> megatron-core forward (mcore layout) and
  -> retro_jax again (both layouts): the same logits and parameters."""
  spec = dict(tp=1, legacy=layout == "legacy", **INSTRUCTRETRO)
  ckpt, ref = reference(f"export_{layout}", layout=layout, **spec)
  model_dir = str(tmp_path / "model")
  config = megatron.import_checkpoint(ckpt, model_dir)
  save = str(tmp_path / "exported")
  paths = megatron.export_checkpoint(model_dir, save, tensor_parallel=2, layout=layout)
  assert len(paths) == 2
  _, params = megatron.from_megatron(*load_dir(ckpt))
  again_config, again = megatron.from_megatron(*load_dir(save),
                                               vocab_size=config.vocab_size)
  assert again_config == config.replace(param_dtype="float32", dtype="float32")
  for (path, a), (path_b, b) in zip(jax.tree_util.tree_leaves_with_path(params),
                                    jax.tree_util.tree_leaves_with_path(again)):
    assert path == path_b
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  if layout == "mcore":  # megatron-core itself runs the exported shards
    padded = files.Shard(paths[0]).args.padded_vocab_size
    _, rerun = run_reference(str(tmp_path / "rerun"), load=save,
                             **dict(spec, tp=2, vocab=padded, token_vocab=128))
    diff = max_diff(ref["logits"], rerun["logits"])
    assert diff < TOLERANCE, diff


def test_export_refuses_semantics_megatron_core_lacks(reference, tmp_path):
  ckpt, _ = reference("instructretro_tp1", tp=1, **INSTRUCTRETRO)
  config, params = megatron.from_megatron(*load_dir(ckpt))
  with pytest.raises(ValueError, match="final_norm"):
    megatron.to_megatron(config, params, layout="legacy")
  with pytest.raises(ValueError, match="encoder_cross_attention_residual"):
    megatron.to_megatron(config.replace(encoder_cross_attention_residual="stream"),
                         params, layout="mcore")


def _copy(reference, tmp_path, name="biases_tp2", **spec):
  ckpt, _ = reference(name, tp=2, **(spec or BIASES))
  target = str(tmp_path / "bad")
  shutil.copytree(ckpt, target)
  return target, os.path.join(target, "iter_0000001")


def _rewrite(path, fn):
  blob = torch.load(path, weights_only=False)
  fn(blob)
  torch.save(blob, path)


def test_bad_checkpoints_fail_clearly(reference, tmp_path):
  target, iteration = _copy(reference, tmp_path)
  out = str(tmp_path / "out")
  shutil.rmtree(os.path.join(iteration, "mp_rank_01"))
  os.makedirs(os.path.join(iteration, "mp_rank_02"))
  with pytest.raises(FileNotFoundError, match="mp_rank_01 missing"):
    megatron.import_checkpoint(target, out)

  target, iteration = _copy(reference, tmp_path / "a")
  shard = os.path.join(iteration, "mp_rank_00", files.SHARD_FILE)
  _rewrite(shard, lambda b: b["model"].__setitem__("decoder.layers.0.mystery.weight",
                                                   torch.zeros(3)))
  with pytest.raises(ValueError, match=r"mp_rank_00.*decoder\.layers\.0\.mystery"):
    megatron.import_checkpoint(target, out)

  for rank in (0, 1):  # a shape that does not match the args, on every rank
    path = os.path.join(iteration, f"mp_rank_0{rank}", files.SHARD_FILE)
    _rewrite(path, lambda b: (b["model"].pop("decoder.layers.0.mystery.weight", None),
                              b["model"].__setitem__(
                                  "decoder.layers.1.mlp.linear_fc2.weight",
                                  b["model"]["decoder.layers.1.mlp.linear_fc2.weight"][:, :8])))
  with pytest.raises(ValueError, match=r"decoder\.layers\.1\.mlp\.linear_fc2\.weight has "
                                       r"shape"):
    megatron.import_checkpoint(target, out)

  target, iteration = _copy(reference, tmp_path / "b")
  for rank in (0, 1):
    _rewrite(os.path.join(iteration, f"mp_rank_0{rank}", files.SHARD_FILE),
             lambda b: setattr(b["args"], "tensor_model_parallel_size", 4))
  with pytest.raises(ValueError, match="tensor_model_parallel_size=4 but 2"):
    megatron.import_checkpoint(target, out)

  target, iteration = _copy(reference, tmp_path / "c")
  _rewrite(os.path.join(iteration, "mp_rank_01", files.SHARD_FILE),
           lambda b: b["model"]["decoder.layers.0.input_layernorm.weight"].add_(1.0))
  with pytest.raises(ValueError, match="replicated"):
    megatron.import_checkpoint(target, out)

  target, iteration = _copy(reference, tmp_path / "d")
  for rank in (0, 1):
    _rewrite(os.path.join(iteration, f"mp_rank_0{rank}", files.SHARD_FILE),
             lambda b: b["model"].pop("decoder.layers.3.pre_mlp_layernorm.bias"))
  with pytest.raises(ValueError, match="pre_mlp_norm/bias"):
    megatron.import_checkpoint(target, out)


def test_command_line(reference, tmp_path):
  ckpt, ref = reference("instructretro_tp2", tp=2, **INSTRUCTRETRO)
  model_dir = str(tmp_path / "cli")
  result = subprocess.run([sys.executable, "-m", "retro_jax.convert.megatron",
                           f"--load={ckpt}", f"--model_dir={model_dir}"],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "CCA layers (2, 4)" in result.stdout
  config = ckpt_lib.stored_model_config(model_dir)
  with open(os.path.join(model_dir, "model.gin")) as f:  # model.gin = the stored config
    gin.parse_config(f.read())
  try:
    assert RetroConfig() == config
  finally:
    gin.clear_config()
  mesh = partitioning.make_mesh({"data": 1}, devices=jax.devices()[:1])
  params, _, _ = ckpt_lib.load_model_params(model_dir, config, mesh)
  assert max_diff(logits_of(config, params, ref), ref["logits"]) < TOLERANCE


def test_megatron_gpt_imports_as_a_decoder(reference):
  """A checkpoint without retrieval keys is a GPT: its decoder, ready to retro-fit."""
  ckpt, ref = reference("learned_gelu_zero_cca", tp=2, zero_cca=True, **LEARNED_GELU)
  ranks, args = load_dir(ckpt)
  gpt = [{k: v for k, v in r.items()
          if ".cross_attention." not in k and "pre_cross_attn" not in k} for r in ranks]
  config, params = megatron.from_megatron(gpt, args)
  assert "cca" not in str(jax.tree_util.tree_structure(params))
  diff = max_diff(logits_of(config, params, ref, retrieval=False), ref["logits"])
  assert diff < TOLERANCE, diff
