r"""seqio Tasks and Mixtures for retro-fitting and instruction tuning.

Training data reaches the model through registered seqio Tasks, as t5x users expect,
but every task is backed by a *random-access* example source
(``retro_jax.data.sources``), so the stream (``retro_jax.data.ordering``) is a pure
function of (seed, position) and a run resumes at any step without replaying it::

    names = register_retro_tasks("/data/retro", "train", seq_len=2048)
    names.retro, names.gpt            # 'retro_retro_train', 'gpt_retro_train'

The seqio view: ``RandomAccessDataSource`` (a ``seqio.DataSource``) serves any example
source as ``tf.data`` (the same positions: ``shuffle=False`` means position = example
index, one pass), with the rank-3 neighbor feature declared through
``seqio.PassThroughVocabulary`` (``add_eos=False``); ``feature_converters`` turns task
features into model features. Tasks register with ``shuffle_buffer_size=None`` (the
source shuffles), so ``seqio.get_dataset`` gives the stream in the same order.
seqio's own Mixture sampling (``sample_from_datasets``) is seeded but not seekable; the
batch source (``retro_jax.data.batches``) replaces it by the period blend of
``retro_jax.data.ordering`` with the Mixture's rates.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import seqio
import tensorflow as tf

from retro_jax.data import instructions
from retro_jax.data import vocab as vocab_lib
from retro_jax.data.ordering import ExampleStream, stream_dataset
from retro_jax.data.sources import ExampleSource, PretrainSource, Retrieve, SFTSource
from retro_jax.retrieval.layout import RetrievalLayout

class RandomAccessDataSource(seqio.DataSource):
  """A ``seqio.DataSource`` over an ``ExampleSource`` (one split).

  ``get_dataset(shuffle=True, seed=s)`` is the endless permuted stream (new
  permutation every epoch); ``shuffle=False`` is one pass in example order. Extra
  keyword ``start``: begin at that element of the shard (seek without replay).
  ``num_input_examples`` is None on purpose: seqio would otherwise cache a small
  endless stream in memory.
  """

  def __init__(self, source: ExampleSource, split: str, *, with_neighbors: bool):
    super().__init__(splits=[split], num_input_examples=None, caching_permitted=False,
                     performs_internal_shuffling=True)
    self.source, self.split, self.with_neighbors = source, split, with_neighbors

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [self.source.describe()]

  def num_examples(self) -> int:
    return self.source.num_examples

  def get_dataset(self, split: str = "train", shuffle: bool = True,  # pytype: disable=signature-mismatch
                  seed: Optional[int] = None, shard_info: Optional[seqio.ShardInfo] = None,
                  *, sequence_length=None, use_cached: bool = False,
                  num_epochs: Optional[int] = 1, start: int = 0) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs  # The stream defines its epochs.
    if split != self.split:
      raise ValueError(f"{self.source.describe()} serves split {self.split!r}, not "
                       f"{split!r}")
    stream = ExampleStream([self.source], seed=seed or 0, shuffle=shuffle,
                           num_epochs=None if shuffle else 1)
    return stream_dataset(stream, with_neighbors=self.with_neighbors,
                          shard_info=shard_info, start=start)


def output_features(vocabulary: Optional[seqio.Vocabulary] = None, *,
                    with_neighbors: bool) -> dict[str, seqio.Feature]:
  """The task features (feature_converters) as seqio Features."""
  passthrough = seqio.PassThroughVocabulary(size=0)
  features = {
      "targets": seqio.Feature(vocabulary or passthrough, add_eos=False, dtype=tf.int32),
      "loss_weights": seqio.Feature(passthrough, add_eos=False, dtype=tf.float32),
  }
  if with_neighbors:
    features["neighbor_tokens"] = seqio.Feature(passthrough, add_eos=False,
                                                dtype=tf.int32, rank=3)
    features["neighbor_mask"] = seqio.Feature(passthrough, add_eos=False,
                                              dtype=tf.bool, rank=2)
  return features


@dataclasses.dataclass(frozen=True)
class TaskNames:
  """The registered names of a Retro task and its GPT twin (same examples)."""
  retro: Optional[str]
  gpt: str

  def get(self, with_neighbors: bool) -> str:
    if with_neighbors and self.retro is None:
      raise ValueError(f"{self.gpt} has no Retro twin (no neighbor map)")
    return self.retro if with_neighbors else self.gpt


_REGISTERED: dict[str, tuple] = {}


def _task_name(text: str) -> str:
  name = re.sub(r"[^0-9a-zA-Z_]+", "_", text).strip("_").lower()
  return name or "data"


def _register_task(name: str, spec: tuple, source: ExampleSource, split: str,
                   with_neighbors: bool, vocabulary) -> None:
  if name in seqio.TaskRegistry.names():
    logging.info("seqio task %s is registered again (new settings or files)", name)
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=RandomAccessDataSource(source, split, with_neighbors=with_neighbors),
      output_features=output_features(vocabulary, with_neighbors=with_neighbors),
      preprocessors=[], shuffle_buffer_size=None)
  _REGISTERED[name] = spec


def _is_registered(names: Sequence[str], spec: tuple) -> bool:
  return all(_REGISTERED.get(n) == spec and n in seqio.TaskRegistry.names() for n in names)


def _layout_vocabulary(layout: RetrievalLayout):
  if os.path.exists(layout.vocab_path):
    return vocab_lib.get_vocabulary(layout.vocab_path)
  return None


def register_retro_tasks(retrieval_dir: str, split: str, seq_len: int, *,
                         name: Optional[str] = None, num_neighbors: Optional[int] = None,
                         pad_id: Optional[int] = None, validate: bool | str = "auto"
                         ) -> TaskNames:
  """Registers ``retro_{name}_{split}`` and its GPT twin ``gpt_{name}_{split}``.

  Both read one ``PretrainSource`` (identical tokens); the Retro task adds the
  neighbor features. Without a neighbor map for the split only the GPT task exists.
  Registering the same settings again is a no-op; new settings replace the tasks.

  Args:
    retrieval_dir: A prepared directory (``RetrievalLayout`` root).
    split: 'train', 'valid', ... (its query DB ``<split>_db``).
    seq_len: n.
    name: Defaults to the directory's base name.
    num_neighbors, pad_id, validate: See ``PretrainSource``.
  """
  layout = RetrievalLayout(retrieval_dir)
  name = _task_name(name or os.path.basename(layout.root))
  has_map = os.path.exists(layout.neighbor_map_path(split))
  names = TaskNames(retro=f"retro_{name}_{split}" if has_map else None,
                    gpt=f"gpt_{name}_{split}")
  spec = ("pretrain", layout.root, split, seq_len, num_neighbors, pad_id, has_map)
  registered = [n for n in (names.retro, names.gpt) if n]
  if _is_registered(registered, spec):
    return names
  kwargs = {} if pad_id is None else {"pad_id": pad_id}
  source = PretrainSource.from_layout(layout, split, seq_len=seq_len, with_neighbors=has_map,
                                      num_neighbors=num_neighbors, validate=validate,
                                      **kwargs)
  vocabulary = _layout_vocabulary(layout)
  for task, with_neighbors in ((names.retro, True), (names.gpt, False)):
    if task:
      _register_task(task, spec, source, split, with_neighbors, vocabulary)
  logging.info("registered %s: %s", registered, source.describe())
  return names


def register_sft_tasks(name: str, path: str, vocab: str, seq_len: int, *,
                       format: str = "auto", chunk_length: int = 64,  # pylint: disable=redefined-builtin
                       num_neighbors: int = 2, retrieved_length: Optional[int] = None,
                       retriever: Optional[Retrieve] = None, align_prompts: bool = False,
                       reader_kwargs: Optional[Mapping[str, Any]] = None) -> TaskNames:
  """Registers ``retro_sft_{name}`` (neighbor features) and ``gpt_sft_{name}``.

  Args:
    name: Dataset name.
    path: Instruction file (any ``instructions.FORMATS`` layout); a relative path
      not found is looked up in the shipped ``data/``.
    vocab: SentencePiece model path of the model.
    seq_len, chunk_length, num_neighbors, retrieved_length, retriever, align_prompts:
      See SFTSource.
    reader_kwargs: Passed to the reader (e.g. ``prompt_key``, or ``num_passages`` in
      the prompt and ``num_neighbor_passages`` read by the encoder).
  """
  path = instructions.resolve_data_file(path)
  names = TaskNames(retro=f"retro_sft_{_task_name(name)}", gpt=f"gpt_sft_{_task_name(name)}")
  spec = ("sft", os.path.abspath(path), os.path.getmtime(path), os.path.abspath(vocab)
          if isinstance(vocab, str) else id(vocab), seq_len, chunk_length, num_neighbors,
          retrieved_length, id(retriever) if retriever else None, align_prompts, format,
          tuple(sorted((reader_kwargs or {}).items())))
  if _is_registered([names.retro, names.gpt], spec):
    return names
  try:
    records = instructions.read_sft(path, format, **(reader_kwargs or {}))
  except TypeError as e:                       # a reader option it does not take
    raise ValueError(f"SFT dataset {name!r} ({path}): reader options "
                     f"{dict(reader_kwargs or {})}: {e}") from e
  source = SFTSource(records, vocab, seq_len=seq_len, chunk_length=chunk_length,
                     num_neighbors=num_neighbors, retrieved_length=retrieved_length,
                     retriever=retriever, align_prompts=align_prompts,
                     name=f"{name} ({path})")
  vocabulary = vocab_lib.get_vocabulary(vocab) if isinstance(vocab, str) else None
  for task, with_neighbors in ((names.retro, True), (names.gpt, False)):
    _register_task(task, spec, source, "train", with_neighbors, vocabulary)
  return names


def register_mixture(name: str, tasks_and_rates: Sequence[tuple[str, float]]) -> str:
  """Registers (or replaces) a seqio Mixture of tasks with rates; returns its name."""
  for task, rate in tasks_and_rates:
    if task not in seqio.TaskRegistry.names():
      raise ValueError(f"mixture {name}: task {task!r} is not registered")
    if not rate > 0:
      raise ValueError(f"mixture {name}: rate of {task!r} must be positive, got {rate}")
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, [(t, float(r)) for t, r in tasks_and_rates])
  return name


DEFAULT_SFT_BLEND = (
    ("chat", "data/sft/chat.jsonl", 1.0),
    ("prompt_response", "data/sft/prompt_response.jsonl", 1.0),
    ("qa", "data/sft/qa.jsonl", 1.0),
)


def register_sft_mixture(name: str, datasets: Sequence[tuple], vocab: str, seq_len: int,
                         **kwargs) -> TaskNames:
  """Registers each ``(dataset, path, rate)`` or ``(dataset, path, rate, reader_kwargs)``
  and the blends ``retro_sft_{name}`` / ``gpt_sft_{name}`` (seqio Mixtures with those
  rates)."""
  members = []
  for entry in datasets:
    if len(entry) not in (3, 4) or (len(entry) == 4 and not isinstance(entry[3], Mapping)):
      raise ValueError(f"SFT blend {name!r}: entry {entry!r} must be (name, path, rate) "
                       "or (name, path, rate, {reader option: value})")
    d, path, rate = entry[:3]
    reader_kwargs = dict(entry[3]) if len(entry) == 4 else None
    members.append((register_sft_tasks(d, path, vocab, seq_len, reader_kwargs=reader_kwargs,
                                       **kwargs), float(rate)))
  if len(members) == 1:
    return members[0][0]
  mixture = _task_name(name)
  return TaskNames(
      retro=register_mixture(f"retro_sft_{mixture}", [(n.retro, r) for n, r in members]),
      gpt=register_mixture(f"gpt_sft_{mixture}", [(n.gpt, r) for n, r in members]))


def register_qa_task(name: str, path: str, vocab: str, *, num_passages: int = 5,
                     split: str = "validation") -> str:
  """Registers ``qa_{name}``: NQ / TriviaQA-style records as zero-shot QA prompts.

  Each example (file order, no shuffling) has ``inputs``: the tokens of
  ``chat.qa_prompt(question, ctxs, num_passages=...)`` (InstructRetro's evaluation
  prompt, ending "Assistant: The answer is"), ``targets``: the tokens of ``answers[0]``
  and EOS (with SentencePiece's dummy prefix these are the tokens that follow the
  prompt in ``prompt + " " + answer``), and the strings ``question`` and ``answers``
  (every gold alias, for exact match / F1). For generation and scoring, not training.
  """
  path = instructions.resolve_data_file(path)
  records = instructions.read_qa_examples(path)
  if not records:
    raise ValueError(f"{path}: no QA records")
  columns = {
      "inputs": [r.prompt(num_passages=num_passages) for r in records],
      "targets": [r.answers[0] if r.answers else "" for r in records],
      "question": [r.question for r in records],
      "answers": tf.ragged.constant([list(r.answers) for r in records], dtype=tf.string),
  }

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices(columns)

  vocabulary = vocab_lib.get_vocabulary(vocab)
  task = f"qa_{_task_name(name)}"
  if task in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(task)
  seqio.TaskRegistry.add(
      task, source=seqio.FunctionDataSource(dataset_fn, splits=[split],
                                            num_input_examples={split: len(records)}),
      output_features={"inputs": seqio.Feature(vocabulary, add_eos=False),
                       "targets": seqio.Feature(vocabulary, add_eos=True)},
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      shuffle_buffer_size=None)
  return task
