"""Row formats: turn one source row into a conversation (SFT) or a prompt and its answer (GRPO).

SFT formats (each gives a list of chat messages, or plain text):
  - `chat`: a `messages` column ([{"role", "content"}, ...]); ShareGPT `conversations`
    ([{"from": "human"|"gpt"|"system", "value"}]) is accepted too; `tool` messages are kept, a
    message with `tool_calls` is refused (only text content is trained on);
  - `prompt-completion`: `prompt` and `completion`, strings (-> one user and one assistant turn)
    or message lists (prompt messages, then completion messages);
  - `text`: a `text` column, trained on as is (every token counts, no chat template);
  - `openmath-reasoning`: `problem`, `generated_solution`, `expected_answer` (the schema of
    unsloth/OpenMathReasoning-mini) -> system: the reasoning prompt, user: the problem, assistant:
    `<start_working_out>{solution}<end_working_out><SOLUTION>{answer}</SOLUTION>`
    (`<think>` tags in the solution are removed).

GRPO formats (each gives the prompt messages and the reference answer):
  - `dapo-math`: `prompt` (the problem text) and `solution` (the answer), as in
    open-r1/DAPO-Math-17k-Processed (config "en");
  - `gsm8k`: `question` and `answer` whose last line is `#### n` -> answer n (commas dropped);
    the full original answer is kept as `reference_solution`;
  - `question-answer`: `question` (or `problem`) and a plain `answer`, taken as it is (the math
    prompt sets of Stanford CS336, MATH). Detection: `question` + `answer` columns are gsm8k when
    some answer holds `####` (the caller checks, see `rows.detect_source_format`), else question-answer;
  - `prompt-answer`: `prompt` (text or messages) and `answer`; a dataset without an `answer`
    column (e.g. code tasks, whose rewards read a `tests` column) gets answer None.
The math formats start the conversation with the reasoning system prompt (or --system-prompt; with
--chat-template r1-zero, CS336's instruction: see `templates.effective_system_prompt`).

A row that does not fit (missing value, wrong type, empty text) raises `BadRow` with what is
wrong; the caller adds the row index and stops, or drops it under --skip-bad-rows.
"""

from __future__ import annotations

from typing import Any

from opensloth.data.templates import (
    REASONING_SYSTEM_PROMPT,
    SOLUTION_END,
    SOLUTION_START,
    WORK_END,
    WORK_START,
)
from opensloth.errors import UserError

Messages = list[dict[str, str]]

SFT_COLUMNS: dict[str, tuple[str, ...]] = {
    "openmath-reasoning": ("problem", "generated_solution", "expected_answer"),
    "chat": ("messages",),
    "prompt-completion": ("prompt", "completion"),
    "text": ("text",),
}
GRPO_COLUMNS: dict[str, tuple[str, ...]] = {
    "gsm8k": ("question", "answer"),
    "question-answer": ("question", "answer"),  # or problem + answer
    "dapo-math": ("prompt", "solution"),
    "prompt-answer": ("prompt",),  # `answer` too when there is one (code tasks have `tests` instead)
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool"}


class BadRow(ValueError):
    """A row that does not fit its format; the message says what is wrong (no row index)."""


# ---------------------------------------------------------------------------------------------
# Choosing and checking the format
# ---------------------------------------------------------------------------------------------


def _format_table(recipe: str) -> dict[str, tuple[str, ...]]:
    return SFT_COLUMNS if recipe == "sft" else GRPO_COLUMNS


def _has(fmt: str, columns: set[str], recipe: str) -> bool:
    if fmt == "chat":
        return "messages" in columns or "conversations" in columns
    if fmt == "question-answer":
        return "answer" in columns and ("question" in columns or "problem" in columns)
    return set(_format_table(recipe)[fmt]) <= columns


def detect_format(columns: list[str], recipe: str, option: str = "--dataset") -> str:
    """The first format (most specific first) whose columns the dataset has.

    Raises:
        UserError: no format fits; lists the dataset's columns and what each format needs.
    """
    for fmt in _format_table(recipe):
        if _has(fmt, set(columns), recipe):
            return fmt
    raise UserError(f"{option}: cannot tell the row format from its columns ({', '.join(columns) or 'none'}). "
                    f"{_needs(recipe)} Rename the columns or pass --format.")


def check_columns(fmt: str, columns: list[str], recipe: str, option: str = "--dataset") -> None:
    """Raise a UserError naming the missing columns when `fmt` does not fit the dataset."""
    table = _format_table(recipe)
    if fmt not in table:
        raise UserError(f"--format {fmt!r} is not a {recipe} format; choose one of {', '.join(table)}.")
    if not _has(fmt, set(columns), recipe):
        need = {"chat": "messages (or conversations)", "question-answer": "question (or problem), answer"}.get(
            fmt, ", ".join(table[fmt]))
        raise UserError(f"--format {fmt} needs the columns {need}, but {option} has: {', '.join(columns)}. "
                        f"{_needs(recipe)}")


def _needs(recipe: str) -> str:
    parts = [f"{fmt} needs {'question (or problem) + answer' if fmt == 'question-answer' else ' + '.join(cols)}"
             for fmt, cols in _format_table(recipe).items()]
    if recipe == "grpo":
        parts[-1] += " + answer (answer may be absent, e.g. for code tasks)"
    return f"{recipe} formats: " + "; ".join(parts) + "."


# ---------------------------------------------------------------------------------------------
# Value checks
# ---------------------------------------------------------------------------------------------


def _text(row: dict, column: str) -> str:
    value = row.get(column)
    if value is None:
        raise BadRow(f"column {column!r} is missing (null)")
    if not isinstance(value, str):
        raise BadRow(f"column {column!r} should be text, got {type(value).__name__} {_preview(value)}")
    if not value.strip():
        raise BadRow(f"column {column!r} is empty")
    return value


def _answer(row: dict, column: str) -> str:
    value = row.get(column)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        if value is None:
            raise BadRow(f"column {column!r} is missing (null)")
        raise BadRow(f"column {column!r} should be text or a number, got {type(value).__name__} {_preview(value)}")
    text = str(value).strip()
    if not text:
        raise BadRow(f"column {column!r} is empty")
    return text


def _messages(value: Any, column: str) -> Messages:
    """Validate a message list; ShareGPT keys (from/value) become role/content."""
    if not isinstance(value, list) or not value:
        raise BadRow(f"column {column!r} should be a non-empty list of messages, got {_preview(value)}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRow(f"message {i + 1} of {column!r} should be a {{'role', 'content'}} object, got {_preview(message)}")
        if message.get("role") is None and message.get("from") is not None:
            role = SHAREGPT_ROLES.get(str(message["from"]).lower(), str(message["from"]))
            content = message.get("value")
        else:
            role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise BadRow(f"message {i + 1} of {column!r} has no 'role'")
        if message.get("tool_calls"):  # only 'content' is kept: the calls would vanish unnoticed
            raise BadRow(f"message {i + 1} of {column!r} ({role}) has 'tool_calls', which this format does not train on (only "
                         "'content' is kept). Write each call into the content as the model should emit it "
                         "(for Qwen2.5: <tool_call>\\n{\"name\": ..., \"arguments\": ...}\\n</tool_call>)")
        if not isinstance(content, str):
            raise BadRow(f"message {i + 1} of {column!r} ({role}) should have text 'content', got {_preview(content)}")
        if not content.strip() and role != "system":
            raise BadRow(f"message {i + 1} of {column!r} ({role}) has empty content")
        out.append({"role": role, "content": content})
    return out


def _preview(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _with_system(messages: Messages, system_prompt: str | None) -> Messages:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


# ---------------------------------------------------------------------------------------------
# Formatters
# ---------------------------------------------------------------------------------------------


def reasoning_answer(solution: str, answer: str) -> str:
    """The assistant turn of the reasoning format."""
    return f"{WORK_START}{solution}{WORK_END}{SOLUTION_START}{answer}{SOLUTION_END}"


def format_sft_row(fmt: str, row: dict, system_prompt: str | None = None) -> Messages | str:
    """One source row -> chat messages (or the raw text for `text`).

    Raises:
        BadRow: the row does not fit `fmt`.
    """
    if fmt == "text":
        return _text(row, "text")
    if fmt == "openmath-reasoning":
        problem = _text(row, "problem")
        solution = _text(row, "generated_solution").replace("<think>", "").replace("</think>", "").strip()
        if not solution:
            raise BadRow("column 'generated_solution' is empty once <think> tags are removed")
        return [
            {"role": "system", "content": system_prompt or REASONING_SYSTEM_PROMPT},
            {"role": "user", "content": problem},
            {"role": "assistant", "content": reasoning_answer(solution, _answer(row, "expected_answer"))},
        ]
    if fmt == "chat":
        column = "messages" if row.get("messages") is not None or "conversations" not in row else "conversations"
        messages = _with_system(_messages(row.get(column), column), system_prompt)
    elif fmt == "prompt-completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):
            messages = _messages(prompt, "prompt") + _messages(completion, "completion")
        else:
            messages = [{"role": "user", "content": _text(row, "prompt")},
                        {"role": "assistant", "content": _text(row, "completion")}]
        messages = _with_system(messages, system_prompt)
    else:
        raise ValueError(f"unknown SFT format {fmt!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("the conversation has no assistant message, so there is nothing to train on")
    return messages


def format_grpo_row(fmt: str, row: dict, system_prompt: str | None = None,
                    default_system: bool = True) -> tuple[Messages, str | None, dict]:
    """One source row -> (prompt messages, reference answer, extra columns).

    `default_system=False` leaves out the math formats' reasoning system prompt (a prompt set written
    before any chat template is chosen: the template's own default then applies).

    Raises:
        BadRow: the row does not fit `fmt`.
    """
    extra: dict[str, Any] = {}
    if fmt == "dapo-math":
        prompt, answer = _text(row, "prompt"), _answer(row, "solution")
    elif fmt == "gsm8k":
        prompt, full = _text(row, "question"), _text(row, "answer")
        if "####" not in full:
            raise BadRow("column 'answer' has no final '#### n' line (gsm8k format; for plain answers in every "
                         "row pass --format question-answer)")
        answer = full.rsplit("####", 1)[1].strip().replace(",", "")
        if not answer:
            raise BadRow("column 'answer' has nothing after '####'")
        extra["reference_solution"] = full
    elif fmt == "question-answer":
        prompt = _text(row, "question" if "question" in row else "problem")
        answer = _answer(row, "answer")
    elif fmt == "prompt-answer":
        value = row.get("prompt")
        prompt = _messages(value, "prompt") if isinstance(value, list) else _text(row, "prompt")
        answer = _answer(row, "answer") if "answer" in row else None
    else:
        raise ValueError(f"unknown GRPO format {fmt!r}")
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if messages[-1]["role"] == "assistant":
        raise BadRow("the prompt ends with an assistant message; GRPO generates that turn")
    fallback = REASONING_SYSTEM_PROMPT if default_system and fmt in ("dapo-math", "gsm8k", "question-answer") else None
    return _with_system(messages, system_prompt or fallback), answer, extra
