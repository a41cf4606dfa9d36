"""Rewards: built-ins on realistic completions, registry, presets, weights, custom modules,
containment of every failure kind, and `os list-rewards`. (The sandbox: test_rewards_sandbox.py.)"""

from __future__ import annotations

import io
import json
import logging
import math
import textwrap
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from opensloth.errors import UserError
from opensloth.rewards import (
    PRESETS,
    DemoReward,
    FunctionReward,
    MathAnswerReward,
    RewardFunction,
    RewardSet,
    code_correctness,
    get_length_penalty,
    get_reward_functions,
    length_penalty,
    list_reward_functions,
    load_reward_module,
    math_answer,
    math_format,
    math_number,
    register_reward_function,
    resolve_rewards,
)
from opensloth.rewards.math import extract_final_answer, parse_number


def chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


EXACT = "<start_working_out>3 apples + 4 apples = 7 apples<end_working_out><SOLUTION>7</SOLUTION>"


# ---------------------------------------------------------------------------------------------
# math_format
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (EXACT, 1.0),
        ("  " + EXACT + "\n", 1.0),
        (EXACT + "<|im_end|>\n<|endoftext|>", 1.0),  # end-of-turn markers left by the decoder
        # The reasoning template's generation prompt already ends with <start_working_out>.
        ("3 + 4 = 7<end_working_out>\n<SOLUTION>7</SOLUTION>", 1.0),
        ("Donc x = 2<end_working_out><SOLUTION>x = 2 ✓</SOLUTION>", 1.0),
        # Text after </SOLUTION>: not exact; three closing tags once each: 3/6.
        (EXACT + " and more text", 0.5),
        # Empty solution: not exact.
        ("<start_working_out>work<end_working_out><SOLUTION> </SOLUTION>", 0.5),
        ("<SOLUTION>7</SOLUTION>", 2 / 6),
        ("The answer is 7.", 0.0),
        ("", 0.0),
        # Repeated tags: <SOLUTION> and </SOLUTION> twice: 1/6 (end_working_out) - 2 x 0.25.
        ("x<end_working_out><SOLUTION>7</SOLUTION><SOLUTION>8</SOLUTION>", round(1 / 6 - 0.5, 6)),
        # Opening tag repeated: one -0.25 on top of the 3/6.
        ("<start_working_out><start_working_out>w<end_working_out><SOLUTION>7</SOLUTION>", 0.25),
    ],
)
def test_math_format_scores(completion, expected):
    assert math_format(["q"], [completion]) == [pytest.approx(expected)]
    assert math_format([[{"role": "user", "content": "q"}]], [chat(completion)]) == [pytest.approx(expected)]


def test_math_format_exact_beats_partial_and_repeats_are_penalised():
    exact, partial, repeated = math_format(
        ["q"] * 3, [EXACT, "<SOLUTION>7</SOLUTION>", EXACT + "<SOLUTION>7</SOLUTION>"]
    )
    assert exact > partial > repeated


# ---------------------------------------------------------------------------------------------
# math_answer
# ---------------------------------------------------------------------------------------------

MATH_ANSWER_CASES = [
    (r"<start_working_out>half<end_working_out><SOLUTION>\frac{1}{2}</SOLUTION>", "0.5", 1.0),
    (r"<SOLUTION>0.5</SOLUTION>", r"\frac{1}{2}", 1.0),
    (r"<SOLUTION>1/2</SOLUTION>", r"\dfrac{1}{2}", 1.0),
    (r"So the total is \boxed{1,000}.", "1000", 1.0),
    (r"First \boxed{3}, no wait: \boxed{\sqrt{2}}", r"\sqrt{2}", 1.0),
    (r"<SOLUTION>x = 3</SOLUTION>", "3", 1.0),
    ("<SOLUTION>−7</SOLUTION>", "-7", 1.0),  # unicode minus
    ("<SOLUTION>41</SOLUTION>", "42", 0.0),
    (r"<SOLUTION>\frac{1}{3}</SOLUTION>", "0.5", 0.0),
    ("The answer is 42 but I give no tags.", "42", 1.0),  # no tags: the completion is the answer
    ("The answer is 41 but I give no tags.", "42", 0.0),
    ("", "42", 0.0),
    ("<SOLUTION></SOLUTION>", "42", 0.0),
]


@pytest.mark.parametrize(("completion", "answer", "expected"), MATH_ANSWER_CASES)
def test_math_answer_equivalent_forms(completion, answer, expected):
    assert math_answer(["q"], [completion], answer=[answer]) == [expected]
    assert math_answer(["q"], [chat(completion)], answer=[answer]) == [expected]


def test_math_answer_reads_trl_solution_column_and_skips_unparseable_reference():
    assert math_answer(["q"], [r"\boxed{4}"], solution=["4"]) == [1.0]
    assert math_answer(["q", "q"], ["<SOLUTION>4</SOLUTION>"] * 2, answer=["", None]) == [None, None]
    assert math_answer(["q"], ["<SOLUTION>4</SOLUTION>"]) == [None]  # no reference column at all


def test_math_answer_gold_without_math_is_compared_as_a_string():
    # math-verify falls back to the string for these (no math found): compared as strings, as its
    # tests compare them; None only where it finds nothing at all (tests/test_rewards_math.py).
    golds = ["???", "\\frac{", "()"]
    assert math_answer(["q"] * 3, ["<SOLUTION>???</SOLUTION>", "<SOLUTION>\\frac{</SOLUTION>", "<SOLUTION>()</SOLUTION>"],
                       answer=golds) == [1.0, 1.0, 1.0]
    assert math_answer(["q"] * 3, ["<SOLUTION>!!!</SOLUTION>"] * 3, answer=golds) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Let me think.\nAnswer: 42", "42"),
        ("**Answer:** $\\frac{1}{2}$", "$\\frac{1}{2}$"),
        ("answer: 7<|im_end|>", "7"),
        ("Answer: 1\n\\boxed{2}", "2"),  # \boxed{} before Answer:
        ("Answer: 1\n<SOLUTION>3</SOLUTION>", "3"),  # <SOLUTION> first
        ("Final Answer: 34", "34"),
        ("so the answer is $5$. Done", "$5$"),
        ("\\boxed{1}\nAnswer: 2", "2"),  # the later of the two
        ("The answer: is unclear", "The answer: is unclear"),  # not an answer line: the completion itself
        ("Answer:", "Answer:"),
    ],
)
def test_answer_line_and_box_the_later_wins(completion, expected):
    assert extract_final_answer(completion) == expected


def test_math_answer_accepts_dapo_answer_line():
    assert math_answer(["q"] * 2, ["So x = 3.\nAnswer: 3", "Answer: $\\frac{1}{2}$"], answer=["3", "0.5"]) == [1.0, 1.0]


def test_math_answer_off_the_main_thread_matches_main_thread():
    """Off the main thread math-verify's signal timeouts cannot work: the check runs in a helper process."""
    completions = [c for c, _, _ in MATH_ANSWER_CASES[:4]] + ["<SOLUTION>41</SOLUTION>"]
    answers = [a for _, a, _ in MATH_ANSWER_CASES[:4]] + ["42"]
    box = {}
    thread = threading.Thread(target=lambda: box.update(out=math_answer(["q"] * 5, completions, answer=answers)))
    thread.start()
    thread.join(180)
    assert box["out"] == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_math_answer_time_limit_per_check_in_and_off_the_main_thread():
    """Comparing two 300th powers takes sympy far longer than 1 s: the check stops and scores 0."""
    reward = MathAnswerReward(time_limit_s=1)
    args = (["q"], ["<SOLUTION>(x+2)^{300}</SOLUTION>"])
    start = time.monotonic()
    assert reward(*args, answer=["(x+1)^{300}"]) == [0.0]
    assert time.monotonic() - start < 10
    box = {}
    thread = threading.Thread(target=lambda: box.update(out=reward(*args, answer=["(x+1)^{300}"])))
    start = time.monotonic()
    thread.start()
    thread.join(120)
    assert box["out"] == [0.0]
    assert time.monotonic() - start < 60  # includes starting the helper process if needed


# ---------------------------------------------------------------------------------------------
# math_number
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("<SOLUTION>1,234 apples</SOLUTION>", "1234", 1.0),
        ("<SOLUTION>$1,234.50</SOLUTION>", "1234.5", 1.0),
        (r"<SOLUTION>1{,}000{,}000</SOLUTION>", "1000000", 1.0),
        ("<SOLUTION>−7 °C</SOLUTION>", "-7", 1.0),
        ("<SOLUTION>答案是 42 个</SOLUTION>", "42", 1.0),
        (r"The result: \boxed{18}", "18", 1.0),
        ("<SOLUTION>-3</SOLUTION>", "3", 0.0),
        ("<SOLUTION>12 then 13</SOLUTION>", "13", 1.0),  # the number math-verify reads: the last one
        ("<SOLUTION>12 then 13</SOLUTION>", "12", 0.0),
        ("<SOLUTION>no idea</SOLUTION>", "13", 0.0),
        ("13", "13", 1.0),  # no tags: the completion is the answer
        ("", "13", 0.0),
        ("<SOLUTION>13</SOLUTION>", "thirteen", None),  # reference is not a number: not scored
        # A reference that is more than a number is not scored (its first number is not the answer).
        ("<SOLUTION>1</SOLUTION>", r"\frac{1}{2}", None),
        ("<SOLUTION>2</SOLUTION>", r"2\sqrt{3}", None),
        ("<SOLUTION>1</SOLUTION>", "(1,2)", None),
        ("<SOLUTION>1</SOLUTION>", "1/2", None),
        ("<SOLUTION>12</SOLUTION>", "12 cm", 1.0),
        ("<SOLUTION>5</SOLUTION>", "$5", 1.0),
        ("<SOLUTION>30</SOLUTION>", r"30\%", 1.0),
        ("Work.\nAnswer: 1,234", "1234", 1.0),  # DAPO-Math's last line
    ],
)
def test_math_number(completion, answer, expected):
    assert math_number(["q"], [completion], answer=[answer]) == [expected]
    assert math_number(["q"], [chat(completion)], answer=[answer]) == [expected]


def test_extraction_helpers():
    assert extract_final_answer("a<SOLUTION>1</SOLUTION>b<SOLUTION>2</SOLUTION>") == "2"
    assert extract_final_answer(r"\boxed{\frac{a}{b}}, then \boxed{\left(1, 2\right)}") == r"\left(1, 2\right)"
    assert extract_final_answer(r"\boxed{\frac{a}{b}} and \boxed{\left(1, 2\right)}") == r"\frac{a}{b}, \left(1, 2\right)"
    assert extract_final_answer("no answer") == "no answer"
    assert extract_final_answer(" <|im_end|>") is None
    assert parse_number("-$5") == -5.0
    assert parse_number("1 234 567") == 1234567.0
    assert parse_number(".5") == 0.5
    assert parse_number("none") is None


@pytest.mark.parametrize(
    "completion",
    [
        "<start_working_out>" + "a" * 20000 + "<end_working_out><SOLUTION>" + "b" * 20000 + "</SOLUTION> junk",
        "<SOLUTION>" * 20000,
        "</SOLUTION>" * 20000,
        "```python\n" * 20000,
        "\\boxed{" * 20000,
        "1," * 20000 + "<SOLUTION>" + "1,000 " * 20000 + "</SOLUTION>",
        "{" * 20000 + "\\boxed{1}" + "}" * 20000,
        "the answer is " * 5000,
        "<answer></answer>" * 10000,
    ],
    ids=["long-junk-after", "unclosed-tags", "closing-tags", "fences", "boxed", "separators", "nested-braces",
         "answer-is", "empty-answer-tags"],
)
def test_text_rewards_stay_linear_on_long_adversarial_completions(completion):
    """Backtracking regexes once took minutes here; a rollout can be this long."""
    for reward in (math_answer, math_number):  # import math-verify and compile its patterns first
        reward(["q"], ["<SOLUTION>1</SOLUTION>"], answer=["1"])
    start = time.monotonic()
    for reward in (math_format, math_answer, math_number, length_penalty, code_correctness):
        assert len(reward(["q"], [completion], answer=["1"])) == 1
    assert time.monotonic() - start < 2


# ---------------------------------------------------------------------------------------------
# length_penalty, demo_reward
# ---------------------------------------------------------------------------------------------


def test_length_penalty_bounds():
    lengths = [0, 10, 20, 100, 4000, 6000, 9000]
    out = length_penalty(["q"] * len(lengths), ["x" * n for n in lengths])
    assert out == pytest.approx([-1.0, -0.5, 0.0, 0.0, 0.0, -0.5, -1.0])
    assert length_penalty(["q"], [chat("é" * 30)]) == [0.0]  # characters, not bytes
    short = get_length_penalty(min_chars=2, max_chars=10, name="short_answers")
    assert short.name == "short_answers"
    assert short(["q"] * 3, ["a", "abcde", "a" * 15]) == pytest.approx([-0.5, 0.0, -0.5])
    with pytest.raises(ValueError, match="min_chars <= max_chars"):
        get_length_penalty(min_chars=10, max_chars=5)


def test_demo_reward_shows_sample_with_other_scores_and_returns_zeros():
    buffer = io.StringIO()
    demo = DemoReward(console=Console(file=buffer, width=200))
    result = RewardSet([demo, math_format, math_answer]).score(["What is 3+4?"] * 2, [EXACT, "no"],
                                                               {"answer": ["7", "7"]})
    assert result.per_reward["demo_reward"] == [0.0, 0.0]
    assert list(result.per_reward) == ["demo_reward", "math_format", "math_answer"]  # order kept
    shown = buffer.getvalue()
    assert "What is 3+4?" in shown and "<SOLUTION>7</SOLUTION>" in shown
    assert "math_format=1.000" in shown and "math_answer=1.000" in shown


# ---------------------------------------------------------------------------------------------
# Registry, presets, weights
# ---------------------------------------------------------------------------------------------


def test_builtins_and_presets_are_registered():
    names = {r.name for r in list_reward_functions()}
    assert {"math_format", "math_answer", "math_number", "length_penalty", "code_correctness",
            "demo_reward"} <= names
    assert PRESETS == {
        "math": ["math_format", "math_answer", "math_number"],
        "code": ["code_correctness", "length_penalty"],
        "general": ["length_penalty"],
        "reasoning": ["math_format", "length_penalty"],
    }
    for task, expected in PRESETS.items():
        assert resolve_rewards(task).names == expected
    assert all(r.source == "built-in" and r.description for r in list_reward_functions())


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UserError, match=r"Unknown reward 'math_fromat'.*math_format"):
        get_reward_functions(["math_fromat"])
    with pytest.raises(UserError, match="Unknown --task 'maths'. Choose one of: math, code, general, reasoning"):
        resolve_rewards("maths")
    with pytest.raises(UserError, match="needs at least one reward"):
        resolve_rewards(None, [])


def test_task_and_names_combine_and_weights_cover_the_combined_list():
    rewards = resolve_rewards("math", ["length_penalty", "math_answer"], [1.0, 2.0, 0.5, 0.1])
    assert rewards.names == ["math_format", "math_answer", "math_number", "length_penalty"]
    result = rewards.score(["q"], [EXACT], {"answer": ["7"]})
    assert result.total == [pytest.approx(1.0 + 2.0 + 0.5 + 0.0)]
    with pytest.raises(UserError, match=r"--reward-weights has 2 values but the run has 3 rewards \(math_format"):
        resolve_rewards("math", [], [1.0, 2.0])


def test_weighted_total_treats_none_as_zero():
    rewards = RewardSet([math_answer, math_format], [2.0, 0.5])
    result = rewards.score(["q"] * 3, [EXACT, "<SOLUTION>8</SOLUTION>", EXACT], {"answer": ["7", "7", ""]})
    assert result.per_reward["math_answer"] == [1.0, 0.0, None]
    assert result.total == pytest.approx([2.0 + 0.5, 0.0 + 0.5 * 2 / 6, 0.0 + 0.5])
    assert result.metrics["rewards/math_answer/mean"] == pytest.approx(0.5)  # None left out
    assert result.metrics["rewards/math_answer/std"] == pytest.approx(0.5)
    assert result.metrics["rewards/math_answer/failures"] == 0.0
    assert result.metrics["rewards/none_fraction"] == pytest.approx(1 / 6)


def test_plain_trl_functions_register_with_and_without_decorator_arguments(clean_registry):
    @register_reward_function
    def brevity_reward(completions, **kwargs):
        """Shorter is better."""
        return [-len(c) / 100 for c in completions]

    @register_reward_function(name="says_hello", description="1 if the completion greets.")
    def greets(prompts, completions, **kwargs):
        return [float("hello" in c.lower()) for c in completions]

    by_name = {r.name: r for r in list_reward_functions()}
    assert by_name["brevity_reward"].description == "Shorter is better."
    assert by_name["says_hello"].description == "1 if the completion greets."
    result = resolve_rewards(None, ["brevity_reward", "says_hello"]).score(["q", "q"], ["Hello!", "x" * 50])
    assert result.per_reward == {"brevity_reward": [-0.06, -0.5], "says_hello": [1.0, 0.0]}


# ---------------------------------------------------------------------------------------------
# Custom reward modules
# ---------------------------------------------------------------------------------------------


def write(tmp_path, name: str, source: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


CUSTOM = """
from opensloth.rewards import RewardFunction, get_length_penalty, math_format, register_reward_function

class ExclaimReward(RewardFunction):
    name = "exclaim"
    description = "1 per exclamation mark."
    def score(self, prompts, completions, **columns):
        return [float(c.count("!")) for c in completions]

exclaim = ExclaimReward()
short_answers = get_length_penalty(1, 5, name="short_answers")

def starts_with_answer(prompts, completions, answer, **kwargs):
    # a plain TRL-style function
    return [float(c.startswith(a)) for c, a in zip(completions, answer)]

@register_reward_function(name="registered_one")
def _private_but_registered(completions, **kwargs):
    return [1.0] * len(completions)

def helper(x):  # not a reward: no completions parameter
    return x
"""


def test_custom_module_registers_instances_trl_functions_and_registered_ones(clean_registry, tmp_path):
    path = write(tmp_path, "my_rewards.py", CUSTOM)
    names = load_reward_module(path)
    assert names == ["exclaim", "registered_one", "short_answers", "starts_with_answer"]
    assert load_reward_module(path) == names  # loading twice is a no-op, not a clash
    sources = {r.name: r.source for r in list_reward_functions()}
    assert sources["exclaim"] == str(path.resolve()) and sources["math_format"] == "built-in"
    rewards = resolve_rewards("reasoning", names, modules=[path])
    result = rewards.score(["q", "q"], ["42!!", "no"], {"answer": ["42", "7"]})
    assert result.per_reward["exclaim"] == [2.0, 0.0]
    assert result.per_reward["starts_with_answer"] == [1.0, 0.0]
    assert result.per_reward["short_answers"] == [0.0, 0.0]


def test_custom_module_using_trls_own_accuracy_reward(clean_registry, tmp_path):
    """A TRL reward works unchanged: TRL's accuracy_reward reads `solution`, aliased to `answer`."""
    pytest.importorskip("trl.rewards")
    path = write(tmp_path, "trl_rewards.py", "from trl.rewards import accuracy_reward\n")
    assert load_reward_module(path) == ["accuracy_reward"]
    result = resolve_rewards(None, ["accuracy_reward"]).score(
        ["q", "q"], [chat(r"It is $\boxed{\frac{1}{2}}$"), chat(r"$\boxed{3}$")], {"answer": ["$0.5$", "$2$"]}
    )
    assert result.per_reward["accuracy_reward"] == [1.0, 0.0]
    assert result.metrics["rewards/accuracy_reward/failures"] == 0.0


def test_name_clash_names_both_sources(clean_registry, tmp_path):
    clash = write(tmp_path, "clash.py", "def math_format(completions, **kwargs):\n    return [0.0]\n")
    with pytest.raises(UserError, match=r"Two rewards are named 'math_format': one from built-in, one from .*clash.py"):
        load_reward_module(clash)
    first = write(tmp_path, "first.py", "def mine(completions, **kwargs):\n    return [0.0]\n")
    (tmp_path / "other").mkdir()
    second = write(tmp_path / "other", "second.py", "def mine(completions, **kwargs):\n    return [1.0]\n")
    load_reward_module(first)
    with pytest.raises(UserError, match=r"'mine': one from .*first.py, one from .*second.py"):
        load_reward_module(second)


def test_errors_in_the_users_file_name_file_and_line(clean_registry, tmp_path):
    bad = write(tmp_path, "bad_syntax.py", "def ok(completions, **kw):\n    return [1.0]\n\ndef broken(:\n    pass\n")
    with pytest.raises(UserError, match=r"bad_syntax.py, line 4: syntax error"):
        load_reward_module(bad)
    raising = write(tmp_path, "raising.py", "import os\n\nVALUE = 1 / 0\n")
    with pytest.raises(UserError, match=r"raising.py, line 3: importing it raised ZeroDivisionError"):
        load_reward_module(raising)
    with pytest.raises(UserError, match="--reward-module .*missing.py: the file does not exist"):
        load_reward_module(tmp_path / "missing.py")
    assert "ok" not in {r.name for r in list_reward_functions()}


# ---------------------------------------------------------------------------------------------
# Containment
# ---------------------------------------------------------------------------------------------


class Misbehaving(RewardFunction):
    def __init__(self, name, fn):
        self.name, self.fn, self.source = name, fn, "test"

    def score(self, prompts, completions, **columns):
        return self.fn(completions)


def _raises(completions):
    raise KeyError("no such column")


def _exits(completions):
    raise SystemExit(3)  # sys.exit(3) in a user's reward ended os-train grpo with exit 3 and no message


class _Escaping(BaseException):
    pass


def _raises_base(completions):
    raise _Escaping("not an Exception")


def _sleeps(completions):
    time.sleep(3)
    return [1.0] * len(completions)


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (_raises, "raised KeyError"),
        (lambda c: [1.0], "returned 1 value for 3 completions"),
        (lambda c: [1.0, math.nan, 0.0], "value 2 (completion 2) is nan"),
        (lambda c: [1.0, 0.0, math.inf], "value 3 (completion 3) is inf"),
        (lambda c: ["1.0", 0.0, 0.0], "value 1 (completion 1) is str"),
        (lambda c: 1.0, "returned float"),
        (_sleeps, "exceeded its time limit of 0.3 s"),
        (_exits, "raised SystemExit: 3"),
        (_raises_base, "raised _Escaping"),
    ],
    ids=["raises", "wrong-length", "nan", "inf", "non-number", "not-a-list", "time-limit", "system-exit",
         "base-exception"],
)
def test_failing_reward_is_contained_counted_and_reported(fn, reason, caplog):
    bad = Misbehaving("bad", fn)
    rewards = RewardSet([length_penalty, bad], weights=[1.0, 5.0], time_limit_s=0.3)
    with caplog.at_level(logging.DEBUG, logger="opensloth.rewards"):
        start = time.monotonic()
        result = rewards.score(["q"] * 3, ["x" * 30, "", "y" * 30], {})
        assert time.monotonic() - start < 2.5
        rewards.score(["q"] * 3, ["x" * 30, "", "y" * 30], {})
    assert result.per_reward["bad"] == [None, None, None]
    assert result.per_reward["length_penalty"] == [0.0, -1.0, 0.0]
    assert result.total == [0.0, -1.0, 0.0]
    assert result.metrics["rewards/bad/failures"] == 1.0
    assert "rewards/bad/mean" not in result.metrics
    assert rewards.failures["bad"] == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and reason in warnings[0].getMessage()  # reported once
    if fn is _raises:
        assert "Traceback" in warnings[0].getMessage() and "no such column" in warnings[0].getMessage()


def test_self_limited_reward_exiting_is_contained_and_ctrl_c_passes_through():
    exiting = Misbehaving("exiting", _exits)
    exiting.self_limited = True  # called in the caller's thread, not the time-limit thread
    result = RewardSet([length_penalty, exiting]).score(["q"], ["x"], {})
    assert result.per_reward["exiting"] == [None] and result.metrics["rewards/exiting/failures"] == 1.0

    def interrupted(completions):
        raise KeyboardInterrupt

    for self_limited in (True, False):
        ctrl_c = Misbehaving("ctrl_c", interrupted)
        ctrl_c.self_limited = self_limited
        with pytest.raises(KeyboardInterrupt):
            RewardSet([ctrl_c]).score(["q"], ["x"], {})


def test_reward_timeout_option_sets_the_time_limit(clean_registry, tmp_path):
    from opensloth.config import GRPORunConfig

    cfg = GRPORunConfig.model_validate({"model": {"model": "m"}, "grpo": {"task": "math", "reward_timeout": 7.5}})
    g = cfg.grpo
    assert resolve_rewards(g.task, g.rewards, g.reward_weights, g.reward_modules, g.reward_timeout).time_limit_s == 7.5
    assert GRPORunConfig.model_validate({"model": {"model": "m"}}).grpo.reward_timeout == 120.0


def test_tensor_and_bool_outputs_are_accepted():
    torch = pytest.importorskip("torch")
    rewards = RewardSet([Misbehaving("t", lambda c: torch.tensor([0.5, 1.0])),
                         Misbehaving("b", lambda c: [True, None])])
    result = rewards.score(["q", "q"], ["a", "b"])
    assert result.per_reward == {"t": [0.5, 1.0], "b": [1.0, None]}
    assert result.total == [1.5, 1.0]


# ---------------------------------------------------------------------------------------------
# os list-rewards
# ---------------------------------------------------------------------------------------------


def test_list_rewards_cli_table_json_and_errors(clean_registry, tmp_path):
    from opensloth.cli.main import app

    runner = CliRunner()
    table = runner.invoke(app, ["list-rewards"], env={"COLUMNS": "160"})
    assert table.exit_code == 0, table.output
    for text in ("math_answer", "code_correctness", "built-in", "Presets", "math_format, math_answer, math_number"):
        assert text in table.output
    path = write(tmp_path, "mine.py", CUSTOM)
    listed = runner.invoke(app, ["list-rewards", "--reward-module", str(path), "--json"])
    assert listed.exit_code == 0, listed.output
    data = json.loads(listed.output)
    rows = {row["name"]: row for row in data["rewards"]}
    assert rows["exclaim"] == {"name": "exclaim", "source": str(path.resolve()), "description": "1 per exclamation mark."}
    assert data["presets"]["code"] == ["code_correctness", "length_penalty"]
    bad = write(tmp_path, "bad.py", "x = (\n")
    failed = runner.invoke(app, ["list-rewards", "--reward-module", str(bad)])
    assert failed.exit_code == 2
    assert "bad.py, line 1: syntax error" in failed.output


@pytest.mark.parametrize("module", ["base", "math", "general", "code", "sandbox"])
def test_docstring_examples_run(module):
    """Each reward's docstring example is runnable and true."""
    import doctest
    import importlib

    mod = importlib.import_module(f"opensloth.rewards.{module}")
    result = doctest.testmod(mod, extraglobs=vars(importlib.import_module("opensloth.rewards")))
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------------------------
# TRL 1.16's calling convention: every argument, async rewards, and loud first-step failures
# ---------------------------------------------------------------------------------------------

USER_REWARDS = Path(__file__).parent / "fixtures" / "user_rewards.py"


def test_every_argument_trl_passes_reaches_the_reward():
    seen = {}

    def spy(prompts, completions, completion_ids, trainer_state, log_extra, log_metric, answer, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, state=trainer_state,
                    answer=answer, rest=sorted(kwargs))
        log_metric("calls", 1.0)
        log_metric("calls", 3.0)
        log_extra("tag", ["a", "b"])
        return [0.5, None]

    state = object()
    result = RewardSet([FunctionReward(spy)]).score(["p", "p"], ["x", "y"], {"answer": ["1", "1"], "level": [2, 2]},
                                                     completion_ids=[[5, 6], [7]], trainer_state=state)
    assert seen == {"prompts": ["p", "p"], "completions": ["x", "y"], "completion_ids": [[5, 6], [7]],
                    "state": state, "answer": ["1", "1"], "rest": ["level", "solution"]}
    assert result.per_reward["spy"] == [0.5, None]
    assert result.logged == {"rewards/calls": (4.0, 2)}  # sum and count: the recipe averages (2.0)
    assert result.extra == {"tag": ["a", "b"]}
    assert result.metrics["rewards/spy/none_fraction"] == 0.5


def test_async_rewards_are_awaited_concurrently_and_contained():
    import asyncio

    async def slow_a(completions, **kwargs):
        await asyncio.sleep(0.5)
        return [1.0] * len(completions)

    async def slow_b(completions, **kwargs):
        await asyncio.sleep(0.5)
        return [2.0] * len(completions)

    async def broken(completions, **kwargs):
        raise ValueError("judge unreachable")

    rewards = RewardSet([FunctionReward(slow_a), FunctionReward(slow_b), FunctionReward(broken), length_penalty])
    start = time.monotonic()
    result = rewards.score(["q"], ["x" * 30])
    assert time.monotonic() - start < 0.9  # together, not one after the other (1.0 s)
    assert result.per_reward == {"slow_a": [1.0], "slow_b": [2.0], "broken": [None], "length_penalty": [0.0]}
    assert result.metrics["rewards/broken/failures"] == 1.0
    with pytest.raises(UserError, match="raised ValueError: judge unreachable on the first step"):
        RewardSet([FunctionReward(broken)]).score(["q"], ["x"], strict=True)


def _load_user_rewards():
    import importlib.util

    pytest.importorskip("trl.rewards")
    spec = importlib.util.spec_from_file_location("user_rewards_for_tests", USER_REWARDS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("reward", "prompts", "completions", "columns", "message"),
    [
        # An Unsloth-notebook reward on a plain-text dataset: completions are strings there.
        ("match_format_exactly", ["2+2="], ["4"], {}, "prompts and completions are strings here, because the "
                                                      "dataset's prompt is text"),
        # A TRL text-format reward on a conversational dataset.
        ("reward_len", [[{"role": "user", "content": "2+2?"}]], [[{"role": "assistant", "content": "4"}]], {},
         None),
        ("reward_ground_truth", [[{"role": "user", "content": "2+2?"}]], [[{"role": "assistant", "content": "4"}]],
         {}, "needs 'ground_truth', which the dataset does not have (its columns: none)"),
        ("check_answer", [[{"role": "user", "content": "2+2?"}]], [[{"role": "assistant", "content": "4"}]],
         {"solution": ["4"]}, "needs 'answer', which the dataset does not have (its columns: solution)"),
    ],
    ids=["notebook-reward-on-text", "text-reward-on-chat", "missing-column", "missing-answer"],
)
def test_a_reward_failing_on_the_first_step_names_itself_with_traceback_and_hint(reward, prompts, completions,
                                                                                  columns, message):
    module = _load_user_rewards()
    fn = FunctionReward(getattr(module, reward), source=str(USER_REWARDS))
    if message is None:  # len() of a message list is 1: wrong but silent, as in TRL (no error to report)
        assert RewardSet([fn]).score(prompts, completions, columns, strict=True).per_reward[reward] == [-19.0]
        return
    with pytest.raises(UserError) as err:
        RewardSet([fn]).score(prompts, completions, columns, strict=True)
    text = str(err.value)
    assert f"Reward {reward!r} ({USER_REWARDS}) raised" in text and "on the first step" in text
    if reward == "match_format_exactly":  # it failed inside: its own frames (the others failed in the call)
        assert "Traceback (most recent call last):" in text and f'{USER_REWARDS}", line' in text
    assert "rewardset.py" not in text  # the reward's frames, never ours
    assert message in text


def test_first_step_hints_for_a_missing_kwargs_and_a_wrong_count():
    def no_kwargs(prompts, completions):
        return [0.0] * len(completions)

    def one_value(completions, **kwargs):
        return [1.0]

    with pytest.raises(UserError, match=r"end the reward's parameters with \*\*kwargs"):
        RewardSet([FunctionReward(no_kwargs)]).score(["q"], ["x"], strict=True)
    with pytest.raises(UserError, match="returned 1 value for 2 completions .*on the first step"):
        RewardSet([FunctionReward(one_value)]).score(["q", "q"], ["x", "y"], strict=True)
    # Not strict (later steps): the same failures are contained and counted.
    assert RewardSet([FunctionReward(one_value)]).score(["q", "q"], ["x", "y"]).per_reward["one_value"] == [None] * 2


def test_notebook_and_trl_rewards_score_conversational_completions_unchanged():
    module = _load_user_rewards()
    prompts = [[{"role": "system", "content": "Think."}, {"role": "user", "content": "What is 3+4?"}]] * 2
    texts = ["<start_working_out>3 and 4<end_working_out><SOLUTION>7</SOLUTION>", "<think>hm</think>8"]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    names = ["match_format_exactly", "match_format_approximately", "check_answer", "check_numbers",
             "format_reward_func", "accuracy_reward", "think_format_reward"]
    rewards = RewardSet([FunctionReward(getattr(module, n)) for n in names])
    result = rewards.score(prompts, completions, {"answer": ["7", "7"]}, completion_ids=[[1], [2]],
                           trainer_state=None, strict=True)
    assert result.per_reward == {
        "match_format_exactly": [3.0, 0], "match_format_approximately": [1.5, -3.0], "check_answer": [5.0, -2.0],
        "check_numbers": [3.5, -2.5], "format_reward_func": [0.0, 0.0], "accuracy_reward": [0.0, 0.0],
        "think_format_reward": [0.0, 1.0],
    }


def test_code_test_timeout_option_sets_the_per_test_limit():
    from opensloth.config import GRPORunConfig
    from opensloth.rewards import set_code_test_timeout

    assert GRPORunConfig.model_validate({"model": {"model": "m"}}).grpo.code_test_timeout == 2.0
    cfg = GRPORunConfig.model_validate({"model": {"model": "m"}, "grpo": {"code_test_timeout": 0.3}})
    slow = "```python\nimport time\ndef f():\n    time.sleep(0.8)\n    return 1\n```"
    try:
        set_code_test_timeout(cfg.grpo.code_test_timeout)
        assert code_correctness(["q"], [slow], tests=[["assert f() == 1"]]) == [0.2]
        set_code_test_timeout(2.0)
        assert code_correctness(["q"], [slow], tests=[["assert f() == 1"]]) == [1.0]
    finally:
        set_code_test_timeout(2.0)
