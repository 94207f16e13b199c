r"""Megatron checkpoint import: seconds and peak memory against the largest tensor.

    python -m retro_jax.bench.convert                        # 843M shape, TP=4, bf16
    python -m retro_jax.bench.convert --gin_file=instructretro_8b.gin --workdir=/scratch

Writes a synthetic Megatron-LM checkpoint (random bf16 weights, legacy layout as the
released InstructRetro files, ``--tensor_parallel`` shards, the 256k vocabulary padded
for TP) of the shape of ``--gin_file``, then runs ``python -m retro_jax.convert.megatron``
on it in a fresh process and reports: seconds, the child's peak resident memory (VmHWM:
everything, including the memory-mapped shard pages the kernel can drop), its peak
anonymous memory (RssAnon sampled every 20 ms: what could exhaust RAM), the same for
a process that only imports jax and orbax (the runtime), the largest single tensor,
and (peak anonymous - runtime) / largest tensor. torch is needed (the converter's
dependency).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
from flax import traverse_util
import jax
import ml_dtypes
import numpy as np

from retro_jax.convert import megatron
from retro_jax.convert import megatron_files as files
from retro_jax.models import RetroConfig
from retro_jax.utils import gin_utils

FLAGS = flags.FLAGS
flags.DEFINE_string("gin_file", "instructretro_843m.gin", "Model size (gin/models).")
flags.DEFINE_integer("vocab_size", 256000, "Tokenizer vocabulary (padded for TP).")
flags.DEFINE_integer("tensor_parallel", 4, "Shards of the synthetic checkpoint.")
flags.DEFINE_string("workdir", None, "Where to write (default: a temporary directory).")
flags.DEFINE_bool("keep", False, "Keep the synthetic checkpoint and the output.")
flags.DEFINE_bool("reuse", False, "Reuse a synthetic checkpoint already in --workdir.")

_MONITOR = r"""
import os, runpy, sys, threading, time
peak = [0]
def sample():
  while True:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("RssAnon:"):
          peak[0] = max(peak[0], int(line.split()[1]))
    time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
try:
  if sys.argv[1] == "--baseline":
    import jax, orbax.checkpoint, numpy  # the runtime alone
    import retro_jax.convert.megatron, torch  # the converter with its torch
  else:
    sys.argv = ["retro_jax.convert.megatron"] + sys.argv[1:]
    runpy.run_module("retro_jax.convert.megatron", run_name="__main__")
except SystemExit as e:
  if e.code:
    raise
finally:
  time.sleep(0.05)
  with open("/proc/self/status") as f:
    hwm = [int(l.split()[1]) for l in f if l.startswith("VmHWM:")][0]
  print(f"MEMORY peak_anon_kib={peak[0]} peak_rss_kib={hwm}", flush=True)
"""


def _measure(args: list[str]) -> tuple[float, int, int]:
  start = time.perf_counter()
  result = subprocess.run([sys.executable, "-c", _MONITOR] + args, capture_output=True,
                          text=True)
  seconds = time.perf_counter() - start
  if result.returncode:
    raise RuntimeError(result.stderr[-3000:])
  line = [l for l in result.stdout.splitlines() if l.startswith("MEMORY")][-1]
  fields = dict(item.split("=") for item in line.split()[1:])
  return seconds, int(fields["peak_anon_kib"]) * 1024, int(fields["peak_rss_kib"]) * 1024


def write_synthetic(config, directory: str, tensor_parallel: int) -> int:
  """A random bf16 Megatron checkpoint of ``config``'s shape; returns the largest
  tensor's bytes."""
  shapes = megatron.param_shapes(config, retro=True)
  rng = np.random.default_rng(0)
  params = {}
  for path, shape in shapes.items():
    params[path] = (rng.standard_normal(shape.shape, np.float32) * 0.02).astype(
        ml_dtypes.bfloat16)
  largest = max(v.nbytes for v in params.values())
  ranks, args = megatron.to_megatron(config, traverse_util.unflatten_dict(params),
                                     tensor_parallel=tensor_parallel, layout=megatron.LEGACY)
  del params
  torch_ranks = [jax.tree_util.tree_map(lambda v: files.from_numpy(np.asarray(v)), r)
                 for r in ranks]
  del ranks
  files.write_checkpoint(directory, torch_ranks, args)
  return largest


def main(argv):
  del argv
  gin_utils.parse_gin([FLAGS.gin_file])
  config = RetroConfig().replace(vocab_size=FLAGS.vocab_size, param_dtype="bfloat16",
                                 final_norm=True, encoder_cross_attention_residual="stream")
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="bench_convert_")
  try:
    ckpt, out = os.path.join(workdir, "megatron"), os.path.join(workdir, "retro_jax")
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    if FLAGS.reuse and os.path.isfile(os.path.join(ckpt, "latest_checkpointed_iteration.txt")):
      largest = config.vocab_size * config.hidden_size * 2  # the embedding, bf16
    else:
      shutil.rmtree(ckpt, ignore_errors=True)
      largest = write_synthetic(config, ckpt, FLAGS.tensor_parallel)
    written = time.perf_counter() - start
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ckpt) for f in fs)
    _, base_anon, base_rss = _measure(["--baseline"])
    seconds, anon, rss = _measure([f"--load={ckpt}", f"--model_dir={out}"])
    out_size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out)
                   for f in fs)
    gib = 2 ** 30
    print(f"\n{FLAGS.gin_file}, TP={FLAGS.tensor_parallel}, bf16: checkpoint "
          f"{size / gib:.2f} GiB (written in {written:.0f} s), retro_jax output "
          f"{out_size / gib:.2f} GiB\n")
    print("| figure | value |\n|---|---|")
    print(f"| conversion wall time (fresh process, imports included) | {seconds:.1f} s |")
    print(f"| read + write throughput | {(size + out_size) / gib / seconds:.2f} GiB/s |")
    print(f"| largest single tensor | {largest / gib:.3f} GiB |")
    print(f"| peak anonymous memory: converter / runtime alone | {anon / gib:.2f} / "
          f"{base_anon / gib:.2f} GiB |")
    print(f"| peak resident (incl. mapped shard pages): converter / runtime alone | "
          f"{rss / gib:.2f} / {base_rss / gib:.2f} GiB |")
    print(f"| (peak anonymous - runtime) / largest tensor | {(anon - base_anon) / largest:.2f}x |")
  finally:
    # A temporary workdir (GiBs of checkpoint) goes even when the run fails or is
    # interrupted; --keep or an explicit --workdir keeps it.
    if not FLAGS.keep and FLAGS.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
