"""seqio tasks over a real small retrieval directory: neighbors, order, shards, seek."""

import json
import os
import shutil

import numpy as np
import pytest
import seqio
import tensorflow as tf

from retro_jax.bench import data as data_bench
from retro_jax.data import batches as batch_sources
from retro_jax.data import chat
from retro_jax.data import feature_converters as fc
from retro_jax.data import instructions
from retro_jax.data import ordering
from retro_jax.data import sources
from retro_jax.data import tasks
from retro_jax.data import vocab as vocab_lib
from retro_jax.inference.generator import passages_to_neighbors
from retro_jax.retrieval import formats
from retro_jax.retrieval.layout import RetrievalLayout

import retrieval_fixture

N = 128          # tokens per example (2 chunks of m = 64)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
  return retrieval_fixture.build(str(tmp_path_factory.mktemp("data") / "tasks_fx"))


@pytest.fixture(scope="module")
def names(layout):
  return tasks.register_retro_tasks(layout.root, "train", N)


def _dbs(layout, split="train"):
  return (formats.ChunkDB(layout.split_db_prefix(split)),
          formats.NeighborMap(layout.neighbor_map_path(split)),
          formats.ChunkDB(layout.retrieval_db_prefix))


def test_examples_are_query_chunks_with_their_mapped_neighbors(layout, names):
  query, knn, db = _dbs(layout)
  source = batch_sources.TaskBatchSource(names.retro, batch_size=8, seed=5,
                                         shard_info=seqio.ShardInfo(0, 1))
  m, l = 64, N // 64
  for step in range(3):
    batch = source.get_batch(step)
    _, examples, _ = source.stream.locate(source.positions(step))
    for row, i in enumerate(examples):
      chunk_ids = i * l + np.arange(l)
      tokens = query.get_chunks(chunk_ids, with_continuation=False).reshape(-1)
      np.testing.assert_array_equal(batch["decoder_input_tokens"][row], tokens)
      following = (query.get_chunk((i + 1) * l)[0] if (i + 1) * l < query.num_chunks
                   else 0)
      np.testing.assert_array_equal(batch["decoder_target_tokens"][row],
                                    np.append(tokens[1:], following))
      np.testing.assert_array_equal(batch["decoder_loss_weights"][row],
                                    batch["decoder_target_tokens"][row] != 0)
      example_docs = set(query.doc_of_chunk(chunk_ids).tolist())
      for u, cid in enumerate(chunk_ids):
        for j, nid in enumerate(knn[int(cid)]):
          assert nid >= 0
          # Megatron's rule: no neighbor from a document of the example itself.
          kept = int(db.doc_of_chunk(int(nid))) not in example_docs
          assert batch["neighbor_mask"][row, u, j] == kept
          expected = db.get_chunk_with_continuation(int(nid)) if kept else 0
          np.testing.assert_array_equal(batch["neighbor_tokens"][row, u, j], expected)
    assert batch["neighbor_mask"].mean() > 0.5
    assert batch["neighbor_tokens"].shape == (8, l, 2, 2 * m)


def test_missing_neighbors_are_masked_never_wrapped(layout, tmp_path):
  query, knn, db = _dbs(layout)
  ids = np.array(knn.neighbors)
  ids[::3, 1] = -1
  ids[5] = -1
  path = formats.write_neighbor_map(tmp_path / "holes.knn", ids).path
  source = sources.PretrainSource(query.prefix, path, db.prefix, seq_len=N,
                                  exclude_example_documents=False)
  feats = source.examples(np.arange(source.num_examples))
  flat_mask = feats["neighbor_mask"].reshape(-1, 2)
  flat_tokens = feats["neighbor_tokens"].reshape(-1, 2, 128)
  used = source.num_examples * 2
  np.testing.assert_array_equal(flat_mask, ids[:used] >= 0)
  assert not flat_tokens[~flat_mask].any()                      # pad rows, not chunk -1
  last = db.get_chunk_with_continuation(db.num_chunks - 1)
  assert not any(np.array_equal(row, last) for row in flat_tokens[~flat_mask])


def test_neighbors_from_a_document_of_the_example_are_masked(layout, tmp_path):
  query, knn, db = _dbs(layout)
  starts = np.asarray(query.chunk_id_start)
  # An example whose two chunks belong to two documents: point chunk 0 at document B.
  i = next(int(c) // 2 for c in starts[1:] if c % 2 == 1)
  doc_b = int(query.doc_of_chunk(2 * i + 1))
  ids = np.array(knn.neighbors)
  ids[2 * i] = [db.doc_chunk_range(doc_b)[0], db.doc_chunk_range(doc_b + 5)[0]]
  path = formats.write_neighbor_map(tmp_path / "same_example.knn", ids).path
  strict = sources.PretrainSource(query.prefix, path, db.prefix, seq_len=N)
  assert strict.exclude_example_documents                     # auto: documents align
  loose = sources.PretrainSource(query.prefix, path, db.prefix, seq_len=N,
                                 exclude_example_documents=False)
  assert strict.examples([i])["neighbor_mask"][0, 0].tolist() == [False, True]
  assert loose.examples([i])["neighbor_mask"][0, 0].tolist() == [True, True]
  valid = sources.PretrainSource(layout.split_db_prefix("valid"),
                                 layout.neighbor_map_path("valid"), db.prefix, seq_len=N)
  assert not valid.exclude_example_documents                  # held-out documents
  with pytest.raises(ValueError, match="not the first documents of"):
    sources.PretrainSource(layout.split_db_prefix("valid"), layout.neighbor_map_path("valid"),
                           db.prefix, seq_len=N, exclude_example_documents=True)


def test_retro_and_gpt_tasks_give_identical_tokens(names):
  retro = batch_sources.TaskBatchSource(names.retro, batch_size=6, seed=3)
  gpt = batch_sources.TaskBatchSource(names.gpt, batch_size=6, seed=3)
  for step in (0, 7, 40):
    a, b = retro.get_batch(step), gpt.get_batch(step)
    assert set(b) == set(fc.MODEL_TOKEN_FEATURES)
    for key in fc.MODEL_TOKEN_FEATURES:
      np.testing.assert_array_equal(a[key], b[key])


def test_same_seed_same_examples_other_seed_other_order(names):
  a = batch_sources.TaskBatchSource(names.retro, batch_size=4, seed=1)
  b = batch_sources.TaskBatchSource(names.retro, batch_size=4, seed=1)
  c = batch_sources.TaskBatchSource(names.retro, batch_size=4, seed=2)
  for step in (0, 3):
    for key, value in a.get_batch(step).items():
      np.testing.assert_array_equal(value, b.get_batch(step)[key])
  assert not np.array_equal(a.get_batch(0)["decoder_input_tokens"],
                            c.get_batch(0)["decoder_input_tokens"])


def test_shards_are_disjoint_and_cover_each_epoch(names):
  hosts, batch = 4, 8
  sources = [batch_sources.TaskBatchSource(names.gpt, batch_size=batch, seed=9,
                                         shard_info=seqio.ShardInfo(h, hosts))
             for h in range(hosts)]
  size = sources[0].stream.sizes[0]
  steps = -(-2 * size // batch)                                  # two epochs
  positions = np.concatenate([s.positions(t) for t in range(steps) for s in sources])
  np.testing.assert_array_equal(np.sort(positions), np.arange(steps * batch))
  _, examples, _ = sources[0].stream.locate(np.arange(2 * size))
  np.testing.assert_array_equal(np.sort(examples[:size]), np.arange(size))
  np.testing.assert_array_equal(np.sort(examples[size:]), np.arange(size))
  assert not np.array_equal(examples[:size], examples[size:])   # reshuffled per epoch
  # Hosts of one step read disjoint examples within an epoch.
  step = [s.stream.locate(s.positions(2))[1] for s in sources]
  assert len(np.unique(np.concatenate(step))) == hosts * (batch // hosts)


def test_seek_equals_iterating(names):
  source = batch_sources.TaskBatchSource(names.retro, batch_size=4, seed=4,
                                         shard_info=seqio.ShardInfo(1, 2))
  iterated = list(source.dataset(0).take(6).as_numpy_iterator())
  seeked = next(source.dataset(start_step=5).as_numpy_iterator())
  fresh = batch_sources.TaskBatchSource(names.retro, batch_size=4, seed=4,
                                        shard_info=seqio.ShardInfo(1, 2)).get_batch(5)
  for key, value in fresh.items():
    np.testing.assert_array_equal(iterated[5][key], value)
    np.testing.assert_array_equal(seeked[key], value)
    assert iterated[5][key].dtype == value.dtype


def test_seqio_get_dataset_gives_the_same_stream(names):
  ds = seqio.get_dataset(names.retro, fc.task_feature_lengths(N, 64), fc.RetroFeatureConverter(),
                         dataset_split="train", shuffle=True, seed=11,
                         shard_info=seqio.ShardInfo(1, 3))
  got = list(ds.take(4).as_numpy_iterator())
  batch = batch_sources.TaskBatchSource(names.retro, batch_size=12, seed=11,
                                        shard_info=seqio.ShardInfo(1, 3)).get_batch(0)
  for i in range(4):
    for key in batch:
      np.testing.assert_array_equal(got[i][key], batch[key][i])
  task = seqio.get_mixture_or_task(names.retro)
  assert task.output_features["neighbor_tokens"].rank == 3
  assert isinstance(task.output_features["neighbor_tokens"].vocabulary,
                    seqio.PassThroughVocabulary)
  ordered = seqio.get_dataset(names.gpt, fc.task_feature_lengths(N, 64, with_neighbors=False),
                              fc.GPTFeatureConverter(), shuffle=False)
  assert sum(1 for _ in ordered) == task.source.num_examples()


def test_eval_stream_scores_every_example_once(layout):
  names = tasks.register_retro_tasks(layout.root, "valid", N)
  source = batch_sources.TaskBatchSource(names.retro, batch_size=4, shuffle=False, num_epochs=1)
  size = source.stream.sizes[0]
  batches = [source.get_batch(i) for i in range(-(-size // 4) + 1)]
  weights = np.concatenate([b["decoder_loss_weights"].sum(1) for b in batches])
  assert (weights[:size] > 0).all() and (weights[size:] == 0).all()
  query = formats.ChunkDB(layout.split_db_prefix("valid"))
  np.testing.assert_array_equal(
      batches[0]["decoder_input_tokens"][1],
      query.get_chunks(np.arange(2, 4), with_continuation=False).reshape(-1))


def test_mixture_blends_sources_at_their_rates(layout, names):
  valid = tasks.register_retro_tasks(layout.root, "valid", N)
  mixture = tasks.register_mixture("tasks_test_mix", [(names.retro, 3.0), (valid.retro, 1.0)])
  source = batch_sources.TaskBatchSource(mixture, batch_size=20, seed=0)
  which, examples, _ = source.stream.locate(np.arange(4000))
  assert np.bincount(which).tolist() == [3000, 1000]
  assert np.bincount(which[:20]).tolist() == [15, 5]            # interleaved, not blocks
  for s in (0, 1):
    assert set(examples[which == s]) == set(range(source.stream.sizes[s]))
  batch = source.get_batch(3)
  assert batch["neighbor_tokens"].shape == (20, 2, 2, 128)
  assert ordering.blend_schedule([0.817, 0.033, 0.15])[2].tolist() == [817, 33, 150]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000, 4097])
def test_permute_is_a_seeded_bijection(size):
  out = ordering.permute(np.arange(size), size, (0, 0, 0))
  np.testing.assert_array_equal(np.sort(out), np.arange(size))
  if size > 8:
    assert not np.array_equal(out, ordering.permute(np.arange(size), size, (1, 0, 0)))
    np.testing.assert_array_equal(out[5:9], ordering.permute(np.arange(5, 9), size, (0, 0, 0)))


def _copy_layout(layout, root):
  shutil.copytree(layout.root, root)
  return RetrievalLayout(root)


def test_bad_neighbor_maps_are_errors_naming_the_file(layout, tmp_path):
  query, knn, db = _dbs(layout)
  short = formats.write_neighbor_map(tmp_path / "short.knn", knn.neighbors[:-3]).path
  with pytest.raises(ValueError, match=r"short.knn: rows cover query chunks \[0, \d+\), but "
                     r".*train_db/chunks.idx has \d+ chunks"):
    sources.PretrainSource(query.prefix, short, db.prefix, seq_len=N)
  ids = np.array(knn.neighbors)
  ids[7, 0] = db.num_chunks + 5
  outside = formats.write_neighbor_map(tmp_path / "outside.knn", ids).path
  with pytest.raises(ValueError, match=r"outside.knn: neighbors: query chunk 7 neighbor 0 is "
                     rf"{db.num_chunks + 5}, outside \[-1, {db.num_chunks}\)"):
    sources.PretrainSource(query.prefix, outside, db.prefix, seq_len=N)
  lazy = sources.PretrainSource(query.prefix, outside, db.prefix, seq_len=N, validate=False)
  lazy.examples(np.array([0]))                                  # chunks 0, 1: fine
  with pytest.raises(ValueError, match=r"outside.knn: neighbors: query chunk 7 neighbor 0"):
    lazy.examples(np.array([3]))                                # chunks 6, 7
  with pytest.raises(ValueError, match=r"training-flavour DB"):
    sources.PretrainSource(query.prefix, knn.path, query.prefix, seq_len=N)
  with pytest.raises(ValueError, match=r"multiple of the chunk size m=64"):
    sources.PretrainSource(query.prefix, knn.path, db.prefix, seq_len=100)
  with pytest.raises(ValueError, match=r"holds k=2"):
    sources.PretrainSource(query.prefix, knn.path, db.prefix, seq_len=N, num_neighbors=3)
  copy = _copy_layout(layout, str(tmp_path / "nomap"))
  os.remove(copy.neighbor_map_path("valid"))
  names = tasks.register_retro_tasks(copy.root, "valid", N)
  assert names.retro is None and names.gpt == "gpt_nomap_valid"
  with pytest.raises(FileNotFoundError, match=r"nomap/neighbors/valid/neighbors.knn: no "
                     "neighbor map"):
    batch_sources.pretraining_batch_source(copy.root, split="valid", seq_len=N, batch_size=2)
  with pytest.raises(FileNotFoundError, match=r"no query DB for split 'test'"):
    tasks.register_retro_tasks(copy.root, "test", N)
  assert batch_sources.pretraining_batch_source(copy.root, split="test", seq_len=N, batch_size=2,
                                                missing_ok=True) is None


def test_feature_converter_checks_features():
  good = {"targets": np.zeros((2, 9), np.int32), "loss_weights": np.zeros((2, 9), np.float32),
          "neighbor_tokens": np.zeros((2, 2, 2, 8), np.int32),
          "neighbor_mask": np.zeros((2, 2, 2), bool)}
  out = fc.model_features(good, with_neighbors=True)
  assert out["decoder_input_tokens"].shape == (2, 8)
  assert out["decoder_loss_weights"].dtype == np.float32
  with pytest.raises(ValueError, match="batch: neighbor_mask must be bool"):
    fc.model_features(dict(good, neighbor_mask=np.zeros((2, 2, 2), np.int32)),
                      with_neighbors=True, where="batch")
  with pytest.raises(ValueError, match="3 chunks, which does not divide the n=8"):
    fc.model_features(dict(good, neighbor_tokens=np.zeros((2, 3, 2, 8), np.int32),
                           neighbor_mask=np.zeros((2, 3, 2), bool)), with_neighbors=True)
  with pytest.raises(ValueError, match="loss_weights must be float"):
    fc.model_features(dict(good, loss_weights=np.zeros((2, 9), np.int32)),
                      with_neighbors=False)
  with pytest.raises(ValueError, match="missing feature 'neighbor_tokens'"):
    fc.model_features({"targets": good["targets"], "loss_weights": good["loss_weights"]},
                      with_neighbors=True)
  with pytest.raises(ValueError, match="packing is not supported"):
    fc.RetroFeatureConverter(pack=True)
  ds = tf.data.Dataset.from_tensors({k: v[0] for k, v in good.items()})
  with pytest.raises(ValueError, match="neighbor_tokens=3 and neighbor_mask=2 must both be"):
    fc.RetroFeatureConverter()(ds, dict(fc.task_feature_lengths(8, 4), neighbor_tokens=3))


def test_sft_blend_batches(layout):
  source = batch_sources.sft_batch_source(layout.root, seq_len=N, batch_size=6, seed=0)
  assert source.name == "retro_sft_blend"
  mixture = seqio.get_mixture_or_task("retro_sft_blend")
  assert sorted(t.name for t in mixture.tasks) == ["retro_sft_chat",
                                                   "retro_sft_prompt_response", "retro_sft_qa"]
  batch = source.get_batch(0)
  assert not batch["neighbor_mask"].any() and not batch["neighbor_tokens"].any()
  weights = batch["decoder_loss_weights"]
  assert (weights.sum(1) > 0).all() and (weights < 1).any()
  gpt = batch_sources.sft_batch_source(layout.root, seq_len=N, batch_size=6, seed=0,
                                       with_neighbors=False)
  assert "neighbor_tokens" not in gpt.get_batch(0)
  np.testing.assert_array_equal(gpt.get_batch(0)["decoder_input_tokens"],
                                batch["decoder_input_tokens"])


def test_sft_blend_with_retrieved_neighbors(layout, monkeypatch):
  searched, opened = [], []

  def fake_load_retriever(root, *, num_neighbors=None, **kwargs):
    del kwargs
    opened.append((root, num_neighbors))

    def retrieve(chunks):                 # neighbor j of a chunk: the chunk, twice, + j
      searched.append(np.array(chunks))
      echo = np.tile(chunks[:, None, :], (1, num_neighbors, 2))
      return echo + np.arange(num_neighbors)[None, :, None], np.ones(
          (len(chunks), num_neighbors), bool), None
    return retrieve

  monkeypatch.setattr(batch_sources, "load_retriever", fake_load_retriever)
  source = batch_sources.sft_batch_source(layout.root, seq_len=N, batch_size=6, seed=0,
                                          datasets=[("qa", "data/sft/qa.jsonl", 1.0)],
                                          retrieve_neighbors=True, name="live")
  assert opened == [(layout.root, 2)]
  batch = source.get_batch(0)
  tokens, weights = batch["decoder_input_tokens"], batch["decoder_loss_weights"]
  mask, neighbors = batch["neighbor_mask"], batch["neighbor_tokens"]
  assert mask.any() and searched
  for row in range(6):
    for u in range(N // 64):
      chunk = tokens[row, u * 64:(u + 1) * 64]
      if mask[row, u].any():              # a prompt chunk: searched with its own tokens
        assert mask[row, u].all() and weights[row, u * 64:(u + 1) * 64 - 1].sum() == 0
        np.testing.assert_array_equal(neighbors[row, u, 1, :64], chunk + 1)
      else:
        assert not neighbors[row, u].any()
  # GPT-Instruct's twin reads the same examples and never searches.
  before = len(searched)
  batch_sources.sft_batch_source(layout.root, seq_len=N, batch_size=6, seed=0, with_neighbors=False,
                                 datasets=[("qa", "data/sft/qa.jsonl", 1.0)],
                                 retrieve_neighbors=True, name="live").get_batch(0)
  assert len(searched) == before and len(opened) == 1


def test_sft_qa_passages_as_neighbors_with_aligned_prompts(layout):
  """QA records' passages read by the encoder (none in the prompt), laid out as the
  evaluation lays out prompts: tokens as the generator's 'passages' neighbors, prompt
  ending at a chunk boundary, the unaligned example's tokens after the left padding."""
  path = instructions.resolve_data_file("data/sft/qa.jsonl")
  with open(path, encoding="utf-8") as f:
    raw = [json.loads(line) for line in f]
  rows = [i for i, r in enumerate(raw) if r.get("ctxs")][:6]
  sp = vocab_lib.load_sentencepiece(layout.vocab_path)
  ids = vocab_lib.special_ids(sp)
  reader = {"num_passages": 0, "num_neighbor_passages": 2}
  n = 8 * 64                    # room for every aligned example (the fixture's small
  aligned = sources.SFTSource(instructions.read_sft(path, **reader), layout.vocab_path,
                              seq_len=n, align_prompts=True)   # vocabulary: long prompts)
  plain = sources.SFTSource(instructions.read_sft(path, **reader), layout.vocab_path,
                            seq_len=n)
  got = aligned.examples(rows)
  for row, i in enumerate(rows):
    tokens, weights, prompt_len = plain.encode(i)
    first_answer = int(np.argmax(got["loss_weights"][row] > 0))
    assert first_answer % 64 == 0 and first_answer == prompt_len + (-prompt_len % 64)
    np.testing.assert_array_equal(got["targets"][row, first_answer - prompt_len:][
        :tokens.size], tokens)
    assert (got["targets"][row, :first_answer - prompt_len] == aligned.pad_id).all()
    text = sp.decode([int(t) for t in tokens[:prompt_len]])
    assert raw[i]["ctxs"][0]["text"][:40] not in text        # no passage in the prompt
    # Every chunk reads the record's two passages: text, EOD, padding.
    for j, ctx in enumerate(raw[i]["ctxs"][:2]):
      want = (sp.encode(f"title: {ctx['title']}, source: {ctx['text']}") + [ids.eos]
              )[:aligned.retrieved_length]
      for u in range(n // 64):
        np.testing.assert_array_equal(got["neighbor_tokens"][row, u, j, :len(want)], want)
        assert (got["neighbor_tokens"][row, u, j, len(want):] == ids.pad).all()
    assert got["neighbor_mask"][row].all()
    # The generator's 'passages' neighbors for the same record are the same tokens.
    fixed = passages_to_neighbors(sp, [[chat.format_passage(c) for c in raw[i]["ctxs"]]],
                                  aligned.retrieved_length)
    np.testing.assert_array_equal(fixed.tokens[0], got["neighbor_tokens"][row, 0])
  # A record with no passages reads none; a GPT twin gets no neighbor features.
  bare = [i for i, r in enumerate(raw) if not r.get("ctxs")][:1]
  assert not aligned.examples(bare)["neighbor_mask"].any()
  assert "neighbor_tokens" not in aligned.examples(rows, with_neighbors=False)


def test_sft_aligned_prompts_that_overflow_lose_prompt_tokens(layout):
  path = instructions.resolve_data_file("data/sft/qa.jsonl")
  records = instructions.read_sft(path)                    # passages in the prompt
  aligned = sources.SFTSource(records, layout.vocab_path, seq_len=N, align_prompts=True)
  for i in range(len(records)):
    tokens, weights, prompt_len = aligned.encode(i)
    assert tokens.size <= N + 1 and prompt_len % 64 == 0
    assert weights[:prompt_len].sum() == 0 and weights[prompt_len:].all()
    answer = records[i].answer
    assert answer.split()[0] in aligned.processor.decode(tokens[prompt_len:].tolist())


def test_sft_blend_entries_are_checked(layout):
  with pytest.raises(ValueError, match=r"entry \('qa', 'data/sft/qa.jsonl', 1.0, 2\) must be"):
    batch_sources.sft_batch_source(layout.root, seq_len=N, batch_size=2, name="bad",
                                   datasets=[("qa", "data/sft/qa.jsonl", 1.0, 2)])
  with pytest.raises(ValueError, match=r"SFT dataset 'chat' .*reader options "
                     r"\{'num_neighbours': 2\}.*unexpected keyword"):
    batch_sources.sft_batch_source(layout.root, seq_len=N, batch_size=2, name="bad2",
                                   datasets=[("chat", "data/sft/chat.jsonl", 1.0,
                                              {"num_neighbours": 2})])


def test_data_bench_rows_run_on_a_synthetic_directory(tmp_path):
  layout = data_bench.build_synthetic_layout(str(tmp_path / "synthetic"), vocab_size=70_000,
                                             query_chunks=300, db_chunks=500)
  assert formats.ChunkDB(layout.retrieval_db_prefix).dtype == np.int32   # a >65500 vocab
  rows = data_bench.source_rows(layout, label="smoke", seq_len=N, batch=4, steps=2,
                                tf_data=True)
  assert [r["pipeline"] for r in rows] == ["smoke Retro get_batch", "smoke GPT get_batch",
                                           "smoke Retro tf.data"]
  assert rows[0]["neighbor_tokens_s"] == rows[0]["examples_s"] * 2 * 2 * 128
  assert all(r["examples_s"] > 0 for r in rows)
  need = data_bench.instructretro_8b_need(mfu=0.4, peak_tflops=989.0, gpus_per_host=8)
  assert 2e14 < need["train_flops"] < 4e14 and need["per_host"] == 8 * need["per_gpu"]


def test_qa_task_gives_zero_shot_prompts(layout):
  name = tasks.register_qa_task("sample", "data/qa/sample.jsonl", layout.vocab_path,
                                num_passages=2)
  records = instructions.read_qa_examples(instructions.shipped_data_path("qa", "sample.jsonl"))
  processor = vocab_lib.load_sentencepiece(layout.vocab_path)
  ds = seqio.get_mixture_or_task(name).get_dataset(None, split="validation", shuffle=False)
  examples = list(ds.as_numpy_iterator())
  assert len(examples) == len(records)
  for example, record in zip(examples[:5], records):
    prompt = chat.qa_prompt(record.question, record.ctxs, num_passages=2)
    assert example["inputs"].tolist() == processor.encode(prompt)
    assert example["targets"][-1] == processor.eos_id()
    assert processor.decode(example["targets"][:-1].tolist()) == record.answers[0]
    assert [a.decode() for a in example["answers"]] == list(record.answers)
