"""Megatron-LM checkpoint files: the directory, the shards, and tensor-parallel merges.

A Megatron-LM (legacy or megatron-core, ``--ckpt-format torch``) checkpoint directory:

    DIR/latest_checkpointed_iteration.txt     "release" or the iteration number
    DIR/release/ | DIR/iter_0000500/           one directory per saved iteration
        mp_rank_00/model_optim_rng.pt          tensor-parallel rank 0 (pipeline size 1)
        mp_rank_01/model_optim_rng.pt          ...
        mp_rank_00_000/model_optim_rng.pt      (pipeline parallel: mp_rank_TT_PPP; refused)

Each ``model_optim_rng.pt`` is a ``torch.save`` pickle of a dict:

    'model'               the module state dict of this rank (legacy: nested
                          {'language_model': {'embedding': {...}, 'encoder': {...},
                          'output_layer': {...}}}; megatron-core: flat names)
    'args'                argparse.Namespace of the training run (architecture below)
    'iteration', 'checkpoint_version', 'optimizer', 'rng_state', ...   (not read)

Tensor parallelism splits a tensor over the ranks (``tensor_parallel_rule``):

    column-parallel, dim 0    linear_qkv, linear_q, linear_kv, linear_fc1 (weights and
                              biases), word_embeddings, output_layer
    row-parallel, dim 1       linear_proj, linear_fc2 weights (their biases replicated)
    replicated                norms, position_embeddings, row-parallel biases

Each rank's q/k/v rows hold whole heads (query groups), so concatenation keeps the
per-head layout. A gated (SwiGLU) ``linear_fc1`` holds ``[gate_r; up_r]`` on rank r:
the merge concatenates the gates, then the ups. The word embedding and output layer
hold ``padded_vocab_size`` rows (a multiple of ``make_vocab_size_divisible_by * TP``).

The pickles are opened memory-mapped (``torch.load(mmap=True)``): a tensor's bytes are
read when it is merged, so a converter holds one tensor's shards at a time. They are
pickles: load only checkpoints you trust. torch is needed here (converter only).
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import ml_dtypes
import numpy as np

SHARD_FILE = "model_optim_rng.pt"
TRACKER_FILE = "latest_checkpointed_iteration.txt"

_COLUMN = ("linear_qkv", "linear_q", "linear_kv", "linear_fc1", "word_embeddings",
           "output_layer")
_ROW = ("linear_proj", "linear_fc2")


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading or writing Megatron-LM checkpoints needs torch (a "
                      "converter-only dependency): pip install torch==2.13.0 (CPU build)"
                      ) from e
  return torch


# The directory --------------------------------------------------------------------


def iteration_dir(load_dir: str, iteration: Optional[str] = None) -> str:
  """The directory of one saved iteration (``release`` or ``iter_NNNNNNN``).

  Args:
    load_dir: the checkpoint directory (``--load`` of Megatron-LM), or one iteration's.
    iteration: 'release', an iteration number, or None: the tracker file's.
  """
  if not os.path.isdir(load_dir):
    raise FileNotFoundError(f"{load_dir}: no such checkpoint directory")
  if any(d.startswith("mp_rank_") for d in os.listdir(load_dir)):
    return load_dir
  if iteration is None:
    tracker = os.path.join(load_dir, TRACKER_FILE)
    if not os.path.isfile(tracker):
      raise FileNotFoundError(f"{load_dir}: no {TRACKER_FILE} and no mp_rank_* shard "
                              "directories (is this a Megatron-LM --save directory?)")
    with open(tracker, encoding="utf-8") as f:
      iteration = f.read().strip()
    if iteration != "release" and not iteration.isdigit():
      raise ValueError(f"{tracker}: expected 'release' or an iteration number, got "
                       f"{iteration!r}")
  name = "release" if str(iteration) == "release" else f"iter_{int(iteration):07d}"
  path = os.path.join(load_dir, name)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: the iteration named by {TRACKER_FILE} is missing")
  if os.path.isfile(os.path.join(path, ".metadata")) or any(
      f.endswith(".distcp") for f in os.listdir(path)):
    raise ValueError(f"{path} is a torch_dist (distributed) checkpoint; convert it to "
                     "the torch format first (Megatron-LM: --ckpt-convert-format torch "
                     "--ckpt-convert-save DIR)")
  return path


def shard_paths(iter_dir: str, tensor_parallel: Optional[int] = None) -> list[str]:
  """``mp_rank_XX/model_optim_rng.pt`` of every tensor-parallel rank, in rank order."""
  ranks = {}
  for name in os.listdir(iter_dir):
    match = re.fullmatch(r"mp_rank_(\d+)(?:_(\d+))?", name)
    if not match:
      continue
    if match.group(2) is not None:
      raise ValueError(f"{os.path.join(iter_dir, name)}: pipeline-parallel checkpoints "
                       "(mp_rank_TT_PPP) are not supported; re-save with "
                       "--pipeline-model-parallel-size 1")
    ranks[int(match.group(1))] = os.path.join(iter_dir, name, SHARD_FILE)
  if not ranks:
    raise FileNotFoundError(f"{iter_dir}: no mp_rank_XX shard directories")
  count = max(ranks) + 1
  missing = [r for r in range(count) if r not in ranks]
  if missing:
    raise FileNotFoundError(f"{iter_dir}: tensor-parallel shard(s) mp_rank_"
                            f"{', mp_rank_'.join(f'{r:02d}' for r in missing)} missing")
  if tensor_parallel is not None and tensor_parallel != count:
    raise ValueError(f"{iter_dir}: args.tensor_model_parallel_size={tensor_parallel} "
                     f"but {count} mp_rank_* shards are present")
  for rank in range(count):
    if not os.path.isfile(ranks[rank]):
      raise FileNotFoundError(f"{ranks[rank]}: shard file missing")
  return [ranks[r] for r in range(count)]


def flatten_state_dict(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested module state dicts (legacy ``language_model``) -> dotted names."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten_state_dict(value, name + "."))
    else:
      flat[name] = value
  return flat


def model_tensors(model: Mapping[str, Any]) -> dict[str, Any]:
  """The tensors of a module state dict, flat; ``*._extra_state`` (transformer-engine
  metadata) and other non-tensor entries dropped."""
  return {k: v for k, v in flatten_state_dict(model).items()
          if not k.endswith("_extra_state") and hasattr(v, "shape")}


class Shard:
  """One rank's ``model_optim_rng.pt``, memory-mapped: ``tensors`` (flat names to
  torch tensors; non-tensor entries such as ``*._extra_state`` dropped) and ``args``."""

  def __init__(self, path: str):
    torch = _torch()
    self.path = path
    try:
      blob = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{path}: cannot be read as a torch checkpoint ({e})") from e
    if not isinstance(blob, Mapping) or "model" not in blob:
      raise ValueError(f"{path}: no 'model' entry (keys: {sorted(blob)[:8]}); not a "
                       "Megatron-LM checkpoint")
    model = blob["model"]
    if not isinstance(model, Mapping):
      raise ValueError(f"{path}: 'model' is a {type(model).__name__}, not a state dict")
    self.args = blob.get("args")
    self.tensors = model_tensors(model)


def to_numpy(tensor: Any) -> np.ndarray:
  """A torch tensor as numpy (bfloat16 through ml_dtypes, no widening)."""
  torch = _torch()
  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def from_numpy(array: np.ndarray) -> Any:
  torch = _torch()
  array = np.ascontiguousarray(array)
  if array.dtype.name == "bfloat16":
    return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(array)


# Tensor parallelism -----------------------------------------------------------------


def tensor_parallel_rule(name: str) -> str:
  """'column', 'row' or 'replicated' for a megatron-core (local spec) tensor name."""
  parts = name.split(".")
  module = parts[-2] if len(parts) >= 2 else ""
  if module in _COLUMN:
    return "column"
  if module in _ROW:
    return "row" if parts[-1] == "weight" else "replicated"
  return "replicated"


def merge_shards(name: str, parts: Sequence[np.ndarray], *, gated: bool,
                 paths: Sequence[str] = ()) -> np.ndarray:
  """Joins one tensor's per-rank parts (megatron-core names, see the module docstring)."""
  rule = tensor_parallel_rule(name)
  if len(parts) == 1:
    return parts[0]
  if rule == "replicated":
    for rank, part in enumerate(parts[1:], 1):
      if part.shape != parts[0].shape or not np.array_equal(part, parts[0]):
        where = paths[rank] if paths else f"rank {rank}"
        raise ValueError(f"{where}: {name} should be replicated on every tensor-parallel "
                         "rank but differs from rank 0's")
    return parts[0]
  if rule == "row":
    return np.concatenate(parts, axis=1)
  if gated and name.split(".")[-2] == "linear_fc1":
    halves = [np.split(p, 2, axis=0) for p in parts]
    return np.concatenate([h[0] for h in halves] + [h[1] for h in halves], axis=0)
  return np.concatenate(parts, axis=0)


def split_tensor(name: str, array: np.ndarray, tensor_parallel: int, *,
                 gated: bool) -> list[np.ndarray]:
  """The inverse of ``merge_shards``: one part per rank."""
  rule = tensor_parallel_rule(name)
  if tensor_parallel == 1 or rule == "replicated":
    return [array] * tensor_parallel
  axis = 1 if rule == "row" else 0
  if array.shape[axis] % tensor_parallel:
    raise ValueError(f"{name}: dimension {axis} of shape {array.shape} does not divide "
                     f"into {tensor_parallel} tensor-parallel ranks")
  if gated and name.split(".")[-2] == "linear_fc1":
    gate, up = np.split(array, 2, axis=0)
    return [np.concatenate([g, u], axis=0) for g, u in
            zip(np.split(gate, tensor_parallel), np.split(up, tensor_parallel))]
  return list(np.split(array, tensor_parallel, axis=axis))


# Writing ------------------------------------------------------------------------------


def write_checkpoint(save_dir: str, rank_state_dicts: Iterable[Mapping[str, Any]],
                     args: argparse.Namespace, *, iteration: str = "release") -> list[str]:
  """Writes ``save_dir/{release|iter_N}/mp_rank_XX/model_optim_rng.pt`` per rank and
  the tracker file (last, so a killed export never looks complete)."""
  torch = _torch()
  name = "release" if iteration == "release" else f"iter_{int(iteration):07d}"
  paths = []
  for rank, state in enumerate(rank_state_dicts):
    directory = os.path.join(save_dir, name, f"mp_rank_{rank:02d}")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, SHARD_FILE)
    tmp = path + ".tmp"
    torch.save({"model": dict(state), "args": args, "checkpoint_version": 3.0,
                "iteration": 0 if iteration == "release" else int(iteration)}, tmp)
    os.replace(tmp, path)
    paths.append(path)
  tracker = os.path.join(save_dir, TRACKER_FILE)
  with open(tracker + ".tmp", "w", encoding="utf-8") as f:
    f.write(str(iteration))
  os.replace(tracker + ".tmp", tracker)
  return paths
