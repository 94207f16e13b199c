"""InstructRetro QA evaluation as Megatron-LM's released scripts run it: the prompt
(character for character), its truncation, Megatron's post-processing and scoring,
and eval_qa_instructretro.gin end to end on a tiny converted-style model directory."""

import json
import os

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from retro_jax import eval as eval_lib
from retro_jax.data import chat
from retro_jax.data import vocab as vocab_lib
from retro_jax.evaluation import qa
from retro_jax.inference import loading
from retro_jax.models import RetroConfig, init_params
from retro_jax.training import checkpoints as ckpt_lib
from retro_jax.utils import gin_utils

# Written out from Megatron-LM (branch InstructRetro) tools/retro/sft/dataset_conv.py
# reformat_prompt (template 0, a short-span task such as nq) and preprocess
# ("title: " + title + ", source: " + text), not built with our functions.
SYSTEM = ("System: This is a chat between a user and an artificial intelligence "
          "assistant. The assistant gives helpful, detailed, and polite answers to the "
          "user's questions based on the context. The assistant should also indicate "
          "when the answer cannot be found in the context.\n\n")
CTXS = [{"id": str(i), "title": f"Doc {i}", "text": f"Passage number {i} says {w}."}
        for i, w in enumerate(["Vell", "Quenton", "Tessel", "Zorbia", "Krabre", "Nope"])]
EXAMPLE = {"question": "which river flows through zorbia", "answers": ["the Vell", "Vell"],
           "ctxs": CTXS}
EXPECTED_PROMPT = (
    "System: This is a chat between a user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions "
    "based on the context. The assistant should also indicate when the answer cannot "
    "be found in the context.\n\n"
    "title: Doc 0, source: Passage number 0 says Vell.\n\n"
    "title: Doc 1, source: Passage number 1 says Quenton.\n\n"
    "title: Doc 2, source: Passage number 2 says Tessel.\n\n"
    "title: Doc 3, source: Passage number 3 says Zorbia.\n\n"
    "title: Doc 4, source: Passage number 4 says Krabre.\n\n"
    "User: Answer the following question with a short span. which river flows through "
    "zorbia\n\nAssistant: The answer is")
TURN = ("User: Answer the following question with a short span. which river flows "
        "through zorbia\n\nAssistant: The answer is")


pytestmark = pytest.mark.usefixtures("clean_gin")


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  root = tmp_path_factory.mktemp("ir_vocab")
  lines = [f"title: Doc {i}, source: Passage number {i} says {w} river city {i * 7}."
           for i in range(300) for w in ("Vell", "Quenton")]
  lines += [SYSTEM.strip(), TURN.replace("\n", " ")] * 20
  return vocab_lib.train_sentencepiece(lines, str(root / "spm"), vocab_size=400,
                                       num_threads=1)


# The prompt -----------------------------------------------------------------------------


def test_prompt_is_megatrons_character_for_character():
  assert SYSTEM + "".join(f"title: {c['title']}, source: {c['text']}\n\n"
                          for c in CTXS[:5]) + TURN == EXPECTED_PROMPT
  assert qa.build_prompt(EXAMPLE, 5) == EXPECTED_PROMPT
  assert chat.qa_prompt(EXAMPLE["question"], CTXS, num_passages=5) == EXPECTED_PROMPT
  # ft_neighbours = 0: the system line and the turn (Megatron's else branch).
  assert qa.build_prompt(EXAMPLE, 0) == SYSTEM + TURN


def test_prompt_truncation_is_megatrons(spm_path):
  sp = vocab_lib.load_sentencepiece(spm_path)
  context = "".join(f"title: {c['title']}, source: {c['text']}\n\n" for c in CTXS[:5])
  fixed = len(sp.encode(SYSTEM)) + len(sp.encode(TURN))
  whole = len(sp.encode(context))
  # Room for everything: the context is replaced by its detokenised tokens.
  roomy = qa.build_prompt(EXAMPLE, 5, tokenizer=sp, max_prompt_tokens=fixed + whole + 10)
  assert roomy == SYSTEM + sp.decode(sp.encode(context)) + TURN
  # Megatron: context_tokens[:max_seq_length - max_output_len - len(dialogue) -
  # len(system)], detokenised, between the system line and the turn.
  for cut in (1, 17, whole - 1):
    limit = fixed + cut
    prompt = qa.build_prompt(EXAMPLE, 5, tokenizer=sp, max_prompt_tokens=limit)
    assert prompt == SYSTEM + sp.decode(sp.encode(context)[:cut]) + TURN
    assert prompt.startswith(SYSTEM) and prompt.endswith(TURN)
    assert len(sp.encode(prompt)) <= limit + 2  # re-tokenised at the two seams
  assert qa.build_prompt(EXAMPLE, 5, tokenizer=sp, max_prompt_tokens=fixed) == SYSTEM + TURN
  with pytest.raises(ValueError, match="needs a tokenizer"):
    chat.qa_prompt("q", CTXS, max_prompt_tokens=100)


# Post-processing and scoring ------------------------------------------------------------


@pytest.mark.parametrize("raw, line", [
    # Newlines become spaces; nothing is cut or stripped without <|endoftext|>.
    (" the Vell.\n\nUser: next", " the Vell.  User: next"),
    ("Vell<|endoftext|>junk\nmore", "Vell"),
    (" the Vell \n<|endoftext|>", "the Vell"),
    ("", ""),
])
def test_megatron_prediction(raw, line):
  assert qa.megatron_prediction(raw) == line


def test_megatron_exact_match():
  assert qa.megatron_exact_match(" Vell. ", ["the Vell"]) == 1.0
  assert qa.megatron_exact_match("Answer: the Vell", ["x", "Vell"]) == 1.0  # max over golds
  # The markers go wherever they are (a plain replace), case-sensitively.
  assert qa.megatron_exact_match("Plan A: Vell", ["plan vell"]) == 1.0
  assert qa.megatron_exact_match("answer: Vell", ["Vell"]) == 0.0
  assert qa.megatron_exact_match("Vell <|endoftext|>", ["Vell"]) == 1.0
  # Our default cuts at the first newline; Megatron's line keeps the rest.
  line = qa.megatron_prediction(" Vell\nUser: more")
  assert qa.megatron_exact_match(line, ["Vell"]) == 0.0
  assert qa.exact_match(qa.postprocess_prediction(" Vell\nUser: more"), ["Vell"]) == 1.0


def test_megatron_f1_uses_the_first_answer_only():
  # The second answer matches exactly, but Megatron scores answers[0] alone.
  assert qa.megatron_f1("Quenton", ["the Vell", "Quenton"]) == 0.0
  assert qa.token_f1("Quenton", ["the Vell", "Quenton"]) == 1.0
  # pred [quenton, river] vs [quenton]: P = 1/2, R = 1.
  assert qa.megatron_f1("Quenton river", ["Quenton", "x"]) == pytest.approx(2 / 3)
  # No marker removal for F1: 'Answer: Vell' -> [answer, vell] vs [vell].
  assert qa.megatron_f1("Answer: Vell", ["Vell"]) == pytest.approx(2 / 3)
  assert qa.megatron_f1("", ["Vell"]) == 0.0
  assert qa.megatron_f1("!!!", ["Vell"]) == 0.0
  assert qa.megatron_f1("Vell", ["!!!"]) == 0.0           # gold normalises to nothing
  assert qa.megatron_f1("Vell", [" ", "Vell"]) is None     # empty first answer: skipped
  assert qa.megatron_f1("Vell", ["no_passages_used"]) is None


def test_megatron_scores_average_f1_over_counted_questions():
  examples = [{"answers": ["Vell"]}, {"answers": ["", "Quenton"]},
              {"answers": ["Tessel city"]}]
  lines = ["Vell", "Quenton", "Tessel"]
  scores = qa.score_predictions(lines, examples, scoring="megatron")
  assert scores["count"] == 3 and scores["f1_count"] == 2
  assert scores["exact_match"] == pytest.approx(2 / 3)   # Vell, Quenton (max over golds)
  assert scores["f1"] == pytest.approx((1 + 2 / 3) / 2)   # Tessel: P 1, R 1/2
  assert "f1_count" not in qa.score_predictions(lines, examples)
  with pytest.raises(ValueError, match="scoring='squad'"):
    qa.score_predictions(lines, examples, scoring="squad")


class _Vocab:

  def encode(self, text):
    return list(text.encode("utf-8"))

  def decode(self, ids):
    return bytes(ids).decode("utf-8", "ignore")


class _Result:

  def __init__(self, texts):
    self.texts, self.retrievals = texts, [[] for _ in texts]


class _EchoGenerator:
  """Answers with the first word after 'source: ' and a second line."""

  class config:  # pylint: disable=invalid-name
    num_neighbors = 2

  retriever, vocab = None, _Vocab()

  def __init__(self):
    self.prompts = []

  def generate(self, prompts, **kwargs):
    del kwargs
    self.prompts += prompts
    return _Result([" " + (p.split("source: ")[1].split()[0] if "source: " in p else "x")
                    + "\nUser: more" for p in prompts])


def test_run_qa_with_megatron_scoring_and_truncation(tmp_path):
  generator = _EchoGenerator()
  examples = [EXAMPLE, dict(EXAMPLE, answers=["Passage"])]
  scores = qa.run_qa(generator, examples, output_dir=str(tmp_path), num_passages=5,
                     scoring="megatron", max_seq_len=856, output_reserve=256,
                     max_new_tokens=66, batch_size=1)
  rows = [json.loads(l) for l in open(tmp_path / "qa_predictions.jsonl")]
  assert rows[0]["prediction"] == " Passage User: more"
  assert scores["exact_match"] == 0.0 and scores["count"] == 2
  # Byte tokens: the prompt is cut to 856 - 256 = 600 bytes (of 645), from the context.
  context = EXPECTED_PROMPT[len(SYSTEM):-len(TURN)]
  assert generator.prompts == [SYSTEM + context[:600 - len(SYSTEM) - len(TURN)] + TURN] * 2
  assert len(generator.prompts[0]) == 600 < len(EXPECTED_PROMPT)
  settings = json.load(open(tmp_path / "qa_scores.json"))["settings"]
  assert settings["scoring"] == "megatron" and settings["max_prompt_tokens"] == 600
  with pytest.raises(ValueError, match="output_reserve=16 must be >= max_new_tokens=66"):
    qa.run_qa(generator, examples, output_dir=str(tmp_path), max_seq_len=1000,
              output_reserve=16, max_new_tokens=66)


# Reading Megatron's files ----------------------------------------------------------------


def test_reads_megatron_json_lists_and_sub_paragraphs(tmp_path):
  path = tmp_path / "nq_QA_dev.json"
  path.write_text(json.dumps([
      {"question": "q1", "answers": ["a", "b"], "ctxs": CTXS[:2]},
      {"question": "q2", "answer": "c", "sub-paragraphs": "Some text."},
      {"question": "q3", "answer": ["d"], "sub-paragraphs": ["T", "Body"]},
      {"question": "q4", "answers": ["e"]},
  ]))
  examples = qa.read_qa_jsonl(str(path))
  assert [e["answers"] for e in examples] == [["a", "b"], ["c"], ["d"], ["e"]]
  assert examples[0]["ctxs"] == [{"title": "Doc 0", "text": CTXS[0]["text"]},
                                 {"title": "Doc 1", "text": CTXS[1]["text"]}]
  assert examples[1]["ctxs"] == [{"title": "", "text": "Some text."}]
  assert examples[2]["ctxs"] == [{"title": "T", "text": "Body"}]
  assert examples[3]["ctxs"] == []
  assert qa.build_prompt(examples[1], 5).startswith(
      SYSTEM + "title: , source: Some text.\n\nUser:")


# eval_qa with the gin file on a tiny model directory ------------------------------------


def _write_model_dir(root, spm):
  config = RetroConfig(vocab_size=512, hidden_size=32, num_layers=2, num_heads=2,
                       mlp_dim=64, encoder_num_layers=1, max_length=4096,
                       param_dtype="float32", cca_gate=0.0)  # as an instruct checkpoint
  params = jax.tree_util.tree_map(np.asarray, init_params(config, jax.random.PRNGKey(0)))
  manager = ocp.CheckpointManager(ckpt_lib.checkpoint_dir(root),
                                  options=ocp.CheckpointManagerOptions(
                                      create=True, enable_async_checkpointing=False))
  manager.save(0, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      meta=ocp.args.JsonSave({"step": 0, **ckpt_lib.config_meta(config)})))
  manager.wait_until_finished()
  manager.close()
  os.makedirs(os.path.join(root, "vocab"))
  with open(spm, "rb") as src, open(os.path.join(root, "vocab", "spm.model"), "wb") as dst:
    dst.write(src.read())
  return config


@pytest.mark.slow
def test_eval_qa_instructretro_gin_end_to_end(tmp_path, spm_path, monkeypatch):
  model_dir, out = str(tmp_path / "ir_tiny"), str(tmp_path / "eval")
  _write_model_dir(model_dir, spm_path)
  qa_file = tmp_path / "nq_QA_dev.json"          # 'dev': the first N questions only
  records = [{"question": f"which river flows through city {i}",
              "answers": [f"Vell {i}", "Vell"], "ctxs": CTXS} for i in range(4)]
  qa_file.write_text(json.dumps(records))
  prompts, generators = [], []
  build = qa.build_prompt
  monkeypatch.setattr(qa, "build_prompt",
                      lambda *a, **k: prompts.append(build(*a, **k)) or prompts[-1])
  load = loading.load_generator
  monkeypatch.setattr(loading, "load_generator",
                      lambda *a, **k: generators.append(load(*a, **k)) or generators[-1])
  gin_utils.parse_gin(["recipes/eval_qa_instructretro.gin"], [
      f"OUTPUT_DIR = '{out}'", f"CHECKPOINT = '{model_dir}'", f"QA_FILE = '{qa_file}'",
      "BATCH_SIZE = 2", "MAX_SEQ_LEN = 556", "eval_qa.dev_max_examples = 3"])
  assert gin.query_parameter("eval_qa.model_config") is None
  results = eval_lib.evaluate()
  rows = results["qa"]
  assert [r["neighbors"] for r in rows] == ["none", "passages"]
  assert "cca_gate" not in rows[0] and rows[1]["cca_gate"] == 1.0  # the encoder row: on
  for row in rows:
    assert row["count"] == 3 and row["num_passages"] == 5
    assert 0.0 <= row["exact_match"] <= 1.0 and 0.0 <= row["f1"] <= 1.0
    predictions = [json.loads(l) for l in open(row["predictions"])]
    assert len(predictions) == 3
    for p in predictions:   # Megatron's line: one line, no <|endoftext|>
      assert "\n" not in p["prediction"] and "<|endoftext|>" not in p["prediction"]
    scores = json.load(open(row["predictions"].replace("_predictions.jsonl",
                                                       "_scores.json")))
    assert scores["settings"]["scoring"] == "megatron"
    assert scores["settings"]["max_new_tokens"] == 66
    assert scores["settings"]["max_prompt_tokens"] == 556 - 256
    assert scores["settings"]["align_prompts"] is False
  assert os.path.exists(os.path.join(out, "instructretro_qa.md"))
  # The architecture came from the checkpoint, held in bf16 (stored as float32).
  [generator] = generators
  assert generator.config.hidden_size == 32 and generator.config.param_dtype == "bfloat16"
  assert generator.config.cca_gate == 0.0
  assert {str(x.dtype) for x in jax.tree_util.tree_leaves(generator.params)} == {"bfloat16"}
  # Every prompt was cut to 300 tokens (of about 400) in its passages; the turn stays.
  sp = vocab_lib.load_sentencepiece(spm_path)
  assert len(prompts) == 6
  for prompt in prompts:
    assert prompt.startswith(SYSTEM) and prompt.endswith("\n\nAssistant: The answer is")
    assert len(sp.encode(prompt)) <= 300 + 2
    assert "title: Doc 0, source:" in prompt and "Doc 4" not in prompt
