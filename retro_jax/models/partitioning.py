"""Device mesh and logical-axis partitioning: the one place that knows mesh axis names.

Modules name their parameter and activation axes logically (see
``retro_jax.models.layers``); ``LOGICAL_AXIS_RULES`` maps them to the mesh axes:

| logical axis        | mesh axis         | what it shards                               |
|---------------------|-------------------|----------------------------------------------|
| activation_batch    | ('data', 'fsdp')  | the batch of every activation                |
| activation_heads    | 'tensor'          | attention heads of q/k/v/outputs             |
| activation_mlp      | 'tensor'          | MLP hidden activations                       |
| activation_vocab    | 'tensor'          | logits                                       |
| vocab               | 'tensor'          | rows of the embedding, columns of the output |
| embed               | 'fsdp'            | the model width of every weight (ZeRO-3)     |
| heads, kv_heads     | 'tensor'          | attention projections (Megatron TP)          |
| mlp                 | 'tensor'          | MLP weights (Megatron TP)                    |
| head_dim, norm, ... | replicated        |                                              |

A mesh is ``{'data': -1, 'fsdp': 1, 'tensor': 1}`` by default (pure data parallel; the
-1 axis takes the devices left over). A parameter dimension that a mesh axis does not
divide is replicated along that axis (with a log line), never silently mis-sharded.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import logging
import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("encoder_embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
)


def resolve_mesh_shape(mesh_shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills the one -1 axis so that the product equals ``num_devices``."""
  shape = {axis: int(mesh_shape.get(axis, 1)) for axis in MESH_AXES}
  unknown = set(mesh_shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh_shape has unknown axes {sorted(unknown)}; axes are {MESH_AXES}")
  free = [a for a, s in shape.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"mesh_shape {shape}: at most one axis may be -1")
  fixed = math.prod(s for s in shape.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh_shape {shape}: {num_devices} devices are not divisible by "
                       f"the fixed axes' product {fixed}")
    shape[free[0]] = num_devices // fixed
  if math.prod(shape.values()) != num_devices:
    raise ValueError(f"mesh_shape {shape} needs {math.prod(shape.values())} devices; "
                     f"there are {num_devices}")
  return shape


def make_mesh(mesh_shape: Optional[Mapping[str, int]] = None,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds a ('data', 'fsdp', 'tensor') mesh over all (global) devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_shape or {"data": -1}, len(devices))
  dims = tuple(shape[a] for a in MESH_AXES)
  try:
    device_array = jax.experimental.mesh_utils.create_device_mesh(dims, devices=devices)
  except Exception:  # Topology-unaware fallback (e.g. CPU device subsets).
    device_array = np.asarray(devices).reshape(dims)
  return Mesh(device_array, MESH_AXES)


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, name: str
              ) -> PartitionSpec:
  """Drops mesh axes that do not divide their dimension (replicating it instead)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    size = math.prod(mesh.shape[a] for a in names)
    if dim % size:
      logging.info("partitioning: %s dim %d is not divisible by mesh axes %s (size %d); "
                   "replicated", name, dim, names, size)
      fitted.append(None)
    else:
      fitted.append(axes)
  return PartitionSpec(*fitted)


def logical_shardings(boxed_tree: Any, mesh: Mesh,
                      rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for a pytree of ``nn.LogicallyPartitioned`` leaves (abstract or not).

  The result has the structure of ``nn.unbox(boxed_tree)``.
  """
  logical_specs = nn.get_partition_spec(boxed_tree)
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  is_spec = lambda x: isinstance(x, PartitionSpec)
  spec_by_path = {jax.tree_util.keystr(path): spec for path, spec in
                  jax.tree_util.tree_flatten_with_path(mesh_specs, is_leaf=is_spec)[0]}

  def to_sharding(path, leaf):
    name = jax.tree_util.keystr(path)
    spec = spec_by_path.get(name, PartitionSpec())
    return NamedSharding(mesh, _fit_spec(spec, leaf.shape, mesh, name))

  # Walk the unboxed tree: optimizer states hold leafless nodes (optax.MaskedNode).
  return jax.tree_util.tree_map_with_path(to_sharding, nn.unbox(boxed_tree))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES):
  """Context under which ``nn.with_logical_constraint`` inside modules takes effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def batch_sharding(mesh: Mesh, batch_dim: int = 0) -> NamedSharding:
  """Shards dimension ``batch_dim`` of an array over the batch axes ('data', 'fsdp');
  the dimensions before and after it are replicated."""
  return NamedSharding(mesh, PartitionSpec(*(None,) * batch_dim, BATCH_AXES))


def sharded_abstract(init_fn: Callable[[jax.Array], Any], mesh: Mesh,
                     rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES
                     ) -> tuple[Any, Any]:
  """``(abstract, shardings)`` of what ``init_fn(rng)`` returns (boxed variables, e.g.
  ``Retro(cfg).init``), without computing it: ``jax.ShapeDtypeStruct`` leaves that
  carry their ``NamedSharding``s, and those shardings (plain, unboxed trees)."""
  boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  shardings = logical_shardings(boxed, mesh, rules)
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed),
      shardings)
  return abstract, shardings


def sharded_init(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh,
                 rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES, *,
                 shardings: Any = None) -> tuple[Any, Any]:
  """Initialises variables directly into their shardings (no host-side full copy).

  ``init_fn(rng)`` returns boxed variables (e.g. ``Retro(cfg).init``); ``shardings``
  (``sharded_abstract``'s) saves working them out again. Returns
  ``(variables, shardings)`` with plain arrays.
  """
  if shardings is None:
    _, shardings = sharded_abstract(init_fn, mesh, rules)
  with activation_sharding(mesh, rules):
    variables = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(rng)
  return variables, shardings


@gin.configurable
def initialize_distributed(mode: str = "auto") -> None:
  """Starts multi-host JAX (``jax.distributed.initialize``) when the job has several hosts.

  mode: 'auto' (initialise when Slurm runs several tasks, when JAX_COORDINATOR_ADDRESS
  is set, or on a multi-host TPU slice), 'on' or 'off'. With JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID are read too (e.g. for local multi-process runs);
  otherwise JAX detects Slurm and TPU environments itself.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"initialize_distributed.mode={mode!r}: must be auto, on or off")
  env = os.environ
  multi = ("JAX_COORDINATOR_ADDRESS" in env or int(env.get("SLURM_NTASKS", "1")) > 1
           or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
  if mode == "off" or (mode == "auto" and not multi):
    return
  kwargs = {}
  if "JAX_COORDINATOR_ADDRESS" in env:
    kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(env["JAX_NUM_PROCESSES"]),
                  process_id=int(env["JAX_PROCESS_ID"]))
    # Cross-process collectives for CPU devices (local multi-process runs and tests);
    # this does not touch GPU/TPU backends. Asking for the backend here would
    # initialise it, which jax.distributed forbids.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d global devices", jax.process_index(),
               jax.process_count(), jax.device_count())
