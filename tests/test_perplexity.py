"""Perplexity in three modes (Retro, encoder ablated, GPT baseline) on identical tokens."""

import gin
import numpy as np
import pytest

from retro_jax.data.synthetic import SyntheticRetroSource
from retro_jax.evaluation.perplexity import (PhraseMatcher, load_results, perplexity_table,
                                             token_class_table, write_results)
from retro_jax.models import RetroConfig
from retro_jax.training.loop import train
from retro_jax.training.optimizers import OptimizerConfig

CONFIG = RetroConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
                     chunk_length=8, encoder_dropout_rate=0.0,
                     encoder_position_embedding="rope")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  gin.clear_config()
  root = tmp_path_factory.mktemp("ppl")
  opt = OptimizerConfig(learning_rate=5e-3, warmup_steps=5)
  common = dict(model_config=CONFIG, optimizer_config=opt, log_every=50)
  gpt, retro = str(root / "gpt"), str(root / "retro")
  train(model_dir=gpt, train_steps=120, retrieval=False, checkpoint_every=120,
        train_source=SyntheticRetroSource(64, 32, 8, chunk_length=8, with_neighbors=False),
        **common)
  train(model_dir=retro, train_steps=120, init_checkpoint=gpt, checkpoint_every=120,
        train_source=SyntheticRetroSource(64, 32, 8, chunk_length=8), **common)
  return {"Retro": retro, "GPT baseline": gpt}, root


@pytest.mark.slow
def test_three_modes_on_identical_tokens(checkpoints):
  paths, root = checkpoints
  held_out = SyntheticRetroSource(64, 32, 8, chunk_length=8, seed=123)
  rows = perplexity_table(CONFIG, paths, held_out, num_batches=2)
  assert [(r["model"], r["mode"]) for r in rows] == [
      ("Retro", "retrieval"), ("Retro", "encoder ablated"), ("GPT baseline", "decoder only")]
  assert len({r["tokens"] for r in rows}) == 1 and rows[0]["tokens"] == 2 * 8 * 32
  by_mode = {r["mode"]: r["perplexity"] for r in rows}
  assert by_mode["retrieval"] < by_mode["encoder ablated"]
  assert by_mode["retrieval"] < by_mode["decoder only"]
  table = write_results(rows, str(root))
  assert "| Retro | retrieval |" in table and load_results(str(root)) == rows


@pytest.mark.slow
def test_token_classes_share_the_forward_pass_and_partition_the_tokens(checkpoints):
  """token_class_table: its rows are perplexity_table's, and per row the class scores
  recombine to the whole (token-weighted losses of disjoint classes)."""
  paths, _ = checkpoints
  held_out = SyntheticRetroSource(64, 32, 8, chunk_length=8, seed=123)
  classes = {"even": lambda b: np.asarray(b["decoder_target_tokens"]) % 2 == 0,
             "below 8": lambda b: (np.asarray(b["decoder_target_tokens"]) < 8)
             & (np.asarray(b["decoder_target_tokens"]) % 2 == 1)}
  rows, class_rows = token_class_table(CONFIG, paths, held_out, 2, classes)
  plain = perplexity_table(CONFIG, paths, held_out, num_batches=2)
  for row, ref in zip(rows, plain):
    assert row["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert row["tokens"] == ref["tokens"]
    parts = [r for r in class_rows if (r["model"], r["mode"]) == (row["model"], row["mode"])]
    assert [r["class"] for r in parts] == ["even", "below 8", "other"]
    assert sum(r["tokens"] for r in parts) == row["tokens"]
    assert sum(r["loss"] * r["tokens"] for r in parts) == pytest.approx(
        row["loss"] * row["tokens"], rel=1e-5)


def test_phrase_matcher_splits_first_and_repeated_mentions_by_position():
  words = {"born": 1, "in": 2, "1805": 3, "Kekribe": 4, "and": 5, "died": 6, "1879": 7}
  encode = lambda text: [words[w] for w in text.split()]  # pylint: disable=unnecessary-lambda-assignment
  seq = encode("born in 1805 and died 1879 born in Kekribe 1805 1879")
  batch = {"decoder_target_tokens": np.asarray([seq, seq[::-1]])}
  phrases = ["1805", "1879", "in Kekribe"]
  every = PhraseMatcher(encode, phrases)(batch)
  assert every[0].nonzero()[0].tolist() == [2, 5, 7, 8, 9, 10]
  first = PhraseMatcher(encode, phrases, mentions="first")(batch)
  repeated = PhraseMatcher(encode, phrases, mentions="repeated")(batch)
  assert first[0].nonzero()[0].tolist() == [2, 5, 7, 8]
  assert repeated[0].nonzero()[0].tolist() == [9, 10]
  assert not (first & repeated).any() and ((first | repeated) == every).all()
  early = PhraseMatcher(encode, phrases, mentions="first", positions=(0, 5))(batch)
  late = PhraseMatcher(encode, phrases, mentions="first", positions=(5, None))(batch)
  assert early[0].nonzero()[0].tolist() == [2]
  assert ((early | late) == first).all() and not (early & late).any()
  shared = PhraseMatcher(encode, phrases)   # selections share its phrases and scan
  for mask, mentions, positions in ((first, "first", (0, None)), (repeated, "repeated",
                                                                  (0, None)),
                                    (late, "first", (5, None)), (every, "all", (0, None))):
    assert (shared.select(mentions=mentions, positions=positions)(batch) == mask).all()
  # Each batch is scanned once, however the views and batches interleave (the three
  # checkpoint modes of eval_perplexity score the same batches in turn).
  counted = PhraseMatcher(encode, phrases)
  scans = []
  scan = counted.occurrences
  counted.occurrences = lambda seq: scans.append(seq) or scan(seq)
  other_batch = {"decoder_target_tokens": np.asarray([seq[1:] + seq[:1]])}
  views = [counted.select(mentions=m) for m in ("first", "repeated", "all")]
  for _ in range(3):
    for view in views:
      assert (view(batch) == {"first": first, "repeated": repeated, "all": every}[
          view.mentions]).all()
      view(other_batch)
  assert len(scans) == 3     # two rows of batch, one of other_batch
  with pytest.raises(ValueError, match="mentions"):
    PhraseMatcher(encode, phrases, mentions="second")
  with pytest.raises(ValueError, match="mentions"):
    shared.select(mentions="second")


class _PaddedEpoch:
  """A held-out source of one epoch: batches past its end have no scored token."""

  def __init__(self, source, real, total):
    self.source, self.real, self.total, self.fetched = source, real, total, []

  def get_batch(self, step):
    self.fetched.append(step)
    batch = dict(self.source.get_batch(step))
    if step >= self.real:
      batch["decoder_loss_weights"] = np.zeros_like(batch["decoder_loss_weights"])
    return batch


def test_evaluator_skips_batches_without_scored_tokens():
  import jax
  from retro_jax.models import partitioning
  from retro_jax.models.lm import init_params
  from retro_jax.training.trainer import Evaluator
  params = init_params(CONFIG, jax.random.PRNGKey(0))
  evaluator = Evaluator(CONFIG, partitioning.make_mesh(None), None, retrieval=True)
  calls = []
  step = evaluator._step
  evaluator._step = lambda *a: (calls.append(1), step(*a))[1]
  held_out = SyntheticRetroSource(64, 32, 8, chunk_length=8, seed=5)
  want = evaluator.evaluate(params, held_out, 2)
  assert len(calls) == 2
  calls.clear()
  padded = _PaddedEpoch(held_out, 2, 5)
  assert evaluator.evaluate(params, padded, 5) == want      # the same sums, to the bit
  assert padded.fetched == [0, 1, 2, 3, 4] and len(calls) == 2
  classes = {"even": lambda b: np.asarray(b["decoder_target_tokens"]) % 2 == 0}
  assert (evaluator.evaluate_classes(params, _PaddedEpoch(held_out, 2, 5), 5, classes)
          == evaluator.evaluate_classes(params, held_out, 2, classes))
  empty = evaluator.evaluate(params, _PaddedEpoch(held_out, 0, 2), 2)
  assert empty["tokens"] == 0 and empty["loss"] == 0.0


@pytest.mark.slow
def test_forward_programs_compile_without_library_fusions_on_cpu():
  """The evaluator's forward pass and generation's prefill are compiled with
  ``forward_compiler_options`` (no YNNPACK fusions on CPU: utils/compilation.py); a
  plain jit of the same forward still gets them (if it stops, the option is moot)."""
  import jax
  from retro_jax.inference import generator as generator_lib
  from retro_jax.models import partitioning
  from retro_jax.models.lm import init_params
  from retro_jax.training.trainer import Evaluator, batch_to_global
  from retro_jax.utils.compilation import forward_compiler_options
  assert forward_compiler_options() == {"xla_cpu_experimental_ynn_fusion_type": ""}
  params = init_params(CONFIG, jax.random.PRNGKey(0))
  evaluator = Evaluator(CONFIG, partitioning.make_mesh(None), None, retrieval=True)
  batch = batch_to_global(SyntheticRetroSource(64, 32, 8, chunk_length=8).get_batch(0),
                          evaluator.batch_sharding, True)
  ours = evaluator._step.lower(params, batch).compile().as_text()
  plain = jax.jit(evaluator.lm.loss_sums).lower(params, batch).compile().as_text()
  assert "ynn_fusion" in plain and "ynn_fusion" not in ours
  prefill = generator_lib._compiled(CONFIG, 0, "prefill", True,
                                    generator_lib.SamplingConfig())
  tokens = np.ones((2, 16), np.int32)
  hlo = prefill.lower(params, tokens, np.ones((2, 2, 2, 16), np.int32),
                      np.ones((2, 2, 2), bool), np.full((2,), 16, np.int32),
                      jax.random.PRNGKey(0), np.int32(-1), cache_length=24).compile().as_text()
  assert "ynn_fusion" not in hlo
