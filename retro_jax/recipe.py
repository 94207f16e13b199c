r"""The InstructRetro recipe end to end, in miniature: the main job of retro_jax.

    python -m retro_jax.recipe                        # embedded corpus, ~12 min on 2 cores
    python -m retro_jax.recipe --run_dir=runs/big --scale=3 --gin.TRAIN_STEPS=2000
    python -m retro_jax.recipe --documents=my_docs.jsonl --run_dir=runs/mine
    python -m retro_jax.recipe --documents=my_docs.jsonl --arms=retro_scratch

Steps (each one gin file in ``gin/miniature/``; the driver runs them in order, records
every finished step in ``RUN_DIR/manifest.json`` and skips it on a re-run; a training
step killed midway resumes from its last checkpoint):

 1. ``corpus``     the embedded fictional encyclopedia (``retro_jax.data.encyclopedia``,
                   ``corpus.gin``)
                   or ``--documents`` (any jsonl with a ``text`` key, split by the
                   driver into GPT pretraining / retro-fitting / held-out documents;
                   ``retro_jax.data.debian_text`` makes one from a Debian package);
 2. ``retrieval``  ``retro_jax.preprocess``: SentencePiece vocabulary, NeMo chunk DBs,
                   all-MiniLM-L6-v2 embeddings (Flax), Faiss index, NeMo neighbor maps;
                   the chunk length it builds with (``build_retrieval.chunk_size``: 64,
                   a ``--documents`` run's 16) is every later model's
                   ``RetroConfig.chunk_length``;
 3. ``gpt``        pretrain a small GPT (``gpt_pretraining.gin``);
 4. ``retro``      retro-fit it, decoder frozen (``retro_fitting.gin`` says why), and
    ``gptfit``     GPT-fit it on the same tokens with equal steps (``gpt_fitting.gin``);
                   with ``--gin.FROZEN_FIT_STEPS=N`` retro-fitting runs in two phases:
                   N steps with the decoder frozen (``retro_frozen_phase.gin``, into
                   ``models/retro_frozen``), then FIT_STEPS with every parameter trained
                   (``retro_unfreezing.gin``); a ``--documents`` run reads its own
                   versions of these files (``DOCUMENTS_GIN``): two phases by
                   default (2,000 frozen steps), batches of 8, and GPT-fit at the
                   unfrozen phase's learning rate: on real text the neighbors stay in
                   use only this way (docs/benchmarks.md, "Real text"), and most with
                   chunks of 16 tokens (``documents_retrieval.gin``);
    ``retro_scratch`` (only with ``--arms=retro_scratch``) a Retro trained from
                   scratch with retrieval at the compute of GPT pretraining + GPT-fitting
                   (``retro_from_scratch.gin``), evaluated beside the two;
 5. ``sft_data``   instruction data: short-answer QA about the retro-fitting corpus with
                   the top retrieved passages in the prompt, plus the project's chat set;
    ``instructretro`` / ``gpt_instruct``  instruction-tune both (decoder only);
 6. ``eval``       held-out perplexity and bits per byte (Retro with retrieval, encoder
                   ablated, GPT-fit), RETRO's analyses (neighbors at evaluation, leakage,
                   retrieval DB size), zero-shot QA (exact match / F1) of GPT-Instruct and InstructRetro
                   with and without retrieval, and the knowledge update: the facts of
                   some entities are changed in the retrieval DB (re-embedding only the
                   changed chunks, no training) and the answers are checked against the
                   new facts;
 7. ``report``     loss and perplexity plots (PNG) and ``RUN_DIR/report.md``.

This module is the driver (the steps, their gin files, the run directory, the
manifest); what a step computes lives in the library: the training run in
``retro_jax.training.loop``, perplexity and token classes in
``retro_jax.evaluation.perplexity``, the analyses in ``retro_jax.evaluation.analyses``, QA and its paired statistics in
``retro_jax.evaluation.qa``, the knowledge-update scores and updated DB in
``retro_jax.evaluation.knowledge_update``, plots and the report in
``retro_jax.evaluation.report``.

A step is done only if the disk still holds what the manifest says: each step records
its outputs with their fingerprints (``utils.io.tree_fingerprint``: a file's content
hash, a directory's listing of names, sizes and mtimes; nothing large is read) and the
fingerprints of the outputs of the steps it reads (``STEP_INPUTS``). A step re-runs
when an output is missing (a deleted file, a deleted or emptied directory), when an
output differs from what was recorded, or when an input's outputs differ from what the
step was built on; so a step that re-ran re-runs every step downstream whose inputs it
changed, and no other. The reason is printed (``[recipe] retro: output
models/retro/checkpoints missing``, ``[recipe] report: input eval_perplexity changed``).

``--gin.KEY=VALUE`` bindings apply to every step (e.g. ``--gin.RetroConfig.hidden_size=192``,
``--gin.TRAIN_STEPS=400`` for all training steps, or a step's own macro such as
``--gin.GPT_STEPS=500``; see ``gin/miniature/*.gin``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import flags
import gin

# data.batches registers the batch sources the step gin files bind.
from retro_jax.data import batches  # pylint: disable=unused-import
from retro_jax.data import chat
from retro_jax.data import encyclopedia
from retro_jax.evaluation import knowledge_update as update_lib
from retro_jax.evaluation import qa as qa_lib
from retro_jax.evaluation import report as report_lib
from retro_jax.evaluation.analyses import eval_analyses
from retro_jax.evaluation.perplexity import db_only_token_classes, eval_perplexity
from retro_jax.inference.loading import load_generator
from retro_jax.models import RetroConfig
from retro_jax.retrieval import pipeline
from retro_jax.retrieval.layout import RetrievalLayout
from retro_jax.retrieval.retriever import load_retriever
from retro_jax.training.loop import train
from retro_jax.utils import gin_utils, provenance
from retro_jax.utils.io import (Manifest, atomic_write_json, atomic_write_jsonl, read_jsonl,
                                tree_fingerprint)

RECIPE_VERSION = 1
STEP_GIN = {
    "gpt": "miniature/gpt_pretraining.gin",
    "retro": "miniature/retro_fitting.gin",
    "gptfit": "miniature/gpt_fitting.gin",
    "instructretro": "miniature/instruction_tuning.gin",
    "gpt_instruct": "miniature/instruction_tuning_gpt.gin",
    "retro_scratch": "miniature/retro_from_scratch.gin",
}
EVAL_GIN = "miniature/evaluation.gin"
CORPUS_GIN = "miniature/corpus.gin"
RETRIEVAL_GIN = "miniature/retrieval.gin"
# Two-phase retro-fitting (FROZEN_FIT_STEPS > 0): the frozen phase, then the unfrozen one.
FROZEN_PHASE_GIN = "miniature/retro_frozen_phase.gin"
UNFREEZING_GIN = "miniature/retro_unfreezing.gin"
# A --documents run (a user's corpus) reads these files instead of the files above:
# each includes its file and changes what real text needs (docs/benchmarks.md, "Real
# text").
DOCUMENTS_GIN = {
    STEP_GIN["retro"]: "miniature/documents_retro_fitting.gin",
    STEP_GIN["gptfit"]: "miniature/documents_gpt_fitting.gin",
    FROZEN_PHASE_GIN: "miniature/documents_retro_frozen_phase.gin",
    UNFREEZING_GIN: "miniature/documents_retro_unfreezing.gin",
    RETRIEVAL_GIN: "miniature/documents_retrieval.gin",
}
FROZEN_PHASE_DIR = "retro_frozen"            # models/<this>: the frozen phase's checkpoints
# Optional steps (``--arms``), run after 'gptfit' and evaluated beside Retro and GPT-fit:
# 'retro_scratch' trains a Retro from scratch with retrieval at the compute of GPT
# pretraining + GPT-fitting (RETRO; Wang et al. 2023).
ARMS = ("retro_scratch",)
DOCUMENTS_ARMS: tuple[str, ...] = ()      # the arms a --documents run adds by default
STEPS = ("corpus", "retrieval", "gpt", "retro", "gptfit", "sft_data", "instructretro",
         "gpt_instruct", "eval_perplexity", "eval_analyses", "eval_qa", "knowledge_update",
         "report")
ALL_STEPS = STEPS[:5] + ARMS + STEPS[5:]     # the order, arms included
# The steps whose outputs each step reads (the run's dependency graph).
STEP_INPUTS = {
    "corpus": (),
    "retrieval": ("corpus",),                       # the corpus texts
    "gpt": ("retrieval",),                          # the 'pretrain' DB, the vocabulary
    "retro": ("retrieval", "gpt"),                  # DBs and neighbors, GPT's checkpoint
    "gptfit": ("retrieval", "gpt"),
    "retro_scratch": ("retrieval",),
    "sft_data": ("corpus", "retrieval"),            # sft_qa.jsonl, the retriever
    "instructretro": ("retrieval", "retro", "sft_data"),
    "gpt_instruct": ("retrieval", "gptfit", "sft_data"),
    "eval_perplexity": ("corpus", "retrieval", "retro", "gptfit",   # kb.json, heldout
                        "retro_scratch"),
    "eval_analyses": ("corpus", "retrieval", "retro", "gptfit", "retro_scratch"),
    "eval_qa": ("corpus", "retrieval", "gpt_instruct", "instructretro"),
    "knowledge_update": ("corpus", "retrieval", "retro", "instructretro"),
    "report": ("gpt", "retro", "gptfit", "retro_scratch", "instructretro", "gpt_instruct",
               "eval_perplexity", "eval_analyses", "eval_qa", "knowledge_update"),
}


@dataclasses.dataclass(frozen=True)
class RunLayout:
  """Where every artifact of a recipe run goes."""

  root: str

  def path(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  @property
  def corpus_dir(self) -> str:
    return self.path("corpus")

  @property
  def retrieval_dir(self) -> str:
    return self.path("retrieval")

  @property
  def updated_retrieval_dir(self) -> str:
    return self.path("retrieval_updated")

  def model_dir(self, name: str) -> str:
    return self.path("models", name)

  @property
  def sft_dir(self) -> str:
    return self.path("sft")

  @property
  def eval_dir(self) -> str:
    return self.path("eval")

  @property
  def plots_dir(self) -> str:
    return self.path("plots")

  @property
  def report_path(self) -> str:
    return self.path("report.md")


# ----------------------------------------------------------------------------------
# Steps 1-2: corpus and retrieval
# ----------------------------------------------------------------------------------

CORPUS_FILES = ("pretrain", "retrofit", "retrieval", "heldout", "sft_qa", "qa_test",
                "updates", "retrieval_updated")


def _read_rows(path: str) -> list[dict]:
  return [row for _, row in read_jsonl(path)]


def corpus_files(corpus_dir: str) -> dict[str, Optional[str]]:
  """The recipe's corpus files (None where a user corpus has no such file)."""
  out = {}
  for key in CORPUS_FILES:
    path = os.path.join(corpus_dir, f"{key}.jsonl")
    out[key] = path if os.path.exists(path) else None
  return out


@gin.configurable
def split_documents(documents: str, output_dir: str, *, text_key: str = "text",
                    pretrain_fraction: float = 0.4, heldout_fraction: float = 0.05,
                    seed: int = 0) -> dict[str, Optional[str]]:
  """A user corpus for the recipe: a seeded split of one jsonl into GPT pretraining,
  retro-fitting and held-out documents; the retrieval DB is the retro-fitting documents
  (first, so that same-document exclusion applies) followed by the pretraining ones.
  QA, instruction tuning on the corpus and the knowledge update need QA files, which a
  plain corpus does not have: those steps are skipped.
  """
  rows = []
  for where, row in read_jsonl(documents):
    if not isinstance(row.get(text_key), str):
      raise ValueError(f"{where}: no string field {text_key!r}")
    rows.append(row)
  order = list(range(len(rows)))
  random.Random(seed).shuffle(order)
  n_held = max(1, int(len(rows) * heldout_fraction))
  n_pre = int(len(rows) * pretrain_fraction)
  if len(rows) - n_held - n_pre < 1 or n_pre < 1:
    raise ValueError(f"{documents}: {len(rows)} documents are too few to split into "
                     "pretraining, retro-fitting and held-out parts")
  pick = lambda idx: [{"text": rows[i][text_key], **{k: v for k, v in rows[i].items()  # pylint: disable=g-long-lambda
                                                     if k != text_key}} for i in idx]
  held, pre, fit = (order[:n_held], order[n_held:n_held + n_pre], order[n_held + n_pre:])
  os.makedirs(output_dir, exist_ok=True)
  atomic_write_jsonl(os.path.join(output_dir, "heldout.jsonl"), pick(held))
  atomic_write_jsonl(os.path.join(output_dir, "pretrain.jsonl"), pick(pre))
  atomic_write_jsonl(os.path.join(output_dir, "retrofit.jsonl"), pick(fit))
  atomic_write_jsonl(os.path.join(output_dir, "retrieval.jsonl"), pick(fit) + pick(pre))
  return corpus_files(output_dir)


@gin.configurable
def build_retrieval(files: Mapping[str, Optional[str]], output_dir: str, *,
                    vocab_size: int = 4000, embedder: str = "all-MiniLM-L6-v2",
                    num_neighbors: int = 2, chunk_size: int = 64) -> dict:
  """``retro_jax.preprocess`` over the corpus: the retro-fitting text is the 'train'
  split (neighbors, same-document exclusion), the held-out text 'valid' (neighbors),
  the GPT pretraining text 'pretrain' (a query DB only). ``chunk_size`` is m, which
  the run's models then take as ``RetroConfig.chunk_length``."""
  splits = {"valid": files["heldout"]} if files.get("heldout") else {}
  lm_splits = {"pretrain": files["pretrain"]} if files.get("pretrain") else {}
  return pipeline.preprocess(files["retrieval"], output_dir,
                             train_input=files["retrofit"], splits=splits,
                             lm_splits=lm_splits, vocab_size=vocab_size,
                             embedder=embedder, num_neighbors=num_neighbors,
                             chunk_size=chunk_size)


# ----------------------------------------------------------------------------------
# Steps 3-5: training (gin recipes)
# ----------------------------------------------------------------------------------


def _parse_step_gin(gin_file: str, bindings: Sequence[str], overrides: Sequence[str]) -> None:
  # Every configurable a --gin binding may name, whichever step parses it, is
  # registered by this module's imports (data.batches' batch sources among them).
  gin.clear_config()
  gin_utils.parse_gin([gin_file], list(bindings) + list(overrides))


def run_training(step: str, layout: RunLayout, bindings: Mapping[str, Any],
                 overrides: Sequence[str], gin_file: Optional[str] = None) -> dict:
  """Runs one training step's gin file (default ``STEP_GIN[step]``) with the run's
  directories bound."""
  values = {"MODEL_DIR": layout.model_dir(step), "RETRIEVAL_DIR": layout.retrieval_dir,
            **bindings}
  _parse_step_gin(gin_file or STEP_GIN[step],
                  [f"{k} = {v!r}" for k, v in values.items()], overrides)
  return train()


def _gin_binds(parameter: str) -> bool:
  """Whether the parsed gin config binds ``parameter`` ("configurable.name")."""
  try:
    gin.query_parameter(parameter)
  except ValueError:
    return False
  return True


@gin.configurable
def build_sft_data(qa_file: str, retriever: Any, output_path: str, *,
                   num_passages: int = 2) -> str:
  """Short-answer QA as chat records that render exactly as the evaluation prompt.

  Each question gets its top ``num_passages`` retrieved DB passages; the record renders
  (``retro_jax.data.chat``) as the zero-shot QA prompt ``qa_prompt`` followed by the
  answer, so the model is tuned on the prompt it is evaluated with.
  """
  rows = qa_lib.with_retrieved_contexts(_read_rows(qa_file), retriever, num_passages)
  records = []
  for row in rows:
    answer = row["answers"][0]
    records.append({
        "messages": [{"role": "system", "content": chat.QA_SYSTEM},
                     {"role": "user", "content": f"{chat.QA_EVAL_INSTRUCTION} "
                                                 f"{row['question']}"},
                     {"role": "assistant",
                      "content": f"{chat.SHORT_ANSWER_PREFIX.strip()} {answer}"}],
        "passages": row["ctxs"]})
  atomic_write_jsonl(output_path, records)
  return output_path


# ----------------------------------------------------------------------------------
# Step 6: evaluation
# ----------------------------------------------------------------------------------


@gin.configurable
def sample_questions(qa_file: str, output_path: str, *, max_questions: int = 200,
                     seed: int = 0) -> str:
  """A seeded random sample of ``max_questions`` rows of a QA file, in file order."""
  rows = _read_rows(qa_file)
  rng = random.Random(seed)
  order = list(range(len(rows)))
  rng.shuffle(order)
  atomic_write_jsonl(output_path, [rows[i] for i in sorted(order[:max_questions])])
  return output_path


@gin.configurable
def qa_settings(*, num_passages: int = 2,
                gpt_modes: Mapping[str, Mapping[str, Any]] = gin.REQUIRED,
                retro_modes: Mapping[str, Mapping[str, Any]] = gin.REQUIRED) -> dict:
  """The QA evaluation of the recipe (``gin/miniature/evaluation.gin``): passages per
  prompt and the ``eval_qa.modes`` of GPT-Instruct and InstructRetro."""
  if "retrieval" not in retro_modes:
    raise ValueError("qa_settings.retro_modes needs a 'retrieval' mode (the knowledge "
                     f"update uses it); got {sorted(retro_modes)}")
  return {"num_passages": num_passages, "gpt_modes": dict(gpt_modes),
          "retro_modes": dict(retro_modes)}


# ----------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------


class Recipe:
  """Runs the steps in order; finished steps are recorded and skipped."""

  def __init__(self, run_dir: str, *, scale: float = 1.0, seed: int = 0,
               documents: Optional[str] = None, overrides: Sequence[str] = (),
               arms: Optional[Sequence[str]] = None,
               print_fn: Callable[[str], None] = print):
    self.layout = RunLayout(os.path.abspath(run_dir))
    self.scale, self.seed, self.documents = scale, seed, documents
    arms = (DOCUMENTS_ARMS if documents else ()) if arms is None else tuple(arms)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
      raise ValueError(f"--arms: unknown arms {unknown}; arms are {ARMS}")
    self.arms = arms
    # This run's steps in order: the recipe's, with the chosen arms.
    self.steps = tuple(s for s in ALL_STEPS if s in STEPS or s in arms)
    self.overrides = list(overrides)
    self.print = print_fn
    os.makedirs(self.layout.root, exist_ok=True)
    # The settings that define the corpus; gin overrides may change between runs (a
    # re-run with new evaluation settings re-runs nothing that is done: delete a step's
    # entry from recipe's manifest, or use a fresh run_dir, to redo it).
    self.manifest = Manifest(self.layout.root, {
        "recipe_version": RECIPE_VERSION, "scale": scale, "seed": seed,
        "documents": os.path.abspath(documents) if documents else None})
    self._retriever = None
    self._fingerprints: dict[str, Optional[str]] = {}   # relative path -> fingerprint
    # Each step records the code as this process started (a tree edited during a long
    # run does not change what this process runs; code_version caches the first call).
    provenance.code_version()

  # -- bookkeeping -------------------------------------------------------------------

  def _fingerprint(self, rel: str) -> Optional[str]:
    if rel not in self._fingerprints:
      self._fingerprints[rel] = tree_fingerprint(os.path.join(self.layout.root, rel))
    return self._fingerprints[rel]

  def _outputs_now(self, step: str) -> Optional[dict[str, Optional[str]]]:
    """The fingerprints of ``step``'s recorded outputs as they are on disk now (None if
    the step has no record: not run, or skipped)."""
    outputs = self.manifest.outputs(step)
    return None if outputs is None else {rel: self._fingerprint(rel) for rel in outputs}

  def _inputs_now(self, step: str) -> dict[str, Optional[dict[str, Optional[str]]]]:
    return {dep: self._outputs_now(dep) for dep in STEP_INPUTS[step]}

  def why_rerun(self, step: str) -> Optional[str]:
    """None if ``step`` is done, else why it (re-)runs: "not run", "output X missing",
    "output X changed", "input STEP changed"."""
    outputs = self._outputs_now(step)
    if outputs is None:
      return "not run"
    missing = [rel for rel, fp in outputs.items() if fp is None]
    if missing:
      return f"output {', '.join(missing)} missing"
    recorded = self.manifest.fingerprints(step)
    if recorded is None:   # recorded before fingerprints were: outputs present is done
      return None
    changed = [rel for rel, fp in outputs.items() if recorded["outputs"].get(rel) != fp]
    if changed:
      return f"output {', '.join(changed)} changed"
    inputs = self._inputs_now(step)
    changed = [dep for dep in STEP_INPUTS[step] if recorded["inputs"].get(dep) != inputs[dep]]
    if changed:
      return f"input {', '.join(changed)} changed"
    return None

  def _done(self, step: str) -> bool:
    return self.why_rerun(step) is None

  def _record(self, step: str, outputs: Sequence[str], info: Mapping[str, Any]) -> None:
    rel = [os.path.relpath(p, self.layout.root) for p in outputs]
    self._fingerprints.clear()       # the step rewrote what it wrote
    fingerprints = {"outputs": {r: self._fingerprint(r) for r in rel},
                    "inputs": self._inputs_now(step)}
    self.manifest.mark_done(step, rel, dict(info), fingerprints=fingerprints)

  def info(self, step: str) -> dict:
    return self.manifest.info(step) if self._done(step) else {}

  def run(self, steps: Optional[Sequence[str]] = None) -> dict:
    steps = self.steps if steps is None else steps
    unknown = [s for s in steps if s not in self.steps]
    if unknown:
      raise ValueError(f"unknown steps {unknown}; this run's steps are {self.steps} "
                       f"(arms: {ARMS}, added with --arms)")
    self._fingerprints.clear()       # the disk may have changed since the last run
    for step in self.steps:
      if step not in steps:
        continue
      reason = self.why_rerun(step)
      if reason is None and step != "report":    # the report is always rewritten
        self.print(f"[recipe] {step}: done (skipped)")
        continue
      if reason not in (None, "not run"):
        self.print(f"[recipe] {step}: {reason}")
      runner = getattr(self, f"step_{step}")
      began = time.time()
      self.print(f"[recipe] {step}: running")
      outputs, info = runner()
      if outputs is None:
        self.print(f"[recipe] {step}: skipped ({info.get('reason')})")
        continue
      info = dict(info, seconds=round(time.time() - began, 1), gin_overrides=self.overrides,
                  code=provenance.code_version())
      self._record(step, outputs, info)
      self.print(f"[recipe] {step}: finished in {info['seconds']:.0f}s")
    return {s: self.info(s) for s in self.steps}

  @property
  def files(self) -> dict[str, Optional[str]]:
    return corpus_files(self.layout.corpus_dir)

  def retriever(self):
    if self._retriever is None:
      self._retriever = load_retriever(self.layout.retrieval_dir)
    return self._retriever

  @property
  def gin_overrides(self) -> list[str]:
    """What every step's gin parse ends with: the model's chunk length from the run's
    retrieval directory (its models read that directory's chunks), then the run's
    --gin bindings."""
    layout = RetrievalLayout(self.layout.retrieval_dir)
    if not os.path.exists(layout.config_path):
      return list(self.overrides)
    chunk_size = layout.read_config()["chunk_size"]
    return [f"RetroConfig.chunk_length = {chunk_size}"] + list(self.overrides)

  def _eval_gin(self, bindings: Sequence[str] = ()) -> None:
    _parse_step_gin(EVAL_GIN, bindings, self.gin_overrides)

  # -- steps ---------------------------------------------------------------------------

  def step_corpus(self):
    if self.documents:
      files = split_documents(self.documents, self.layout.corpus_dir, seed=self.seed)
      counts = {k: len(_read_rows(p)) for k, p in files.items() if p}
    else:
      _parse_step_gin(CORPUS_GIN, (), self.gin_overrides)
      for key in ("scale", "seed"):      # the recipe passes both: a binding would be lost
        if _gin_binds(f"generate_corpus.{key}"):
          raise ValueError(f"--gin.generate_corpus.{key}: the recipe sets the corpus's "
                           f"{key} with its --{key} flag; pass --{key}= instead")
      result = encyclopedia.generate_corpus(self.layout.corpus_dir, scale=self.scale,
                                            seed=self.seed)
      counts = result["counts"]
    files = self.files
    return [p for p in files.values() if p], {"counts": counts}

  def step_retrieval(self):
    _parse_step_gin(self.run_gin(RETRIEVAL_GIN), (), self.gin_overrides)
    summary = build_retrieval(self.files, self.layout.retrieval_dir)
    # Each part (vocabulary, chunk DBs, index, neighbors, retrieval.json) is an output
    # of its own, so that a deleted part is named.
    root = self.layout.retrieval_dir
    outputs = [os.path.join(root, name) for name in sorted(os.listdir(root))
               if not name.startswith(".") and tree_fingerprint(os.path.join(root, name))]
    return outputs, {
        "retrieval_db": summary["retrieval_db"], "splits": summary["splits"],
        "index": summary["index_factory"], "vocab_size": summary["vocab_size"],
        "chunk_size": summary["chunk_size"],
        "stages": {s["stage"]: s["seconds"] for s in summary["stages"]}}

  def step_gin(self, step: str) -> str:
    """The gin file of a training step in this run (a --documents run's own, if any)."""
    return self.run_gin(STEP_GIN[step])

  def run_gin(self, gin_file: str) -> str:
    """The gin file this run reads for ``gin_file`` (a --documents run's own version,
    ``DOCUMENTS_GIN``, if it has one)."""
    return (DOCUMENTS_GIN if self.documents else {}).get(gin_file, gin_file)

  def _train(self, step: str, **bindings) -> tuple[list[str], dict]:
    metrics = run_training(step, self.layout, bindings, self.gin_overrides,
                           gin_file=self.step_gin(step))
    return [os.path.join(self.layout.model_dir(step), "checkpoints")], {"metrics": metrics}

  def step_gpt(self):
    return self._train("gpt")

  def frozen_fit_steps(self) -> int:
    """The frozen phase's steps (``FROZEN_FIT_STEPS`` as the retro step's gin and the
    run's --gin bindings set it; 0: one phase)."""
    _parse_step_gin(self.step_gin("retro"), (), self.gin_overrides)
    try:
      steps = gin.query_parameter("%FROZEN_FIT_STEPS")
    except ValueError:          # a step file (and bindings) without the macro: one phase
      steps = 0
    finally:
      gin.clear_config()
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
      raise ValueError(f"--gin.FROZEN_FIT_STEPS={steps!r}: must be an integer >= 0 (the "
                       "frozen phase's steps; 0: no frozen phase)")
    return steps

  def step_retro(self):
    gpt = self.layout.model_dir("gpt")
    frozen_steps = self.frozen_fit_steps()
    if not frozen_steps:
      return self._train("retro", INIT_CHECKPOINT=gpt)
    frozen = self.layout.model_dir(FROZEN_PHASE_DIR)
    # The retro step's gin file sets the phase's length (a --documents run's default),
    # which the phase's own file does not include.
    first = run_training("retro", self.layout, {"MODEL_DIR": frozen, "INIT_CHECKPOINT": gpt,
                                                "FROZEN_FIT_STEPS": frozen_steps},
                         self.gin_overrides, gin_file=self.run_gin(FROZEN_PHASE_GIN))
    metrics = run_training("retro", self.layout, {"INIT_CHECKPOINT": frozen},
                           self.gin_overrides, gin_file=self.run_gin(UNFREEZING_GIN))
    return ([os.path.join(frozen, "checkpoints"),
             os.path.join(self.layout.model_dir("retro"), "checkpoints")],
            {"metrics": metrics, "frozen_phase": {"steps": frozen_steps, "metrics": first}})

  def step_gptfit(self):
    return self._train("gptfit", INIT_CHECKPOINT=self.layout.model_dir("gpt"))

  def step_retro_scratch(self):
    return self._train("retro_scratch")

  def step_sft_data(self):
    if not self.files.get("sft_qa"):
      return None, {"reason": "the corpus has no sft_qa.jsonl"}
    self._eval_gin()
    path = build_sft_data(self.files["sft_qa"], self.retriever(),
                          os.path.join(self.layout.sft_dir, "qa_with_passages.jsonl"))
    return [path], {"examples": len(_read_rows(path))}

  def _sft(self, step: str, init: str):
    qa = os.path.join(self.layout.sft_dir, "qa_with_passages.jsonl")
    if not os.path.exists(qa):
      return None, {"reason": "no instruction data (sft_data was skipped)"}
    return self._train(step, INIT_CHECKPOINT=self.layout.model_dir(init), SFT_QA_FILE=qa)

  def step_instructretro(self):
    return self._sft("instructretro", "retro")

  def step_gpt_instruct(self):
    return self._sft("gpt_instruct", "gptfit")

  def _eval_checkpoints(self) -> dict[str, str]:
    """The language models the held-out evaluations score: display name -> MODEL_DIR."""
    checkpoints = {"Retro": self.layout.model_dir("retro"),
                   "GPT-fit": self.layout.model_dir("gptfit")}
    if "retro_scratch" in self.arms:
      checkpoints[report_lib.SCRATCH_MODEL] = self.layout.model_dir("retro_scratch")
    return checkpoints

  def step_eval_perplexity(self):
    if not self.files.get("heldout"):
      return None, {"reason": "no held-out text"}
    self._eval_gin()
    classes = db_only_token_classes(os.path.join(self.layout.corpus_dir, "kb.json"),
                                    RetrievalLayout(self.layout.retrieval_dir).vocab_path,
                                    RetroConfig().chunk_length)
    rows = eval_perplexity(output_dir=self.layout.eval_dir,
                           checkpoints=self._eval_checkpoints(),
                           retrieval_dir=self.layout.retrieval_dir, token_classes=classes)
    outputs = [os.path.join(self.layout.eval_dir, "perplexity.json")]
    info = {"rows": rows}
    if classes:
      outputs.append(os.path.join(self.layout.eval_dir, "perplexity_by_class.json"))
      with open(outputs[-1], encoding="utf-8") as f:
        info["by_class"] = json.load(f)
    return outputs, info

  def step_eval_analyses(self):
    if not self.files.get("heldout"):
      return None, {"reason": "no held-out text"}
    self._eval_gin()
    output_dir = os.path.join(self.layout.eval_dir, "analyses")
    results = eval_analyses(output_dir=output_dir, checkpoints=self._eval_checkpoints(),
                            retrieval_dir=self.layout.retrieval_dir)
    markdown = os.path.join(output_dir, "analyses.md")
    return [os.path.join(output_dir, "analyses.json"), markdown], {
        "markdown": os.path.relpath(markdown, self.layout.root),
        "notes": results["notes"], "neighbors": results["neighbors"],
        "db_size": results["db_size"]}

  def step_eval_qa(self):
    if not self.files.get("qa_test") or not os.path.isdir(
        self.layout.model_dir("instructretro")):
      return None, {"reason": "no QA test set or no instruction-tuned models"}
    self._eval_gin()
    questions = sample_questions(self.files["qa_test"],
                                 os.path.join(self.layout.eval_dir, "qa_questions.jsonl"))
    questions_with_ctxs = os.path.join(self.layout.eval_dir, "qa_questions_ctxs.jsonl")
    settings = qa_settings()
    atomic_write_jsonl(questions_with_ctxs, qa_lib.with_retrieved_contexts(
        _read_rows(questions), self.retriever(), settings["num_passages"]))
    rows = []
    for name, model, modes in (
        ("GPT-Instruct", "gpt_instruct", settings["gpt_modes"]),
        ("InstructRetro", "instructretro", settings["retro_modes"])):
      rows += qa_lib.eval_qa(output_dir=self.layout.eval_dir,
                             checkpoint=self.layout.model_dir(model),
                             qa_file=questions_with_ctxs,
                             retrieval_dir=self.layout.retrieval_dir, model_name=name,
                             modes=modes, retriever=self.retriever())
    atomic_write_json(os.path.join(self.layout.eval_dir, "qa.json"), rows)
    return [os.path.join(self.layout.eval_dir, "qa.json")], {
        "rows": rows, "paired": qa_lib.paired_qa_rows(rows)}

  def step_knowledge_update(self):
    files = self.files
    if not (files.get("updates") and files.get("retrieval_updated")
            and os.path.isdir(self.layout.model_dir("instructretro"))):
      return None, {"reason": "no knowledge-update files or no InstructRetro model"}
    self._eval_gin()
    began = time.time()
    rebuild = update_lib.build_updated_retrieval(
        self.layout.retrieval_dir, files["retrieval_updated"],
        self.layout.updated_retrieval_dir)
    updated = rebuild["retrieval_dir"]
    rebuild_seconds = time.time() - began
    updates = _read_rows(files["updates"])
    settings = qa_settings()
    num_passages = settings["num_passages"]
    modes = {"retrieval": settings["retro_modes"]["retrieval"]}
    out_dir = os.path.join(self.layout.eval_dir, "knowledge_update")
    results, completions = {}, {}
    cloze = update_lib.fact_completion_prompts(files.get("heldout"), updates)
    lm = None
    if cloze[0] and os.path.isdir(self.layout.model_dir("retro")):
      lm = load_generator(self.layout.model_dir("retro"),
                          vocab_path=RetrievalLayout(self.layout.retrieval_dir).vocab_path)
    for db_name, root, retriever in (
        ("original DB", self.layout.retrieval_dir, self.retriever()),
        ("updated DB", updated, load_retriever(updated))):
      if lm is not None:
        completions[db_name] = update_lib.fact_completion_scores(
            lm, retriever, *cloze,
            os.path.join(out_dir, f"completions_{db_name.split()[0]}.jsonl"))
      rows = [{"question": u["question"], "answers": u["new_answers"]} for u in updates]
      path = os.path.join(out_dir, f"questions_{db_name.split()[0]}.jsonl")
      atomic_write_jsonl(path, qa_lib.with_retrieved_contexts(rows, retriever, num_passages))
      name = f"InstructRetro_{db_name.split()[0]}"
      [row] = qa_lib.eval_qa(output_dir=out_dir,
                             checkpoint=self.layout.model_dir("instructretro"),
                             qa_file=path, retrieval_dir=root, model_name=name,
                             modes=modes, retriever=retriever)
      results[db_name] = update_lib.knowledge_update_scores(row["predictions"], updates)
    info = {"results": results, "completions": completions, "facts": len(updates),
            "rebuild_seconds": round(rebuild_seconds, 1),
            "embedded_anew": rebuild["embedded_anew"], "chunk_texts": rebuild["chunk_texts"]}
    atomic_write_json(os.path.join(out_dir, "knowledge_update.json"), info)
    return [os.path.join(out_dir, "knowledge_update.json")], info

  def step_report(self):
    paths = report_lib.write_recipe_report(
        self.layout.report_path, run_dir=self.layout.root,
        model_dirs={step: self.layout.model_dir(step)
                    for step in (*STEP_GIN, FROZEN_PHASE_DIR)},
        infos={step: self.info(step) for step in self.steps},
        documents=os.path.abspath(self.documents) if self.documents else None)
    self.print(open(self.layout.report_path, encoding="utf-8").read())  # pylint: disable=consider-using-with
    return paths, {}


# ----------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------

def _define_flags() -> None:
  flags.DEFINE_string("run_dir", "runs/miniature", "Where the run's artifacts go.")
  flags.DEFINE_float("scale", 1.0, "Size of the embedded corpus (entity count multiplier).")
  flags.DEFINE_integer("seed", 0, "Corpus and split seed.")
  flags.DEFINE_string("documents", None, "Use this jsonl corpus (a 'text' key per line) "
                      "instead of the embedded one.")
  flags.DEFINE_list("steps", None, "Steps to run (finished ones are skipped); default "
                    f"all: {', '.join(STEPS)} and the run's arms.")
  flags.DEFINE_list("arms", None, f"Optional steps to add ({', '.join(ARMS)}); default "
                    "none for the embedded corpus, "
                    "the DOCUMENTS_ARMS for --documents.")
  flags.DEFINE_multi_string("gin_bindings", [], "gin bindings for every step (or "
                            "--gin.KEY=VALUE).")


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  recipe = Recipe(f.run_dir, scale=f.scale, seed=f.seed, documents=f.documents,
                  overrides=f.gin_bindings, arms=f.arms)
  recipe.run(f.steps)


if __name__ == "__main__":
  _define_flags()
  gin_utils.run_with_gin_flags(main)
