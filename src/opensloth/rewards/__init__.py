"""Rewards for GRPO: TRL's calling convention, a registry, presets, built-ins, a code sandbox.

    from opensloth.rewards import resolve_rewards
    rewards = resolve_rewards(task="math")                 # math_format, math_answer, math_number
    result = rewards.score(prompts, completions, {"answer": answers})
    result.total, result.per_reward, result.metrics

See docs/rewards.md and `os list-rewards`.
"""

from opensloth.rewards.base import (
    PRESETS,
    FunctionReward,
    RewardFunction,
    completion_text,
    get_reward_functions,
    list_reward_functions,
    load_reward_module,
    prompt_text,
    register_reward_function,
)
from opensloth.rewards.code import CodeCorrectnessReward, code_correctness, set_code_test_timeout
from opensloth.rewards.general import (
    DemoReward,
    LengthPenalty,
    demo_reward,
    get_length_penalty,
    length_penalty,
)
from opensloth.rewards.math import (
    MathAnswerReward,
    MathFormatReward,
    MathNumberReward,
    R1ZeroReward,
    math_answer,
    math_format,
    math_number,
    r1_zero,
)
from opensloth.rewards.rewardset import RewardResult, RewardSet, resolve_rewards
from opensloth.rewards.sandbox import SandboxLimits, SandboxResult, run_python

__all__ = [
    "PRESETS",
    "CodeCorrectnessReward",
    "DemoReward",
    "FunctionReward",
    "LengthPenalty",
    "MathAnswerReward",
    "MathFormatReward",
    "MathNumberReward",
    "R1ZeroReward",
    "RewardFunction",
    "RewardResult",
    "RewardSet",
    "SandboxLimits",
    "SandboxResult",
    "code_correctness",
    "completion_text",
    "demo_reward",
    "get_length_penalty",
    "get_reward_functions",
    "length_penalty",
    "list_reward_functions",
    "load_reward_module",
    "math_answer",
    "math_format",
    "math_number",
    "prompt_text",
    "r1_zero",
    "register_reward_function",
    "resolve_rewards",
    "run_python",
    "set_code_test_timeout",
]
