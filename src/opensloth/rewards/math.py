"""Math rewards: the reasoning format, the answer (math-verify) and the number in the answer.

Two reasoning formats are read:

    <start_working_out> ... working ... <end_working_out><SOLUTION> answer </SOLUTION>   (taught by SFT)
    <think> ... </think> <answer> ... </answer>                                          (CS336's r1-zero)

The opening tag may be missing from a completion: the chat template ends the generation prompt
with it (<start_working_out>, or r1-zero's <think>), so the model never writes it.

math_answer gives math-verify what its own extraction would see (`math_verify_input`): a short
answer span with LaTeX delimiters as it is; otherwise the span's final answer, a box as
`$\boxed{...}$` and bare text as math-verify reads bare text (`_readings`). Its options are
math-verify's, with math-verify's defaults. math_number reads the same answer's number.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import math
import pickle
import re
import select
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from opensloth.rewards.base import (
    RewardFunction,
    completion_text,
    reference_answers,
    register_reward_function,
)

logger = logging.getLogger(__name__)

WORK_START, WORK_END = "<start_working_out>", "<end_working_out>"
SOLUTION_START, SOLUTION_END = "<SOLUTION>", "</SOLUTION>"
ANSWER_START, ANSWER_END = "<answer>", "</answer>"
# CS336's r1_zero_reward_fn: formatted when the response contains both of these.
R1_ZERO_MARKERS = ("</think> <answer>", "</answer>")
# End-of-turn markers a decoder may leave at the end (when special tokens are not skipped).
_END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")


# ---------------------------------------------------------------------------------------------
# Extraction helpers (pure). Every one is linear in the completion's length: a rollout can be
# 20,000 characters of unclosed tags or braces.
# ---------------------------------------------------------------------------------------------


def strip_end_markers(text: str) -> str:
    """Drop trailing whitespace and end-of-turn markers (`<|im_end|>`, `<|endoftext|>`, ...)."""
    text = text.rstrip()
    while text.endswith(_END_MARKERS):
        text = text[: -len(next(m for m in _END_MARKERS if text.endswith(m)))].rstrip()
    return text


def _last_tagged(text: str, start_tag: str, end_tag: str) -> str | None:
    """Content of the last non-empty `start_tag ... end_tag`, or None (rfind, not a regex: a lazy
    pattern is quadratic on completions full of unclosed tags)."""
    end = text.rfind(end_tag)
    while end >= 0:
        start = text.rfind(start_tag, 0, end)
        if start < 0:
            return None
        content = text[start + len(start_tag): end]
        if content.strip():
            return content.strip()
        end = text.rfind(end_tag, 0, start)
    return None


_BRACES = re.compile(r"\\boxed\s*\{|\\[{}]|[{}]")


def boxed_spans(text: str) -> list[tuple[int, int, str]]:
    r"""(start, end, content) of each outermost `\boxed{...}` (braces balanced; `\{`, `\}` are
    not braces), in order. One pass.

    >>> [c for _, _, c in boxed_spans(r"so \boxed{\frac{1}{2}} or \boxed{\{1\}}")]
    ['\\frac{1}{2}', '\\{1\\}']
    """
    spans, stack, open_boxes = [], [], 0  # stack: (box start, content start) for a \boxed{, None for a {
    for m in _BRACES.finditer(text):
        token = m.group()
        if token.startswith("\\boxed"):
            stack.append((m.start(), m.end()))
            open_boxes += 1
        elif token == "{":
            stack.append(None)
        elif token == "}" and stack:
            opened = stack.pop()
            if opened is not None:
                open_boxes -= 1
                if not open_boxes:  # outermost
                    spans.append((opened[0], m.end(), text[opened[1]: m.start()]))
    return spans


# What may stand between the boxes of one answer: "\boxed{1}, \boxed{2} and \boxed{3}",
# "$\boxed{a}$ \quad \text{and} \quad $\boxed{b}$".
_CONNECTOR = re.compile(r"(?:\s|[,;&~]|\$|\\[()\[\]]|\\(?:quad|qquad|[,;: ])|\\text\w*\s*\{[^{}]{0,40}\}"
                        r"|\band\b|\bor\b)*", re.IGNORECASE)


def _boxed_run(text: str) -> tuple[int, str] | None:
    """(start, answer) of the last `\\boxed{}` together with the boxes just before it that only
    connectors separate from it (one answer in several boxes: their contents joined by commas)."""
    spans = boxed_spans(text)
    if not spans:
        return None
    run = [spans[-1]]
    for span in reversed(spans[:-1]):
        if not _CONNECTOR.fullmatch(text[span[1]: run[0][0]]):
            break
        run.insert(0, span)
    contents = [c.strip() for _, _, c in run if c.strip()]
    return (run[-1][0], ", ".join(contents)) if contents else None


# "Answer: X" / "Final Answer: X" on a line of its own (DAPO-Math's prompts ask for the first
# as the last line), markdown bold allowed; and "the (final) answer is X" anywhere in a line.
_ANSWER_LINE = re.compile(r"^[ \t>*_#]*(?:final[ \t]+)?answer[ \t*_]*:[ \t*_]*(\S[^\n]*)$",
                          re.IGNORECASE | re.MULTILINE)
_ANSWER_IS = re.compile(r"\banswer[ \t*_]+is[ \t*_]*:?[ \t]*", re.IGNORECASE)
_HAS_MATH = re.compile(r"[\d$\\]")


def _first_sentence(text: str) -> str:
    """`text` up to the first full stop (followed by a space or the end) outside `$...$`."""
    inside = False
    for i, ch in enumerate(text):
        if ch == "$" and (i == 0 or text[i - 1] != "\\"):
            inside = not inside
        elif ch == "." and not inside and (i + 1 == len(text) or text[i + 1].isspace()):
            return text[:i]
    return text


def _answer_line(text: str) -> tuple[int, str] | None:
    """(start, X) of the last answer line: `Answer: X`, `Final Answer: X`, or "the answer is X"
    (X with a digit or LaTeX in it, up to its full stop; the last such one)."""
    best = None
    for m in _ANSWER_LINE.finditer(text):
        best = (m.start(), m.group(1).strip().strip("*_").strip())
    for m in list(_ANSWER_IS.finditer(text))[::-1][:20]:  # the last 20: bounded work on adversarial text
        if best is not None and m.start() <= best[0]:
            break
        rest = text[m.end(): m.end() + 500].split("\n", 1)[0]  # a sentence's X: at most 500 characters
        value = _first_sentence(rest).strip().strip("*_").strip()
        if _HAS_MATH.search(value):
            best = (m.start(), value)
            break
    return best if best and best[1] else None


def _tail(span: str, max_chars: int) -> str:
    """The last `max_chars` characters of a long answer span, from a line start where there is
    one, never starting inside `$...$` (math-verify reads the rightmost answer: it is there)."""
    head, tail = span[:-max_chars], span[-max_chars:]
    if len(re.findall(r"(?<!\\)\$", head)) % 2:  # the cut fell inside $...$: skip to its end
        close = re.search(r"(?<!\\)\$", tail)
        tail = tail[close.end():] if close else tail
    newline = tail.find("\n")
    return tail[newline + 1:] if 0 <= newline < len(tail) - 1 else tail


def answer_span(text: str) -> str | None:
    """Where the answer is: the last non-empty `<SOLUTION>...</SOLUTION>`, else the last
    `<answer>...</answer>` (CS336's r1-zero format), else the whole completion (end-of-turn
    markers dropped); None when that is empty."""
    text = strip_end_markers(text)
    span = _last_tagged(text, SOLUTION_START, SOLUTION_END) or _last_tagged(text, ANSWER_START, ANSWER_END)
    return (span if span is not None else text).strip() or None


def _final_in(span: str, max_chars: int | None) -> tuple[str, bool]:
    """(final answer, whether it is the content of a box) of an answer span."""
    boxed, line = _boxed_run(span), _answer_line(span)
    if boxed and (line is None or boxed[0] >= line[0]):
        return boxed[1], True
    if line:
        return line[1], False
    return (_tail(span, max_chars) if max_chars and len(span) > max_chars else span), False


def extract_final_answer(text: str, max_chars: int | None = None) -> str | None:
    r"""The final answer of a completion, or None.

    In the answer span (`answer_span`): the later of its last `\boxed{}` (with the boxes right
    before it that only `,`/`and`/`\quad` separate: contents joined by commas) and its last
    answer line (`Answer: X`, `Final Answer: X`, "the answer is X"); else the span itself. A span
    longer than `max_chars` with neither: its last `max_chars` characters.

    >>> extract_final_answer(r"<SOLUTION>work... so \boxed{7}</SOLUTION>")
    '7'
    >>> extract_final_answer(r"<think>2+2</think> <answer>\boxed{1} and \boxed{2}</answer>")
    '1, 2'
    """
    span = answer_span(text)
    return _final_in(span, max_chars)[0] if span else None


def math_verify_input(text: str, max_chars: int = 1000) -> tuple[str, bool] | None:
    r"""What math_answer gives math-verify for a completion: (text, is the content of a box), or None.

    An answer span with LaTeX delimiters (`$`, `\(`, `\[`) of at most `max_chars` characters
    goes as it is: math-verify extracts its answer as it does from any text. Otherwise its final
    answer (`extract_final_answer`). None when there is none, or when it is over `max_chars`.

    >>> math_verify_input(r"<SOLUTION>So $x = 2$, hence $2x = 4$.</SOLUTION>")
    ('So $x = 2$, hence $2x = 4$.', False)
    >>> math_verify_input("<SOLUTION>" + "a long working " * 100 + r"so \boxed{4}</SOLUTION>")
    ('4', True)
    """
    span = answer_span(text)
    if span is None:
        return None
    if len(span) <= max_chars and _DELIMITED.search(span):
        return span, False
    answer, boxed = _final_in(span, max_chars)
    return (answer, boxed) if answer and len(answer) <= max_chars else None


# ---------------------------------------------------------------------------------------------
# Numbers (math_number).
# ---------------------------------------------------------------------------------------------

# 1,234 (thousands: a first group without a leading 0), 12, 1.5, .5. A comma that is not a
# thousands separator ends the number ("-2,1" is a list in LaTeX, 1,22 a decimal comma elsewhere).
_NUMBER = re.compile(r"[-+]?(?:[1-9]\d{0,2}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def parse_number(text: Any) -> float | None:
    r"""The first number in `text` as a float, or None.

    Handles thousands separators (1,234 and LaTeX 1{,}234 or 1\,234), a sign (also the unicode
    minus), a currency sign before and units or % after (ignored).

    >>> parse_number("The total is $1,234.50 dollars")
    1234.5
    >>> parse_number("−7 cm")
    -7.0
    """
    if text is None:
        return None
    text = str(text).replace("\u2212", "-").replace("{,}", ",").replace("\\,", ",").replace("\\!", "")
    text = re.sub(r"(?<=\d) (?=\d{3}\b)", ",", text)  # "1 234" as a thousands separator
    text = re.sub(r"([-+])\s*\\?\$", r"\1", text)  # "-$5" -> "-5"
    match = _NUMBER.search(text)
    if match is None:
        return None
    return float(match.group().replace(",", ""))


# What may surround a plain number: a currency sign before; a unit, %, or \text{unit} after.
_NUMBER_PREFIX = re.compile(r"^(?:\\?\$|[€£¥])\s*")
_NUMBER_SUFFIX = re.compile(r"^(?:\\?%|\\text\{\s*[A-Za-z .%]*\}|\\?\$|[A-Za-z][A-Za-z .]*)?$")


def is_plain_number(text: Any) -> bool:
    r"""Is `text` a number and nothing more (a sign, thousands separators, a currency sign, a unit)?

    A comma that is not a thousands separator is not plain: "-2,1" is a list in LaTeX, "1,22" a
    decimal comma elsewhere (math_answer reads those as math-verify does).

    >>> [is_plain_number(t) for t in ("1,234", "$5", "12 cm", "-3.5%", r"\frac{1}{2}", r"2\sqrt{3}", "(1,2)", "-2,1")]
    [True, True, True, True, False, False, False, False]
    """
    if text is None:
        return False
    text = str(text).strip().replace("\u2212", "-").replace("{,}", ",").replace("\\,", ",").replace("\\!", "")
    text = re.sub(r"(?<=\d) (?=\d{3}\b)", ",", text)
    text = text.strip("$ ").strip()
    sign = text[:1] if text[:1] in "+-" else ""
    text = _NUMBER_PREFIX.sub("", text[len(sign):])
    match = _NUMBER.match(sign + text) if text[:1] not in "+-" else None
    if match is None:
        return False
    rest = (sign + text)[match.end():].strip()
    return not re.match(r"[eE][-+]?\d", rest) and bool(_NUMBER_SUFFIX.match(rest))


# ---------------------------------------------------------------------------------------------
# math-verify with a time limit, in the main thread or not.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyOptions:
    """math-verify's options, with its defaults (`math_verify.parse` / `math_verify.verify`).

    Attributes:
        targets: what `parse` extracts: math-verify ExtractionTarget configs, or the names
            "latex" / "expr" for their default configs; () for math-verify's default
            (LatexExtractionConfig(), ExprExtractionConfig()).
        float_rounding: decimal places numbers are rounded to before comparing (verify's 6).
        strict: variables and set/tuple types must match (verify's True).
        allow_set_relation_comp: compare a set and a relation both ways (`x \\in [a, b]` with
            `a <= x <= b`), not only when the prediction is the set (verify's False).
        time_limit_s: limit of each parse and each comparison (math-verify's 5 s).
    """

    targets: tuple = ()
    float_rounding: int = 6
    strict: bool = True
    allow_set_relation_comp: bool = False
    time_limit_s: int = 5


_TARGET_NAMES = ("latex", "expr")


def _extraction_configs(targets: tuple) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    if not targets:
        return [LatexExtractionConfig(), ExprExtractionConfig()]
    named = {"latex": LatexExtractionConfig, "expr": ExprExtractionConfig}
    return [named[t]() if isinstance(t, str) else t for t in targets]


# A math delimiter that is not escaped: $, $$, \( or \[; math-verify also reads a \boxed{} without one.
_DELIMITED = re.compile(r"(?<!\\)\$|\\\(|\\\[")
_READABLE = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed\b")
# One number and nothing more: a sign, a currency sign, thousands separators (1,000 or 1 000), a
# decimal point, a percent sign or a unit word after a space ("3x" is not one). A comma that is
# not a thousands separator ("-2,1", "1000,99") is LaTeX's list before it is a decimal comma.
_LONE_NUMBER = re.compile(r"[-+]?[€£¥₹]?\s*(?:[1-9]\d{0,2}(?:[ ,]\d{3})+|\d+)?(?:\.\d+)?(?:\s*%|\s+[A-Za-z]+)?")
# A word (three letters or more) outside LaTeX commands: prose, which math-verify reads bare.
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_SHORT_PROSE = 40


def _readings(answer: str, box: bool = False, latex: bool = True) -> list[str]:
    r"""What math-verify is given for one answer, in order of preference.

    With delimiters or a `\boxed{}`, the answer itself: math-verify extracts from it as from any
    text. The content of a box (`box=True`) as math-verify reads a box, `$\boxed{...}$` (when it
    extracts LaTeX, `latex`). Otherwise a lone number or prose first as it stands (math-verify's
    reading of "1 000", "12 cm", "34 is the largest"), then between `$...$` (prose only up to 40
    characters: "odd"); anything else first between `$...$` (`$$...$$` over several lines), then
    as it stands ("2\sqrt{3}" bare reads as 2, "1, 2" and "-2,1" as 2 and -2.1).

    >>> _readings("1 000"), _readings(r"2\sqrt{3}"), _readings("-2,1"), _readings("$x$ = 3")
    (['1 000', '$1 000$'], ['$2\\sqrt{3}$', '2\\sqrt{3}'], ['$-2,1$', '-2,1'], ['$x$ = 3'])
    >>> _readings("1,2", box=True)
    ['$\\boxed{1,2}$']
    """
    multiline = "\n" in answer
    if box and latex:
        return [f"$$\\boxed{{{answer}}}$$" if multiline else f"$\\boxed{{{answer}}}$"]
    if _READABLE.search(answer):
        return [answer]
    wrapped = f"$${answer}$$" if multiline else f"${answer}$"
    if any(c.isdigit() for c in answer) and _LONE_NUMBER.fullmatch(answer):
        return [answer, wrapped]
    if _WORD.search(re.sub(r"\\text\w*\{[^{}]*\}", " ", answer)):  # prose: between $...$ only if short
        return [answer, wrapped] if len(answer) <= _SHORT_PROSE else [answer]  # (LaTeX parsing costs ~3 ms a letter)
    return [wrapped, answer]


class _NothingFound(Exception):
    """Raised so that lru_cache keeps no empty parse: one may come from a timeout under load."""


@functools.lru_cache(maxsize=4096)
def _parse_cached(answer: str, options: VerifyOptions, box: bool) -> tuple:
    from math_verify import LatexExtractionConfig, parse

    configs = _extraction_configs(options.targets)
    latex = any(isinstance(c, LatexExtractionConfig) for c in configs)
    for reading in _readings(answer.replace("\u2212", "-").strip(), box, latex):
        parsed = parse(reading, configs, parsing_timeout=options.time_limit_s)
        if parsed:
            return tuple(parsed)
    raise _NothingFound


def _parse(answer: str, options: VerifyOptions, box: bool = False) -> list:
    """math-verify's parse of the first reading in which it finds anything: math, or the string
    it falls back to (which verify compares as a string); [] when it finds nothing. Cached (the
    completions of a group share a reference and often an answer), except when empty."""
    try:
        return list(_parse_cached(answer, options, box))
    except _NothingFound:
        return []


def _verify_here(gold: str, pred: str | None, options: VerifyOptions, boxed: bool = False) -> bool | None:
    """True/False; None when math-verify finds nothing at all in the gold answer. `boxed`: the
    prediction is the content of a box (LaTeX). Signal timeouts need the main thread."""
    from math_verify import verify

    gold_parsed = _parse(gold, options)
    if not gold_parsed:
        return None
    pred_parsed = _parse(pred, options, box=boxed) if pred else []
    return bool(pred_parsed) and bool(verify(
        gold_parsed, pred_parsed, float_rounding=options.float_rounding, strict=options.strict,
        allow_set_relation_comp=options.allow_set_relation_comp, timeout_seconds=options.time_limit_s))


def _number_value(parsed: list) -> float | None:
    """The real number math-verify read: a number, a percentage's number (28% -> 28, as in the
    reference), or the right side of a relation (x = 28); None when it read none."""
    import sympy

    for value in parsed:
        if isinstance(value, str) or not isinstance(value, sympy.Basic):
            continue
        if isinstance(value, sympy.core.relational.Relational):
            value = value.rhs
        if isinstance(value, sympy.Mul) and sympy.UnevaluatedExpr(sympy.Rational(1, 100)) in value.args:
            value = sympy.Mul(*[a for a in value.args if a != sympy.UnevaluatedExpr(sympy.Rational(1, 100))])
        if isinstance(value, sympy.Expr) and value.is_number:
            number = complex(value.doit().evalf())
            if number.imag == 0:
                return number.real
    return None


def _number_here(ref: float, pred: str | None, options: VerifyOptions, boxed: bool = False) -> bool:
    """Is the number math-verify reads in `pred` `ref` (relative tolerance 1e-6)?"""
    value = _number_value(_parse(pred, options, box=boxed)) if pred else None
    return value is not None and math.isclose(value, ref, rel_tol=1e-6, abs_tol=1e-9)


_CHECKS = {"equal": _verify_here, "number": _number_here}


def _checker_main() -> None:  # pragma: no cover - runs in the helper process
    """Helper process loop: one request per line in (base64 pickle of the check's name and
    arguments, from the parent), one JSON answer per line out."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        kind, args = pickle.loads(base64.b64decode(line))
        try:
            result = _CHECKS[kind](*args)
        except Exception:  # noqa: BLE001 - a math-verify timeout or parse crash: wrong, as math-verify itself scores it
            result = False
        print(json.dumps({"result": result}), flush=True)


class _CheckerProcess:
    """math-verify in a helper process, for callers off the main thread (where signal-based
    timeouts cannot work). A check that overruns kills the helper; the next check restarts it."""

    STARTUP_S = 120.0

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def _readline(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline() if ready else None

    def _start(self) -> None:
        code = "from opensloth.rewards.math import _checker_main; _checker_main()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1)
        if not self._readline(self.STARTUP_S):
            self.close()
            raise RuntimeError("the math-verify helper process did not start")

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def check(self, kind: str, args: tuple, time_limit_s: int) -> bool | None:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            self.proc.stdin.write(base64.b64encode(pickle.dumps((kind, args))).decode() + "\n")
            # Each parse (up to 2 readings of each side) and each pairwise comparison (up to 4)
            # is limited inside the helper; this is only the backstop for one that stops answering.
            line = self._readline(8 * time_limit_s + 2.0)
            if not line:
                self.close()
                raise TimeoutError(f"math-verify check exceeded {time_limit_s} s")
            return json.loads(line)["result"]


_CHECKER = _CheckerProcess()


def _run_check(kind: str, *args) -> bool | None:
    """A check in this thread when it is the main one (math-verify's signal timeouts), else in
    the helper process. One that raises or times out is wrong (False), as math-verify scores it."""
    options = args[2]
    try:
        if threading.current_thread() is threading.main_thread():
            return _CHECKS[kind](*args)
        return _CHECKER.check(kind, args, options.time_limit_s)
    except Exception as exc:  # noqa: BLE001 - TimeoutException, TimeoutError
        logger.debug("math-verify check failed: %s", exc)
        return False


def verify_answer(gold: str, pred: str | None, options: VerifyOptions = VerifyOptions(),
                  boxed: bool = False) -> bool | None:
    """Is `pred` mathematically equal to `gold`? math-verify with a per-check time limit.

    In the main thread math-verify's own (signal-based) timeouts apply; elsewhere the check runs
    in a helper process that is killed if it overruns. A check that times out counts as wrong.
    `boxed`: `pred` is the content of a `\\boxed{}`, read as LaTeX (see `_readings`).

    Returns:
        True or False; None when math-verify finds nothing in the gold answer, not even a string
        to compare (the sample is not scored).
    """
    return _run_check("equal", gold, pred, options, boxed)


# ---------------------------------------------------------------------------------------------
# Rewards.
# ---------------------------------------------------------------------------------------------


def _is_exact_format(text: str) -> bool:
    """[<start_working_out>] work <end_working_out> <SOLUTION> answer </SOLUTION>, each tag at most
    once (checked by the caller), work and answer non-empty, only whitespace around the rest.
    String positions, not a regex: a backtracking pattern is quadratic on long completions."""
    body = text.strip()
    if body.startswith(WORK_START):
        body = body[len(WORK_START):]
    elif WORK_START in body:
        return False
    i, j, k = body.find(WORK_END), body.find(SOLUTION_START), body.find(SOLUTION_END)
    if not 0 <= i < j < k:
        return False
    work, between = body[:i], body[i + len(WORK_END): j]
    answer, after = body[j + len(SOLUTION_START): k], body[k + len(SOLUTION_END):]
    return bool(work.strip() and answer.strip()) and not between.strip() and not after.strip()


class MathFormatReward(RewardFunction):
    r"""Scores the reasoning format, in this order:

    - 1.0: exactly `<start_working_out>...<end_working_out><SOLUTION>...</SOLUTION>`: non-empty
      working, then a non-empty solution, each tag once, nothing after `</SOLUTION>` but
      whitespace or end-of-turn markers such as `<|im_end|>` (the opening tag may be left to the
      prompt);
    - 1.0: CS336's r1-zero format, checked as its r1_zero_reward_fn does: the completion contains
      `</think> <answer>` and `</answer>` (its prompt ends with `<think>`);
    - otherwise partial credit for the <SOLUTION> format: +1/6 for each of `<end_working_out>`,
      `<SOLUTION>`, `</SOLUTION>` present exactly once (at most 0.5), and -0.25 for each tag (the
      opening one included) repeated. Range [-1, 1].

    Example:
        >>> math_format([""] * 2, ["<start_working_out>2+2<end_working_out><SOLUTION>4</SOLUTION>",
        ...                        "2+2 is 4 </think> <answer>4</answer>"])
        [1.0, 1.0]
    """

    name = "math_format"
    description = ("Tags <start_working_out> <end_working_out> <SOLUTION> </SOLUTION>: 1 exact, partial per tag, "
                   "repeats penalised; r1-zero's '</think> <answer>': 1.")

    def score(self, prompts, completions, **columns):
        return [self.score_one(completion_text(c)) for c in completions]

    @staticmethod
    def score_one(text: str) -> float:
        text = strip_end_markers(text)
        counts = {tag: text.count(tag) for tag in (WORK_START, WORK_END, SOLUTION_START, SOLUTION_END)}
        if all(n <= 1 for n in counts.values()) and _is_exact_format(text):
            return 1.0
        if all(marker in text for marker in R1_ZERO_MARKERS):
            return 1.0
        partial = sum(1 / 6 for tag in (WORK_END, SOLUTION_START, SOLUTION_END) if counts[tag] == 1)
        return round(partial - 0.25 * sum(n > 1 for n in counts.values()), 6)


class MathAnswerReward(RewardFunction):
    r"""1.0 when the final answer equals the reference `answer` (or TRL's `solution`) per
    math-verify, else 0.0.

    What math-verify is given (`math_verify_input`): the answer span (<SOLUTION>, else r1-zero's
    <answer>, else the whole completion) as it is when it has LaTeX delimiters and fits
    `max_answer_chars`; otherwise its final answer (its last `\boxed{}` or answer line), read as
    math-verify reads it (`_readings`). Equivalent forms count (1/2, 0.5, \frac{1}{2}; 1,000,
    1 000 and 1000). No answer: 0.0. The cap only bounds math-verify's parse time: a long span is
    searched for its final answer (without a box or answer line: its last `max_answer_chars`
    characters), and only a final answer longer than the cap scores 0.0. A reference in which
    math-verify finds no math is compared as a string (its string fallback, as its own tests
    compare it); one in which it finds nothing at all: None (not scored). Each parse and
    comparison has a time limit (`time_limit_s`); one that overruns scores 0.0.

    Args:
        time_limit_s: limit of each math-verify parse and comparison, in whole seconds.
        max_answer_chars: the longest final answer given to math-verify.
        float_rounding, strict, allow_set_relation_comp: math-verify's `verify` options (6, True,
            False, its defaults): see `VerifyOptions`.
        targets: math-verify's `parse` extraction targets: configs or "latex"/"expr"; None for
            its default (both).

    Example:
        >>> math_answer([""] * 2, [r"<SOLUTION>\frac{1}{2}</SOLUTION>", "So the answer is $0.5$."], answer=["0.5"] * 2)
        [1.0, 1.0]
    """

    name = "math_answer"
    description = ("Answer in <SOLUTION>, else <answer>, else the text (if long: its last \\boxed{} or answer "
                   "line) equals the reference per math-verify: 1, else 0.")
    self_limited = True

    def __init__(self, time_limit_s: int = 5, max_answer_chars: int = 1000, float_rounding: int = 6,
                 strict: bool = True, allow_set_relation_comp: bool = False,
                 targets: Sequence[Any] | None = None):
        if not isinstance(time_limit_s, int) or time_limit_s < 1:
            raise ValueError(f"time_limit_s must be a whole number of seconds >= 1 (math-verify's limit), "
                             f"got {time_limit_s!r}")
        if not isinstance(max_answer_chars, int) or max_answer_chars < 1:
            raise ValueError(f"max_answer_chars must be an integer >= 1, got {max_answer_chars!r}")
        targets = tuple(targets or ())
        unknown = [t for t in targets if isinstance(t, str) and t not in _TARGET_NAMES]
        if unknown:
            raise ValueError(f"unknown math-verify target(s) {unknown}: use {', '.join(_TARGET_NAMES)} "
                             "or math_verify extraction configs")
        self.max_answer_chars = max_answer_chars
        self.options = VerifyOptions(targets=targets, float_rounding=float_rounding, strict=strict,
                                     allow_set_relation_comp=allow_set_relation_comp, time_limit_s=time_limit_s)

    @property
    def time_limit_s(self) -> int:
        return self.options.time_limit_s

    def score(self, prompts, completions, **columns):
        out: list[float | None] = []
        seen: dict[tuple, bool | None] = {}  # the completions of a group often end in the same answer
        for completion, gold in zip(completions, reference_answers(columns, len(completions)), strict=True):
            if gold is None or not str(gold).strip():
                out.append(None)
                continue
            pred, boxed = math_verify_input(completion_text(completion), self.max_answer_chars) or (None, False)
            key = (str(gold), pred, boxed)
            if key not in seen:
                seen[key] = verify_answer(str(gold), pred, self.options, boxed)
            out.append(None if seen[key] is None else float(seen[key]))
        return out


class MathNumberReward(MathAnswerReward):
    r"""1.0 when the answer's number equals the reference number, else 0.0; None when the
    reference is not a plain number.

    The answer is what math_answer gives math-verify, and its number is the one math-verify
    reads there (the last number of a sentence, the value of an expression such as `\sqrt{17}`
    or `(9+1)`, the right side of `x = 12`; a percentage counts as its number, as in the
    reference). Numbers are compared as floats (relative tolerance 1e-6). The reference is a plain
    number: thousands separators, a currency sign, a unit or % allowed (`1,234`, `$5`, `12 cm`,
    `30\%`); any other (\frac{1}{2}, 2\sqrt{3}, (1,2), 1/2): None (math_answer scores those).
    No number in the answer: 0.0. Options as math_answer's.

    Example:
        >>> math_number([""] * 2, ["<SOLUTION>1,234 apples</SOLUTION>", r"So it is $4\sqrt{2}$."], answer=["1234", "4"])
        [1.0, 0.0]
    """

    name = "math_number"
    description = ("Number math-verify reads in the answer = reference number (1,234 = 1234; units ignored): 1, "
                   "else 0; None if the reference is not a plain number.")

    def score(self, prompts, completions, **columns):
        out: list[float | None] = []
        seen: dict[tuple, bool] = {}
        for completion, gold in zip(completions, reference_answers(columns, len(completions)), strict=True):
            ref = parse_number(gold) if is_plain_number(gold) else None
            if ref is None:
                out.append(None)
                continue
            pred, boxed = math_verify_input(completion_text(completion), self.max_answer_chars) or (None, False)
            key = (ref, pred, boxed)
            if key not in seen:
                seen[key] = bool(_run_check("number", ref, pred, self.options, boxed))
            out.append(float(seen[key]))
        return out


class R1ZeroReward(MathAnswerReward):
    r"""CS336's r1_zero_reward_fn reward: 1.0 when the completion is in the r1-zero format (it
    contains `</think> <answer>` and `</answer>`) and its last `<answer>...</answer>` equals the
    reference as math_answer grades it; else 0.0. Unlike math_answer, a right answer outside the
    format earns nothing, as in CS336. Options as math_answer's.

    Example:
        >>> r1_zero([""] * 3, ["7 </think> <answer> 7 </answer>", "7 </think> <answer> 8 </answer>", "so 7."],
        ...         answer=["7"] * 3)
        [1.0, 0.0, 0.0]
    """

    name = "r1_zero"
    description = ("CS336's r1_zero reward: '</think> <answer>' and '</answer>' present and the <answer> right per "
                   "math-verify: 1, else 0.")

    def score(self, prompts, completions, **columns):
        answers = []
        for completion in completions:
            text = strip_end_markers(completion_text(completion))
            formatted = all(marker in text for marker in R1_ZERO_MARKERS)
            span = _last_tagged(text, ANSWER_START, ANSWER_END) if formatted else None
            answers.append(f"{ANSWER_START}{span}{ANSWER_END}" if span else "")
        return super().score(prompts, answers, **columns)


math_format = MathFormatReward()
math_answer = MathAnswerReward()
math_number = MathNumberReward()
r1_zero = R1ZeroReward()
for _reward in (math_format, math_answer, math_number, r1_zero):
    register_reward_function(_reward)
