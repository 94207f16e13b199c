r"""Instruction data: readers for the common layouts, and SFT examples as tokens.

Layouts (one JSON object per line in ``.jsonl``; a JSON list in ``.json``):

* ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...],
  "passages": [...]}`` (``passages`` optional: strings or ``{"title", "text"}``); the
  last message is the assistant answer that is trained on.
* ``prompt_response``: ``{"prompt": ..., "response": ..., "system": ...}`` (keys
  configurable; ``system`` optional).
* ``qa`` (Megatron's QA layout, also NQ / TriviaQA): ``{"question": ...,
  "answer": ... | "answers": [...], "ctxs": [{"title", "text"}, ...]}``; SFT uses the
  first answer (as Megatron) and the short-answer template; ``ctxs`` (or Megatron's
  ``sub-paragraphs``) become context passages.

Every reader error names the file and the 1-based line (or list index) and the field:
invalid JSON, a record that is not an object, a missing field, an unknown role.

An SFT example is tokenized as ``prompt + answer + [EOS]`` (``chat.render_example``;
EOS is the vocabulary's own, ``vocab.special_ids``: 1 for ours, 2 for Megatron's)
into at most ``n + 1`` tokens (the model reads n of them and predicts the next).
``loss_weights[j] = 1`` exactly for the tokens of the final answer and its EOS, so the
loss covers only the last assistant turn (Megatron's ``--answer-loss-only``).
Truncation rule for long examples: the answer and EOS are kept whole when they fit
in n tokens (otherwise the answer is cut on the right and loses its EOS); the prompt
keeps its *last* tokens, i.e. it is truncated from the left (the system line, the
passages and the oldest turns go first; the final user turn stays next to the answer).

The shipped instruction set written by this project lives in ``data/sft/`` (and a
small NQ-style QA sample in ``data/qa/``); ``shipped_data_path`` finds them from any
working directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from retro_jax.data import chat
from retro_jax.data.vocab import special_ids
from retro_jax.utils.io import read_jsonl

FORMATS = ("auto", "chat", "prompt_response", "qa")
DATA_DIR_ENV = "RETRO_JAX_DATA_DIR"


def shipped_data_path(*parts: str) -> str:
  """A path under the repository's ``data/`` directory (the shipped SFT/QA sets).

  ``$RETRO_JAX_DATA_DIR`` overrides the location (e.g. for a non-editable install).
  """
  root = os.environ.get(DATA_DIR_ENV) or os.path.join(
      os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
      "data")
  path = os.path.join(root, *parts)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: shipped data not found (set ${DATA_DIR_ENV} to "
                            "the repository's data/ directory)")
  return path


def resolve_data_file(path: str) -> str:
  """``path`` as given if it exists, else under the shipped ``data/`` directory."""
  if os.path.exists(path):
    return path
  relative = path[len("data/"):] if path.startswith("data/") else path
  try:
    return shipped_data_path(relative)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: instruction data file not found (looked in the "
                            "working directory and the shipped data/)") from None


# ----------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SFTExample:
  """One instruction-tuning conversation.

  Attributes:
    messages: Validated ``{role, content}`` dicts ending with the assistant answer.
    passages: Context passages (formatted strings) put before the turns.
    answer_prefix: ``""`` or ``chat.SHORT_ANSWER_PREFIX`` (short-answer QA).
    where: ``file:line`` of the record, for errors.
    neighbor_passages: Passages (formatted strings) that every chunk of the example
      reads as its neighbors in the Retro encoder, in place of retrieved ones (the
      evaluation's 'passages' mode, Megatron's ``--reuse-top``); () for none.
  """
  messages: tuple[Mapping[str, str], ...]
  passages: tuple[str, ...] = ()
  answer_prefix: str = ""
  where: str = ""
  neighbor_passages: tuple[str, ...] = ()

  def render(self) -> tuple[str, str]:
    """``(prompt, answer)`` texts (``chat.render_example``)."""
    return chat.render_example(self.messages, passages=self.passages,
                               answer_prefix=self.answer_prefix, where=self.where)

  @property
  def answer(self) -> str:
    return self.messages[-1]["content"]


@dataclasses.dataclass(frozen=True)
class QAExample:
  """An NQ / TriviaQA-style evaluation record."""
  question: str
  answers: tuple[str, ...]
  ctxs: tuple[Mapping[str, str], ...] = ()
  where: str = ""

  def prompt(self, num_passages: int = 5, **kwargs) -> str:
    """The zero-shot prompt (``chat.qa_prompt``) with the top ``num_passages`` ctxs."""
    return chat.qa_prompt(self.question, self.ctxs, num_passages=num_passages, **kwargs)


def read_json_records(path: str) -> Iterator[tuple[str, dict]]:
  """Yields ``(where, record)`` of a ``.jsonl`` file (``utils.io.read_jsonl``: blank
  lines skipped) or a ``.json`` list; ``where`` is ``path:line`` or ``path[index]``."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: file not found")
  if path.endswith(".json"):
    with open(path, encoding="utf-8") as f:
      try:
        data = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(data, list):
      raise ValueError(f"{path}: a .json file must hold a list of records, got "
                       f"{type(data).__name__}")
    items = ((f"{path}[{i}]", record) for i, record in enumerate(data))
  else:
    items = read_jsonl(path)
  for where, record in items:
    if not isinstance(record, dict):
      raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    yield where, record


def _field(record: Mapping[str, Any], key: str, where: str, kind=str) -> Any:
  if key not in record:
    raise ValueError(f"{where}: missing field {key!r} (keys: {sorted(record)})")
  value = record[key]
  if not isinstance(value, kind):
    raise ValueError(f"{where}: field {key!r} must be {getattr(kind, '__name__', kind)},"
                     f" got {type(value).__name__}")
  return value


def _passages(record: Mapping[str, Any], where: str, keys: Sequence[str]
              ) -> tuple[str, ...]:
  for key in keys:
    if key in record and record[key] is not None:
      value = record[key]
      if isinstance(value, str):               # Megatron's sub-paragraph string
        value = [{"title": "", "text": value}]
      if not isinstance(value, list):
        raise ValueError(f"{where}: field {key!r} must be a list of passages")
      try:
        out = tuple(chat.format_passage(p) for p in value)
      except ValueError as e:
        raise ValueError(f"{where}: field {key!r}: {e}") from e
      return out
  return ()


def _passage_fields(record: Mapping[str, Any], where: str, keys: Sequence[str],
                    num_passages: Optional[int], num_neighbor_passages: int
                    ) -> dict[str, tuple[str, ...]]:
  """``SFTExample`` fields from a record's passages: the top ``num_passages`` (None:
  all) in the prompt, the top ``num_neighbor_passages`` read by the encoder."""
  if num_passages is not None and num_passages < 0 or num_neighbor_passages < 0:
    raise ValueError(f"{where}: num_passages={num_passages} and num_neighbor_passages="
                     f"{num_neighbor_passages} must be >= 0")
  passages = _passages(record, where, keys)
  return {"passages": passages if num_passages is None else passages[:num_passages],
          "neighbor_passages": passages[:num_neighbor_passages]}


def _answers(record: Mapping[str, Any], where: str) -> tuple[str, ...]:
  if "answers" in record:
    value = record["answers"]
  elif "answer" in record:
    value = record["answer"]
  else:
    raise ValueError(f"{where}: missing field 'answer' or 'answers' (keys: "
                     f"{sorted(record)})")
  values = value if isinstance(value, list) else [value]
  out = []
  for v in values:
    if isinstance(v, Mapping) and "text" in v:       # SQuAD-style {"text": ...}
      v = v["text"]
    if not isinstance(v, (str, int, float)):
      raise ValueError(f"{where}: answers must be strings, got {type(v).__name__}")
    out.append(str(v).strip())
  return tuple(out)


# ----------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------


def read_chat(path: str, *, messages_key: str = "messages",
              passages_keys: Sequence[str] = ("passages", "ctxs"),
              num_passages: Optional[int] = None,
              num_neighbor_passages: int = 0) -> list[SFTExample]:
  """Reads ``{"messages": [...]}`` records (the last message is the trained answer);
  passages as ``read_qa_sft``'s."""
  out = []
  for where, record in read_json_records(path):
    messages = chat.validate_messages(_field(record, messages_key, where, list),
                                      where=where, final_role="assistant")
    out.append(SFTExample(tuple(messages), where=where, **_passage_fields(
        record, where, passages_keys, num_passages, num_neighbor_passages)))
  return out


def read_prompt_response(path: str, *, prompt_key: str = "prompt",
                         response_key: str = "response",
                         system_key: Optional[str] = "system",
                         passages_keys: Sequence[str] = ("passages", "ctxs"),
                         num_passages: Optional[int] = None,
                         num_neighbor_passages: int = 0) -> list[SFTExample]:
  """Reads ``{"prompt": ..., "response": ...}`` pairs as one-turn conversations;
  passages as ``read_qa_sft``'s."""
  out = []
  for where, record in read_json_records(path):
    messages = []
    if system_key and record.get(system_key):
      messages.append({"role": "system", "content": _field(record, system_key, where)})
    messages += [{"role": "user", "content": _field(record, prompt_key, where)},
                 {"role": "assistant", "content": _field(record, response_key, where)}]
    out.append(SFTExample(tuple(messages), where=where, **_passage_fields(
        record, where, passages_keys, num_passages, num_neighbor_passages)))
  return out


def read_qa_sft(path: str, *, question_key: str = "question",
                passages_keys: Sequence[str] = ("ctxs", "sub-paragraphs", "sub_paragraph"),
                num_passages: Optional[int] = 5,
                num_neighbor_passages: int = 0) -> list[SFTExample]:
  """Megatron QA records as short-answer SFT examples (first answer, as Megatron).

  The record's top ``num_passages`` passages go into the prompt (None: all) and its top
  ``num_neighbor_passages`` become the example's ``neighbor_passages``.
  """
  out = []
  for where, record in read_json_records(path):
    question = _field(record, question_key, where)
    answers = _answers(record, where)
    if not answers:
      raise ValueError(f"{where}: no answer to train on (empty 'answers')")
    out.append(SFTExample(tuple(chat.short_answer_messages(question, answers[0])),
                          answer_prefix=chat.SHORT_ANSWER_PREFIX, where=where,
                          **_passage_fields(record, where, passages_keys, num_passages,
                                            num_neighbor_passages)))
  return out


def read_qa_examples(path: str, *, question_key: str = "question",
                     ctxs_key: str = "ctxs") -> list[QAExample]:
  """NQ / TriviaQA-style evaluation records: question, answers, optional ctxs."""
  out = []
  for where, record in read_json_records(path):
    ctxs = record.get(ctxs_key) or []
    if not isinstance(ctxs, list) or not all(isinstance(c, Mapping) and "text" in c
                                             for c in ctxs):
      raise ValueError(f"{where}: field {ctxs_key!r} must be a list of "
                       "{title, text} objects")
    out.append(QAExample(_field(record, question_key, where), _answers(record, where),
                         tuple({"title": c.get("title") or "", "text": c["text"]}
                               for c in ctxs), where=where))
  return out


def detect_format(path: str) -> str:
  """``chat``, ``qa`` or ``prompt_response`` from the first record's fields."""
  for where, record in read_json_records(path):
    if "messages" in record:
      return "chat"
    if "question" in record:
      return "qa"
    if "prompt" in record:
      return "prompt_response"
    raise ValueError(f"{where}: cannot tell the layout (no 'messages', 'question' or "
                     f"'prompt' field; keys: {sorted(record)}); pass format=")
  raise ValueError(f"{path}: no records")


def read_sft(path: str, format: str = "auto", **kwargs) -> list[SFTExample]:  # pylint: disable=redefined-builtin
  """Reads an instruction file of any layout (``format`` one of ``FORMATS``)."""
  if format not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
  path = resolve_data_file(path)
  if format == "auto":
    format = detect_format(path)
  reader = {"chat": read_chat, "prompt_response": read_prompt_response,
            "qa": read_qa_sft}[format]
  examples = reader(path, **kwargs)
  if not examples:
    raise ValueError(f"{path}: no records")
  return examples


# ----------------------------------------------------------------------------------
# Tokens
# ----------------------------------------------------------------------------------


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  n = min(len(a), len(b))
  for i in range(n):
    if a[i] != b[i]:
      return i
  return n


def encode_sft(prompt: str, answer: str, processor, max_tokens: int, *,
               eos_id: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, int]:
  """Tokens of ``prompt + answer + EOS`` and the weights of the answer tokens.

  The text is tokenized as a whole (as the model reads it at inference) and split where
  the prompt's own tokenization ends (SentencePiece splits at the space that starts the
  answer, so the split is exact; should a piece straddle it, that piece is counted as
  answer).

  Args:
    prompt, answer: ``chat.render_example`` output.
    processor: A ``sentencepiece.SentencePieceProcessor`` (with an EOS id).
    max_tokens: At most this many tokens (``n + 1``); see the module's truncation rule.
    eos_id: The EOS appended; default the vocabulary's (``vocab.special_ids``: 1 for
      our models, 2 for Megatron's), never a fixed id.
  Returns:
    ``(tokens int32 [L], loss_weights float32 [L], prompt_length)``, L <= max_tokens;
    ``loss_weights`` is 1 on the answer tokens and the EOS, 0 on the prompt.
  """
  if max_tokens < 2:
    raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
  eos = special_ids(processor).eos if eos_id is None else int(eos_id)
  whole = processor.encode(prompt + answer)
  split = _common_prefix(whole, processor.encode(prompt))
  prompt_ids, target = whole[:split], whole[split:] + [eos]
  if len(target) > max_tokens - 1:
    target = target[:max_tokens - 1]
  prompt_ids = prompt_ids[len(prompt_ids) - min(len(prompt_ids), max_tokens - len(target)):]
  tokens = np.asarray(prompt_ids + target, np.int32)
  weights = np.zeros(tokens.shape, np.float32)
  weights[len(prompt_ids):] = 1.0
  return tokens, weights, len(prompt_ids)
