r"""The GPU check: one command, one table, a loud failure for any part that cannot run.

    bash launch/gpu/check.sh                        # its own venv: CUDA jax, faiss-gpu
    python -m retro_jax.bench.gpu_check             # where those are installed already
    python -m retro_jax.bench.gpu_check --dry_run   # CPU, tiny sizes: the logic only

Each part reuses its benchmark module and runs under a time budget (seconds, one H100;
the parts add up to under 8 minutes with imports and start-up):

==========  =========================================================  ======  ========
part        what                                                       budget  reuses
==========  =========================================================  ======  ========
devices     JAX's backend is a GPU; faiss sees a GPU                   10      -
train       Trainer step of GPT and Retro at 1b, bf16, batch 8 x 2048  180     bench.train
            (median of 3 steps): tokens/s, MFU (``models.flops``), and
            the cuDNN flash-attention custom calls in the step's
            compiled HLO (forward and backward)
generate    tokens/s at batch 1/16/64: decoder alone, Retro on fixed   120     bench.generate
            neighbors, Retro with live retrieval (MiniLM + Faiss)
embedding   Flax MiniLM chunks/s in bf16                               35      bench.embedding
faiss       neighbor map of 1M synthetic chunks over 1M DB chunks      100     bench.retrieval
            on faiss-gpu (train, add, choose nprobe, search, write),
            recall@2 of its rows against exact search
==========  =========================================================  ======  ========

Failing loudly: a part that cannot run (no GPU for JAX, a train step without cuDNN flash
attention, a faiss without GPUs, a search that fell back to the CPU, a part past its
budget) stops the check with exit status 1 and a line naming the part; nothing is
skipped. ``--budget_scale`` multiplies every budget (a slower GPU). ``--dry_run`` runs
the same code at tiny sizes on whatever backend there is, without those GPU assertions
(the figures are then meaningless).

The cuDNN column counts ``__cudnn$fmha*`` custom calls (``jax.nn.dot_product_attention``'s
cuDNN kernels) in the optimised HLO that XLA dumps for the timed train step itself
(``--xla_dump_to``, set before the backend starts), so it describes the program that
was measured. Peak memory is the JAX allocator's ``peak_bytes_in_use`` on device 0
after each part (cumulative; faiss' own GPU memory is not in it).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from typing import Callable, Iterator, Optional

from absl import app
from absl import flags
import jax

from retro_jax.bench import generate as generate_bench
from retro_jax.bench import retrieval as retrieval_bench
from retro_jax.bench import train as train_bench
from retro_jax.bench.embedding import run_embedding_bench
from retro_jax.data.prose import real_embeddings
from retro_jax.models import RetroConfig
from retro_jax.retrieval import search as search_lib
from retro_jax.retrieval.embedders import load_embedder

BUDGET_S = {"devices": 10, "train": 180, "generate": 120, "embedding": 35, "faiss": 100}
EMBEDDER = "all-MiniLM-L6-v2"
HEADER = ("| part | setting | throughput | MFU | cuDNN flash calls (fwd / bwd) | "
          "recall@2 | peak GPU memory (GiB) | seconds |\n"
          "|---|---|---|---|---|---|---|---|")
_FMHA = re.compile(r'custom_call_target="(__cudnn\$fmha\w*)"')


class CheckFailed(RuntimeError):
  """A part of the check could not run; the message names it."""

  def __init__(self, part: str, reason: str):
    super().__init__(f"gpu_check: part '{part}' FAILED: {reason}")
    self.part = part


# Sizes of a real run and of --dry_run.
FULL = dict(train_size="1b", train_batch=8, train_seq_len=2048, train_steps=3,
            remat_policy="dots", gen_size="100m", gen_batches=(1, 16, 64), gen_new_tokens=128,
            gen_repeats=1, db_scale=0.1, embed_texts=4096, faiss_vectors=1_000_000,
            faiss_queries=None, faiss_factory="IVF4096,Flat", real_chunks=None,
            recall_queries=2000)
DRY = dict(train_size="tiny", train_batch=8, train_seq_len=128, train_steps=1,
           remat_policy="none", gen_size="tiny", gen_batches=(1, 2), gen_new_tokens=8,
           gen_repeats=1, db_scale=0.02, embed_texts=16, faiss_vectors=20_000,
           faiss_queries=2_000, faiss_factory="IVF64,Flat", real_chunks=256,
           recall_queries=200)


def count_cudnn_attention(hlo_text: str) -> tuple[int, int]:
  """(forward, backward) ``__cudnn$fmha*`` custom calls in an HLO module's text."""
  targets = _FMHA.findall(hlo_text)
  backward = sum("Backward" in t for t in targets)
  return len(targets) - backward, backward


def dump_flags(dump_dir: str, existing: str = "") -> str:
  """``XLA_FLAGS`` that also dump the train step's HLO text to ``dump_dir``."""
  return " ".join(filter(None, [existing, f"--xla_dump_to={dump_dir}",
                                "--xla_dump_hlo_module_re=.*train_step.*",
                                "--xla_dump_hlo_as_text"]))


def optimized_hlo_texts(dump_dir: str) -> list[str]:
  """The optimised HLO module texts XLA dumped into ``dump_dir``."""
  paths = sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")))
  texts = []
  for path in paths:
    with open(path, encoding="utf-8", errors="replace") as f:
      texts.append(f.read())
  return texts


def peak_memory_gib() -> Optional[float]:
  stats = jax.devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**30


@contextlib.contextmanager
def budget(part: str, seconds: float) -> Iterator[None]:
  """Raises ``CheckFailed(part)`` when the block runs past ``seconds`` (SIGALRM; checked
  between Python bytecodes, so a long XLA compile is interrupted when it returns)."""

  def expire(signum, frame):
    del signum, frame
    raise CheckFailed(part, f"over its budget of {seconds:.0f}s")

  previous = signal.signal(signal.SIGALRM, expire)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def _fmt_gib(value: Optional[float]) -> str:
  return "n/a" if value is None else f"{value:.1f}"


def check_devices(dry_run: bool) -> dict:
  backend, kind = jax.default_backend(), jax.devices()[0].device_kind
  gpus = search_lib.gpu_count()
  if not dry_run:
    if backend != "gpu":
      raise CheckFailed("devices", f"JAX's backend is {backend!r} ({kind}), not a GPU: "
                        "is jax[cuda12] installed and a CUDA device visible?")
    if gpus == 0:
      raise CheckFailed("devices", f"faiss {getattr(search_lib.faiss, '__version__', '?')} "
                        "sees no GPU (faiss-cpu installed instead of faiss-gpu?)")
  return dict(part="devices", setting=f"jax {jax.__version__} {backend}: {kind} x"
              f"{jax.device_count()}; faiss {search_lib.faiss.__version__}, {gpus} GPUs",
              throughput="", mfu="", cudnn="", recall="")


def check_train(sizes: dict, dry_run: bool, dump_root: str) -> list[dict]:
  """GPT and Retro train steps; their compiled HLO must call cuDNN flash attention."""
  rows = []
  base = RetroConfig(**train_bench.SIZES[sizes["train_size"]], dtype="bfloat16",
                     remat_policy=sizes["remat_policy"], encoder_dropout_rate=0.0)
  for name, _, retrieval in train_bench.GPT_AND_RETRO:
    dump_dir = os.path.join(dump_root, name)
    before = set(glob.glob(os.path.join(dump_root, "*")))
    r = train_bench.time_train_step(base, retrieval=retrieval, batch=sizes["train_batch"],
                                    seq_len=sizes["train_seq_len"],
                                    steps=sizes["train_steps"])
    # XLA dumps into dump_root; move this step's files aside for this model.
    os.makedirs(dump_dir, exist_ok=True)
    for path in set(glob.glob(os.path.join(dump_root, "*"))) - before - {dump_dir}:
      shutil.move(path, dump_dir)
    texts = optimized_hlo_texts(dump_dir)
    fwd = bwd = 0
    for text in texts:
      f, b = count_cudnn_attention(text)
      fwd, bwd = fwd + f, bwd + b
    if not dry_run:
      if not texts:
        raise CheckFailed("train", f"{name}: XLA dumped no optimised HLO of the train step "
                          f"into {dump_dir} (XLA_FLAGS set after the backend started, or "
                          "a persistent compilation cache hit?)")
      if fwd == 0 or bwd == 0:
        raise CheckFailed("train", f"{name}: the compiled train step has {fwd} forward and "
                          f"{bwd} backward cuDNN flash-attention calls (see {dump_dir})")
      if r["mfu"] is None:
        raise CheckFailed("train", f"no peak TFLOP/s known for "
                          f"{jax.devices()[0].device_kind!r} (retro_jax.models.flops)")
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    rows.append(dict(
        part="train", setting=f"{name} {sizes['train_size']} ({r['params'] / 1e6:,.0f}M "
        f"params) bf16, batch {sizes['train_batch']} x {sizes['train_seq_len']}, remat "
        f"{sizes['remat_policy']}",
        throughput=f"{r['tokens_s']:,.0f} tokens/s ({r['step_s']:.3f} s/step, "
        f"{r['tflops']:.3g} TFLOP/s)", mfu=mfu,
        cudnn=f"{fwd} / {bwd}" if texts else "n/a (no HLO dump)", recall=""))
  return rows


def check_generate(sizes: dict, dry_run: bool, log: Callable[[str], None]) -> list[dict]:
  del dry_run
  found = generate_bench.run([sizes["gen_size"]], list(sizes["gen_batches"]),
                             embedder=EMBEDDER, db_scale=sizes["db_scale"],
                             new_tokens=sizes["gen_new_tokens"], repeats=sizes["gen_repeats"],
                             dtype="bfloat16", print_fn=log)
  rows = []
  for batch in sizes["gen_batches"]:
    by_mode = {r["mode"]: r for r in found if r["batch"] == batch}
    speeds = " / ".join(f"{by_mode[m]['tokens_per_s']:,.0f}" for m in generate_bench.MODES)
    rows.append(dict(part="generate", setting=f"{sizes['gen_size']} bf16, batch {batch}, "
                     f"64 + {sizes['gen_new_tokens']} tokens",
                     throughput=f"{speeds} tokens/s (decoder / fixed / live)", mfu="",
                     cudnn="", recall=""))
  return rows


def check_embedding(sizes: dict, dry_run: bool, log: Callable[[str], None]) -> list[dict]:
  [row] = run_embedding_bench(num_texts=sizes["embed_texts"], embedder=EMBEDDER,
                              dtype="bfloat16", repeats=2, sentence_transformers=False,
                              print_fn=log)
  if not dry_run and "cpu" in row["device"].lower():
    raise CheckFailed("embedding", f"the embedder ran on {row['device']}")
  return [dict(part="embedding", setting=f"{EMBEDDER} bf16 on {row['device']}, "
               f"{row['texts']} texts of {row['mean_tokens']:.0f} tokens",
               throughput=f"{row['chunks_per_s']:,.0f} chunks/s", mfu="", cudnn="",
               recall="")]


def check_faiss(sizes: dict, dry_run: bool, cache_dir: Optional[str]) -> list[dict]:
  real, _ = real_embeddings(load_embedder(), max_chunks=sizes["real_chunks"],
                            cache_dir=cache_dir, progress=False)
  n = sizes["faiss_vectors"]
  queries = n if sizes["faiss_queries"] is None else sizes["faiss_queries"]
  db, made = retrieval_bench.synthetic_like(real, n, seed=0)
  query_vectors, _ = retrieval_bench.synthetic_like(
      real, queries, seed=1, target_cosine=made["target_parent_cosine"])
  row = retrieval_bench.index_section(db, query_vectors, k=2,
                                      factory=sizes["faiss_factory"],
                                      recall_queries=sizes["recall_queries"],
                                      progress=False)
  if not dry_run and not row["on_gpu"]:
    raise CheckFailed("faiss", f"the search of {row['factory']} ran on the CPU, not faiss-gpu")
  settings = ", ".join(f"{key} {row[key]}" for key in ("nprobe", "k_factor") if key in row)
  return [dict(part="faiss", setting=f"{row['factory']} ({settings}), {row['db_vectors']:,} "
               f"DB x {row['queries']:,} query chunks, k=2, "
               f"{'GPU' if row['on_gpu'] else 'CPU'}",
               throughput=f"{row['queries_per_s']:,.0f} queries/s; total "
               f"{row['total_seconds']:.1f} s (train {row['train_seconds']:.1f}, add "
               f"{row['add_seconds']:.1f})", mfu="", cudnn="",
               recall=f"{row['recall@2']:.3f} ({row['recall_queries']} queries)")]


def format_row(row: dict) -> str:
  return (f"| {row['part']} | {row['setting']} | {row['throughput']} | {row['mfu']} | "
          f"{row['cudnn']} | {row['recall']} | {_fmt_gib(row['peak_gib'])} | "
          f"{row['seconds']:.0f} |")


def run_check(*, dry_run: bool, dump_dir: str, cache_dir: Optional[str] = None,
              parts: Optional[list[str]] = None, budget_scale: float = 1.0, print_fn=print,
              log: Callable[[str], None] = lambda line: print(line, file=sys.stderr)
              ) -> list[dict]:
  """Runs the parts in order; prints the table; raises ``CheckFailed`` on a failure."""
  sizes = DRY if dry_run else FULL
  parts = parts or list(BUDGET_S)
  unknown = sorted(set(parts) - set(BUDGET_S))
  if unknown:
    raise ValueError(f"--parts: unknown {unknown}; known: {list(BUDGET_S)}")
  steps = {
      "devices": lambda: [check_devices(dry_run)],
      "train": lambda: check_train(sizes, dry_run, dump_dir),
      "generate": lambda: check_generate(sizes, dry_run, log),
      "embedding": lambda: check_embedding(sizes, dry_run, log),
      "faiss": lambda: check_faiss(sizes, dry_run, cache_dir),
  }
  rows = []
  began = time.perf_counter()
  for part in parts:
    seconds_allowed = BUDGET_S[part] * budget_scale
    log(f"gpu_check: part {part} (budget {seconds_allowed:.0f}s)")
    start = time.perf_counter()
    with budget(part, seconds_allowed):
      try:
        new_rows = steps[part]()
      except CheckFailed:
        raise
      except Exception as e:  # pylint: disable=broad-except
        raise CheckFailed(part, f"{type(e).__name__}: {e}") from e
    seconds = time.perf_counter() - start
    peak = peak_memory_gib()
    if peak is None and not dry_run:
      raise CheckFailed(part, "device 0 reports no memory statistics")
    for row in new_rows:
      row.update(peak_gib=peak, seconds=seconds / len(new_rows))
    rows += new_rows
  total = time.perf_counter() - began
  print_fn(f"GPU check ({'dry run, tiny sizes' if dry_run else 'full'}), "
           f"{jax.devices()[0].device_kind}, {total:.0f} s for the parts "
           f"(seconds of a part with several rows are split between them)")
  print_fn(HEADER)
  for row in rows:
    print_fn(format_row(row))
  return rows


_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Tiny sizes on any backend, without the "
                             "GPU assertions (tests the check's logic on a CPU).")
_PARTS = flags.DEFINE_list("parts", list(BUDGET_S), "Parts to run, in order.")
_BUDGET_SCALE = flags.DEFINE_float("budget_scale", 1.0, "Multiplies every part's time "
                                   "budget.")
_DUMP_DIR = flags.DEFINE_string("dump_dir", None, "Where XLA dumps the train steps' HLO "
                                "(default: a temporary directory, removed).")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Cache of the real MiniLM embeddings "
                                 "the synthetic vectors are drawn around.")


def main(argv):
  del argv
  dump_dir = _DUMP_DIR.value or tempfile.mkdtemp(prefix="gpu_check_hlo_")
  # Read by XLA when the backend starts, which nothing has done yet.
  os.environ["XLA_FLAGS"] = dump_flags(dump_dir, os.environ.get("XLA_FLAGS", ""))
  # Every step is compiled here (a persistent cache hit would dump no HLO).
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    run_check(dry_run=_DRY_RUN.value, dump_dir=dump_dir, cache_dir=_CACHE_DIR.value,
              parts=_PARTS.value, budget_scale=_BUDGET_SCALE.value)
  except CheckFailed as e:
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(1)
  finally:
    if _DUMP_DIR.value is None:
      shutil.rmtree(dump_dir, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
