"""Chat templates: the model's own, ChatML, the reasoning template, CS336's r1-zero prompt, or a Jinja file.

`apply_chat_template(tokenizer, name, system_prompt)` sets `tokenizer.chat_template` and returns
its text. The data pipeline uses `resolve_template` (the same text, tokenizer untouched), renders
every row with it and records it in the prepared dataset's metadata
(`PreparedDataset.chat_template`), so the trainer saves the same template with the tokenizer.

Names:
  - `model`: the tokenizer's own template (UserError if it has none);
  - `chatml`: `<|im_start|>role\\ncontent<|im_end|>\\n` turns, as Qwen2.5 renders them, without a
    default system turn (unless --system-prompt gives one);
  - `reasoning`: ChatML whose first turn is always a system turn (the reasoning system prompt
    unless the conversation or --system-prompt gives another), and whose generation prompt opens
    the assistant turn with `<start_working_out>`, so the model goes straight into its working;
  - `r1-zero`: the r1_zero prompt of Stanford CS336 (assignment 5), no ChatML:
    `{instruction}\nUser: {question}\nAssistant: <think>` with R1_ZERO_INSTRUCTION (or the system
    turn, or --system-prompt) as the instruction; an assistant turn renders as
    `Assistant: <think>{content}{eos}` (`<think>` is not repeated when the content starts with it).
    The model answers `... </think> <answer> ... </answer>`. Chosen only by name, never by `auto`;
    rows then get R1_ZERO_INSTRUCTION as their system turn (`effective_system_prompt`), not the
    reasoning system prompt the math formats give by default;
  - a path to a Jinja file;
  - `auto`: `reasoning` for the math formats (openmath-reasoning, dapo-math, gsm8k) and --task
    math, else the model's own, else `chatml`.

The ChatML and reasoning templates wrap each assistant turn's content and its closing
`<|im_end|>` in `{% generation %}` markers, so `apply_chat_template(...,
return_assistant_tokens_mask=True)` (and TRL's assistant_only_loss) work with them too. The
pipeline itself does not depend on the markers (see `opensloth.data.sft_rows`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from opensloth.errors import UserError

TEMPLATE_NAMES = ("auto", "model", "chatml", "reasoning", "r1-zero")
MATH_FORMATS = ("openmath-reasoning", "dapo-math", "gsm8k", "question-answer")

WORK_START, WORK_END = "<start_working_out>", "<end_working_out>"
SOLUTION_START, SOLUTION_END = "<SOLUTION>", "</SOLUTION>"
# Short on purpose: a byte-level tiny model pays one token per character.
REASONING_SYSTEM_PROMPT = (
    f"Reason step by step between {WORK_START} and {WORK_END}, "
    f"then give only the final answer between {SOLUTION_START} and {SOLUTION_END}."
)

# CS336 assignment 5's cs336_alignment/prompts/r1_zero.prompt is
#   R1_ZERO_INSTRUCTION + "\nUser: {question}\nAssistant: <think>"
THINK_START, THINK_END = "<think>", "</think>"
ANSWER_START, ANSWER_END = "<answer>", "</answer>"
R1_ZERO_INSTRUCTION = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with the "
    "answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>."
)

_TURNS = (
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
)


def _jinja_string(text: str) -> str:
    """A Jinja string literal for `text` (JSON escapes are valid Jinja escapes)."""
    return json.dumps(text, ensure_ascii=True)


def chatml_template(system_prompt: str | None = None) -> str:
    """ChatML; with `system_prompt`, conversations without a system turn get this one first."""
    head = "{%- set loop_messages = messages %}"
    if system_prompt:
        head += (
            "{%- if not messages or messages[0]['role'] != 'system' %}"
            "{{- '<|im_start|>system\\n' + " + _jinja_string(system_prompt) + " + '<|im_end|>\\n' }}"
            "{%- endif %}"
        )
    return head + _TURNS + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"


def reasoning_template(system_prompt: str | None = None) -> str:
    """ChatML with a system turn first (default: REASONING_SYSTEM_PROMPT); the generation prompt
    is `<|im_start|>assistant\\n<start_working_out>`."""
    system = _jinja_string(system_prompt or REASONING_SYSTEM_PROMPT)
    head = (
        "{%- if messages and messages[0]['role'] == 'system' %}"
        "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
        "{%- set loop_messages = messages[1:] %}"
        "{%- else %}"
        "{{- '<|im_start|>system\\n' + " + system + " + '<|im_end|>\\n' }}"
        "{%- set loop_messages = messages %}"
        "{%- endif %}"
    )
    return head + _TURNS + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n" + WORK_START + "' }}{%- endif %}"


def r1_zero_template(system_prompt: str | None = None) -> str:
    """CS336's r1_zero prompt as a chat template: the instruction (a leading system turn, else
    `system_prompt`, else R1_ZERO_INSTRUCTION), then `\nUser: ...` and `\nAssistant: <think>...` turns;
    the generation prompt is `\nAssistant: <think>`. Only system (first), user and assistant turns."""
    instruction = _jinja_string(system_prompt or R1_ZERO_INSTRUCTION)
    return (
        "{%- if messages and messages[0]['role'] == 'system' %}"
        "{{- messages[0]['content'] }}"
        "{%- set loop_messages = messages[1:] %}"
        "{%- else %}"
        "{{- " + instruction + " }}"
        "{%- set loop_messages = messages %}"
        "{%- endif %}"
        "{%- for message in loop_messages %}"
        "{%- if message['role'] == 'user' %}"
        "{{- '\\nUser: ' + message['content'] }}"
        "{%- elif message['role'] == 'assistant' %}"
        "{{- '\\nAssistant: ' }}"
        "{%- if not message['content'].startswith('" + THINK_START + "') %}{{- '" + THINK_START + "' }}{%- endif %}"
        "{%- generation %}{{- message['content'] }}{%- if eos_token %}{{- eos_token }}{%- endif %}{%- endgeneration %}"
        "{%- else %}"
        "{{- raise_exception('the r1-zero template renders a first system turn, then user and assistant turns; got a '"
        " + message['role'] + ' turn') }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '\\nAssistant: " + THINK_START + "' }}{%- endif %}"
    )


def effective_system_prompt(template: str | None, system_prompt: str | None) -> str | None:
    """The system turn rows get: --system-prompt when given, else r1-zero's instruction for that template
    (so the math formats do not add the reasoning system prompt to it), else None (the format's default)."""
    if system_prompt is not None:
        return system_prompt
    return R1_ZERO_INSTRUCTION if template == "r1-zero" else None


def resolve_template_name(name: str, data_format: str | None = None, task: str | None = None,
                          tokenizer: Any = None) -> str:
    """`auto` -> reasoning (math formats, --task math), model (it has a template) or chatml."""
    if name != "auto":
        return name
    if data_format in MATH_FORMATS or task == "math":
        return "reasoning"
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return "model"
    return "chatml"


def template_text(tokenizer: Any, name: str, system_prompt: str | None = None) -> str:
    """The Jinja text of template `name` (not `auto`: see resolve_template_name) for `tokenizer`.

    Raises:
        UserError: `model` for a tokenizer without a template; a path that is not a readable file;
            an unknown name.
    """
    if name == "chatml":
        return chatml_template(system_prompt)
    if name == "reasoning":
        return reasoning_template(system_prompt)
    if name == "r1-zero":
        return r1_zero_template(system_prompt)
    if name == "model":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        if not own:
            raise UserError(
                f"--chat-template model: the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')} has no "
                "chat template. Use --chat-template chatml, reasoning, r1-zero, or a path to a Jinja file."
            )
        return own
    path = Path(name).expanduser()
    if path.is_file():
        text = path.read_text()
        if not text.strip():
            raise UserError(f"--chat-template {name}: the file is empty. Give a Jinja chat template file.")
        return text
    if name.endswith((".jinja", ".j2", ".jinja2", ".txt")) or "/" in name:
        raise UserError(f"--chat-template {name}: no such file. Give an existing Jinja file, or one of "
                        f"{', '.join(TEMPLATE_NAMES)}.")
    raise UserError(f"--chat-template {name!r} is not a template name or a file. Choose one of "
                    f"{', '.join(TEMPLATE_NAMES)}, or a path to a Jinja file.")


def apply_chat_template(tokenizer: Any, name: str = "auto", system_prompt: str | None = None, *,
                        data_format: str | None = None, task: str | None = None,
                        variables: dict[str, Any] | None = None) -> str:
    """Set `tokenizer.chat_template` to the chosen template and return its text.

    Args:
        tokenizer: a Hugging Face tokenizer (modified in place).
        name: auto, model, chatml, reasoning, r1-zero, or a path to a Jinja file.
        system_prompt: default system turn for chatml/reasoning (a model's own or a file's
            template is used as is; the pipeline then adds the system turn to each row).
        data_format, task: steer `auto` (see resolve_template_name).
        variables: --chat-template-kwargs, set at the template's top (with_template_variables).

    Example:
        >>> apply_chat_template(tok, "reasoning")  # doctest: +SKIP
        >>> tok.apply_chat_template([{"role": "user", "content": "1+1?"}], tokenize=False,
        ...                         add_generation_prompt=True)  # doctest: +SKIP
        '<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n1+1?<|im_end|>\\n<|im_start|>assistant\\n<start_working_out>'
    """
    text = resolve_template(tokenizer, name, system_prompt, data_format=data_format, task=task, variables=variables)
    tokenizer.chat_template = text
    return text


def resolve_template(tokenizer: Any, name: str = "auto", system_prompt: str | None = None, *,
                     data_format: str | None = None, task: str | None = None,
                     variables: dict[str, Any] | None = None) -> str:
    """The text `apply_chat_template` would set, without modifying the tokenizer; with `variables`
    (--chat-template-kwargs) set at its top (`with_template_variables`)."""
    text = template_text(tokenizer, resolve_template_name(name, data_format, task, tokenizer), system_prompt)
    return with_template_variables(text, variables or {})


def with_template_variables(template: str, variables: dict[str, Any]) -> str:
    """`template` with each variable set at its top, as `apply_chat_template(..., **variables)` would pass it.

    TRL passes chat_template_kwargs at each call; set in the template itself, they reach every render
    (data prep, eval, generate) and stay with the saved model, so it is exported as it was trained.
    A `{% set %}` at the top wins over a variable passed at call time.

    Example:
        >>> with_template_variables("{{ enable_thinking }}", {"enable_thinking": False})
        '{%- set enable_thinking = false %}\\n{{ enable_thinking }}'
    """
    if not variables:
        return template
    lines = [f"{{%- set {name} = {_jinja_literal(value)} %}}" for name, value in variables.items()]
    return "\n".join([*lines, template])


def _jinja_literal(value: Any) -> str:
    """A JSON scalar as a Jinja literal: true/false/none, numbers, double-quoted strings."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False,
           chat_template: str | None = None) -> str:
    """Render `messages` with `chat_template` (default: the tokenizer's); template errors become UserErrors."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             chat_template=chat_template)
    except Exception as exc:  # noqa: BLE001 - jinja2 errors, raise_exception() calls in templates
        raise UserError(f"The chat template failed on a conversation ({type(exc).__name__}: {exc}). "
                        "Check --chat-template (or the model's template) against your rows' roles.") from None
