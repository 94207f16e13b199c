"""Chat template (InstructRetro strings), instruction readers, SFT tokens and loss masks."""

import json

import numpy as np
import pytest

from retro_jax.data import chat
from retro_jax.data import instructions
from retro_jax.data import sources
from retro_jax.data import vocab as vocab_lib

SYSTEM = ("System: This is a chat between a user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's "
          "questions.\n\n")


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  """A small SentencePiece model trained on the shipped instruction data."""
  texts = []
  for name in ("chat.jsonl", "prompt_response.jsonl", "qa.jsonl"):
    with open(instructions.shipped_data_path("sft", name), encoding="utf-8") as f:
      texts += [line for line in f]
  prefix = str(tmp_path_factory.mktemp("spm") / "spm")
  return vocab_lib.train_sentencepiece(texts, prefix, vocab_size=700, num_threads=1)


@pytest.fixture(scope="module")
def processor(spm_model):
  return vocab_lib.load_sentencepiece(spm_model)


def test_single_turn_is_megatron_retro_sft_format():
  prompt, answer = chat.render_example([{"role": "user", "content": "Name a red fruit."},
                                        {"role": "assistant", "content": "A strawberry."}])
  assert prompt == SYSTEM + "User: Name a red fruit.\n\nAssistant:"
  assert answer == " A strawberry."


def test_multi_turn_joins_turns_and_uses_a_given_system():
  messages = [{"role": "system", "content": "You are terse."},
              {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
  prompt, answer = chat.render_example(messages, passages=["p1", {"title": "T", "text": "x"}])
  assert prompt == ("System: You are terse.\n\np1\n\ntitle: T, source: x\n\n"
                    "User: Hi\n\nAssistant: Hello.\n\nUser: 2+2?\n\nAssistant:")
  assert answer == " 4"


def test_short_answer_qa_and_zero_shot_eval_prompts():
  prompt, answer = chat.render_example(chat.short_answer_messages("Who wrote Emma?",
                                                                  "Jane Austen"),
                                       answer_prefix=chat.SHORT_ANSWER_PREFIX)
  assert prompt == (SYSTEM + "User: Who wrote Emma? Answer the above question with a short "
                    "phrase.\n\nAssistant: The answer is")
  assert prompt + answer == prompt + " Jane Austen"
  passages = [{"title": f"t{i}", "text": f"s{i}"} for i in range(7)]
  text = chat.qa_prompt("who wrote emma", passages, num_passages=2)
  assert text == ("System: This is a chat between a user and an artificial intelligence "
                  "assistant. The assistant gives helpful, detailed, and polite answers to "
                  "the user's questions based on the context. The assistant should also "
                  "indicate when the answer cannot be found in the context.\n\n"
                  "title: t0, source: s0\n\ntitle: t1, source: s1\n\n"
                  "User: Answer the following question with a short span. who wrote emma"
                  "\n\nAssistant: The answer is")
  assert chat.qa_prompt("q", []).endswith("questions based on the context. The assistant "
                                          "should also indicate when the answer cannot be "
                                          "found in the context.\n\nUser: Answer the "
                                          "following question with a short span. q\n\n"
                                          "Assistant: The answer is")


def test_context_truncation_keeps_the_first_passage_tokens(processor):
  long = {"title": "Long", "text": "word " * 400}
  text = chat.qa_prompt("q?", [long], max_context_tokens=20, tokenizer=processor)
  context = text.split("\n\n")[1]
  assert context.startswith("title: Long, source: word")
  assert len(processor.encode(context)) <= 20
  assert text.endswith("User: Answer the following question with a short span. q?\n\n"
                       "Assistant: The answer is")


@pytest.mark.parametrize("messages,error", [
    ([{"role": "robot", "content": "x"}], "message 0 has unknown role 'robot'"),
    ([{"role": "user"}], "message 0 has no 'content' field"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "message 1 is 'user' where 'assistant' was expected"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
     "system message may only come first"),
    ([{"role": "system", "content": "s"}], "no user turn"),
])
def test_bad_conversations_are_named(messages, error):
  with pytest.raises(ValueError, match=error):
    chat.validate_messages(messages, where="f.jsonl:3")


def _write(path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path)


def test_reader_errors_name_file_and_line(tmp_path):
  good = json.dumps({"messages": [{"role": "user", "content": "a"},
                                  {"role": "assistant", "content": "b"}]})
  bad_role = json.dumps({"messages": [{"role": "user", "content": "a"},
                                      {"role": "bot", "content": "b"}]})
  path = _write(tmp_path / "chat.jsonl", [good, "", bad_role])
  with pytest.raises(ValueError, match=r"chat.jsonl:3: message 1 has unknown role 'bot'"):
    instructions.read_sft(path)
  path = _write(tmp_path / "pr.jsonl", [json.dumps({"prompt": "p", "response": "r"}),
                                        json.dumps({"prompt": "p"})])
  with pytest.raises(ValueError, match=r"pr.jsonl:2: missing field 'response'"):
    instructions.read_sft(path)
  path = _write(tmp_path / "qa.jsonl", [json.dumps({"question": "q"})])
  with pytest.raises(ValueError, match=r"qa.jsonl:1: missing field 'answer' or 'answers'"):
    instructions.read_sft(path)
  path = _write(tmp_path / "broken.jsonl", [good, "{not json"])
  with pytest.raises(ValueError, match=r"broken.jsonl:2: invalid JSON"):
    instructions.read_sft(path, "chat")
  path = _write(tmp_path / "last.jsonl", [json.dumps({"messages": [
      {"role": "user", "content": "a"}]})])
  with pytest.raises(ValueError, match=r"last.jsonl:1: the last message must be the "
                     r"'assistant' turn"):
    instructions.read_sft(path)


def test_readers_of_each_layout(tmp_path):
  path = _write(tmp_path / "pr.jsonl", [json.dumps({"instruction": "Say hi", "output": "Hi",
                                                    "system": "Be kind."})])
  [example] = instructions.read_sft(path, "prompt_response", prompt_key="instruction",
                                    response_key="output")
  assert example.render() == ("System: Be kind.\n\nUser: Say hi\n\nAssistant:", " Hi")
  megatron = tmp_path / "nq_QA_train.json"
  megatron.write_text(json.dumps([
      {"question": "q1", "answer": "a1", "sub-paragraphs": "some text"},
      {"question": "q2", "answers": [{"text": " a2 "}, "b2"]}]))
  first, second = instructions.read_sft(str(megatron))
  assert first.passages == ("title: , source: some text",)
  assert first.render()[0].endswith("some text\n\nUser: q1 Answer the above question with a "
                                    "short phrase.\n\nAssistant: The answer is")
  assert second.render()[1] == " a2"


def test_shipped_data_parses_and_renders():
  counts = {}
  for name, kind in (("chat.jsonl", "chat"), ("prompt_response.jsonl", "prompt_response"),
                     ("qa.jsonl", "qa")):
    path = instructions.shipped_data_path("sft", name)
    assert instructions.detect_format(path) == kind
    examples = instructions.read_sft(path)
    counts[kind] = len(examples)
    for example in examples:
      prompt, answer = example.render()
      assert prompt.startswith("System: ") and answer.startswith(" ") and answer.strip()
  assert sum(counts.values()) >= 250 and min(counts.values()) >= 40, counts
  multi = [e for e in instructions.read_sft("data/sft/chat.jsonl")
           if sum(m["role"] == "user" for m in e.messages) > 1]
  assert len(multi) >= 15
  with_context = [e for e in instructions.read_sft("data/sft/qa.jsonl") if e.passages]
  assert 20 <= len(with_context) < counts["qa"]
  qa = instructions.read_qa_examples(instructions.shipped_data_path("qa", "sample.jsonl"))
  assert len(qa) >= 20 and all(e.answers and len(e.ctxs) == 3 for e in qa)
  # The gold answer is in one of the passages of every sample record.
  for e in qa:
    assert any(a.lower() in c["text"].lower() for a in e.answers for c in e.ctxs), e.question
    assert e.prompt(num_passages=3).endswith(f"short span. {e.question}\n\nAssistant: The "
                                             "answer is")


def _decode(processor, ids):
  return processor.decode([int(t) for t in ids])


def test_loss_weights_cover_exactly_the_last_answer_and_eos(processor):
  examples = (instructions.read_sft("data/sft/chat.jsonl")
              + instructions.read_sft("data/sft/qa.jsonl")[:20])
  checked = 0
  for example in examples:
    prompt, answer = example.render()
    tokens, weights, prompt_len = instructions.encode_sft(prompt, answer, processor, 4096)
    on = np.flatnonzero(weights)
    assert on[0] == prompt_len and on[-1] == len(tokens) - 1
    assert np.array_equal(on, np.arange(prompt_len, len(tokens)))
    assert tokens[-1] == processor.eos_id()
    assert _decode(processor, tokens[on[:-1]]) == example.answer
    assert _decode(processor, tokens[:prompt_len]) == prompt
    if sum(m["role"] == "assistant" for m in example.messages) > 1:
      earlier = example.messages[-3]["content"]  # an earlier assistant turn: context only
      assert earlier in _decode(processor, tokens[:prompt_len])
    checked += 1
  assert checked > 60


def test_long_prompts_are_truncated_from_the_left(processor):
  messages = [{"role": "user", "content": "old " * 300}, {"role": "assistant", "content": "ok"},
              {"role": "user", "content": "What is the capital of Peru?"},
              {"role": "assistant", "content": "Lima is the capital of Peru."}]
  prompt, answer = chat.render_example(messages)
  tokens, weights, prompt_len = instructions.encode_sft(prompt, answer, processor, 65)
  assert len(tokens) == 65
  assert _decode(processor, tokens[weights > 0][:-1]) == "Lima is the capital of Peru."
  full = processor.encode(prompt)
  assert list(tokens[:prompt_len]) == full[len(full) - prompt_len:]   # the prompt's tail
  assert _decode(processor, tokens[:prompt_len]).endswith(
      "User: What is the capital of Peru?\n\nAssistant:")
  # An answer longer than n is cut on the right (no EOS) and keeps one prompt token.
  long = chat.render_example([{"role": "user", "content": "Count."},
                              {"role": "assistant", "content": "one two " * 100}])
  tokens, weights, prompt_len = instructions.encode_sft(*long, processor, 33)
  assert len(tokens) == 33 and prompt_len == 1 and weights[1:].all()
  assert tokens[-1] != processor.eos_id()


def test_sft_source_has_no_neighbors_unless_a_retriever_is_given(spm_model, processor):
  records = instructions.read_sft("data/sft/qa.jsonl")
  records = [r for r in records if r.passages][:6]
  plain = sources.SFTSource(records, spm_model, seq_len=256, chunk_length=32, num_neighbors=2)
  feats = plain.examples(np.arange(6))
  assert feats["targets"].shape == (6, 257) and feats["neighbor_tokens"].shape == (6, 8, 2, 64)
  assert not feats["neighbor_mask"].any() and not feats["neighbor_tokens"].any()
  assert np.all(feats["loss_weights"][feats["targets"] == plain.pad_id] == 0)

  calls = []

  def retriever(chunks):
    calls.append(np.array(chunks))
    c = len(chunks)
    return (np.tile(chunks[:, None, :], (1, 2, 2)), np.ones((c, 2), bool), None)

  live = sources.SFTSource(records, spm_model, seq_len=256, chunk_length=32, num_neighbors=2,
                           retriever=retriever)
  feats = live.examples(np.arange(6))
  assert len(calls) == 1                        # one search for the whole batch
  queried = []
  for row in range(6):
    tokens, weights, prompt_len = live.encode(row)
    complete = prompt_len // 32
    assert complete >= 1
    np.testing.assert_array_equal(feats["neighbor_mask"][row].all(-1),
                                  np.arange(8) < complete)
    query = tokens[:complete * 32].reshape(complete, 32)
    queried.append(query)
    # Each chunk's neighbors are the ones retrieved for that chunk (the fake retriever
    # echoes its query), and no retrieved chunk contains an answer token.
    np.testing.assert_array_equal(feats["neighbor_tokens"][row, :complete, 1, 32:], query)
    assert not feats["neighbor_tokens"][row, complete:].any()
    assert weights[:complete * 32].sum() == 0
  np.testing.assert_array_equal(calls[0], np.concatenate(queried))
