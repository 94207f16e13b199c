r"""The one chat / prompt template of the project: InstructRetro's SFT and QA strings.

Every prompt the project builds (instruction tuning, zero-shot QA, the demo's chat)
comes from ``render_prompt``; the strings are Megatron-LM's InstructRetro ones
(``tools/retro/sft/dataset_conv.py``: ``reformat_prompt_retro`` for SFT,
``reformat_prompt`` for evaluation), so a released InstructRetro checkpoint sees the
prompts it was tuned on.

A conversation is a list of messages ``{"role": ..., "content": ...}`` with roles
``system`` (optional, first only), then ``user`` and ``assistant`` alternating, starting
with ``user``. It renders as::

    System: {system}\n\n                      (default: SFT_SYSTEM)
    {passage 1}\n\n{passage 2}\n\n ...          (optional context passages)
    User: {user 1}\n\nAssistant: {assistant 1}\n\nUser: {user 2}\n\nAssistant:{prefix}

and the answer (the final assistant turn, the only text the loss covers) is
``" " + content`` (Megatron's ``format_answer``). Earlier turns are context, joined with
``"\n\n"`` exactly as Megatron's conversational sets store them in their ``question``
field. ``prefix`` is ``""`` for chat and ``" The answer is"`` for short-answer QA:

    SFT short-answer QA   ... User: {q} Answer the above question with a short phrase.
                          \n\nAssistant: The answer is     + " {answer}"
    zero-shot QA (eval)   System: ...based on the context...\n\n
                          title: {t}, source: {text}\n\n ... (top passages)
                          User: Answer the following question with a short span. {q}
                          \n\nAssistant: The answer is

    prompt, answer = render_example([{"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Hello!"}])
    text = qa_prompt("Who wrote Hamlet?", [{"title": "Hamlet", "text": "..."}])
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol, Sequence

ROLES = ("system", "user", "assistant")

# The system sentence of Retro SFT (reformat_prompt_retro).
SFT_SYSTEM = ("This is a chat between a user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's "
              "questions.")
# The system sentence of QA evaluation (reformat_prompt, template 0).
QA_SYSTEM = ("This is a chat between a user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's "
             "questions based on the context. The assistant should also indicate when "
             "the answer cannot be found in the context.")
# Short-span QA in SFT: appended to the question; the assistant turn starts with it.
SHORT_ANSWER_INSTRUCTION = "Answer the above question with a short phrase."
SHORT_ANSWER_PREFIX = " The answer is"
# Short-span QA at evaluation: put before the question.
QA_EVAL_INSTRUCTION = "Answer the following question with a short span."

TURN_SEPARATOR = "\n\n"
Message = Mapping[str, str]


class TextTokenizer(Protocol):
  """What prompt truncation needs (``sentencepiece.SentencePieceProcessor`` fits)."""

  def encode(self, text: str) -> Sequence[int]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...


def format_passage(passage: Any) -> str:
  """A context passage: ``{"title", "text"}`` -> ``"title: {t}, source: {text}"``;
  a string is taken as already formatted."""
  if isinstance(passage, str):
    return passage
  if isinstance(passage, Mapping) and "text" in passage:
    return f"title: {passage.get('title') or ''}, source: {passage['text']}"
  raise ValueError(f"a passage must be a string or a mapping with 'text' (and "
                   f"'title'); got {passage!r:.80}")


def validate_messages(messages: Sequence[Message], *, where: str = "messages",
                      final_role: Optional[str] = None) -> list[dict[str, str]]:
  """Checks roles, contents and turn order; returns plain ``{role, content}`` dicts.

  Args:
    messages: The conversation.
    where: Names the record in errors (e.g. ``"data/sft/chat.jsonl:12"``).
    final_role: Required role of the last message (``'assistant'`` for training
      examples, ``'user'`` for a prompt to complete), or None for either.
  Raises:
    ValueError naming ``where``, the message index and the problem.
  """
  if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
    raise ValueError(f"{where}: messages must be a list of {{role, content}} objects, "
                     f"got {type(messages).__name__}")
  out = []
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping):
      raise ValueError(f"{where}: message {i} must be an object with 'role' and "
                       f"'content', got {type(message).__name__}")
    for key in ("role", "content"):
      if key not in message:
        raise ValueError(f"{where}: message {i} has no {key!r} field (keys: "
                         f"{sorted(message)})")
    role, content = message["role"], message["content"]
    if role not in ROLES:
      raise ValueError(f"{where}: message {i} has unknown role {role!r}; expected one "
                       f"of {ROLES}")
    if not isinstance(content, str):
      raise ValueError(f"{where}: message {i} ({role}) content must be a string, got "
                       f"{type(content).__name__}")
    out.append({"role": role, "content": content})
  turns = out[1:] if out and out[0]["role"] == "system" else out
  if not turns:
    raise ValueError(f"{where}: no user turn")
  for i, message in enumerate(turns):
    expected = "user" if i % 2 == 0 else "assistant"
    if message["role"] != expected:
      index = i + (len(out) - len(turns))
      detail = ("a system message may only come first" if message["role"] == "system"
                else "user and assistant turns must alternate, starting with user")
      raise ValueError(f"{where}: message {index} is {message['role']!r} where "
                       f"{expected!r} was expected ({detail})")
  if final_role is not None and turns[-1]["role"] != final_role:
    raise ValueError(f"{where}: the last message must be the {final_role!r} turn, got "
                     f"{turns[-1]['role']!r}")
  return out


def _truncate_text(text: str, max_tokens: int, tokenizer: TextTokenizer) -> str:
  ids = list(tokenizer.encode(text))
  if len(ids) <= max_tokens:
    return text
  return tokenizer.decode(ids[:max(max_tokens, 0)])


def render_prompt(messages: Sequence[Message], *, passages: Sequence[Any] = (),
                  answer_prefix: str = "", system: Optional[str] = None,
                  max_context_tokens: Optional[int] = None,
                  tokenizer: Optional[TextTokenizer] = None,
                  where: str = "messages") -> str:
  """The prompt of a conversation that ends with a user turn (the one template).

  Args:
    messages: System (optional), then alternating user / assistant turns ending with
      the user turn to answer.
    passages: Context passages put between the system line and the turns (strings,
      or ``{"title", "text"}`` rendered by ``format_passage``).
    answer_prefix: Text after ``"Assistant:"`` that starts the answer
      (``SHORT_ANSWER_PREFIX`` for short-answer QA).
    system: System sentence if the messages have none (default ``SFT_SYSTEM``).
    max_context_tokens: With ``tokenizer``: cut the joined passages to their first
      ``max_context_tokens`` tokens (as Megatron); the separator after them is kept.
    where: Names the record in errors.
  """
  messages = validate_messages(messages, where=where, final_role="user")
  if messages[0]["role"] == "system":
    system, messages = messages[0]["content"], messages[1:]
  system = SFT_SYSTEM if system is None else system
  text = f"System: {system}{TURN_SEPARATOR}"
  if passages:
    context = TURN_SEPARATOR.join(format_passage(p) for p in passages)
    if max_context_tokens is not None:
      if tokenizer is None:
        raise ValueError("max_context_tokens needs a tokenizer")
      context = _truncate_text(context, max_context_tokens, tokenizer)
    text += context + TURN_SEPARATOR
  names = {"user": "User", "assistant": "Assistant"}
  turns = [f"{names[m['role']]}: {m['content']}" for m in messages]
  return text + TURN_SEPARATOR.join(turns) + f"{TURN_SEPARATOR}Assistant:{answer_prefix}"


def render_example(messages: Sequence[Message], *, passages: Sequence[Any] = (),
                   answer_prefix: str = "", system: Optional[str] = None,
                   where: str = "messages") -> tuple[str, str]:
  """``(prompt, answer)`` of a training conversation that ends with an assistant turn.

  The answer is ``" " + final assistant content``; ``prompt + answer`` is the text the
  model reads, and only the answer (plus EOS) is trained on.
  """
  messages = validate_messages(messages, where=where, final_role="assistant")
  prompt = render_prompt(messages[:-1], passages=passages, answer_prefix=answer_prefix,
                         system=system, where=where)
  return prompt, " " + messages[-1]["content"]


def short_answer_messages(question: str, answer: Optional[str] = None
                          ) -> list[dict[str, str]]:
  """The SFT short-answer QA turn: ``"{q} Answer the above question with a short
  phrase."`` (render with ``answer_prefix=SHORT_ANSWER_PREFIX``)."""
  messages = [{"role": "user", "content": f"{question} {SHORT_ANSWER_INSTRUCTION}"}]
  if answer is not None:
    messages.append({"role": "assistant", "content": answer})
  return messages


def qa_prompt(question: str, passages: Sequence[Any] = (), *, num_passages: int = 5,
              system: str = QA_SYSTEM, max_context_tokens: Optional[int] = None,
              tokenizer: Optional[TextTokenizer] = None,
              max_prompt_tokens: Optional[int] = None) -> str:
  """InstructRetro's zero-shot QA prompt (NQ, TriviaQA): top passages, then the turn.

  Args:
    question: The question.
    passages: Retrieved passages, best first: ``{"title", "text"}`` mappings (rendered
      ``"title: {t}, source: {text}"``) or preformatted strings.
    num_passages: How many passages to put in the prompt (Megatron's ft_neighbours).
    system: The system sentence (default: the evaluation one, ``QA_SYSTEM``).
    max_context_tokens, tokenizer: Optionally cut the passages to fit a budget.
    max_prompt_tokens: With ``tokenizer``: Megatron's rule (``dataset_conv.
      reformat_prompt``) for a prompt of at most this many tokens. The context (the
      passages joined by ``"\n\n"``, plus the ``"\n\n"`` after them) is tokenised,
      cut to ``max_prompt_tokens`` minus the tokens of the system line and of the
      user turn, and replaced by the detokenisation of what is left (also when
      nothing is cut; a cut context loses its final ``"\n\n"``). Megatron passes
      ``seq_length - out_seq_length`` (4096 - 256).
  Returns:
    ``"System: ...\n\n{passages}\n\nUser: Answer the following question with a short
    span. {question}\n\nAssistant: The answer is"``; the model continues with the answer.
  """
  if num_passages < 0:
    raise ValueError(f"num_passages must be >= 0, got {num_passages}")
  messages = [{"role": "user", "content": f"{QA_EVAL_INSTRUCTION} {question}"}]
  chosen = list(passages)[:num_passages]
  if max_prompt_tokens is None:
    return render_prompt(messages, passages=chosen, answer_prefix=SHORT_ANSWER_PREFIX,
                         system=system, max_context_tokens=max_context_tokens,
                         tokenizer=tokenizer)
  if tokenizer is None or max_context_tokens is not None:
    raise ValueError("max_prompt_tokens needs a tokenizer (and no max_context_tokens)")
  # The same template without passages: system line + user turn.
  bare = render_prompt(messages, answer_prefix=SHORT_ANSWER_PREFIX, system=system)
  head = f"System: {system}{TURN_SEPARATOR}"
  turn = bare[len(head):]
  if not chosen:
    return bare
  context = TURN_SEPARATOR.join(format_passage(p) for p in chosen) + TURN_SEPARATOR
  budget = (max_prompt_tokens - len(tokenizer.encode(head))
            - len(tokenizer.encode(turn)))
  ids = list(tokenizer.encode(context))[:max(budget, 0)]
  return head + tokenizer.decode(ids) + turn
