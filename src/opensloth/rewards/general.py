"""Task-independent rewards: length_penalty, and demo_reward (a debugging aid)."""

from __future__ import annotations

import os

from rich.console import Console
from rich.markup import escape

from opensloth.rewards.base import RewardFunction, completion_text, prompt_text, register_reward_function


class LengthPenalty(RewardFunction):
    """0 for completions of `min_chars` to `max_chars` characters, negative outside, down to -1.

    Shorter: -(min_chars - n) / min_chars (an empty completion scores -1).
    Longer: -min(1, (n - max_chars) / max_chars) (twice the limit or more scores -1).
    Characters, not tokens: rewards see text only. Make one with other bounds with
    `get_length_penalty(min_chars, max_chars, name=...)` in a --reward-module file.

    Example:
        >>> length_penalty([""], ["x" * 100])
        [0.0]
    """

    def __init__(self, min_chars: int = 20, max_chars: int = 4000, name: str = "length_penalty"):
        if not 0 <= min_chars <= max_chars or max_chars <= 0:
            raise ValueError(f"length bounds need 0 <= min_chars <= max_chars and max_chars > 0, "
                             f"got {min_chars}, {max_chars}")
        self.min_chars, self.max_chars, self.name = min_chars, max_chars, name
        self.description = (f"0 for {min_chars}..{max_chars} characters; linearly down to -1 when shorter "
                            "or longer (empty, or twice the maximum).")

    def score(self, prompts, completions, **columns):
        return [self.score_one(len(completion_text(c))) for c in completions]

    def score_one(self, n: int) -> float:
        if n < self.min_chars:
            return -(self.min_chars - n) / self.min_chars
        if n > self.max_chars:
            return -min(1.0, (n - self.max_chars) / self.max_chars)
        return 0.0


def get_length_penalty(min_chars: int = 20, max_chars: int = 4000, name: str = "length_penalty") -> LengthPenalty:
    """A length penalty with other bounds; give it its own `name` when the built-in one is also used."""
    return LengthPenalty(min_chars, max_chars, name)


class DemoReward(RewardFunction):
    """Shows one sample (prompt, completion, the other rewards' scores) and returns 0.0 for every completion.

    A debugging aid: add it to --rewards to watch what the model writes and how it is scored.
    Shows the first sample of every `every`-th call, on rank 0 only (the RANK environment
    variable), on stderr. It scores nothing, so it never changes training.

    Example:
        >>> demo_reward(["2+2?"], ["4"])  # also prints the sample
        [0.0]
    """

    name = "demo_reward"
    description = "Prints a sample (prompt, completion, the other rewards' scores); returns zeros. Debugging aid."
    wants_scores = True
    self_limited = True

    def __init__(self, every: int = 1, max_chars: int = 1200, console: Console | None = None):
        self.every, self.max_chars, self.calls = every, max_chars, 0
        self.console = console or Console(stderr=True)

    def score(self, prompts, completions, reward_scores: dict | None = None, **columns):
        self.calls += 1
        if completions and (self.calls - 1) % self.every == 0 and os.environ.get("RANK", "0") == "0":
            self.show(prompt_text(prompts[0]) if prompts else "", completion_text(completions[0]),
                      {name: values[0] for name, values in (reward_scores or {}).items()},
                      {key: values[0] for key, values in columns.items()
                       if isinstance(values, (list, tuple)) and not (key == "solution" and values is columns.get("answer"))})
        return [0.0] * len(completions)

    def show(self, prompt: str, completion: str, scores: dict, columns: dict) -> None:
        def clip(text: str) -> str:
            text = str(text)
            return escape(text if len(text) <= self.max_chars else text[: self.max_chars] + " [...]")

        self.console.rule(f"[bold]demo_reward[/] sample (call {self.calls})")
        self.console.print(f"[cyan]prompt:[/] {clip(prompt)}")
        self.console.print(f"[green]completion:[/] {clip(completion)}")
        for key, value in columns.items():
            self.console.print(f"[magenta]{escape(key)}:[/] {clip(value)}")
        shown = ", ".join(f"{name}={'None' if v is None else f'{v:.3f}'}" for name, v in scores.items())
        self.console.print(f"[yellow]scores:[/] {shown or '(no other rewards)'}")


length_penalty = LengthPenalty()
demo_reward = DemoReward()
register_reward_function(length_penalty)
register_reward_function(demo_reward)
