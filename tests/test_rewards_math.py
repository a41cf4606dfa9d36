"""The math rewards against Math-Verify's own test cases, and their extraction and format rules.

tests/fixtures/math_verify/cases.json holds the (gold, prediction, expected) cases of
Math-Verify's upstream tests with the options each test calls math-verify with (see its README
and build_cases.py; raw math-verify agrees with every expected value there). Each case is scored
three ways, one batch per set of options:

- solution: the prediction inside <SOLUTION>...</SOLUTION>, after a working section;
- boxed: the bare answers (`bare_answer`) in a final \\boxed{} after some text;
- prose: the prediction as the whole completion (no tags), as a model that ignores them writes it.

math_answer must agree with the expected value on every case in every way, math_number on every
case whose gold is a plain number, and no wrong answer may score 1.0.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path

import pytest

from opensloth.rewards import MathAnswerReward, MathNumberReward, math_answer, math_format, math_number
from opensloth.rewards.math import extract_final_answer, is_plain_number, math_verify_input

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "math_verify" / "cases.json").read_text(encoding="utf-8"))
CASES = FIXTURE["cases"]
MODES = ("solution", "boxed", "prose")

# Cases where the expected value is math-verify's own misreading, which a box does not repeat.
EXCLUDED = {
    ("boxed", "test_yujianll.py::test_string_extraction[9]"): (
        "upstream expects 1 for 1 - 1/e against 1 + 1/e: between $...$ math-verify drops \\mathrm{e}, fails on "
        "the rest and reads both as the number 1; inside \\boxed{} it finds no number in either and compares "
        "the two (different) strings, so 0, the right verdict"),
}


def completion(case: dict, mode: str) -> str:
    if mode == "solution":
        return f"<start_working_out>Let me work it out.<end_working_out><SOLUTION>{case['pred']}</SOLUTION>"
    if mode == "boxed":
        answer = case["bare_answer"]
        boxed = answer if "\\boxed" in answer else "\\boxed{" + answer + "}"  # several boxes stay as they are
        return f"We work it out step by step.\n\nTherefore, the answer is {boxed}."
    return case["pred"]


def reward_options(case: dict) -> dict:
    """The options the upstream test calls math-verify with, as reward arguments."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    options = {"float_rounding": case["float_rounding"], "strict": case["strict"],
               "allow_set_relation_comp": case["allow_set_relation_comp"]}
    if case["targets"] != "default":  # compare_strings' configs (tests/test_all.py upstream)
        options["targets"] = [LatexExtractionConfig(boxed_match_priority=0) if t == "latex" else ExprExtractionConfig()
                              for t in case["targets"]]
    return options


def cases_for(mode: str) -> list[dict]:
    return [c for c in CASES if mode != "boxed" or c["bare_answer"] is not None]


def score_all(reward_class: type, keep=lambda case: True) -> dict[str, dict[str, float | None]]:
    """{mode: {case id: score}}: one reward call per set of options, with every case of that set
    in every mode in one batch (as a GRPO step scores a batch)."""
    groups = defaultdict(list)
    for mode in MODES:
        for case in filter(keep, cases_for(mode)):
            groups[json.dumps([case["targets"], case["float_rounding"], case["strict"],
                               case["allow_set_relation_comp"]])].append((mode, case))
    scores = {mode: {} for mode in MODES}
    for group in groups.values():
        reward = reward_class(**reward_options(group[0][1]))
        out = reward([""] * len(group), [completion(c, mode) for mode, c in group], answer=[c["gold"] for _, c in group])
        for (mode, case), score in zip(group, out, strict=True):
            scores[mode][case["id"]] = score
    return scores


@pytest.fixture(scope="module")
def answer_scores() -> dict[str, dict[str, float | None]]:
    return score_all(MathAnswerReward)


@pytest.fixture(scope="module")
def number_scores() -> dict[str, dict[str, float | None]]:
    return score_all(MathNumberReward, lambda case: is_plain_number(case["gold"]))


def disagreements(scores: dict, cases: list[dict], mode: str) -> list[str]:
    return [f"{c['id']}: expected {c['expected']}, got {scores[c['id']]} (gold {c['gold'][:60]!r}, "
            f"prediction {c['pred'][:60]!r})" for c in cases
            if (mode, c["id"]) not in EXCLUDED and scores[c["id"]] != c["expected"]]


def test_fixture_is_for_the_installed_math_verify():
    """The expected values are those of the installed math-verify's own tests (build_cases.py checked
    that raw math-verify, called as those tests call it, agrees with all of them)."""
    assert version("math-verify") == FIXTURE["math_verify_version"], "rebuild cases.json: see its README"
    assert len(CASES) == 276
    assert sum(c["kind"] == "prose" for c in CASES) == 115 and sum(c["expected"] == 0 for c in CASES) == 43


@pytest.mark.parametrize("mode", MODES)
def test_math_answer_agrees_with_math_verify_on_every_upstream_case(answer_scores, mode):
    cases = cases_for(mode)
    wrong = disagreements(answer_scores[mode], cases, mode)
    assert not wrong, f"{len(wrong)} of {len(cases)} cases disagree ({mode}):\n" + "\n".join(wrong)
    assert len(cases) == {"solution": 276, "boxed": 161, "prose": 276}[mode]
    for (excluded_mode, case_id), _reason in EXCLUDED.items():
        if excluded_mode == mode:  # scored as raw math-verify scores the boxed answer: the numbers differ
            assert answer_scores[mode][case_id] == 0.0


@pytest.mark.parametrize("mode", MODES)
def test_no_wrong_answer_scores_one(answer_scores, mode):
    """Where raw math-verify says the prediction differs from the gold, nothing we wrap pays it."""
    paid = [c["id"] for c in cases_for(mode) if c["expected"] == 0 and answer_scores[mode][c["id"]] == 1.0]
    assert not paid


@pytest.mark.parametrize("mode", MODES)
def test_math_number_agrees_with_math_verify_where_the_gold_is_a_plain_number(number_scores, mode):
    cases = [c for c in cases_for(mode) if is_plain_number(c["gold"])]
    assert len(cases) == {"solution": 72, "boxed": 24, "prose": 72}[mode]
    wrong = disagreements(number_scores[mode], cases, mode)
    assert not wrong, f"{len(wrong)} of {len(cases)} cases disagree ({mode}):\n" + "\n".join(wrong)


# ---------------------------------------------------------------------------------------------
# Where the final answer is
# ---------------------------------------------------------------------------------------------

LONG_WORK = "We expand, collect the terms and check each case in turn. " * 30  # 1,770 characters


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<SOLUTION>1</SOLUTION> then <answer>2</answer>", "1"),  # <SOLUTION> first
        ("<SOLUTION>1</SOLUTION><SOLUTION> </SOLUTION>", "1"),  # the last non-empty one
        ("<think>2+2</think> <answer>4</answer>", "4"),  # r1-zero
        ("<answer>4</answer> and \\boxed{5}", "4"),  # <answer> before the rest
        ("So it is 4.\n\\boxed{5}\nAnswer: 6", "6"),  # the later of box and answer line
        ("Answer: 6\nno wait \\boxed{5}", "5"),
        ("**Final Answer:** 34", "34"),
        ("Final Answer: The largest $n$ is 34.", "The largest $n$ is 34."),
        ("I checked twice, so the final answer is $20\\%$. I hope it is correct.", "$20\\%$"),
        ("The answer is positive, as shown.", "The answer is positive, as shown."),  # no math after "is": not an answer line
        (r"\boxed{1}, \boxed{2} and \boxed{3}", "1, 2, 3"),  # one answer in several boxes
        (r"$\boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 2)}$", "(2, 2), (6, 2)"),
        (r"First \boxed{3}, no wait: \boxed{\sqrt{2}}", r"\sqrt{2}"),  # words between: the last box
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are not braces
        (r"\boxed{\$16,\!386.20}", r"\$16,\!386.20"),
        ("no tags, no box", "no tags, no box"),  # the completion itself
        ("<|im_end|>", None),
        ("", None),
    ],
)
def test_extract_final_answer_precedence(completion, expected):
    assert extract_final_answer(completion) == expected


def test_long_solution_is_searched_for_its_final_answer():
    """A model that writes its working inside <SOLUTION> is scored on its final answer (before: 0)."""
    boxed = f"<SOLUTION>{LONG_WORK}So the total is \\boxed{{1,000}}.</SOLUTION>"
    line = f"<SOLUTION>{LONG_WORK}\nAnswer: 1000</SOLUTION>"
    tail = f"<SOLUTION>{LONG_WORK}\nSo the total is $1000$.</SOLUTION>"  # neither: its last 1,000 characters
    wrong = f"<SOLUTION>{LONG_WORK}So the total is \\boxed{{999}}.</SOLUTION>"
    assert math_answer([""] * 4, [boxed, line, tail, wrong], answer=["1000"] * 4) == [1.0, 1.0, 1.0, 0.0]
    assert math_number([""] * 4, [boxed, line, tail, wrong], answer=["1000"] * 4) == [1.0, 1.0, 1.0, 0.0]


def test_the_cap_bounds_only_the_final_answer():
    reward = MathAnswerReward(max_answer_chars=20)
    short = f"<SOLUTION>{LONG_WORK}\\boxed{{42}}</SOLUTION>"
    long_box = "<SOLUTION>\\boxed{" + "4" * 30 + "}</SOLUTION>"
    assert reward([""] * 2, [short, long_box], answer=["42", "4" * 30]) == [1.0, 0.0]
    assert math_verify_input(long_box, 20) is None


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("<SOLUTION>1 000</SOLUTION>", "1000", 1.0),  # before: $1 000$ read as 1*0 ...
        ("<SOLUTION>1 000</SOLUTION>", "0", 0.0),  # ... which paid a gold of 0
        ("<SOLUTION>-2,1</SOLUTION>", "1, -2", 1.0),  # a comma that separates no thousands: LaTeX's list
        ("<SOLUTION>-2,1</SOLUTION>", "-2.1", 0.0),
        ("<SOLUTION>2\\sqrt{3}</SOLUTION>", "2", 0.0),  # bare LaTeX is read as LaTeX, not as its first number
        ("<SOLUTION>2\\sqrt{3}</SOLUTION>", "\\sqrt{12}", 1.0),
        ("<SOLUTION>3x</SOLUTION>", "3", 0.0),
        ("<SOLUTION>1, 2</SOLUTION>", "2", 0.0),  # a list is not its last element
        ("<SOLUTION>1, 2</SOLUTION>", "2, 1", 1.0),
        (r"The final answer is \boxed{1}, \boxed{2}, \boxed{3}.", "{1, 2, 3}", 1.0),  # several boxes together
        (r"\boxed{1}, \boxed{2}", "2", 0.0),  # and a hedge between boxes is not paid
        (r"So she has \boxed{\$16,\!386.20}.", "16386.20", 1.0),  # an escaped dollar (before: 0)
        ("Final Answer: 34", "34", 1.0),  # before: no answer
        ("After all that, the answer is $\\frac{3}{4}$.", "0.75", 1.0),
        ("The answer is 42 but I give no tags.", "42", 1.0),  # before: 0 (no tags)
        ("<SOLUTION>\\$5</SOLUTION>", "\\$5", 1.0),  # before: a gold of \$5 was not scored
    ],
)
def test_math_answer_reads_answers_as_math_verify_does(completion, gold, expected):
    assert math_answer([""], [completion], answer=[gold]) == [expected]


def test_a_gold_without_math_is_compared_as_a_string():
    """As math-verify's tests compare it: its string fallback, after its normalisation."""
    golds = ["???", "\\frac{", "x = \\frac{1}{2}, x = \\frac{-1 \\pm \\sqrt{13}}{4}"]
    same = [f"<SOLUTION>{g}</SOLUTION>" for g in golds]
    other = ["<SOLUTION>!!!</SOLUTION>", "<SOLUTION>\\sqrt{</SOLUTION>", "<SOLUTION>x = \\frac{1}{3}</SOLUTION>"]
    assert math_answer([""] * 6, same + other, answer=golds * 2) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    # Only a gold in which math-verify finds nothing at all, not even a string, is not scored.
    assert math_answer([""] * 3, ["<SOLUTION>$</SOLUTION>"] * 3, answer=["$", "", None]) == [None, None, None]


def test_math_verify_options_are_reward_options():
    def score(completion, gold, **options):
        return MathAnswerReward(**options)([""], [completion], answer=[gold])[0]

    assert score("<SOLUTION>0.3333</SOLUTION>", "\\frac{1}{3}") == 0.0
    assert score("<SOLUTION>0.3333</SOLUTION>", "\\frac{1}{3}", float_rounding=4) == 1.0
    assert score("<SOLUTION>$f(y)$</SOLUTION>", "$f(x)$") == 0.0
    assert score("<SOLUTION>$f(y)$</SOLUTION>", "$f(x)$", strict=False) == 1.0
    assert score("<SOLUTION>$-2 \\le x \\le 7$</SOLUTION>", "$x \\in [-2,7]$") == 0.0
    assert score("<SOLUTION>$-2 \\le x \\le 7$</SOLUTION>", "$x \\in [-2,7]$", allow_set_relation_comp=True) == 1.0
    # The other way round math-verify compares them whatever the option (before: 0, no option passed).
    assert score("<SOLUTION>$x \\in [-2,7]$</SOLUTION>", "$-2 \\le x \\le 7$") == 1.0
    assert score("<SOLUTION>Answer $ \n 9 \n $</SOLUTION>", "9") == 1.0  # the number, read as an expression
    assert score("<SOLUTION>Answer $ \n 9 \n $</SOLUTION>", "9", targets=["latex"]) == 0.0  # no inline $ across lines
    assert score("<SOLUTION>1000,99</SOLUTION>", "1000.99") == 0.0  # LaTeX's list {1000, 99}
    assert score("<SOLUTION>1000,99</SOLUTION>", "1000.99", targets=["expr"]) == 1.0  # a decimal comma
    with pytest.raises(ValueError, match="unknown math-verify target"):
        MathAnswerReward(targets=["latx"])
    with pytest.raises(ValueError, match="time_limit_s must be a whole number"):
        MathAnswerReward(time_limit_s=0.5)
    with pytest.raises(ValueError, match="max_answer_chars must be an integer >= 1"):
        MathAnswerReward(max_answer_chars=0)


def test_options_and_number_off_the_main_thread_match_the_main_thread():
    """Off the main thread the checks run in the helper process, options included."""
    reward, number = MathAnswerReward(float_rounding=4, targets=["latex"]), MathNumberReward(targets=["expr"])
    completions = ["<SOLUTION>$0.3333$</SOLUTION>", "<SOLUTION>Answer $ \n 9 \n $</SOLUTION>", "So it is 1 000."]
    answers = ["\\frac{1}{3}", "9", "1000"]
    here = reward([""] * 3, completions, answer=answers), number([""] * 3, completions, answer=answers)
    box = {}
    thread = threading.Thread(target=lambda: box.update(out=(reward([""] * 3, completions, answer=answers),
                                                             number([""] * 3, completions, answer=answers))))
    thread.start()
    thread.join(180)
    assert box["out"] == here == ([1.0, 0.0, 0.0], [None, 1.0, 1.0])


# ---------------------------------------------------------------------------------------------
# CS336's r1-zero format; math_format's partial credit; math_number with plain-number golds
# ---------------------------------------------------------------------------------------------

R1_ZERO_CORRECT = " 3 apples and 4 more make 7. </think> <answer> 7 </answer>"  # the prompt ends with <think>
R1_ZERO_WRONG = " 3 and 4 make 8. </think> <answer> 8 </answer>"


def test_r1_zero_completions_are_graded_as_cs336_grades_them():
    """r1_zero_reward_fn: format 1 when '</think> <answer>' and '</answer>' are in the response;
    the answer is the <answer> content."""
    texts = [R1_ZERO_CORRECT, R1_ZERO_WRONG, " 7 </think><answer> 7 </answer>", "<think>7</think> <answer> \\boxed{7} </answer>"]
    assert math_format([""] * 4, texts) == [1.0, 1.0, 0.0, 1.0]
    assert math_answer([""] * 4, texts, answer=["7"] * 4) == [1.0, 0.0, 1.0, 1.0]
    assert math_number([""] * 4, texts, answer=["7"] * 4) == [1.0, 0.0, 1.0, 1.0]


W, S, E = "<end_working_out>", "<SOLUTION>", "</SOLUTION>"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        # Each of the three closing tags present exactly once: +1/6; not the exact format here
        # because of the text after the last tag (or a missing part).
        ("work" + W + S + "7" + E + " more", round(3 / 6, 6)),
        ("work" + W + S + "7", round(2 / 6, 6)),
        ("work" + W + "7" + E, round(2 / 6, 6)),
        (S + "7" + E, round(2 / 6, 6)),
        ("work" + W + "7", round(1 / 6, 6)),
        (S + "7", round(1 / 6, 6)),
        ("7" + E, round(1 / 6, 6)),
        ("the answer is 7", 0.0),
        # Repeats: -0.25 per repeated tag, the opening one included, whatever the other credit.
        ("work" + W + W + S + "7" + E, round(2 / 6 - 0.25, 6)),
        ("<start_working_out>" * 2 + "w" + W + S + "7" + E, 0.25),
        (W * 2 + S * 2 + E * 2 + "<start_working_out>" * 2, -1.0),
        # An r1-zero marker does not rescue a broken <SOLUTION> completion unless both are there.
        ("work" + W + S + "7" + E + " </answer>", round(3 / 6, 6)),
        # The exact format first, then r1-zero's, then partial credit.
        ("work" + W + S + "7" + E, 1.0),
        ("work" + W + S + "7 </think> <answer>7</answer>", 1.0),
    ],
)
def test_math_format_partial_credit(completion, expected):
    assert math_format([""], [completion]) == [pytest.approx(expected)]


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("<SOLUTION>1,234</SOLUTION>", "1234", 1.0),
        ("<SOLUTION>1234</SOLUTION>", "1,234", 1.0),
        ("<SOLUTION>$1,234.50</SOLUTION>", "1234.5", 1.0),
        ("<SOLUTION>12 then 13</SOLUTION>", "13", 1.0),  # math-verify reads the last number of a sentence
        ("<SOLUTION>12 then 13</SOLUTION>", "12", 0.0),
        ("<SOLUTION>28/100</SOLUTION>", "28", 0.0),  # an expression's value, not its first number
        ("<SOLUTION>\\frac{56}{2}</SOLUTION>", "28", 1.0),
        ("<SOLUTION>\\sqrt{17}</SOLUTION>", "4.123105625617661", 1.0),
        ("<SOLUTION>x = 12</SOLUTION>", "12", 1.0),
        ("<SOLUTION>28%</SOLUTION>", "28", 1.0),  # a percentage counts as its number, as in the reference
        ("<SOLUTION>28</SOLUTION>", "28\\%", 1.0),
        ("<SOLUTION>0.111</SOLUTION>", "0,111", None),  # a list in LaTeX, a decimal elsewhere: not plain
        ("<SOLUTION>AZYUK2A</SOLUTION>", "2", 0.0),
        ("<SOLUTION>2 + 3i</SOLUTION>", "2", 0.0),
        ("<SOLUTION>12</SOLUTION>", "$-2,1$", None),  # a list in LaTeX: not a plain number
        ("<SOLUTION>1</SOLUTION>", "1/2", None),
    ],
)
def test_math_number_with_plain_number_golds(completion, gold, expected):
    assert math_number([""], [completion], answer=[gold]) == [expected]


def test_a_reward_module_sets_the_options_under_its_own_name(tmp_path):
    """docs/rewards.md's example: options are constructor arguments, a reward file uses them."""
    from opensloth.rewards import base as reward_base
    from opensloth.rewards import get_reward_functions, load_reward_module

    path = tmp_path / "my_rewards.py"
    path.write_text("from opensloth.rewards import MathAnswerReward\n\n\nclass ExactAnswer(MathAnswerReward):\n"
                    "    name = 'exact_answer'\n    description = 'math_answer to 8 decimal places.'\n\n\n"
                    "exact_answer = ExactAnswer(float_rounding=8)\n")
    registry, loaded = dict(reward_base._REGISTRY), dict(reward_base._LOADED_MODULES)
    try:
        assert load_reward_module(path) == ["exact_answer"]
        exact = get_reward_functions(["exact_answer"])[0]
        texts = ["<SOLUTION>0.33333333</SOLUTION>", "<SOLUTION>0.333333</SOLUTION>"]
        assert exact([""] * 2, texts, answer=["\\frac{1}{3}"] * 2) == [1.0, 0.0]
        assert math_answer([""] * 2, texts, answer=["\\frac{1}{3}"] * 2) == [1.0, 1.0]
    finally:
        reward_base._REGISTRY.clear()
        reward_base._REGISTRY.update(registry)
        reward_base._LOADED_MODULES.clear()
        reward_base._LOADED_MODULES.update(loaded)
