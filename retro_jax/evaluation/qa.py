r"""Zero-shot QA: answer normalisation, exact match and token F1, and the QA runner.

    examples = read_qa_jsonl("nq_test.jsonl")
    scores = run_qa(generator, examples, output_dir="/tmp/eval", num_passages=5)

Scoring, ``scoring='default'`` (the usual open-domain QA metrics):

* ``postprocess_prediction``: strip, drop ``"Answer:"`` / ``"A:"`` prefixes and an
  ``<|endoftext|>``, cut at the first newline.
* ``exact_match``: SQuAD's ``normalize_answer`` (lowercase, delete ASCII punctuation,
  drop the words a/an/the, collapse whitespace) on both sides; max over gold answers.
* ``token_f1``: ParlAI's normalisation (as SQuAD's, but punctuation becomes a space),
  unigram precision/recall F1 on whitespace tokens; max over gold answers. Gold
  answers that normalise to nothing are skipped (Megatron); if every gold does, F1 is
  1 for a prediction that also normalises to nothing, else 0.

``scoring='megatron'`` reproduces Megatron-LM's InstructRetro scripts
(``tools/retro/text_generation/{retro_text_generation.py, evaluate.py, metrics.py}``):

* ``megatron_prediction``: the line the generation script writes: the continuation
  cut at ``<|endoftext|>`` (then stripped), newlines replaced by spaces (not cut).
* ``megatron_exact_match``: every ``"Answer:"``, ``"????  "``, ``"A: "``, ``"A:"``
  deleted wherever it occurs (case-sensitive), stripped, then SQuAD's exact match,
  max over gold answers.
* ``megatron_f1``: ParlAI F1 of the stripped prediction (no marker removal) against
  the first gold answer only (``answers[0]``); a question whose first answer is
  empty (or ``"no_passages_used"``) is not counted (F1 None), an empty prediction
  scores 0. The mean F1 is over the counted questions (``f1_count`` when it
  differs from ``count``).

Data: NQ / TriviaQA-style jsonl, one ``{"question", "answers": [...] (or "answer"),
"ctxs": [{"title", "text"}, ...] (optional, best first)}`` per line, or a .json list
of such records (Megatron's ``*_QA_test.json``), read by the project's QA reader
(``retro_jax.data.instructions.read_qa_examples``). A record without ``ctxs`` takes
Megatron's ``sub-paragraphs`` (a text, or ``[title, text]``) or ``sub_paragraph``
as its one context.

The runner builds InstructRetro's zero-shot prompt (``retro_jax.data.chat.qa_prompt``:
the top ``num_passages`` contexts as ``"title: {t}, source: {text}"``, then the
question; the model continues "The answer is"; with ``max_seq_len`` the contexts are
tokenizer-truncated as Megatron does, so that the prompt leaves ``output_reserve``
tokens of the sequence free), generates in batches and writes
``{name}_predictions.jsonl`` (one row per question with its prediction and scores)
and ``{name}_scores.json``; with passages in the prompt, or neighbors in the encoder,
each row and the scores also say whether they hold a gold answer
(``answer_in_passages``, ``answer_in_neighbors``: the neighbors of the last prompt
chunk, which the answer reads), to tell a reader's failure from retrieval's. The
encoder's neighbors (``neighbors``): 'none' (the decoder alone, as the released
InstructRetro scripts run), 'passages' (the top contexts as fixed neighbors, Megatron's
``--reuse-top``) or 'live' (the generator's retriever). A killed run resumes from its
partial predictions.

``eval_qa`` (gin-configurable: ``python -m retro_jax.eval``'s QA task and the recipe
bind it) loads one checkpoint and runs ``run_qa`` once per *mode* (passages in the
prompt, what the encoder reads, optionally the CCA gate), filling in the ``ctxs`` of
questions without them from a retrieval directory (``with_retrieved_contexts``);
``paired_qa_rows`` compares InstructRetro's and GPT-Instruct's rows question by
question.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import math
import os
import re
import string
import time
from typing import Any, Iterable, Mapping, Optional, Sequence

from absl import logging
import gin
import jax.numpy as jnp

from retro_jax.data import instructions
from retro_jax.data.chat import format_passage, qa_prompt
from retro_jax.evaluation.report import QA_SCORE_COLUMNS, markdown_table
from retro_jax.inference import loading
from retro_jax.models import RetroConfig
from retro_jax.models.config import DTYPES
from retro_jax.retrieval import retriever as retriever_lib
from retro_jax.retrieval.layout import RetrievalLayout
from retro_jax.training import checkpoints as ckpt_lib
from retro_jax.utils.io import atomic_write_json, atomic_write_text, read_jsonl

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
# ParlAI's punctuation class (string.punctuation, with '_' and "'").
_PARLAI_PUNCTUATION = re.compile(r"[!\"#$%&()*+,\-./:;<=>?@\[\]\\^`{|}~_']")
_PREFIXES = ("Answer:", "A:")
# What Megatron's evaluate.py (read_prediction) deletes from a prediction, in order.
_MEGATRON_DELETED = ("Answer:", "Answer: ", "????  ", "A: ", "A:")
_MEGATRON_NO_ANSWER = "no_passages_used"
_END_OF_TEXT = "<|endoftext|>"
NEIGHBOR_MODES = ("none", "passages", "live")
SCORINGS = ("default", "megatron")
QA_COLUMNS = (("model", "model"), ("mode", "mode"), *QA_SCORE_COLUMNS)


# Normalisation and metrics -----------------------------------------------------------


def normalize_answer(text: str) -> str:
  """SQuAD: lowercase, delete punctuation, drop articles, collapse whitespace."""
  text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def normalize_answer_parlai(text: str) -> str:
  """ParlAI (F1): as SQuAD's, but punctuation is replaced by a space."""
  text = _PARLAI_PUNCTUATION.sub(" ", text.lower())
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def postprocess_prediction(text: str) -> str:
  """The answer in a generated continuation: first line, without answer prefixes."""
  text = text.replace(_END_OF_TEXT, "\n").strip()
  changed = True
  while changed:
    changed = False
    for prefix in _PREFIXES:
      if text.startswith(prefix):
        text, changed = text[len(prefix):].strip(), True
  return text.split("\n", 1)[0].strip()


def _as_answers(answers: Any) -> list[str]:
  if isinstance(answers, str):
    return [answers]
  answers = list(answers)
  if not answers or not all(isinstance(a, str) for a in answers):
    raise ValueError(f"gold answers must be a non-empty list of strings; got {answers!r:.80}")
  return answers


def exact_match(prediction: str, answers: Any) -> float:
  """1.0 if the normalised prediction equals a normalised gold answer."""
  pred = normalize_answer(prediction)
  return float(any(pred == normalize_answer(a) for a in _as_answers(answers)))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
  common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred_tokens), same / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Any) -> float:
  """Unigram F1 (ParlAI normalisation), max over the non-empty gold answers."""
  pred = normalize_answer_parlai(prediction).split()
  golds = [normalize_answer_parlai(a).split() for a in _as_answers(answers)]
  golds = [g for g in golds if g]
  if not golds:
    return float(not pred)
  return max(_f1(pred, g) for g in golds)


def score(prediction: str, answers: Any) -> dict[str, float]:
  return {"exact_match": exact_match(prediction, answers), "f1": token_f1(prediction, answers)}


# Megatron-LM's InstructRetro scoring -----------------------------------------------


def megatron_prediction(text: str) -> str:
  """The prediction line ``retro_text_generation.py`` writes for a continuation: cut at
  ``<|endoftext|>`` (and then stripped), newlines turned into spaces."""
  if _END_OF_TEXT in text:
    text = text[:text.find(_END_OF_TEXT)].strip()
  return text.replace("\n", " ")


def megatron_exact_match(prediction: str, answers: Any) -> float:
  """``evaluate.py``'s exact match: answer markers deleted wherever they occur,
  stripped, SQuAD-normalised, max over the gold answers."""
  for marker in _MEGATRON_DELETED:
    prediction = prediction.replace(marker, "")
  prediction = prediction.strip().replace(_END_OF_TEXT, "")
  return exact_match(prediction, answers)


def megatron_f1(prediction: str, answers: Any) -> Optional[float]:
  """``evaluate.py`` + ``metrics.py`` (ParlAI) F1 against the first gold answer only;
  None when that answer is empty (the question is not counted)."""
  gold = _as_answers(answers)[0].strip()
  prediction = prediction.strip().replace(_END_OF_TEXT, "")
  if gold in ("", _MEGATRON_NO_ANSWER):
    return None
  if not prediction:
    return 0.0
  return _f1(normalize_answer_parlai(prediction).split(),
             normalize_answer_parlai(gold).split())


def score_megatron(prediction: str, answers: Any) -> dict[str, Optional[float]]:
  return {"exact_match": megatron_exact_match(prediction, answers),
          "f1": megatron_f1(prediction, answers)}


def _scorer(scoring: str):
  """(postprocess, score) of a scoring mode."""
  if scoring not in SCORINGS:
    raise ValueError(f"scoring={scoring!r}: must be one of {SCORINGS}")
  if scoring == "megatron":
    return megatron_prediction, score_megatron
  return postprocess_prediction, score


# Data ------------------------------------------------------------------------------


def parse_qa_example(example: Any, where: str = "example") -> dict[str, Any]:
  """One QA example as a dict {id, question, answers, ctxs}: from a
  ``retro_jax.data.instructions.QAExample`` or a mapping with question, answers (or
  answer), optional ctxs and id."""
  if hasattr(example, "question") and hasattr(example, "answers"):
    example = {"id": getattr(example, "where", None) or None,
               "question": example.question, "answers": list(example.answers),
               "ctxs": list(example.ctxs)}
  if not isinstance(example, Mapping) or not isinstance(example.get("question"), str):
    raise ValueError(f"{where}: needs a 'question' string")
  answers = example.get("answers", example.get("answer"))
  if answers is None:
    raise ValueError(f"{where}: needs 'answers' (a list of strings) or 'answer'")
  try:
    answers = _as_answers(answers)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from e
  ctxs = example.get("ctxs") or []
  if not isinstance(ctxs, (list, tuple)) or not all(isinstance(c, (Mapping, str))
                                                    for c in ctxs):
    raise ValueError(f"{where}: 'ctxs' must be a list of {{'title', 'text'}} objects")
  return {"id": example.get("id", where), "question": example["question"],
          "answers": answers, "ctxs": list(ctxs)}


def read_qa_jsonl(path: str, max_examples: Optional[int] = None) -> list[dict[str, Any]]:
  """QA examples of a .jsonl (or .json list) file, read by the project's QA reader
  (``retro_jax.data.instructions.read_qa_examples``; errors name the file and line).
  An example's id is its ``path:line``."""
  examples = instructions.read_qa_examples(path)
  if max_examples is not None:
    examples = examples[:max_examples]
  if not examples:
    raise ValueError(f"{path}: no QA examples")
  out = [parse_qa_example(e, where=e.where) for e in examples]
  if any(not e["ctxs"] for e in out):  # Megatron's sub-paragraphs, if any
    records = dict(instructions.read_json_records(path))
    for example in out:
      if not example["ctxs"]:
        example["ctxs"] = _sub_paragraphs(records.get(example["id"], {}), example["id"])
  return out


def _sub_paragraphs(record: Mapping[str, Any], where: str) -> list[dict[str, str]]:
  """Megatron's context of a record without ``ctxs`` (``dataset_conv.preprocess``):
  ``sub-paragraphs`` (a text, or ``[title, text]``) or ``sub_paragraph``."""
  value = record.get("sub-paragraphs", record.get("sub_paragraph"))
  if value is None:
    return []
  if isinstance(value, str):
    return [{"title": "", "text": value}]
  if (isinstance(value, (list, tuple)) and len(value) >= 2
      and all(isinstance(v, str) for v in value[:2])):
    return [{"title": value[0], "text": value[1]}]
  raise ValueError(f"{where}: 'sub-paragraphs' must be a string or [title, text]")


# The runner --------------------------------------------------------------------------


def build_prompt(example: Mapping[str, Any], num_passages: int, *,
                 tokenizer: Any = None, max_prompt_tokens: Optional[int] = None) -> str:
  """The example's zero-shot prompt; with ``tokenizer`` and ``max_prompt_tokens`` its
  contexts are cut so that the prompt holds at most that many tokens (Megatron)."""
  if max_prompt_tokens is None:
    return qa_prompt(example["question"], example["ctxs"], num_passages=num_passages)
  return qa_prompt(example["question"], example["ctxs"], num_passages=num_passages,
                   tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens)


def _neighbor_passages(example: Mapping[str, Any], count: int) -> list[str]:
  return [format_passage(c) for c in example["ctxs"][:count]]


def answer_in_texts(texts: Iterable[str], answers: Any) -> bool:
  """Whether a gold answer occurs in one of ``texts`` as whole words, both sides
  SQuAD-normalised (DPR's top-k retrieval accuracy, for the passages or neighbors a
  question was given)."""
  golds = [normalize_answer(a) for a in _as_answers(answers)]
  golds = [f" {g} " for g in golds if g]
  texts = [f" {normalize_answer(t)} " for t in texts] if golds else []
  return any(g in t for t in texts for g in golds)


def _answer_neighbors(retrievals: Sequence[Mapping[str, Any]]) -> list[str]:
  """Texts of the neighbors the first answer token reads: those of the last complete
  prompt chunk (its retrieval record with ``in_prompt``)."""
  prompt = [r for r in retrievals if r.get("in_prompt")]
  if not prompt:
    return []
  return [n["text"] for n in max(prompt, key=lambda r: r["chunk_index"])["neighbors"]]


# Row fields, averaged by ``summarize`` over the rows that have them.
_RECALLS = ("answer_in_passages", "answer_in_neighbors")


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Mean exact match and F1 of scored rows. Rows whose F1 is None (Megatron scoring:
  an empty first answer) do not count towards F1; ``f1_count`` then says how many did.
  With passages in the prompt or neighbors in the encoder, also the fraction of
  questions whose gold answer they hold (``answer_in_passages``,
  ``answer_in_neighbors``)."""
  count = len(rows)
  f1s = [r["f1"] for r in rows if r["f1"] is not None]
  out = {"exact_match": sum(r["exact_match"] for r in rows) / max(count, 1),
         "f1": sum(f1s) / max(len(f1s), 1), "count": count}
  if len(f1s) != count:
    out["f1_count"] = len(f1s)
  for key in _RECALLS:
    held = [r[key] for r in rows if key in r]
    if held:
      out[key] = sum(held) / len(held)
  return out


def sign_test_p_value(wins: int, losses: int) -> float:
  """Two-sided exact sign test (McNemar's exact test) on the discordant pairs: the
  chance, if neither side were better, of a split at least this uneven."""
  n = wins + losses
  if n == 0:
    return 1.0
  tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2.0 ** n
  return min(1.0, 2.0 * tail)


def paired_exact_match(rows_a: Sequence[Mapping[str, Any]],
                       rows_b: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Compares two systems' predictions on the same questions (``run_qa`` rows).

  Exact match differences of a few points on a few hundred questions are often noise;
  what decides is how the questions that only one system gets right split. Returns
  counts ``a_only``, ``b_only``, ``both``, ``neither``, ``count`` and the sign test's
  ``p_value`` on ``a_only`` vs ``b_only``.
  """
  if len(rows_a) != len(rows_b):
    raise ValueError(f"paired_exact_match: {len(rows_a)} vs {len(rows_b)} predictions")
  for i, (a, b) in enumerate(zip(rows_a, rows_b)):
    if a["question"] != b["question"]:
      raise ValueError(f"paired_exact_match: row {i} holds different questions: "
                       f"{a['question']!r} vs {b['question']!r}")
  right_a = [r["exact_match"] > 0 for r in rows_a]
  right_b = [r["exact_match"] > 0 for r in rows_b]
  a_only = sum(x and not y for x, y in zip(right_a, right_b))
  b_only = sum(y and not x for x, y in zip(right_a, right_b))
  both = sum(x and y for x, y in zip(right_a, right_b))
  return {"a_only": a_only, "b_only": b_only, "both": both,
          "neither": len(right_a) - a_only - b_only - both, "count": len(right_a),
          "p_value": sign_test_p_value(a_only, b_only)}


def paired_qa_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """InstructRetro vs GPT-Instruct on the same questions, each InstructRetro mode
  against the GPT-Instruct mode with as many passages in the prompt
  (``paired_exact_match``: the questions only one of them answers right, and the
  sign test's p-value)."""
  out = []
  for retro in (r for r in rows if r["model"] == "InstructRetro"):
    for gpt in (r for r in rows if r["model"] == "GPT-Instruct"
                and r["num_passages"] == retro["num_passages"]):
      pair = paired_exact_match(_read_predictions(retro["predictions"]),
                                _read_predictions(gpt["predictions"]))
      out.append({"InstructRetro": retro["mode"], "GPT-Instruct": gpt["mode"],
                  "retro_only": pair["a_only"], "gpt_only": pair["b_only"],
                  "both": pair["both"], "count": pair["count"],
                  "p_value": round(pair["p_value"], 4)})
  return out


def _read_predictions(path: str) -> list[dict[str, Any]]:
  """The rows of a predictions file ``run_qa`` wrote."""
  return [row for _, row in read_jsonl(path)]


def predictions_path(output_dir: str, name: str) -> str:
  """Where ``run_qa(..., output_dir=output_dir, name=name)`` writes its predictions."""
  return os.path.join(output_dir, f"{name}_predictions.jsonl")


def equal_batch_size(count: int, batch_size: int) -> int:
  """The batch size that splits ``count`` examples into as many batches as
  ``batch_size`` does, all of one size but the last (shorter by fewer rows than there are
  batches): 300 questions at 32 are 10 batches of 30, not 9 of 32 and one of 12."""
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  batches = max(1, -(-count // batch_size))
  return max(1, -(-count // batches))


def run_qa(generator: Any, examples: Sequence[Mapping[str, Any]], *, output_dir: str,
           name: str = "qa", num_passages: int = 5, neighbors: str = "none",
           num_neighbor_passages: Optional[int] = None, max_new_tokens: int = 32,
           batch_size: int = 16, sampling: Any = None,
           align_prompts: bool = False, scoring: str = "default",
           max_seq_len: Optional[int] = None,
           output_reserve: Optional[int] = None) -> dict[str, Any]:
  """Generates an answer per question, scores it, writes predictions and scores.

  Args:
    generator: a ``retro_jax.inference.Generator``.
    examples: from ``read_qa_jsonl`` (or dicts with question/answers/ctxs).
    output_dir: gets ``{name}_predictions.jsonl`` and ``{name}_scores.json``.
    num_passages: contexts in the prompt text (0: the question alone).
    neighbors: the encoder's neighbors: 'none', 'passages' or 'live'.
    num_neighbor_passages: contexts used as neighbors with 'passages' (default: the
      model's k).
    max_new_tokens, sampling: generation settings (greedy by default).
    batch_size: Questions per ``generate`` call at most; the questions are split into
      batches of one size (``equal_batch_size``), the last one padded to it.
    align_prompts: left-pad each prompt to a multiple of m, so that its last chunk
      (the question) is complete, and retrieved from, before the first answer token
      (``Generator.generate``); with 'live' neighbors this lets the answer read the
      neighbors of the question itself.
    scoring: 'default' or 'megatron' (Megatron-LM's post-processing, exact match and
      answers[0]-only F1; see the module doc).
    max_seq_len: Cut the contexts of each prompt (tokenizer-truncated with the
      generator's vocabulary, Megatron's rule: ``chat.qa_prompt(max_prompt_tokens=)``)
      so that the prompt holds at most ``max_seq_len - output_reserve`` tokens; None:
      prompts are not cut.
    output_reserve: Tokens of ``max_seq_len`` kept for the answer (Megatron's
      ``--out-seq-length``: 256 in its scripts); default ``max_new_tokens``.
  Returns:
    ``{"exact_match", "f1", "count", "settings"}`` (fractions in [0, 1]), and
    ``f1_count`` when fewer questions count towards F1.
  """
  if neighbors not in NEIGHBOR_MODES:
    raise ValueError(f"run_qa.neighbors={neighbors!r}: must be one of {NEIGHBOR_MODES}")
  postprocess, score_row = _scorer(scoring)
  max_prompt_tokens = tokenizer = None
  if max_seq_len is not None:
    reserve = max_new_tokens if output_reserve is None else output_reserve
    if reserve < max_new_tokens or max_seq_len - reserve < 1:
      raise ValueError(f"run_qa: output_reserve={reserve} must be >= max_new_tokens="
                       f"{max_new_tokens} and < max_seq_len={max_seq_len}")
    max_prompt_tokens, tokenizer = max_seq_len - reserve, generator.vocab
  if neighbors == "live" and generator.retriever is None:
    raise ValueError("run_qa.neighbors='live' needs a generator with a retriever")
  examples = [parse_qa_example(e, where=f"examples[{i}]") for i, e in enumerate(examples)]
  k = num_neighbor_passages or generator.config.num_neighbors
  settings = {"num_passages": num_passages, "neighbors": neighbors,
              "num_neighbor_passages": k if neighbors == "passages" else 0,
              "max_new_tokens": max_new_tokens, "sampling": repr(sampling),
              "align_prompts": align_prompts, "examples": len(examples),
              "scoring": scoring, "max_prompt_tokens": max_prompt_tokens}
  os.makedirs(output_dir, exist_ok=True)
  partial_path = os.path.join(output_dir, f"{name}_predictions.partial.jsonl")
  settings_path = os.path.join(output_dir, f"{name}_predictions.partial.settings.json")
  rows: list[dict[str, Any]] = []
  if os.path.exists(settings_path):
    with open(settings_path, encoding="utf-8") as f:
      if json.load(f) == settings:
        rows = ([row for _, row in read_jsonl(partial_path, torn_tail=True)]
                if os.path.exists(partial_path) else [])[:len(examples)]
        if rows:
          logging.info("%s: resuming after %d predictions", partial_path, len(rows))
  atomic_write_json(settings_path, settings)
  atomic_write_text(partial_path, "".join(json.dumps(r) + "\n" for r in rows))
  start_time, done_before = time.perf_counter(), len(rows)
  with open(partial_path, "a", encoding="utf-8") as partial:
    size = equal_batch_size(len(examples), batch_size)
    for start in range(len(rows), len(examples), size):
      batch = examples[start:start + size]
      # A short last batch repeats its last question (answers dropped): every batch has
      # one shape, so it runs the programs the others compiled.
      pad = size - len(batch)
      prompts = [build_prompt(e, num_passages, tokenizer=tokenizer,
                              max_prompt_tokens=max_prompt_tokens) for e in batch]
      prompts += prompts[-1:] * pad
      # 'passages': each question's neighbor texts, for the generator and the scores.
      given = [_neighbor_passages(e, k) for e in batch] if neighbors == "passages" else []
      # No contexts in the whole batch: the decoder alone.
      passages = given + given[-1:] * pad if any(given) else None
      result = generator.generate(prompts, max_new_tokens=max_new_tokens,
                                  sampling=sampling, passages=passages,
                                  retrieval=neighbors == "live" or passages is not None,
                                  align_prompts=align_prompts)
      for i, (example, raw, chunks) in enumerate(zip(batch, result.texts,
                                                     result.retrievals)):
        prediction = postprocess(raw)
        row = {"id": example["id"], "question": example["question"],
               "answers": example["answers"], "prediction": prediction, "raw": raw,
               **score_row(prediction, example["answers"])}
        if num_passages:
          row["answer_in_passages"] = answer_in_texts(
              _neighbor_passages(example, num_passages), example["answers"])
        if neighbors == "live":
          row["retrievals"] = chunks
          row["answer_in_neighbors"] = answer_in_texts(_answer_neighbors(chunks),
                                                       example["answers"])
        elif neighbors == "passages":
          row["answer_in_neighbors"] = answer_in_texts(given[i], example["answers"])
        rows.append(row)
        partial.write(json.dumps(row) + "\n")
      partial.flush()
      elapsed = time.perf_counter() - start_time
      logging.info("%s: %d/%d questions (%.2f questions/s), EM so far %.3f", name,
                   len(rows), len(examples), (len(rows) - done_before) / max(elapsed, 1e-9),
                   summarize(rows)["exact_match"])
  scores = dict(summarize(rows), settings=settings)
  atomic_write_text(predictions_path(output_dir, name),
                    "".join(json.dumps(r) + "\n" for r in rows))
  atomic_write_json(os.path.join(output_dir, f"{name}_scores.json"), scores)
  os.remove(partial_path)
  os.remove(settings_path)
  return scores


def score_predictions(predictions: Iterable[str], examples: Sequence[Mapping[str, Any]],
                      scoring: str = "default") -> dict[str, float]:
  """Scores ready-made predictions (e.g. another system's, or the lines of a Megatron
  ``retro-generate-*.txt`` file with ``scoring='megatron'``) against QA examples."""
  postprocess, score_row = _scorer(scoring)
  rows = [score_row(postprocess(p), e["answers"]) for p, e in zip(predictions, examples)]
  return summarize(rows)


# One checkpoint in several modes ----------------------------------------------------


def with_cca_gate(generator: Any, gate: Optional[float]) -> Any:
  """The generator with its model's CCA gate set to ``gate`` (same parameters); the
  released InstructRetro checkpoints store Megatron's ``--retro-attention-gate 0``."""
  if gate is None or float(gate) == generator.config.cca_gate:
    return generator
  other = copy.copy(generator)
  other.config = dataclasses.replace(generator.config, cca_gate=float(gate))
  return other


# Tokens of a retrieved passage in a prompt: the retrieved chunk and what follows it in
# its document. RETRO's neighbor (chunk + continuation) at m = 64; passages keep this
# length when the model reads shorter chunks, whose neighbors hold an answer less often
# (docs/benchmarks.md, "Chunks of 16 in the embedded run").
PASSAGE_TOKENS = 128


def retrieved_contexts(retriever: Any, questions: Sequence[str], count: int, *,
                       passage_tokens: int = PASSAGE_TOKENS) -> list[list[dict[str, str]]]:
  """Top ``count`` DB passages of each question (``Retriever.passages`` text)."""
  if count <= 0:
    return [[] for _ in questions]
  _, _, info = retriever.query_texts(list(questions), k=count,
                                     passage_tokens=passage_tokens)
  return [[{"title": hit.get("title", ""), "text": hit["text"]} for hit in hits]
          for hits in info]


def with_retrieved_contexts(rows: Sequence[Mapping[str, Any]], retriever: Any,
                            count: int, batch: int = 256) -> list[dict[str, Any]]:
  """QA rows (``{"question", ...}``) with their top ``count`` passages as ``ctxs``,
  retrieved ``batch`` questions at a time."""
  out = []
  for start in range(0, len(rows), batch):
    part = rows[start:start + batch]
    contexts = retrieved_contexts(retriever, [r["question"] for r in part], count)
    out += [dict(r, ctxs=c) for r, c in zip(part, contexts)]
  return out


@gin.configurable
def eval_qa(*, output_dir: str, checkpoint: str = gin.REQUIRED, qa_file: str = gin.REQUIRED,
            retrieval_dir: Optional[str] = None, model_name: str = "model",
            modes: Mapping[str, Mapping[str, Any]] = gin.REQUIRED,
            model_config: Optional[RetroConfig] = None, vocab_path: Optional[str] = None,
            max_examples: Optional[int] = None, max_new_tokens: int = 16,
            batch_size: int = 16, align_prompts: bool = True,
            retriever: Any = None, scoring: str = "default",
            max_seq_len: Optional[int] = None, output_reserve: Optional[int] = None,
            dev_max_examples: Optional[int] = None,
            param_dtype: Optional[str] = None,
            dtype: Optional[str] = None) -> list[dict[str, Any]]:
  """Zero-shot QA of one checkpoint in several modes; returns one row per mode (scores,
  settings and the path of its ``predictions`` file, for paired comparisons:
  ``paired_exact_match``).

  Args:
    output_dir: Gets ``{model_name}_{mode}_predictions.jsonl`` / ``_scores.json`` and
      ``{model_name}_qa.md``.
    checkpoint: MODEL_DIR (or step directory) of a GPT or Retro checkpoint.
    qa_file: jsonl (or .json list) of ``{question, answers, ctxs?}``.
    retrieval_dir: Prepared retrieval directory: the vocabulary, the index for live
      retrieval and for questions without ``ctxs``. Not needed when every question
      has ``ctxs`` and the model directory has its vocabulary (``vocab/spm.model``).
    modes: row name -> ``{"num_passages": int, "neighbors": "none"|"passages"|"live"}``,
      optionally ``"cca_gate": float`` (the CCA gate of this row: e.g. 1.0 to read the
      neighbors with a checkpoint stored with Megatron's gate 0).
    model_config: The architecture (default: the one stored in the checkpoint, else
      gin's ``RetroConfig()``).
    max_examples: Score the first N questions only.
    align_prompts: Left-pad prompts to a chunk boundary (the question's chunk is then
      retrieved before the answer starts; see ``run_qa``).
    retriever: An already built retriever (else one is loaded from ``retrieval_dir``).
    scoring, max_seq_len, output_reserve: As ``run_qa`` ('megatron': Megatron's
      post-processing and scores; contexts cut so that the prompt fits
      ``max_seq_len - output_reserve`` tokens).
    dev_max_examples: When the QA file's name contains "dev", score only its first
      N questions (Megatron's evaluate.py: 3000).
    param_dtype: Hold the parameters in this dtype (e.g. 'bfloat16': 2 bytes each, as
      Megatron's --bf16 inference) whatever the stored architecture says.
    dtype: Compute in this dtype whatever the stored architecture says
      (``load_generator(dtype=)``), e.g. 'float32' for a bf16 checkpoint on a CPU without
      bf16 units; its parameters are then loaded in it unless ``param_dtype`` is given,
      which must not be narrower.
  """
  for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
    if value is not None and value not in DTYPES:
      raise ValueError(f"eval_qa.{name}={value!r}: must be one of {DTYPES}")
  if dtype is not None and param_dtype is not None and (
      jnp.dtype(param_dtype).itemsize < jnp.dtype(dtype).itemsize):
    raise ValueError(f"eval_qa: param_dtype={param_dtype!r} is narrower than "
                     f"dtype={dtype!r} (every step would convert the weights); unset "
                     "param_dtype or choose it at least as wide")
  for mode, spec in modes.items():
    unknown = set(spec) - {"num_passages", "neighbors", "cca_gate"}
    if unknown or spec.get("neighbors", "none") not in NEIGHBOR_MODES:
      raise ValueError(f"eval_qa.modes[{mode!r}]={dict(spec)}: expected keys num_passages "
                       f"and neighbors (one of {NEIGHBOR_MODES}), optionally "
                       "cca_gate")
  needs_retriever = any(spec.get("neighbors") == "live" or spec.get("num_passages", 0)
                        for spec in modes.values())
  if retriever is None and needs_retriever and retrieval_dir is not None:
    retriever = retriever_lib.load_retriever(retrieval_dir)
  if vocab_path is None and retrieval_dir is not None:
    vocab_path = RetrievalLayout(retrieval_dir).vocab_path
  if param_dtype is not None:
    base = model_config or ckpt_lib.stored_model_config(checkpoint) or RetroConfig()
    model_config = dataclasses.replace(base, param_dtype=param_dtype)
  generator = loading.load_generator(checkpoint, model_config=model_config,
                                     vocab_path=vocab_path, retrieval_dir=None,
                                     retriever=retriever, dtype=dtype)
  if dev_max_examples is not None and "dev" in os.path.basename(qa_file):
    max_examples = min(dev_max_examples, max_examples or dev_max_examples)
  examples = read_qa_jsonl(qa_file, max_examples=max_examples)
  most = max(int(spec.get("num_passages", 0)) for spec in modes.values())
  missing = [i for i, e in enumerate(examples) if not e["ctxs"]]
  if missing and most:
    if retriever is None:
      raise ValueError(f"{qa_file}: {len(missing)} questions have no 'ctxs' and no "
                       "retrieval_dir was given to retrieve them")
    filled = with_retrieved_contexts([examples[i] for i in missing], retriever, most)
    for i, example in zip(missing, filled):
      examples[i] = example
  rows = []
  for mode, spec in modes.items():
    neighbors = spec.get("neighbors", "none")
    if neighbors == "live" and generator.retriever is None:
      logging.warning("%s: no retrieval for %s (a decoder-only checkpoint)", mode,
                      checkpoint)
      neighbors = "none"
    if neighbors == "passages" and not generator.has_retro:
      logging.warning("%s: %s has no encoder/CCA; its passages go to the prompt only",
                      mode, checkpoint)
      neighbors = "none"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model_name}_{mode}").strip("_")
    mode_generator = with_cca_gate(generator, spec.get("cca_gate"))
    scores = run_qa(mode_generator, examples, output_dir=output_dir, name=slug,
                    num_passages=int(spec.get("num_passages", 0)),
                    neighbors=neighbors, max_new_tokens=max_new_tokens,
                    batch_size=batch_size, align_prompts=align_prompts,
                    scoring=scoring, max_seq_len=max_seq_len,
                    output_reserve=output_reserve)
    rows.append({"model": model_name, "mode": mode, "checkpoint": checkpoint,
                 "neighbors": neighbors, "num_passages": int(spec.get("num_passages", 0)),
                 **({"cca_gate": mode_generator.config.cca_gate}
                    if "cca_gate" in spec else {}),
                 **{k: scores[k] for k in ("exact_match", "f1", "count", "f1_count",
                                           *_RECALLS) if k in scores},
                 "predictions": predictions_path(output_dir, slug)})
  atomic_write_json(os.path.join(output_dir, f"{model_name}_qa.json"), rows)
  atomic_write_text(os.path.join(output_dir, f"{model_name}_qa.md"),
                    markdown_table(rows, QA_COLUMNS) + "\n")
  return rows
