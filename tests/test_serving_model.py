"""The retrieval service with a real (tiny, random) Retro model from an orbax checkpoint
and a SentencePiece vocabulary, on a real loopback server; and the generate entry point."""

import dataclasses
import json

import gin
import jax
import numpy as np
import pytest

from retro_jax import generate as generate_lib
from retro_jax import serve
from retro_jax.data.vocab import train_sentencepiece
from retro_jax.inference import loading
from retro_jax.models import RetroConfig
from retro_jax.serving.app import create_app
from retro_jax.training.checkpoints import Checkpointer
from retro_jax.utils import gin_utils
from serving_utils import call, running_server
from test_decoding import _params
from test_retriever import DOCS, BagOfWordsEmbedder

CONFIG = RetroConfig(vocab_size=320, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
                     chunk_length=8, num_neighbors=2, cca_layers=(1, 2),
                     encoder_dropout_rate=0.0, max_length=256)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
  root = tmp_path_factory.mktemp("served")
  texts = DOCS + ["who built the clock", "a river and a city", "rises above the plains"]
  vocab_path = train_sentencepiece(texts, str(root / "spm"), vocab_size=300,
                                   num_threads=1)
  checkpointer = Checkpointer(str(root / "model"), async_save=False)
  params = jax.tree_util.tree_map(np.asarray, _params(CONFIG))
  checkpointer.save(1, params, {"count": np.zeros((), np.int32)}, {"step": 1})
  checkpointer.close()
  return str(root / "model"), vocab_path


@pytest.mark.slow
def test_add_document_generate_and_read_retrievals(model_files):
  checkpoint, vocab_path = model_files
  service = serve.build_service(checkpoint, vocab_path, embedder=BagOfWordsEmbedder(),
                                model_config=CONFIG)
  with running_server(create_app(service, max_new_tokens_limit=32)) as url:
    status, body = call(url + "/api/status")
    assert status == 200 and body["num_docs"] == 0 and body["model"].startswith("retro")
    status, body = call(url + "/api/documents", {"documents": [
        {"text": t, "title": title} for t, title in zip(DOCS, ["Zorbia", "Arrak", "Moss"])]})
    assert status == 200 and body["doc_ids"] == [0, 1, 2]
    prompt = "tell me who built a clock that runs on rain water"
    status, body = call(url + "/api/generate", {"prompt": prompt, "max_new_tokens": 20},
                        timeout=300)
    assert status == 200, body
    assert isinstance(body["text"], str)
    # The aligned prompt's chunks are retrieved before the first new token (the last
    # one holds "clock that runs on rain water"), then every chunk completed while
    # generating (20 new tokens, m = 8: two more).
    chunks = body["retrievals"]
    assert len(chunks) >= 3 and all(len(hits) == 2 for hits in chunks)
    assert {"chunk_id", "doc_id", "score", "text", "title"} <= set(chunks[0][0])
    assert any(hits[0]["doc_id"] == 2 and hits[0]["title"] == "Moss"
               and "clock" in hits[0]["text"] for hits in chunks)
    # Reset: generation still works, nothing is retrieved.
    assert call(url + "/api/reset", {})[1]["num_docs"] == 0
    status, body = call(url + "/api/generate", {"prompt": prompt, "max_new_tokens": 4},
                        timeout=300)
    assert status == 200 and all(hits == [] for hits in body["retrievals"])
    assert call(url + "/api/generate", {"prompt": "x", "max_new_tokens": 33})[0] == 422


@pytest.mark.slow
def test_generate_entry_point_with_passages(model_files, tmp_path):
  checkpoint, vocab_path = model_files
  prompts_file = tmp_path / "prompts.jsonl"
  prompts_file.write_text(
      json.dumps({"prompt": "the river of zorbia is", "passages": [
          {"title": "Zorbia", "text": DOCS[0]}]}) + "\n"
      + json.dumps({"prompt": "mount arrak"}) + "\n")
  prompts, passages = loading.read_prompts(str(prompts_file))
  assert passages == [[f"title: Zorbia, source: {DOCS[0]}"], []]
  common = dict(checkpoint=checkpoint, model_config=CONFIG, vocab_path=vocab_path,
                max_new_tokens=10)
  with_passages = generate_lib.generate_texts(prompts, passages=passages, **common)
  assert [r["prompt"] for r in with_passages] == prompts
  assert all(len(r["tokens"]) <= 10 and isinstance(r["text"], str) for r in with_passages)
  # Example 1 has no passage: its chunks are recorded with no neighbors.
  assert with_passages[1]["retrievals"][0]["neighbors"] == []
  assert with_passages[0]["retrievals"][0]["neighbors"][0]["text"].startswith("title: Zorbia")
  assert "PROMPT: mount arrak" in generate_lib.format_record(with_passages[1])


def test_load_generator_compute_dtype_override(model_files):
  checkpoint, vocab_path = model_files
  generator = loading.load_generator(checkpoint, model_config=CONFIG, vocab_path=vocab_path,
                                     dtype="bfloat16")
  assert generator.config.dtype == "bfloat16" and generator.config.param_dtype == "float32"
  kernel = generator.params["layers_0"]["mlp"]["wi"]["kernel"]
  assert kernel.dtype == jax.numpy.bfloat16
  assert len(generator.generate(["a river"], max_new_tokens=3, retrieval=False).tokens[0]) == 3
  # A bf16 checkpoint decoded in float32 is loaded in float32 (no per-step conversion).
  bf16 = dataclasses.replace(CONFIG, dtype="bfloat16", param_dtype="bfloat16")
  generator = loading.load_generator(checkpoint, model_config=bf16, vocab_path=vocab_path,
                                     dtype="float32")
  assert (generator.config.dtype, generator.config.param_dtype) == ("float32", "float32")
  assert {str(x.dtype) for x in jax.tree_util.tree_leaves(generator.params)} == {"float32"}
  with pytest.raises(ValueError, match="dtype"):
    loading.load_generator(checkpoint, model_config=CONFIG, vocab_path=vocab_path,
                           dtype="int8")


def test_gin_cannot_bind_what_a_flag_sets():
  # generate/serve main() pass these from flags; a gin binding would be ignored silently.
  for binding in ("generate_texts.batch_size = 4", "generate_texts.checkpoint = 'x'",
                  "build_service.checkpoint = 'x'", "build_service.vocab_path = 'x'"):
    gin.clear_config()
    with pytest.raises(ValueError, match="allowlist"):
      gin_utils.parse_gin([], [binding])
  gin.clear_config()
  gin_utils.parse_gin([], ["generate_texts.mesh_shape = {'data': 1}",
                           "build_service.max_chunks = 5"])
  gin.clear_config()
