"""megatron-core 0.12.3's own RetroModel as the numerical reference for Megatron import.

    python tests/megatron_reference.py SPEC.json OUT_DIR

Builds a tiny fp32 ``RetroModel`` (local, non transformer-engine specs) on CPU with
``tp`` tensor-parallel ranks (processes over gloo), so that every shard is what
megatron-core itself partitions (``use_cpu_initialization``: each rank holds its slice
of the master weight). Every parameter is then randomised (norm weights 1 + 0.2 N,
biases 0.2 N, weights N(0, 1/fan_in)); replicated parameters get the same values on
every rank. One forward pass, then per rank ``OUT_DIR/iter_0000001/mp_rank_XX/
model_optim_rng.pt`` = ``{'model': state_dict, 'args': Namespace(...), 'iteration',
'checkpoint_version'}`` as Megatron-LM saves it, ``latest_checkpointed_iteration.txt``,
and ``OUT_DIR/reference.npz`` (inputs and the gathered logits ``[b, n, padded vocab]``).

SPEC keys (defaults below; ``token_vocab``: input ids drawn below it instead of below
``vocab``; ``zero_cca``: CCA output projections zeroed, so that the
model is its GPT decoder; ``load``: a checkpoint directory (``release/``) whose shards
are loaded, strictly, instead of random parameters): tp, num_layers, retro_layers (1-based), hidden, heads,
num_query_groups, kv_channels, ffn, vocab (padded), swiglu, bias, qkv_bias, rope,
rotary_percent, layernorm_1p, tied, seq, batch, k, chunk, encoder_layers, seed and
``layout``: 'mcore' (the state dict as megatron-core names it) or 'legacy' (renamed
and nested by the documented legacy map, ``legacy_state_dict``). ``legacy``: the model
computes what Megatron-LM's legacy code computes (the released
InstructRetro checkpoints): a final layernorm after the decoder, and the Retro
encoder's cross-attention residual is the layer's residual stream instead of its
layer-normed input (legacy ``retro_encoder_cross_attention``: ``residual =
chunked_outputs_before_norm[:, :, k]``). megatron-core's module is patched for exactly
that and nothing else.

``apply_layernorm_1p``: the CPU norm (torch LayerNorm) has no zero-centred gamma, so
the model runs with plain gammas g and the checkpoint stores g - 1 with
``apply_layernorm_1p=True``, as Megatron stores a 1p model computing the same function.

CPU patches: see ../shared/references/megatron_core/README.md.
"""

import argparse
import json
import os
import sys
import tempfile
import unittest.mock
import warnings

os.environ.setdefault("NVTE_FLASH_ATTN", "0")
os.environ.setdefault("NVTE_FUSED_ATTN", "0")
warnings.filterwarnings("ignore")

DEFAULTS = dict(tp=1, num_layers=4, retro_layers=[2, 4], hidden=64, heads=4,
                num_query_groups=None, kv_channels=None, ffn=None, vocab=128, swiglu=False,
                bias=True, qkv_bias=False, rope=False, rotary_percent=1.0,
                layernorm_1p=False, tied=False, seq=128, batch=2, k=2, chunk=64,
                encoder_layers=2, seed=0, legacy=False, normalization="LayerNorm",
                layout="mcore", token_vocab=None)


def _patch_cpu():
  import torch
  import megatron.core.utils as mcu
  import megatron.core.models.retro.config as retro_config_mod
  import megatron.core.fusions.fused_softmax as fused_softmax_mod
  from megatron.core.models.common.embeddings import rotary_pos_embedding as rope_mod
  retro_config_mod.is_te_min_version = lambda *a, **k: False
  mcu.GlobalMemoryBuffer.get_tensor = (
      lambda self, shape, dtype, name: torch.zeros(*shape, dtype=dtype))
  fused_softmax_mod.get_default_causal_mask = (
      lambda sq: torch.triu(torch.ones(sq, sq, dtype=torch.bool), 1))
  forward = rope_mod.RotaryEmbedding.forward

  def rope_forward_cpu(self, *a, **k):
    with unittest.mock.patch.object(torch.cuda, "current_device", lambda: "cpu"):
      return forward(self, *a, **k)
  rope_mod.RotaryEmbedding.forward = rope_forward_cpu


def _patch_legacy_encoder_residual():
  """Legacy Megatron: the encoder cross-attention adds to the residual stream."""
  from megatron.core.models.retro import encoder_attention
  cls = encoder_attention.RetroEncoderBiasDropoutAdd
  original = cls._forward.__func__

  def legacy(klass, x_with_bias, residual, prob, retro_num_neighbors, bias_dropout_add):
    r, _, d = residual.shape
    stream = residual.reshape(r, -1, retro_num_neighbors, d)
    x_with_bias = [(out, bias, stream[:, :, j].contiguous())
                   for j, (out, bias, _) in enumerate(x_with_bias)]
    return original(klass, x_with_bias, residual, prob, retro_num_neighbors,
                    bias_dropout_add)
  cls._forward = classmethod(legacy)


_LEGACY_NAMES = (  # megatron-core local name -> legacy name (megatron_retro.md section 6)
    ("input_layernorm.", "input_norm."),
    ("self_attention.linear_qkv.", "self_attention.query_key_value."),
    ("self_attention.linear_proj.", "self_attention.dense."),
    ("cross_attention.attn.linear_q.", "inter_attention.query."),
    ("cross_attention.attn.linear_kv.", "inter_attention.key_value."),
    ("cross_attention.attn.linear_proj.", "inter_attention.dense."),
    ("pre_cross_attn_layernorm.", "post_attention_norm."),
    ("mlp.linear_fc1.", "mlp.dense_h_to_4h."),
    ("mlp.linear_fc2.", "mlp.dense_4h_to_h."),
)


def legacy_state_dict(state):
  """A megatron-core state dict under the legacy Megatron-LM names, nested as legacy
  ``GPTModel.state_dict_for_save_checkpoint`` writes it."""
  embedding, encoder, output = {}, {}, {}
  for name, value in state.items():
    if name.startswith("embedding."):
      embedding.setdefault(name.split(".")[1], {})["weight"] = value
      continue
    if name == "output_layer.weight":
      output["weight"] = value
      continue
    if name.startswith("decoder.final_layernorm."):
      encoder["final_norm." + name.rsplit(".", 1)[1]] = value
      continue
    body = name[len("decoder."):].replace("cross_attention.encoder.layers.",
                                          "retriever.layers.")
    head, _, tail = body.rpartition("layers.")
    index, _, rest = tail.partition(".")
    layer_has_cross = any(k.startswith(name[:name.rindex(rest)] + "cross_attention.attn.")
                          for k in state)
    rest = rest.replace("pre_mlp_layernorm.norm.", "pre_mlp_layernorm.")
    if rest.startswith("pre_mlp_layernorm."):
      rest = rest.replace("pre_mlp_layernorm.", "post_inter_attention_norm." if
                          layer_has_cross else "post_attention_norm.")
    for new, old in _LEGACY_NAMES:
      if rest.startswith(new):
        rest = old + rest[len(new):]
        break
    encoder[f"{head}layers.{index}.{rest}"] = value
  tree = {"embedding": embedding, "encoder": encoder}
  if output:
    tree["output_layer"] = output
  return {"language_model": tree}


def megatron_args(spec):
  """The Megatron-LM training arguments a run of this model would have stored."""
  heads = spec["heads"]
  return argparse.Namespace(
      num_layers=spec["num_layers"], hidden_size=spec["hidden"],
      ffn_hidden_size=spec["ffn"] or 4 * spec["hidden"], num_attention_heads=heads,
      group_query_attention=spec["num_query_groups"] is not None,
      num_query_groups=spec["num_query_groups"] or heads,
      kv_channels=spec["kv_channels"] or spec["hidden"] // heads,
      position_embedding_type="rope" if spec["rope"] else "learned_absolute",
      rotary_percent=spec["rotary_percent"], rotary_base=10000, rotary_interleaved=False,
      normalization=spec["normalization"], apply_layernorm_1p=spec["layernorm_1p"],
      norm_epsilon=1e-5, swiglu=spec["swiglu"], squared_relu=False, openai_gelu=False,
      add_bias_linear=spec["bias"], add_qkv_bias=spec["qkv_bias"],
      untie_embeddings_and_output_weights=not spec["tied"],
      padded_vocab_size=spec["vocab"], make_vocab_size_divisible_by=16,
      max_position_embeddings=512, seq_length=spec["seq"],
      tensor_model_parallel_size=spec["tp"], pipeline_model_parallel_size=1,
      apply_residual_connection_post_layernorm=False, hidden_dropout=0.0,
      attention_dropout=0.0, retro_add_retriever=True,
      retro_encoder_layers=spec["encoder_layers"], retro_num_neighbors=spec["k"],
      retro_num_retrieved_chunks=2, retro_gpt_chunk_length=spec["chunk"],
      retro_encoder_hidden_dropout=0.1, retro_encoder_attention_dropout=0.1,
      retro_attention_gate=1.0, use_legacy_models=spec["legacy"], bf16=False, fp16=False,
      params_dtype="float32")


def _randomise(model, spec, rank):
  """Every parameter random; a replicated one identical on every rank."""
  import hashlib
  import numpy as np
  import torch
  for name, p in model.named_parameters():
    split = getattr(p, "tensor_model_parallel", False)
    key = f"{spec['seed']}:{name}:{rank if split else 'all'}"
    seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
      noise = torch.randn(p.shape, generator=g)
      if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        p.copy_(1.0 + 0.2 * noise)
      elif p.dim() == 1:
        p.copy_(0.2 * noise)
      elif "embeddings" in name:
        p.copy_(noise)
      else:
        p.copy_(noise / np.sqrt(p.shape[1]))


def _run_rank(rank, spec, out_dir, rendezvous):
  import numpy as np
  import torch
  import torch.distributed as dist
  torch.set_num_threads(1)
  _patch_cpu()
  if spec["legacy"]:
    _patch_legacy_encoder_residual()
  from megatron.core import parallel_state
  from megatron.core.tensor_parallel import random as tp_random
  from megatron.core.models.retro import RetroConfig, RetroModel
  from megatron.core.models.retro.decoder_spec import get_retro_decoder_layer_local_spec
  from megatron.core.models.retro.encoder_spec import get_retro_encoder_block_spec
  from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
  from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
  from megatron.core.transformer.torch_norm import WrappedTorchNorm
  import torch.nn.functional as F

  tp = spec["tp"]
  dist.init_process_group("gloo", init_method="file://" + rendezvous, rank=rank,
                          world_size=tp)
  parallel_state.initialize_model_parallel(tp, 1)
  tp_random.initialize_rng_tracker(inference_rng_tracker=True)
  torch.manual_seed(spec["seed"])
  cfg = RetroConfig(
      num_layers=spec["num_layers"], hidden_size=spec["hidden"],
      num_attention_heads=spec["heads"], num_query_groups=spec["num_query_groups"],
      kv_channels=spec["kv_channels"], ffn_hidden_size=spec["ffn"],
      add_bias_linear=spec["bias"], add_qkv_bias=spec["qkv_bias"],
      gated_linear_unit=spec["swiglu"], activation_func=F.silu if spec["swiglu"] else F.gelu,
      bias_activation_fusion=False, normalization=spec["normalization"],
      tensor_model_parallel_size=tp, use_cpu_initialization=True,
      params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
      retro_encoder_hidden_dropout=0.0, retro_encoder_attention_dropout=0.0,
      retro_num_neighbors=spec["k"], retro_chunk_length=spec["chunk"],
      retro_num_retrieved_chunks=2, retro_encoder_num_layers=spec["encoder_layers"],
      retro_split_preprocessing="98,2,0")
  retro_layers = list(spec["retro_layers"])
  encoder_spec = get_retro_encoder_block_spec(cfg, use_transformer_engine=False)
  layer_specs = [get_retro_decoder_layer_local_spec(encoder_spec) if i == retro_layers[0]
                 else get_retro_decoder_layer_local_spec() if i in retro_layers
                 else get_gpt_layer_local_spec() for i in range(1, cfg.num_layers + 1)]
  block = TransformerBlockSubmodules(
      layer_specs=layer_specs, layer_norm=WrappedTorchNorm if spec["legacy"] else None)
  model = RetroModel(config=cfg, transformer_layer_spec=block, vocab_size=spec["vocab"],
                     max_sequence_length=512,
                     position_embedding_type="rope" if spec["rope"] else "learned_absolute",
                     rotary_percent=spec["rotary_percent"],
                     share_embeddings_and_output_weights=spec["tied"]).eval()
  _randomise(model, spec, rank)
  if spec.get("zero_cca"):  # CCA adds nothing: the model is its GPT decoder
    with torch.no_grad():
      for name, p in model.named_parameters():
        if ".cross_attention.attn.linear_proj." in name and ".encoder." not in name:
          p.zero_()
  if spec.get("load"):  # run a checkpoint instead of random parameters
    path = os.path.join(spec["load"], "release", f"mp_rank_{rank:02d}",
                        "model_optim_rng.pt")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    state = dict(blob["model"])
    if blob["args"].apply_layernorm_1p:
      state = {k: v + 1.0 if k.endswith("norm.weight") or k.endswith("layernorm.weight")
               else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
      raise ValueError(f"{path}: missing {missing[:5]}, unexpected {unexpected[:5]}")

  g = torch.Generator().manual_seed(1000 + spec["seed"])
  b, n, k, m = spec["batch"], spec["seq"], spec["k"], spec["chunk"]
  r, l = 2 * m, n // m
  ids = torch.randint(0, spec["token_vocab"] or spec["vocab"], (b, n), generator=g)
  neighbors = torch.randint(0, spec["token_vocab"] or spec["vocab"], (b, l, k, r),
                            generator=g)
  with torch.no_grad():
    logits = model(input_ids=ids, position_ids=torch.arange(n).expand(b, n),
                   attention_mask=torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), 1),
                   context_input_ids=neighbors.reshape(b * l * k, r),
                   context_position_ids=torch.arange(r).expand(b * l * k, r),
                   context_mask=None)
  state = {}
  for name, value in model.state_dict().items():
    if not torch.is_tensor(value):
      continue  # *._extra_state
    value = value.clone()
    if spec["layernorm_1p"] and (name.endswith("norm.weight")
                                 or name.endswith("layernorm.weight")):
      value = value - 1.0
    state[name] = value
  shard_dir = os.path.join(out_dir, "iter_0000001", f"mp_rank_{rank:02d}")
  os.makedirs(shard_dir, exist_ok=True)
  if spec.get("layout") == "legacy":
    state = legacy_state_dict(state)
  torch.save({"model": state, "args": megatron_args(spec), "iteration": 1,
              "checkpoint_version": 3.0}, os.path.join(shard_dir, "model_optim_rng.pt"))
  np.save(os.path.join(out_dir, f"logits_rank{rank}.npy"), logits.numpy())
  if rank == 0:
    np.savez(os.path.join(out_dir, "inputs.npz"), tokens=ids.numpy(),
             neighbors=neighbors.numpy())
  dist.barrier()
  dist.destroy_process_group()


def main():
  spec = dict(DEFAULTS)
  with open(sys.argv[1]) as f:
    spec.update(json.load(f))
  out_dir = sys.argv[2]
  os.makedirs(out_dir, exist_ok=True)
  rendezvous = os.path.join(tempfile.mkdtemp(), "rendezvous")
  import torch.multiprocessing as mp
  if spec["tp"] == 1:
    _run_rank(0, spec, out_dir, rendezvous)
  else:
    mp.spawn(_run_rank, args=(spec, out_dir, rendezvous), nprocs=spec["tp"], join=True)
  import numpy as np
  logits = np.concatenate([np.load(os.path.join(out_dir, f"logits_rank{i}.npy"))
                           for i in range(spec["tp"])], axis=-1)
  inputs = np.load(os.path.join(out_dir, "inputs.npz"))
  np.savez(os.path.join(out_dir, "reference.npz"), logits=logits, **inputs)
  for i in range(spec["tp"]):
    os.remove(os.path.join(out_dir, f"logits_rank{i}.npy"))
  os.remove(os.path.join(out_dir, "inputs.npz"))
  with open(os.path.join(out_dir, "latest_checkpointed_iteration.txt"), "w") as f:
    f.write("1")


if __name__ == "__main__":
  main()
