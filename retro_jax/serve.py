r"""Retrieval service with a real model: add documents, then generate against them.

    python -m retro_jax.serve --gin_file=tiny.gin --checkpoint=/tmp/retrofit \
        --vocab=/data/retro/vocab/spm.model [--embedder=all-MiniLM-L6-v2] \
        [--host=127.0.0.1 --port=8000 --token=SECRET]

then open http://127.0.0.1:8000/ (or use the JSON API of ``retro_jax.serving.app``).

The service starts with an empty in-memory ``DocumentStore`` (chunked with the model's
m, embedded with ``--embedder``, exact Faiss search); ``/api/generate`` runs the
``Generator`` with live retrieval against it: the prompt is aligned so that its last
chunk is retrieved before the first new token (``align_prompts``), then every chunk
completed during generation retrieves again. The answer lists, per retrieved chunk,
the documents' chunks it read. A GPT checkpoint (no encoder/CCA) serves generation
without retrieval (queries still work).

Binding beyond loopback requires ``--token``; without one, requests must name the
loopback (or the bound host) in ``Host``/``Origin`` (no DNS rebinding, no cross-site
posts). Request sizes, generation lengths and the generation queue are bounded
(``--max_request_bytes``, ``--max_new_tokens_limit``, ``--max_pending_generates``: 503
with ``Retry-After`` beyond it).
"""

from __future__ import annotations

from typing import Any, Optional, Union

from absl import app
from absl import flags
from absl import logging
import gin
import uvicorn

from retro_jax.inference.generator import Generator
from retro_jax.inference.loading import DTYPE_FLAG_HELP, load_generator
from retro_jax.inference.sampling import SamplingConfig
from retro_jax.models import RetroConfig
from retro_jax.models.config import DTYPES
from retro_jax.retrieval.embedders import load_embedder
from retro_jax.retrieval.retriever import DocumentStore, Retriever
from retro_jax.serving.app import RetroService, check_bind, create_app
from retro_jax.utils import gin_utils


def make_generate_fn(generator: Generator, sampling: Optional[SamplingConfig] = None):
  """The service's ``generate_fn(prompt, max_new_tokens, retriever)`` over a generator."""

  def generate_fn(prompt: str, max_new_tokens: int, retriever: Retriever) -> dict:
    result = generator.generate([prompt], max_new_tokens=max_new_tokens, sampling=sampling,
                                retriever=retriever, retrieval=generator.has_retro,
                                align_prompts=True)
    logging.info("generated %d tokens in %.2fs (%d chunks retrieved)",
                 len(result.tokens[0]), result.stats["seconds"],
                 result.stats.get("retrieved_chunks", 0))
    return {"text": result.texts[0],
            "retrievals": [chunk["neighbors"] for chunk in result.retrievals[0]]}

  return generate_fn


def service_for_generator(generator: Generator, embedder: Any, *,
                          sampling: Optional[SamplingConfig] = None,
                          model_name: str = "retro", max_chunks: int = 1_000_000
                          ) -> RetroService:
  """A ``RetroService`` whose documents are chunked for ``generator``'s model."""
  config = generator.config
  # The generator's ids are its vocabulary's (``vocab_lib.special_ids``): documents end
  # with its EOD and are padded with its pad (EOD where the vocabulary has no pad).
  store = DocumentStore(generator.vocab, embedder, chunk_length=config.chunk_length,
                        pad_id=generator.pad_id, eod_id=generator.eod_id,
                        max_chunks=max_chunks)
  retriever = Retriever(embedder, generator.vocab, store,
                        num_neighbors=config.num_neighbors, pad_id=generator.pad_id,
                        eod_id=generator.eod_id)
  return RetroService(store, retriever, make_generate_fn(generator, sampling),
                      model_name=model_name)


# The flags set checkpoint, vocab_path and embedder; gin may bind only the rest, so a
# binding is never silently overridden.
@gin.configurable(allowlist=["model_config", "sampling", "mesh_shape", "max_chunks"])
def build_service(checkpoint: str, vocab_path: str, *,
                  embedder: Union[str, Any] = "all-MiniLM-L6-v2",
                  model_config: Optional[RetroConfig] = None,
                  sampling: Optional[SamplingConfig] = None,
                  mesh_shape: Optional[dict] = None, max_chunks: int = 1_000_000,
                  dtype: Optional[str] = None) -> RetroService:
  """Loads the checkpoint, vocabulary and embedder; returns the service state.

  Args:
    checkpoint: MODEL_DIR or a step directory (GPT or Retro).
    vocab_path: the model's SentencePiece model.
    embedder: a name or directory for ``retro_jax.retrieval.embedders.load_embedder``,
      or an embedder object (``dim``, ``embed_texts``).
    model_config: the architecture (default: ``RetroConfig()`` as bound by gin).
    sampling: generation rule (greedy by default).
    max_chunks: capacity of the document store.
    dtype: compute dtype (default: the architecture's); see ``load_generator``.
  """
  generator = load_generator(checkpoint, model_config=model_config, vocab_path=vocab_path,
                             mesh_shape=mesh_shape, dtype=dtype)
  if isinstance(embedder, str):
    embedder = load_embedder(embedder)
  name = f"{'retro' if generator.has_retro else 'gpt (no retrieval)'}: {checkpoint}"
  return service_for_generator(generator, embedder, sampling=sampling, model_name=name,
                               max_chunks=max_chunks)


# Command line ------------------------------------------------------------------------


def _define_flags() -> None:
  gin_utils.define_gin_flags()
  flags.DEFINE_string("checkpoint", None, "MODEL_DIR or a step directory.")
  flags.DEFINE_string("vocab", None, "The model's SentencePiece model.")
  flags.DEFINE_string("embedder", "all-MiniLM-L6-v2", "Sentence embedder (name or "
                      "directory).")
  flags.DEFINE_string("host", "127.0.0.1", "Bind address (loopback by default).")
  flags.DEFINE_integer("port", 8000, "Port.")
  flags.DEFINE_string("token", None, "API token (required off loopback).")
  flags.DEFINE_integer("max_request_bytes", 1 << 20, "Largest request body.")
  flags.DEFINE_integer("max_new_tokens_limit", 256, "Largest max_new_tokens a request "
                       "may ask.")
  flags.DEFINE_integer("max_pending_generates", 4, "Generate requests running or waiting "
                       "at once; more get 503 with Retry-After.")
  flags.DEFINE_enum("dtype", None, DTYPES, DTYPE_FLAG_HELP)


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  gin_utils.parse_gin(f.gin_file, f.gin_bindings)
  for name in ("checkpoint", "vocab"):
    if not f[name].value:
      raise app.UsageError(f"--{name} is required")
  check_bind(f.host, f.token)
  service = build_service(f.checkpoint, f.vocab, embedder=f.embedder, dtype=f.dtype)
  app_ = create_app(service, token=f.token, max_request_bytes=f.max_request_bytes,
                    max_new_tokens_limit=f.max_new_tokens_limit,
                    max_pending_generates=f.max_pending_generates, host=f.host, port=f.port)
  logging.info("serving %s on http://%s:%d/", service.model_name, f.host, f.port)
  uvicorn.run(app_, host=f.host, port=f.port, log_level="info")


if __name__ == "__main__":
  _define_flags()
  gin_utils.run_with_gin_flags(main)
