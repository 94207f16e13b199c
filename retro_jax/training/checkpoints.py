"""orbax checkpoints: periodic/final saves, keep-last-N, restore-latest, and the
cross-stage initialisations of the InstructRetro recipe.

Layout: ``MODEL_DIR/checkpoints/<step>/{params, opt_state, meta}``; ``params`` alone is
enough to start another stage. ``meta`` (JSON) holds the step and the architecture
(``model_config``: the ``RetroConfig`` fields), so a model directory can be loaded
without naming its gin file; ``MODEL_DIR/vocab/spm.model``, when present, is its
tokenizer (imported checkpoints):

* retro-fit: a GPT (or any) checkpoint's decoder parameters + fresh encoder and CCA;
* SFT / GPT-fit / evaluation: all parameters of a checkpoint (optimizer reset).

orbax writes each step to a temporary directory and renames it when complete, so a
killed job never leaves a checkpoint that looks finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import traverse_util

from retro_jax.models import RetroConfig, RetroLM
from retro_jax.models import lm
from retro_jax.models import partitioning


def checkpoint_dir(model_dir: str) -> str:
  return os.path.join(os.path.abspath(model_dir), "checkpoints")


class Checkpointer:
  """Saves and restores ``(params, opt_state, meta)`` under ``MODEL_DIR/checkpoints``."""

  def __init__(self, model_dir: str, *, keep: int = 3, async_save: bool = True):
    self.directory = checkpoint_dir(model_dir)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, params: Any, opt_state: Any, meta: dict) -> None:
    """Saves a step; refuses (``FloatingPointError``) params/opt_state that are not
    finite (a non-finite leaf or an overflowing global norm): such a checkpoint could
    never be resumed, and keeping it would evict a good one (keep-last-N)."""
    problem = state_problem(params, opt_state)
    if problem is not None:
      raise FloatingPointError(f"not saving checkpoint step {step}: {problem}")
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any
              ) -> tuple[Any, Any, dict]:
    """Restores into the shardings of the abstract trees (ShapeDtypeStruct + sharding)."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_params),
          opt_state=ocp.args.StandardRestore(abstract_opt_state),
          meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise self._mismatch_error(step, abstract_params, abstract_opt_state, e) from e
    return restored["params"], restored["opt_state"], dict(restored["meta"])

  def _mismatch_error(self, step: int, abstract_params: Any, abstract_opt_state: Any,
                      error: Exception) -> ValueError:
    """A readable error for a checkpoint whose trees differ from the current run's."""
    where = os.path.join(self.directory, str(step))
    model_dir = os.path.dirname(self.directory)
    for item, current in (("opt_state", abstract_opt_state), ("params", abstract_params)):
      try:
        metadata = ocp.StandardCheckpointer().metadata(os.path.join(where, item))
        saved = _leaf_paths(getattr(metadata, "item_metadata", metadata))
      except Exception:  # pylint: disable=broad-except
        continue
      diff = _describe_difference(saved, _leaf_paths(current))
      if diff is None:
        continue
      if item == "opt_state":
        return ValueError(
            f"checkpoint {where}: its opt_state tree does not match the one the current "
            f"OptimizerConfig builds ({diff}). The optimizer config changed since it was "
            "saved (e.g. grad_clip_norm on/off, trainable, a different optimizer chain), "
            "so the run cannot resume with this optimizer state. Either restore the old "
            "OptimizerConfig, or start from its params only, with a fresh optimizer, in a "
            f"new MODEL_DIR: --gin.INIT_CHECKPOINT={model_dir} "
            "--gin.train.init_mode='params' --gin.MODEL_DIR=<new dir>")
      return ValueError(
          f"checkpoint {where}: its params tree does not match the current model config "
          f"({diff}); resume with the model config it was trained with")
    return ValueError(f"checkpoint {where} cannot be restored into the current run's "
                      f"params/opt_state: {error}")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _key_name(key: Any) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _leaf_paths(tree: Any) -> list[str]:
  """'/'-joined leaf paths, the same for a live optax state (namedtuples, tuples) and
  orbax's metadata of it (dicts, lists)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return sorted("/".join(_key_name(k) for k in path) for path, _ in leaves)


def _describe_difference(saved: list[str], current: list[str], limit: int = 3
                         ) -> Optional[str]:
  if saved == current:
    return None
  only_saved = [p for p in saved if p not in set(current)][:limit]
  only_current = [p for p in current if p not in set(saved)][:limit]
  return (f"saved: {len(saved)} leaves, current: {len(current)} leaves; first paths only "
          f"in the checkpoint: {only_saved or 'none'}; first paths only in the current "
          f"run: {only_current or 'none'}")


@jax.jit
def _finite_summary(tree: Any) -> tuple[jax.Array, jax.Array]:
  leaves = [x for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.asarray(True), jnp.asarray(0.0, jnp.float32)
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
  return finite, optax.global_norm(leaves)


def state_problem(params: Any, opt_state: Any) -> Optional[str]:
  """None if params and opt_state are finite (every leaf, and a finite float32 global
  norm of each tree), else what is wrong. A tree whose leaves are ~1e30 is finite
  element-wise but its global norm overflows and the next step diverges: not good."""
  problems = []
  for name, tree in (("params", params), ("opt_state", opt_state)):
    finite, norm = jax.device_get(_finite_summary(tree))
    if not bool(finite):
      problems.append(f"{name} have non-finite values")
    elif not bool(jnp.isfinite(norm)):
      problems.append(f"{name} global norm is {float(norm)}")
  return "; ".join(problems) if problems else None


def _resolve_checkpoint(path: str) -> tuple[str, int]:
  """Accepts MODEL_DIR, MODEL_DIR/checkpoints or MODEL_DIR/checkpoints/<step>."""
  path = os.path.abspath(path)
  base = os.path.basename(path.rstrip("/"))
  if base.isdigit() and os.path.isdir(os.path.join(path, "params")):
    return os.path.dirname(path), int(base)
  directory = path if os.path.basename(path) == "checkpoints" else checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints under {path} (looked for {directory})")
  steps = sorted(int(d) for d in os.listdir(directory)
                 if d.isdigit() and os.path.isdir(os.path.join(directory, d, "params")))
  if not steps:
    raise FileNotFoundError(f"{directory} holds no finished checkpoint")
  return directory, steps[-1]


def config_meta(config: RetroConfig) -> dict:
  """The JSON form of a ``RetroConfig`` stored in a checkpoint's ``meta``."""
  return {"model_config": dataclasses.asdict(config)}


def stored_model_config(path: str) -> Optional[RetroConfig]:
  """The ``RetroConfig`` stored in a checkpoint's ``meta`` (None for checkpoints
  written without one)."""
  directory, step = _resolve_checkpoint(path)
  meta_dir = os.path.join(directory, str(step), "meta")
  files = [os.path.join(meta_dir, f) for f in
           (os.listdir(meta_dir) if os.path.isdir(meta_dir) else ())]
  for name in files:
    if not os.path.isfile(name):
      continue
    try:
      with open(name, encoding="utf-8") as f:
        meta = json.load(f)
    except (OSError, ValueError):
      continue
    if isinstance(meta, dict) and "model_config" in meta:
      fields = {f.name for f in dataclasses.fields(RetroConfig)}
      stored = meta["model_config"]
      unknown = sorted(set(stored) - fields)
      if unknown:
        raise ValueError(f"{name}: model_config has fields {unknown} that this "
                         "RetroConfig does not know (written by a newer retro_jax?)")
      return RetroConfig(**stored)
  return None


def model_dir_vocab(path: str) -> Optional[str]:
  """``MODEL_DIR/vocab/spm.model`` of the model directory holding ``path``, if any."""
  directory, _ = _resolve_checkpoint(path)
  candidate = os.path.join(os.path.dirname(directory), "vocab", "spm.model")
  return candidate if os.path.isfile(candidate) else None


def load_params(path: str, abstract_params: Any, *, partial: bool = False) -> Any:
  """Restores the ``params`` item of a checkpoint into ``abstract_params``' shardings.

  Args:
    path: MODEL_DIR, its ``checkpoints`` dir, or one step's directory (latest step when
      not given).
    abstract_params: tree of ``jax.ShapeDtypeStruct`` (with shardings) to restore into.
    partial: allow the checkpoint to hold more parameters than requested.
  """
  directory, step = _resolve_checkpoint(path)
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True))
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
        item=abstract_params, restore_args=restore_args, partial_restore=partial)))
  except (ValueError, KeyError) as e:
    raise ValueError(f"checkpoint {directory}/{step}: its params do not match the model "
                     f"config ({e})") from e
  finally:
    manager.close()
  logging.info("restored params from %s step %d", directory, step)
  return restored["params"]


def retrofit_params(path: str, fresh_params: Any, abstract_params: Any) -> Any:
  """Decoder parameters from a checkpoint, encoder and CCA from ``fresh_params``.

  The checkpoint may be a GPT (decoder-only tree) or a Retro checkpoint (its retrieval
  parameters are ignored). Returns a tree with the structure of ``fresh_params``.
  """
  abstract_decoder, _ = lm.split_retro_params(abstract_params)
  decoder = load_params(path, traverse_util.unflatten_dict(abstract_decoder), partial=True)
  return lm.replace_params(fresh_params, decoder)


def checkpoint_param_keys(path: str) -> set[tuple[str, ...]]:
  """Flattened parameter names stored in a checkpoint (read from its metadata)."""
  directory, step = _resolve_checkpoint(path)
  metadata = ocp.StandardCheckpointer().metadata(os.path.join(directory, str(step), "params"))
  tree = getattr(metadata, "item_metadata", metadata)
  return set(traverse_util.flatten_dict(dict(tree)).keys())


def has_retro_params(path: str) -> bool:
  """Whether the checkpoint at ``path`` holds the Retro part (a GPT one does not)."""
  return any(lm.is_retro_path(key) for key in checkpoint_param_keys(path))


def load_model_params(path: str, config: RetroConfig, mesh: jax.sharding.Mesh,
                      rules=partitioning.LOGICAL_AXIS_RULES) -> tuple[Any, Any, bool]:
  """Loads a GPT or Retro checkpoint for ``config`` into its shardings on ``mesh``.

  Returns ``(params, shardings, has_retro)``; a GPT checkpoint (decoder only) gives
  decoder parameters, usable with retrieval off.
  """
  retro = has_retro_params(path)
  abstract, shardings = RetroLM(config, retrieval=retro).sharded_abstract_params(mesh, rules)
  return load_params(path, abstract), shardings, retro
