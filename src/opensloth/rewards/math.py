"""Math rewards: the reasoning format, the answer (math-verify) and the number in the answer.

The reasoning format, taught by SFT and rewarded here:

    <start_working_out> ... working ... <end_working_out><SOLUTION> answer </SOLUTION>

The opening tag may be missing from a completion: the reasoning chat template ends the
generation prompt with it, so the model never writes it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import select
import subprocess
import sys
import threading
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
# End-of-turn markers a decoder may leave at the end (when special tokens are not skipped).
_END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")


# ---------------------------------------------------------------------------------------------
# Extraction helpers (pure).
# ---------------------------------------------------------------------------------------------


def last_boxed(text: str) -> str | None:
    r"""Content of the last `\boxed{...}` (braces balanced), or None.

    >>> last_boxed(r"so \boxed{\frac{1}{2}}.")
    '\\frac{1}{2}'
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


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


def strip_end_markers(text: str) -> str:
    """Drop trailing whitespace and end-of-turn markers (`<|im_end|>`, `<|endoftext|>`, ...)."""
    text = text.rstrip()
    while text.endswith(_END_MARKERS):
        text = text[: -len(next(m for m in _END_MARKERS if text.endswith(m)))].rstrip()
    return text


# "Answer: X" on a line of its own (DAPO-Math's prompts ask for it as the last line), bold allowed.
_ANSWER_LINE = re.compile(r"^[ \t>*_]*answer[ \t*_]*:[ \t*_]*(\S[^\n]*)$", re.IGNORECASE | re.MULTILINE)


def last_answer_line(text: str) -> str | None:
    """The X of the last line `Answer: X` (case-insensitive, markdown bold allowed), or None.

    >>> last_answer_line("so it is 12.\\nAnswer: $12$")
    '$12$'
    """
    matches = _ANSWER_LINE.findall(text)
    return matches[-1].strip().strip("*_").strip() or None if matches else None


def extract_solution(text: str) -> str | None:
    r"""The answer part of a completion, in this order: inside the last <SOLUTION>...</SOLUTION>,
    else the last \boxed{}, else the last line `Answer: X`, else None."""
    # rfind, not a regex: a lazy pattern is quadratic on completions full of unclosed tags.
    end = text.rfind(SOLUTION_END)
    start = text.rfind(SOLUTION_START, 0, max(end, 0))
    if end >= 0 and start >= 0 and text[start + len(SOLUTION_START): end].strip():
        return text[start + len(SOLUTION_START): end].strip()
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    return last_answer_line(strip_end_markers(text))


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


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

    >>> [is_plain_number(t) for t in ("1,234", "$5", "12 cm", "-3.5%", r"\frac{1}{2}", r"2\sqrt{3}", "(1,2)")]
    [True, True, True, True, False, False, False]
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


def _as_latex(text: str) -> str:
    """math-verify reads LaTeX between $...$; bare answers ("\\frac{1}{2}", "(1,2)") need them."""
    text = text.replace("\u2212", "-").strip()
    return text if "$" in text or "\\boxed" in text or "\\(" in text else f"${text}$"


# ---------------------------------------------------------------------------------------------
# math-verify with a time limit, in the main thread or not.
# ---------------------------------------------------------------------------------------------


def _verify_here(gold: str, pred: str, time_limit_s: int | None) -> bool | None:
    """True/False; None when the gold answer does not parse. Signal timeouts need the main thread."""
    from math_verify import parse, verify

    gold_parsed = parse(_as_latex(gold), parsing_timeout=time_limit_s)
    # math-verify falls back to the raw string when it finds no math ("???", "\frac{"): not parsed.
    if all(isinstance(x, str) for x in gold_parsed):
        return None
    pred_parsed = parse(_as_latex(pred), parsing_timeout=time_limit_s)
    return bool(pred_parsed) and bool(verify(gold_parsed, pred_parsed, timeout_seconds=time_limit_s))


def _checker_main() -> None:  # pragma: no cover - runs in the helper process
    """Helper process loop: one JSON request per line in, one JSON answer per line out."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            result = _verify_here(request["gold"], request["pred"], request["t"])
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

    def check(self, gold: str, pred: str, time_limit_s: int) -> bool | None:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            self.proc.stdin.write(json.dumps({"gold": gold, "pred": pred, "t": time_limit_s}) + "\n")
            # Each parse and each pairwise comparison is limited inside the helper (a few of them
            # per check); this is only the backstop for a helper that stops answering.
            line = self._readline(6 * time_limit_s + 2.0)
            if not line:
                self.close()
                raise TimeoutError(f"math-verify check exceeded {time_limit_s} s")
            return json.loads(line)["result"]


_CHECKER = _CheckerProcess()


def verify_answer(gold: str, pred: str, time_limit_s: int = 5) -> bool | None:
    """Is `pred` mathematically equal to `gold`? math-verify with a per-check time limit.

    In the main thread math-verify's own (signal-based) timeouts apply; elsewhere the check runs
    in a helper process that is killed if it overruns. A check that times out counts as wrong.

    Returns:
        True or False; None when the gold answer cannot be parsed (the sample is not scored).
    """
    try:
        if threading.current_thread() is threading.main_thread():
            return _verify_here(gold, pred, time_limit_s)
        return _CHECKER.check(gold, pred, time_limit_s)
    except Exception as exc:  # noqa: BLE001 - TimeoutException, TimeoutError: wrong, as math-verify scores it
        logger.debug("math-verify check failed: %s", exc)
        return False


# ---------------------------------------------------------------------------------------------
# Rewards.
# ---------------------------------------------------------------------------------------------


class MathFormatReward(RewardFunction):
    r"""Scores the reasoning format `<start_working_out>...<end_working_out><SOLUTION>...</SOLUTION>`.

    - 1.0: exactly the format: non-empty working, then a non-empty solution, each tag once,
      nothing after `</SOLUTION>` but whitespace or end-of-turn markers such as `<|im_end|>`
      (the opening tag may be left to the prompt);
    - otherwise partial credit: +1/6 for each of `<end_working_out>`, `<SOLUTION>`, `</SOLUTION>`
      present exactly once (at most 0.5), and -0.25 for each tag (the opening one included)
      repeated. Range [-1, 1].

    Example:
        >>> math_format([""], ["<start_working_out>2+2<end_working_out><SOLUTION>4</SOLUTION>"])
        [1.0]
    """

    name = "math_format"
    description = "Tags <start_working_out> <end_working_out> <SOLUTION> </SOLUTION>: 1 exact, partial per tag, repeats penalised."

    def score(self, prompts, completions, **columns):
        return [self.score_one(completion_text(c)) for c in completions]

    @staticmethod
    def score_one(text: str) -> float:
        text = strip_end_markers(text)
        counts = {tag: text.count(tag) for tag in (WORK_START, WORK_END, SOLUTION_START, SOLUTION_END)}
        if all(n <= 1 for n in counts.values()) and _is_exact_format(text):
            return 1.0
        partial = sum(1 / 6 for tag in (WORK_END, SOLUTION_START, SOLUTION_END) if counts[tag] == 1)
        return round(partial - 0.25 * sum(n > 1 for n in counts.values()), 6)


class MathAnswerReward(RewardFunction):
    r"""1.0 when the answer equals the reference `answer` (or TRL's `solution`) per math-verify, else 0.0.

    The answer is the text inside the last `<SOLUTION>...</SOLUTION>`, else the last `\boxed{}`,
    else the last line `Answer: X` (the form DAPO-Math's prompts ask for);
    equivalent forms count (1/2, 0.5, \frac{1}{2}; 1,000 and 1000). No answer, or one longer than
    `max_answer_chars` (not a final answer; spares math-verify a huge parse): 0.0. A reference
    in which math-verify finds no math (it falls back to the raw string): None (not scored). Each check has a time limit (`time_limit_s`);
    one that overruns scores 0.0.

    Example:
        >>> math_answer([""], [r"<SOLUTION>\frac{1}{2}</SOLUTION>"], answer=["0.5"])
        [1.0]
    """

    name = "math_answer"
    description = ("Answer in <SOLUTION> (else last \\boxed{}, else a last 'Answer: X' line) equals the reference "
                   "per math-verify: 1, else 0.")
    self_limited = True

    def __init__(self, time_limit_s: int = 5, max_answer_chars: int = 1000):
        self.time_limit_s, self.max_answer_chars = time_limit_s, max_answer_chars

    def score(self, prompts, completions, **columns):
        out: list[float | None] = []
        for completion, gold in zip(completions, reference_answers(columns, len(completions)), strict=True):
            if gold is None or not str(gold).strip():
                out.append(None)
                continue
            pred = extract_solution(completion_text(completion))
            if pred is None or len(pred) > self.max_answer_chars:
                out.append(0.0)
                continue
            result = verify_answer(str(gold), pred, self.time_limit_s)
            out.append(None if result is None else float(result))
        return out


class MathNumberReward(RewardFunction):
    r"""1.0 when the first number of the answer equals the reference number, else 0.0.

    The answer is found as in math_answer; numbers are compared as floats (relative tolerance
    1e-6), after removing thousands separators, currency signs and units. No number in the
    answer: 0.0. A reference that is not a plain number (\frac{1}{2}, 2\sqrt{3}, (1,2), 1/2):
    None (not scored; math_answer scores those).

    Example:
        >>> math_number([""], ["<SOLUTION>1,234 apples</SOLUTION>"], answer=["1234"])
        [1.0]
    """

    name = "math_number"
    description = ("First number in the answer equals the reference number (1,234 = 1234; units ignored): 1, else 0; "
                   "None when the reference is not a plain number.")

    def score(self, prompts, completions, **columns):
        out: list[float | None] = []
        for completion, gold in zip(completions, reference_answers(columns, len(completions)), strict=True):
            ref = parse_number(gold) if is_plain_number(gold) else None
            if ref is None:
                out.append(None)
                continue
            solution = extract_solution(completion_text(completion))
            guess = parse_number(solution) if solution else None
            out.append(float(guess is not None and math.isclose(guess, ref, rel_tol=1e-6, abs_tol=1e-9)))
        return out


math_format = MathFormatReward()
math_answer = MathAnswerReward()
math_number = MathNumberReward()
for _reward in (math_format, math_answer, math_number):
    register_reward_function(_reward)
