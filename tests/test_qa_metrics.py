"""QA scoring against hand-computed cases, and the QA runner's files and resume."""

import json
import os

import pytest

from retro_jax.evaluation import qa


# Normalisation ------------------------------------------------------------------------


@pytest.mark.parametrize("text, squad, parlai", [
    ("The  Quick, Brown fox!", "quick brown fox", "quick brown fox"),
    # Articles are whole words only: not inside 'theater', 'banana', 'Athens', 'another'.
    ("Theater of the Anarchy", "theater of anarchy", "theater of anarchy"),
    ("a banana, an apple and another Athens", "banana apple and another athens",
     "banana apple and another athens"),
    # SQuAD deletes punctuation, ParlAI turns it into spaces.
    ("U.S.", "us", "u s"),
    ("rock'n'roll", "rocknroll", "rock n roll"),
    ("snake_case-word", "snakecaseword", "snake case word"),
    # Punctuation only.
    ("!!!", "", ""),
    # Unicode letters are kept and lower-cased; non-ASCII punctuation is not removed.
    ("ZÜRICH.", "zürich", "zürich"),
    ("Ça va — bien", "ça va — bien", "ça va — bien"),
    ("", "", ""),
])
def test_normalisation(text, squad, parlai):
  assert qa.normalize_answer(text) == squad
  assert qa.normalize_answer_parlai(text) == parlai


# Exact match and F1 -------------------------------------------------------------------


def test_exact_match_cases():
  assert qa.exact_match("The Vell.", ["vell"]) == 1.0
  assert qa.exact_match("Vell river", ["vell"]) == 0.0
  assert qa.exact_match("US", ["U.S."]) == 1.0          # SQuAD deletes the dots
  assert qa.exact_match("zürich", ["Zürich!"]) == 1.0
  assert qa.exact_match("zurich", ["Zürich"]) == 0.0     # no accent folding
  assert qa.exact_match("Quenton", ["the vell", "QUENTON", "x"]) == 1.0  # max over golds
  assert qa.exact_match("", ["x"]) == 0.0                # empty prediction
  assert qa.exact_match("?", ["!!!"]) == 1.0             # both normalise to nothing
  assert qa.exact_match("x", "x") == 1.0                 # a single gold string


def test_token_f1_cases():
  # pred [quenton, river] vs gold [quenton]: P = 1/2, R = 1, F1 = 2/3 (max over golds).
  assert qa.token_f1("Quenton river", ["the Vell", "Quenton"]) == pytest.approx(2 / 3)
  # Repeated tokens count with multiplicity: pred [x y y z], gold [y y y]:
  # common y:2, P = 2/4, R = 2/3, F1 = 4/7.
  assert qa.token_f1("x y y z", ["y y y"]) == pytest.approx(4 / 7)
  # ParlAI splits 'U.S.' into 'u s': no common token with 'us'.
  assert qa.token_f1("us", ["U.S."]) == 0.0
  assert qa.token_f1("u.s. army", ["U.S."]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
  assert qa.token_f1("", ["x"]) == 0.0                   # empty prediction
  assert qa.token_f1("the", ["a"]) == 1.0                # every gold is empty, so is pred
  assert qa.token_f1("x", ["!!!"]) == 0.0
  assert qa.token_f1("x", ["!!!", "x"]) == 1.0           # empty golds are skipped
  assert qa.score("The Vell", ["vell"]) == {"exact_match": 1.0, "f1": 1.0}


def test_gold_answers_must_be_strings():
  with pytest.raises(ValueError, match="non-empty list of strings"):
    qa.exact_match("x", [])
  with pytest.raises(ValueError, match="non-empty list of strings"):
    qa.token_f1("x", [3])


@pytest.mark.parametrize("raw, answer", [
    (" Quenton.", "Quenton."),
    ("Answer: Quenton\nQuestion: next", "Quenton"),
    (" A: the Vell river <|endoftext|> junk", "the Vell river"),
    ("\n\n Vell \n more", "Vell"),
    ("Answer: A: x", "x"),
    ("", ""),
])
def test_postprocess_prediction(raw, answer):
  assert qa.postprocess_prediction(raw) == answer


# Reading ------------------------------------------------------------------------------


def test_read_qa_jsonl_and_errors(tmp_path):
  path = tmp_path / "nq.jsonl"
  path.write_text(json.dumps({"question": "q1", "answers": ["a"], "ctxs": [
      {"title": "T", "text": "body"}]}) + "\n\n" + json.dumps(
          {"question": "q2", "answer": "b"}) + "\n")
  examples = qa.read_qa_jsonl(str(path))
  assert [e["id"] for e in examples] == [f"{path}:1", f"{path}:3"]
  assert examples[1]["answers"] == ["b"] and examples[1]["ctxs"] == []
  assert examples[0]["ctxs"] == [{"title": "T", "text": "body"}]
  assert len(qa.read_qa_jsonl(str(path), max_examples=1)) == 1
  path.write_text(json.dumps({"question": "q"}) + "\n")
  with pytest.raises(ValueError, match=r"nq.jsonl:1: missing field 'answer'"):
    qa.read_qa_jsonl(str(path))
  path.write_text(json.dumps({"question": "q", "answers": []}) + "\n")
  with pytest.raises(ValueError, match=r"nq.jsonl:1: gold answers must be a non-empty"):
    qa.read_qa_jsonl(str(path))


# The runner ---------------------------------------------------------------------------


class _Config:
  num_neighbors = 2


class _Result:

  def __init__(self, texts):
    self.texts = texts
    self.retrievals = [[] for _ in texts]


class FakeGenerator:
  """Answers with the first word after 'source: ' in its prompt; records its calls."""

  config = _Config()
  retriever = None

  def __init__(self, fail_after=None):
    self.calls, self.fail_after = [], fail_after

  def generate(self, prompts, *, max_new_tokens, sampling, passages, retrieval,
               align_prompts=False):
    if self.fail_after is not None and len(self.calls) >= self.fail_after:
      raise RuntimeError("killed")
    self.calls.append({"prompts": prompts, "passages": passages, "retrieval": retrieval,
                       "align_prompts": align_prompts})
    texts = []
    for p in prompts:
      words = p.split("source: ")[1].split() if "source: " in p else ["nothing"]
      texts.append(" " + words[0].strip(",") + ".\nUser: more")
    return _Result(texts)


EXAMPLES = [
    {"question": "What river?", "answers": ["the Vell"],
     "ctxs": [{"title": "Zorbia", "text": "Vell flows"}, {"title": "b", "text": "x"}]},
    {"question": "Which city?", "answers": ["Quenton", "Q"],
     "ctxs": [{"title": "Zorbia", "text": "Tessel is near"}]},
    {"question": "No context?", "answers": ["nothing"], "ctxs": []},
]


def test_run_qa_writes_predictions_and_scores(tmp_path):
  generator = FakeGenerator()
  scores = qa.run_qa(generator, EXAMPLES, output_dir=str(tmp_path), name="nq",
                     num_passages=1, neighbors="passages", batch_size=2)
  assert scores["count"] == 3
  assert scores["exact_match"] == pytest.approx(2 / 3)  # Vell, nothing right; Tessel wrong
  assert scores["f1"] == pytest.approx(2 / 3)
  rows = [json.loads(l) for l in open(tmp_path / "nq_predictions.jsonl")]
  assert [r["prediction"] for r in rows] == ["Vell.", "Tessel.", "nothing."]
  assert rows[0]["raw"].startswith(" Vell.") and rows[1]["exact_match"] == 0.0
  assert json.load(open(tmp_path / "nq_scores.json"))["settings"]["neighbors"] == "passages"
  # Prompts are InstructRetro's; the top k=2 contexts are the encoder's neighbors.
  first = generator.calls[0]
  assert first["prompts"][0].endswith("Answer the following question with a short span. "
                                      "What river?\n\nAssistant: The answer is")
  assert "title: Zorbia, source: Vell flows" in first["prompts"][0]
  assert first["passages"][0] == ["title: Zorbia, source: Vell flows", "title: b, source: x"]
  assert generator.calls[1]["passages"] is None and not generator.calls[1]["retrieval"]
  assert sorted(os.listdir(tmp_path)) == ["nq_predictions.jsonl", "nq_scores.json"]
  # Whether the prompt's passage / the encoder's passages hold a gold answer: only the
  # first question's do ("Vell flows" holds "the Vell").
  assert [(r["answer_in_passages"], r["answer_in_neighbors"]) for r in rows] == [
      (True, True), (False, False), (False, False)]
  assert scores["answer_in_passages"] == scores["answer_in_neighbors"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("texts,answers,held", [
    (["title: Zorbia, source: Vell flows"], ["the Vell"], True),   # normalised both sides
    (["Quenton, on the sea"], ["Quenton"], True),                  # punctuation dropped
    (["Quentonia"], ["Quenton", "Q"], False),                      # whole words only
    (["x", "in 1784."], ["1784"], True),                           # any of the texts
    (["a"], ["the", "An"], False),                                 # empty golds skipped
    ([], ["x"], False)])
def test_answer_in_texts(texts, answers, held):
  assert qa.answer_in_texts(texts, answers) is held


class LiveFakeGenerator(FakeGenerator):
  """Records retrievals as the generator does: two prompt chunks, one generated."""

  retriever = object()

  def generate(self, prompts, **kwargs):
    result = super().generate(prompts, **kwargs)
    result.retrievals = [[
        {"chunk_index": 0, "in_prompt": True, "neighbors": [{"text": "Vell flows"}]},
        {"chunk_index": 1, "in_prompt": True,
         "neighbors": [{"text": "x"}, {"text": "Tessel, not Quenton"}]},
        {"chunk_index": 2, "in_prompt": False, "neighbors": [{"text": "nothing"}]},
    ] for _ in prompts]
    return result


def test_answer_in_neighbors_reads_the_last_prompt_chunk(tmp_path):
  scores = qa.run_qa(LiveFakeGenerator(), EXAMPLES, output_dir=str(tmp_path),
                     num_passages=0, neighbors="live", batch_size=3)
  rows = [json.loads(l) for l in open(tmp_path / "qa_predictions.jsonl")]
  # Chunk 1's neighbors hold "Quenton"; chunk 0's "Vell" and chunk 2's "nothing" are
  # not what the answer reads. No passages in the prompt: no answer_in_passages.
  assert [r["answer_in_neighbors"] for r in rows] == [False, True, False]
  assert "answer_in_passages" not in scores and "answer_in_passages" not in rows[0]
  assert scores["answer_in_neighbors"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("count,batch_size,size", [
    (300, 32, 30), (301, 32, 31), (12, 32, 12), (64, 32, 32), (7, 4, 4), (5, 1, 1),
    (1, 16, 1)])
def test_equal_batch_size(count, batch_size, size):
  assert qa.equal_batch_size(count, batch_size) == size
  batches = -(-count // batch_size)
  assert -(-count // size) == batches                    # as many calls as batch_size's
  assert batches * size - count < batches                # the last batch pads few rows


def test_run_qa_calls_with_batches_of_one_size(tmp_path):
  examples = [dict(EXAMPLES[i % 3], id=str(i), question=f"Q{i}?") for i in range(7)]
  generator = FakeGenerator()
  qa.run_qa(generator, examples, output_dir=str(tmp_path), num_passages=1, batch_size=4)
  assert [len(c["prompts"]) for c in generator.calls] == [4, 4]
  assert generator.calls[1]["prompts"][3] == generator.calls[1]["prompts"][2]   # padding
  rows = [json.loads(l) for l in open(tmp_path / "qa_predictions.jsonl")]
  assert [r["question"] for r in rows] == [f"Q{i}?" for i in range(7)]
  assert [r["prediction"] for r in rows] == ["Vell.", "Tessel.", "nothing."] * 2 + ["Vell."]


def test_run_qa_resumes_after_a_kill(tmp_path):
  with pytest.raises(RuntimeError, match="killed"):
    qa.run_qa(FakeGenerator(fail_after=1), EXAMPLES, output_dir=str(tmp_path),
              num_passages=1, batch_size=2)
  assert len(open(tmp_path / "qa_predictions.partial.jsonl").readlines()) == 2
  resumed = FakeGenerator()
  scores = qa.run_qa(resumed, EXAMPLES, output_dir=str(tmp_path), num_passages=1,
                     batch_size=2)
  assert len(resumed.calls) == 1 and resumed.calls[0]["prompts"][0].endswith(
      "No context?\n\nAssistant: The answer is")
  fresh = qa.run_qa(FakeGenerator(), EXAMPLES, output_dir=str(tmp_path / "b"),
                    num_passages=1, batch_size=2)
  assert scores == fresh
  with pytest.raises(ValueError, match="neighbors='retrieve'"):
    qa.run_qa(FakeGenerator(), EXAMPLES, output_dir=str(tmp_path), neighbors="retrieve")


def test_sign_test_p_values():
  # Exact binomial(n, 1/2) tails, two-sided: 0/5 -> 2/32; 1/9 -> 2 * 11/1024; ties -> 1.
  assert qa.sign_test_p_value(0, 5) == pytest.approx(2 / 32)
  assert qa.sign_test_p_value(9, 1) == pytest.approx(22 / 1024)
  assert qa.sign_test_p_value(4, 4) == 1.0 and qa.sign_test_p_value(0, 0) == 1.0
  assert qa.sign_test_p_value(30, 10) < 0.005 < qa.sign_test_p_value(22, 18)


def test_paired_exact_match_counts_the_discordant_questions():
  def rows(hits):
    return [{"question": f"q{i}", "exact_match": float(h)} for i, h in enumerate(hits)]
  a, b = rows([1, 1, 0, 0, 1, 0]), rows([1, 0, 1, 0, 0, 0])
  pair = qa.paired_exact_match(a, b)
  assert {k: pair[k] for k in ("a_only", "b_only", "both", "neither", "count")} == {
      "a_only": 2, "b_only": 1, "both": 1, "neither": 2, "count": 6}
  assert pair["p_value"] == pytest.approx(qa.sign_test_p_value(2, 1))
  with pytest.raises(ValueError, match="row 1 holds different questions"):
    qa.paired_exact_match(a, [a[0], {"question": "other", "exact_match": 0.0}, *a[2:]])
  with pytest.raises(ValueError, match="6 vs 5"):
    qa.paired_exact_match(a, b[:5])


def test_eval_qa_dtype_reaches_the_generator_and_bad_dtypes_are_named(tmp_path, monkeypatch):
  from retro_jax.inference import loading
  seen = {}

  class Stop(Exception):
    pass

  def fake_load(checkpoint, **kwargs):
    seen.update(kwargs)
    raise Stop

  monkeypatch.setattr(loading, "load_generator", fake_load)
  modes = {"question only": {"num_passages": 0, "neighbors": "none"}}
  common = dict(output_dir=str(tmp_path), checkpoint="/ckpt", qa_file="/q.jsonl",
                modes=modes, vocab_path="/spm.model")
  with pytest.raises(Stop):
    qa.eval_qa(dtype="float32", **common)
  assert seen["dtype"] == "float32"
  with pytest.raises(ValueError, match=r"param_dtype='bfloat16' is narrower than "
                                       r"dtype='float32'"):
    qa.eval_qa(dtype="float32", param_dtype="bfloat16", **common)
  with pytest.raises(ValueError, match=r"eval_qa\.dtype='fp8'"):
    qa.eval_qa(dtype="fp8", **common)
