r"""The trainer's batch source: global batch ``step`` of a registered Task or Mixture.

::

    names = tasks.register_retro_tasks("/data/retro", "train", seq_len=2048)
    source = TaskBatchSource(names.retro, batch_size=256, seed=0)
    batch = source.get_batch(step)    # this host's share of global batch `step`

``get_batch(step)`` (and ``TaskBatchSource.dataset(start_step=step)`` for a tf.data
pipeline) reads the stream positions of that step (``retro_jax.data.ordering``): a run
resumes at any step with no state and nothing replayed. ``pretraining_batch_source``
and ``sft_batch_source`` are what the gin files bind: they register the tasks
(``retro_jax.data.tasks``) and return the batch source.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from absl import logging
import gin
import jax
import numpy as np
import seqio
import tensorflow as tf

from retro_jax.data import feature_converters as fc
from retro_jax.data import vocab as vocab_lib
from retro_jax.data.ordering import ExampleStream, shard_positions, stream_dataset
from retro_jax.data.tasks import (DEFAULT_SFT_BLEND, RandomAccessDataSource,
                                  register_retro_tasks, register_sft_mixture)
from retro_jax.retrieval import formats
from retro_jax.retrieval.layout import RetrievalLayout
from retro_jax.retrieval.retriever import load_retriever


def _data_sources(name: str) -> tuple[list[RandomAccessDataSource], list[float]]:
  provider = seqio.get_mixture_or_task(name)
  if isinstance(provider, seqio.Mixture):
    tasks = list(provider.tasks)
    rates = [float(provider.get_rate(t)) for t in tasks]
  else:
    tasks, rates = [provider], [1.0]
  sources = []
  for task in tasks:
    if not isinstance(task.source, RandomAccessDataSource):
      raise ValueError(f"task {task.name!r} has a {type(task.source).__name__}; the batch "
                       "source needs tasks registered by retro_jax.data.tasks "
                       "(random access)")
    sources.append(task.source)
  return sources, rates


def _default_shard_info() -> seqio.ShardInfo:
  return seqio.ShardInfo(jax.process_index(), jax.process_count())


@gin.configurable
class TaskBatchSource:
  """``get_batch(step)``: this host's share of global batch ``step`` of a Task/Mixture.

  Args:
    task_or_mixture: A name registered by ``retro_jax.data.tasks``.
    batch_size: Global batch size B (divided over the shards).
    seed, shuffle, num_epochs: The stream (``ExampleStream``).
    shard_info: This host's shard; default ``(jax.process_index(), process_count())``.
  Batches are model features (``feature_converters.model_features``); a Retro task gives
  neighbor features, its GPT twin does not.
  """

  def __init__(self, task_or_mixture: str, *, batch_size: int, seed: int = 0,
               shuffle: bool = True, num_epochs: Optional[int] = None,
               shard_info: Optional[seqio.ShardInfo] = None):
    self.name = task_or_mixture
    sources, rates = _data_sources(task_or_mixture)
    kinds = {s.with_neighbors for s in sources}
    if len(kinds) != 1:
      raise ValueError(f"{task_or_mixture}: mixes tasks with and without neighbors")
    self.with_neighbors = kinds.pop()
    self.stream = ExampleStream([s.source for s in sources], rates, seed=seed,
                                shuffle=shuffle, num_epochs=num_epochs)
    self.shard_info = shard_info or _default_shard_info()
    shards = self.shard_info.num_shards
    if batch_size <= 0 or batch_size % shards:
      raise ValueError(f"batch_size={batch_size} must be a positive multiple of the "
                       f"{shards} shards (hosts)")
    self.batch_size, self.local_batch_size = batch_size, batch_size // shards
    first = self.stream.sources[0]
    self.seq_len, self.chunk_length = first.seq_len, first.chunk_length
    logging.info("batch source %s: %s, global batch %d, shard %d/%d, seed %d",
                 task_or_mixture, [s.describe() for s in self.stream.sources], batch_size,
                 self.shard_info.index, shards, seed)

  def elements(self, step: int) -> np.ndarray:
    """This shard's element numbers of step ``step``."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    b = self.local_batch_size
    return step * b + np.arange(b, dtype=np.int64)

  def positions(self, step: int) -> np.ndarray:
    """Global stream positions this shard reads at step ``step``."""
    return shard_positions(self.elements(step), self.shard_info)

  def task_features(self, step: int) -> dict[str, np.ndarray]:
    return self.stream.features(self.positions(step), with_neighbors=self.with_neighbors)

  def get_batch(self, step: int) -> dict[str, np.ndarray]:
    return fc.model_features(self.task_features(step), with_neighbors=self.with_neighbors,
                             where=f"{self.name} step {step}")

  def dataset(self, start_step: int = 0) -> tf.data.Dataset:
    """The same batches as a ``tf.data`` pipeline (seqio feature converter), from
    ``start_step`` on (seeked, not replayed)."""
    ds = stream_dataset(self.stream, with_neighbors=self.with_neighbors,
                        shard_info=self.shard_info,
                        start=start_step * self.local_batch_size)
    converter = (fc.RetroFeatureConverter() if self.with_neighbors
                 else fc.GPTFeatureConverter())
    ds = converter(ds, fc.task_feature_lengths(self.seq_len, self.chunk_length,
                                               with_neighbors=self.with_neighbors))
    return ds.batch(self.local_batch_size, drop_remainder=True)


def _check_vocab(vocab_path: str, model_config) -> None:
  """The model's embedding must cover the data's token ids."""
  if model_config is None or not os.path.exists(vocab_path):
    return
  pieces = vocab_lib.load_sentencepiece(vocab_path).get_piece_size()
  if pieces > model_config.vocab_size:
    raise ValueError(f"{vocab_path} has {pieces} pieces, more than the model's "
                     f"RetroConfig.vocab_size={model_config.vocab_size}")


def _model_shape(model_config) -> dict[str, int]:
  if model_config is None:
    return {}
  return {"chunk_length": model_config.chunk_length,
          "num_neighbors": model_config.num_neighbors,
          "retrieved_length": model_config.neighbor_length}


@gin.configurable
def pretraining_batch_source(retrieval_dir: str = gin.REQUIRED, *, split: str = "train",
                             seq_len: int = gin.REQUIRED, batch_size: int = gin.REQUIRED,
                             with_neighbors: bool = True,
                             num_neighbors: Optional[int] = None, seed: int = 0,
                             shuffle: bool = True, num_epochs: Optional[int] = None,
                             model_config: Any = None, name: Optional[str] = None,
                             missing_ok: bool = False) -> Optional[TaskBatchSource]:
  """Registers a split's tasks and returns the batch source of the Retro or GPT one.

  Args:
    retrieval_dir: The prepared directory (``RETRIEVAL_DIR``).
    split, seq_len, batch_size, seed, shuffle, num_epochs: The stream.
    with_neighbors: The Retro task (True) or its GPT twin (GPT pretraining,
      GPT-fitting).
    num_neighbors: k (default: the model's, else the map's).
    model_config: A ``RetroConfig`` to check the data against (chunk size, k).
    missing_ok: Return None (with a warning) if the split has no query DB, e.g. an
      optional held-out split.
  """
  layout = RetrievalLayout(retrieval_dir)
  if missing_ok and not formats.chunk_db_exists(layout.split_db_prefix(split)):
    logging.warning("no %r split in %s; no batch source", split, layout.root)
    return None
  knn = layout.neighbor_map_path(split)
  if with_neighbors and not os.path.exists(knn):
    raise FileNotFoundError(f"{knn}: no neighbor map for split {split!r}, which a Retro "
                            "run needs (build it with `python -m retro_jax.preprocess`, or "
                            "train without retrieval)")
  _check_vocab(layout.vocab_path, model_config)
  shape = _model_shape(model_config)
  if with_neighbors and num_neighbors is None:
    num_neighbors = shape.get("num_neighbors")
  names = register_retro_tasks(retrieval_dir, split, seq_len, name=name,
                               num_neighbors=num_neighbors if with_neighbors else None)
  source = TaskBatchSource(names.get(with_neighbors), batch_size=batch_size, seed=seed,
                           shuffle=shuffle, num_epochs=num_epochs)
  if shape and source.chunk_length != shape["chunk_length"]:
    raise ValueError(f"{retrieval_dir}: chunk size {source.chunk_length} differs from the "
                     f"model's RetroConfig.chunk_length={shape['chunk_length']}")
  return source


@gin.configurable
def sft_batch_source(retrieval_dir: Optional[str] = None, *,
                     datasets: Sequence[tuple[str, str, float]] = DEFAULT_SFT_BLEND,
                     vocab_path: Optional[str] = None, seq_len: int = gin.REQUIRED,
                     batch_size: int = gin.REQUIRED, with_neighbors: bool = True,
                     seed: int = 0, chunk_length: int = 64, num_neighbors: int = 2,
                     retrieved_length: Optional[int] = None, model_config: Any = None,
                     retrieve_neighbors: bool = False, align_prompts: bool = False,
                     name: str = "blend") -> TaskBatchSource:
  """Registers an instruction blend (``(name, path, rate)`` triples) and its batch source.

  Args:
    retrieval_dir: Gives the vocabulary (``vocab/spm.model``) unless ``vocab_path``,
      and the retrieval DB when ``retrieve_neighbors``.
    datasets: The blend (default: the project's shipped set in ``data/sft``):
      ``(name, path, rate)``, or ``(name, path, rate, reader_kwargs)`` (e.g.
      ``{'num_passages': 0, 'num_neighbor_passages': 2}``: a QA file's top 2 passages
      read by the encoder, none in the prompt).
    with_neighbors: Retro SFT (neighbor features present) or GPT-Instruct.
    chunk_length, num_neighbors, retrieved_length: m, k, r; taken from
      ``model_config`` (a ``RetroConfig``) when given.
    retrieve_neighbors: Fill the neighbor features by searching ``retrieval_dir``
      (``Retriever``) with every complete chunk of each prompt, as the 'live' mode of
      generation does; chunks holding answer tokens get none. False (Megatron's
      InstructRetro SFT): all neighbors are masked, the encoder and CCA idle, but for
      examples that carry their own neighbor passages (``with_neighbors``).
    align_prompts: Left-pad examples so that each prompt ends at a chunk boundary, as
      the evaluation lays out its prompts (``SFTSource``).
  """
  if vocab_path is None:
    if retrieval_dir is None:
      raise ValueError("sft_batch_source needs retrieval_dir (for its vocab/spm.model) "
                       "or vocab_path")
    vocab_path = RetrievalLayout(retrieval_dir).vocab_path
  _check_vocab(vocab_path, model_config)
  shape = dict(chunk_length=chunk_length, num_neighbors=num_neighbors,
               retrieved_length=retrieved_length)
  shape.update(_model_shape(model_config))
  retriever = None
  if retrieve_neighbors and with_neighbors:
    if retrieval_dir is None:
      raise ValueError("sft_batch_source.retrieve_neighbors needs retrieval_dir (the "
                       "retrieval DB to search)")
    retriever = load_retriever(retrieval_dir, num_neighbors=shape["num_neighbors"])
  names = register_sft_mixture(name, [tuple(d) for d in datasets], vocab_path, seq_len,
                               retriever=retriever, align_prompts=align_prompts, **shape)
  return TaskBatchSource(names.get(with_neighbors), batch_size=batch_size, seed=seed)
