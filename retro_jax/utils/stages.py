r"""What the sharded, resumable offline stages share: shard names and ranges, the
directory lock, the removal of a killed run's temporaries, and the stage command line.

A stage (chunk DB, embeddings, index, neighbors) splits its work into ``num_shards``
shards, one file per shard named ``shard_name(shard_id, num_shards, suffix)``; every
file is written under a temporary ``.<name>.<random>.tmp`` (``utils.io.atomic_path``),
so a re-run of a killed shard removes those (``remove_stale_temporaries``) and redoes
it. Processes building the same directory serialise the steps that must run once
(training an index, merging) with ``locked``.

A stage's command line is ``run_stage(build)``: gin files and bindings only, as in
``retro_jax.train``::

    python -m retro_jax.retrieval.chunk_db --gin_file=my_stage.gin \
        --gin.build_chunk_db.output_dir=/data/db --gin.build_chunk_db.shard_id=3
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import json
import os
import shutil
from typing import Any, Callable, Iterator, Optional

from absl import app
from absl import flags
from absl import logging

from retro_jax.utils import gin_utils


def shard_name(shard_id: int, num_shards: int, suffix: str = "") -> str:
  """``shard_00003_of_00008`` + ``suffix`` (e.g. ``'.npy'``): one shard's file name."""
  return f"shard_{shard_id:05d}_of_{num_shards:05d}{suffix}"


def check_shard(shard_id: int, num_shards: int) -> None:
  """Raises ``ValueError`` unless ``0 <= shard_id < num_shards``."""
  if num_shards < 1 or not 0 <= shard_id < num_shards:
    raise ValueError(f"need 0 <= shard_id < num_shards, got shard_id={shard_id}, "
                     f"num_shards={num_shards}")


def shard_range(num_records: int, shard_id: int, num_shards: int) -> tuple[int, int]:
  """``[start, stop)`` record range of a contiguous shard (sizes differ by <= 1)."""
  check_shard(shard_id, num_shards)
  return (shard_id * num_records // num_shards,
          (shard_id + 1) * num_records // num_shards)


def shard_chunk_range(num_chunks: int, shard_id: int, num_shards: int) -> tuple[int, int]:
  """Contiguous chunk range ``[start, end)`` of a shard of the embeddings and neighbor
  stages: ``ceil(num_chunks / num_shards)`` chunks per shard, so the last shards may
  be short or empty (their files record these ranges; ``shard_range`` balances)."""
  per = -(-num_chunks // num_shards)
  start = min(num_chunks, shard_id * per)
  return start, min(num_chunks, start + per)


@contextlib.contextmanager
def locked(directory: str, name: str) -> Iterator[None]:
  """An exclusive lock (``<directory>/.<name>.lock``) between processes building the
  same directory; creates the directory."""
  os.makedirs(directory, exist_ok=True)
  fd = os.open(os.path.join(directory, f".{name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def remove_stale_temporaries(output_dir: str, name: str) -> None:
  """Removes the temporaries (files or directories) of output ``name`` a killed run
  left in ``output_dir``."""
  for path in glob.glob(os.path.join(glob.escape(output_dir), f".{name}.*.tmp")):
    logging.info("removing %s (left by an interrupted run)", path)
    if os.path.isdir(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      os.remove(path)


def run_stage(build: Callable[[], Any], merge: Optional[Callable[[], Any]] = None
              ) -> None:
  """A stage's ``__main__``: ``--gin_file`` / ``--gin.KEY=VALUE`` configure ``build``
  (a gin configurable; every argument comes from gin), whose result is printed (a
  dataclass as JSON). With ``merge``, ``--merge_only`` calls it instead (its
  arguments from gin too) and prints what it returns."""
  if merge is not None:
    flags.DEFINE_bool("merge_only", False, "Only merge the finished shards "
                      f"(configure {merge.__name__} with --gin.{merge.__name__}.*).")
  gin_utils.define_gin_flags()

  def main(argv) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]} (configure the stage with "
                           f"--gin_file and --gin.{build.__name__}.ARG=VALUE)")
    gin_utils.parse_gin(flags.FLAGS.gin_file, flags.FLAGS.gin_bindings)
    if merge is not None and flags.FLAGS.merge_only:
      print(merge())
      return
    result = build()
    if dataclasses.is_dataclass(result):
      result = json.dumps(dataclasses.asdict(result), indent=2, sort_keys=True)
    print(result)

  gin_utils.run_with_gin_flags(main)
