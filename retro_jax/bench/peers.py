r"""Side by side with RETRO-pytorch: train step and generation at its default architecture.

    python -m retro_jax.bench.peers                  # batch 2, n = 512, k = 2 (minutes)
    python -m retro_jax.bench.peers --small          # a quick run of the same program

The peer is RETRO-pytorch (lucidrains), an optional dependency; without it only the
retro_jax rows are printed. Install it beside the pinned CPU torch
(``requirements-test.txt``), without letting pip replace torch::

    pip install retro-pytorch "pyarrow<20"

Both frameworks build the same architecture: RETRO-pytorch 0.3.9's ``RETRO()`` defaults
(vocab 28,996; decoder 768 wide, 12 layers, 8 heads of 64, GELU MLP 4x; CCA at 1-based
layers 1, 3, 6, 9; encoder 896 wide, 2 layers, 8 heads, MLP 4x; chunks of m = 64,
neighbors of r = 2m), in float32, dropout off. Rows:

* ``train``: one step (forward + backward + Adam) on random tokens and k random
  neighbors per chunk; median of ``--steps`` (default 5) after warm-up
  ( retro_jax: ``bench.train.time_train_step``, the real ``Trainer`` step). tokens/s =
  batch * n / step; GFLOP/s from ``retro_jax.models.flops`` (the same count for both);
  ``of matmul`` = that rate over the framework's own fp32 2048^2 matmul rate measured in
  this run (the attainable bound on this machine).
* ``generate``: batch 1, a ``--prompt_tokens`` prompt and exactly ``--new_tokens`` new
  tokens, random neighbors fetched at every completed chunk. retro_jax: ``Generator``
  (KV cache); the peer: its own ``TrainingWrapper.generate`` loop (a full forward per
  token), with its neighbor fetch replaced by random chunks. Best of ``--repeats``
  after a warm-up call.

``jax / peer`` is retro_jax's rate over the peer's (> 1: retro_jax is faster).
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time
from typing import Any, Callable, Optional

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.bench.train import time_train_step
from retro_jax.inference.generator import FixedNeighbors, Generator
from retro_jax.models import RetroConfig, init_params

INSTALL = 'pip install retro-pytorch "pyarrow<20"  (beside the CPU torch pinned in requirements-test.txt)'

# RETRO-pytorch 0.3.9's RETRO() defaults (its heads argument is not passed on: 8 heads).
DEFAULT_ARCH = dict(vocab=28996, dec_dim=768, dec_depth=12, dim_head=64,
                    cca_layers=(1, 3, 6, 9), enc_dim=896, enc_depth=2)
SMALL_ARCH = dict(vocab=1024, dec_dim=256, dec_depth=4, dim_head=32, cca_layers=(1, 3),
                  enc_dim=256, enc_depth=2)
HEADS, MLP_MULT, CHUNK = 8, 4, 64


def retro_jax_config(arch: dict, num_neighbors: int) -> RetroConfig:
  """The RetroConfig of the peer's architecture ``arch`` (float32, dropout off)."""
  return RetroConfig(vocab_size=arch["vocab"], hidden_size=arch["dec_dim"],
                     num_layers=arch["dec_depth"], num_heads=HEADS,
                     head_dim=arch["dim_head"], mlp_dim=MLP_MULT * arch["dec_dim"],
                     cca_layers=tuple(arch["cca_layers"]), chunk_length=CHUNK,
                     num_neighbors=num_neighbors, encoder_num_layers=arch["enc_depth"],
                     encoder_hidden_size=arch["enc_dim"], encoder_num_heads=HEADS,
                     encoder_mlp_dim=MLP_MULT * arch["enc_dim"], encoder_dropout_rate=0.0)


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """Median wall seconds of ``fn()`` over ``repeats`` calls after one untimed call;
  ``fn`` must wait for its result (``block_until_ready`` for jax)."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def jax_matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  return 2 * size ** 3 / median_seconds(lambda: f(a, a).block_until_ready(), repeats) / 1e9


def _jax_generate(config: RetroConfig, *, prompt_tokens: int, new_tokens: int,
                  repeats: int) -> float:
  """retro_jax Generator tokens/s (batch 1, KV cache), best of ``repeats``."""
  params = jax.jit(lambda key: init_params(config, key))(jax.random.PRNGKey(0))

  class IdVocab:  # token ids only: no text is encoded or decoded here
    def encode(self, text):
      raise NotImplementedError

    def decode(self, ids):
      return ""

  generator = Generator(config, params, IdVocab(), eos_id=None)
  rng = np.random.default_rng(0)
  prompt = [rng.integers(3, config.vocab_size, prompt_tokens).tolist()]
  k, r = config.num_neighbors, config.neighbor_length
  neighbors = FixedNeighbors(rng.integers(3, config.vocab_size, (1, k, r)),
                             np.ones((1, k), bool), [[{}] * k])
  run = lambda: generator.generate_tokens(prompt, max_new_tokens=new_tokens,
                                          neighbors=neighbors)
  run()
  seconds = []
  for _ in range(repeats):
    result = run()
    seconds.append(result.stats["seconds"])
  return new_tokens / min(seconds)


def run_jax(arch: dict, *, batch: int, seq_len: int, steps: int, num_neighbors: int,
            prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
  config = retro_jax_config(arch, num_neighbors)
  matmul = jax_matmul_gflops()
  r = time_train_step(config, retrieval=True, batch=batch, seq_len=seq_len, steps=steps,
                      num_neighbors=num_neighbors)
  gen = _jax_generate(config, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                      repeats=repeats)
  return dict(framework=f"retro_jax (jax {jax.__version__})", step_s=r["step_s"],
              train_flops=r["train_flops"], matmul_gflops=matmul, gen_tokens_s=gen)


def import_peer() -> Optional[tuple[Any, Any]]:
  """(torch, retro_pytorch) or None when RETRO-pytorch is not installed."""
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional heavy dependency)
    import retro_pytorch  # pylint: disable=g-import-not-at-top
    from retro_pytorch import training  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f"RETRO-pytorch is not importable ({e}); running retro_jax only. "
          f"Install it with: {INSTALL}")
    return None
  return torch, training


def run_peer(torch: Any, training: Any, arch: dict, *, batch: int, seq_len: int,
             steps: int, num_neighbors: int, prompt_tokens: int, new_tokens: int,
             repeats: int, train_flops: float) -> dict:
  torch.manual_seed(0)
  size = 2048
  a = torch.randn(size, size)
  matmul = 2 * size ** 3 / median_seconds(lambda: torch.mm(a, a), 5) / 1e9

  model = training.RETRO(num_tokens=arch["vocab"], max_seq_len=2048,
                         enc_dim=arch["enc_dim"], enc_depth=arch["enc_depth"],
                         dec_depth=arch["dec_depth"], dec_dim=arch["dec_dim"],
                         dim_head=arch["dim_head"],
                         dec_cross_attn_layers=tuple(arch["cca_layers"]),
                         chunk_size=CHUNK)
  optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
  seq = torch.randint(1, arch["vocab"], (batch, seq_len + 1))
  retrieved = torch.randint(1, arch["vocab"],
                            (batch, seq_len // CHUNK, num_neighbors, 2 * CHUNK))

  def step():
    loss = model(seq, retrieved, return_loss=True)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()

  model.train()
  step()
  step_s = median_seconds(step, steps)

  class Wrapper(torch.nn.Module):
    """What ``TrainingWrapper.generate`` reads, with random chunks as neighbors."""

    def __init__(self):
      super().__init__()
      self.retro, self.chunk_size = model, CHUNK
      self.max_seq_len = prompt_tokens + new_tokens - 1  # its loop makes max - start + 1
      self.fetch_knn_chunks_fn = lambda chunks: torch.randint(
          1, arch["vocab"], (chunks.shape[0], num_neighbors, 2 * CHUNK))

  wrapper = Wrapper()
  prompt = torch.randint(1, arch["vocab"], (1, prompt_tokens))
  gen_s = []
  for i in range(repeats + 1):
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints at every retrieval
      out = training.TrainingWrapper.generate(wrapper, start=prompt)
    if i:
      gen_s.append(time.perf_counter() - start)
  made = out.shape[1] - prompt_tokens  # an early EOS would end it sooner: count them
  return dict(framework=f"RETRO-pytorch (torch {torch.__version__})", step_s=step_s,
              train_flops=train_flops, matmul_gflops=matmul, gen_tokens_s=made / min(gen_s))


def format_rows(rows: list[dict], *, batch: int, seq_len: int) -> list[str]:
  lines = ["| framework | train step (s) | train tokens/s | GFLOP/s | fp32 2048² matmul "
           "GFLOP/s | of matmul | generate tokens/s |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    gflops = r["train_flops"] / r["step_s"] / 1e9
    lines.append(f"| {r['framework']} | {r['step_s']:.2f} | {batch * seq_len / r['step_s']:.0f} "
                 f"| {gflops:.0f} | {r['matmul_gflops']:.0f} | "
                 f"{100 * gflops / r['matmul_gflops']:.0f}% | {r['gen_tokens_s']:.1f} |")
  if len(rows) == 2:
    ours, peer = rows
    lines.append(f"| jax / peer | {peer['step_s'] / ours['step_s']:.2f}x | | | "
                 f"{ours['matmul_gflops'] / peer['matmul_gflops']:.2f}x | | "
                 f"{ours['gen_tokens_s'] / peer['gen_tokens_s']:.2f}x |")
  return lines


def run(*, arch: dict, batch: int, seq_len: int, steps: int, num_neighbors: int,
        prompt_tokens: int, new_tokens: int, repeats: int, peer: bool = True,
        print_fn: Callable[[str], None] = print) -> list[dict]:
  """Prints the table; returns the rows (retro_jax first, then the peer if it ran)."""
  if seq_len % CHUNK or prompt_tokens % CHUNK:
    raise ValueError(f"seq_len={seq_len} and prompt_tokens={prompt_tokens} must be "
                     f"multiples of the chunk length {CHUNK}")
  print_fn(f"arch: {arch}; batch={batch}, n={seq_len}, k={num_neighbors}, r={2 * CHUNK}, "
           f"float32; generate: batch 1, {prompt_tokens} + {new_tokens} tokens; "
           f"{jax.devices()[0].device_kind} ({jax.default_backend()})")
  kw = dict(batch=batch, seq_len=seq_len, steps=steps, num_neighbors=num_neighbors,
            prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats)
  rows = [run_jax(arch, **kw)]
  imported = import_peer() if peer else None
  if imported is not None:
    rows.append(run_peer(*imported, arch, **kw, train_flops=rows[0]["train_flops"]))
  for line in format_rows(rows, batch=batch, seq_len=seq_len):
    print_fn(line)
  return rows


def _define_flags() -> None:
  # --batch, --seq_len, --steps and --num_neighbors are retro_jax.bench.train's flags
  # (imported above): batch 2, n = 512, k = 2 by default.
  flags.DEFINE_bool("small", False, "A small architecture, n = 128 unless --seq_len is "
                    "given, 16 new tokens unless --new_tokens is given: a quick run.")
  flags.DEFINE_integer("prompt_tokens", 64, "Generation prompt length (whole chunks).")
  flags.DEFINE_integer("new_tokens", 64, "New tokens per generation.")
  flags.DEFINE_integer("repeats", 2, "Timed generation calls (the best is shown).")
  flags.DEFINE_bool("peer", True, "Run RETRO-pytorch when it is installed.")


def main(argv):
  del argv
  f = flags.FLAGS
  small = f.small
  run(arch=SMALL_ARCH if small else DEFAULT_ARCH, batch=f.batch,
      seq_len=128 if small and not f["seq_len"].present else f.seq_len,
      steps=f.steps, num_neighbors=f.num_neighbors, prompt_tokens=f.prompt_tokens,
      new_tokens=16 if small and not f["new_tokens"].present else f.new_tokens,
      repeats=f.repeats, peer=f.peer)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
