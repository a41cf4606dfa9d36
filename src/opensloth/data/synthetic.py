"""Small arithmetic problems in the schemas of the tutorial's hub datasets, for tests and the demo.

The tiny test model is byte-level (one token per character), so every text here is short:
"What is 3 + 4?" and the working "3+4=7". Single-digit addition and subtraction (never below
zero) are learnable by a 0.1M-parameter model on 2 CPU cores in minutes.

Example:
    >>> make_arithmetic_rows(1, seed=0, schema="dapo")
    [{'prompt': 'What is 6 + 6?', 'solution': '12'}]
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal

Schema = Literal["openmath", "dapo", "gsm8k", "question-answer", "prompt-answer"]
SCHEMAS = ("openmath", "dapo", "gsm8k", "question-answer", "prompt-answer")


def make_arithmetic_rows(n: int, seed: int = 0, schema: Schema = "openmath") -> list[dict[str, str]]:
    """`n` single-digit problems ("What is a + b?", "What is a - b?" with a >= b), seeded.

    Args:
        n: number of rows.
        seed: same seed, same rows.
        schema: "openmath" (`problem`, `generated_solution`, `expected_answer`: the schema of
            unsloth/OpenMathReasoning-mini), "dapo" (`prompt`, `solution`: open-r1/DAPO-Math-17k-Processed),
            "gsm8k" (`question`, `answer` ending in "#### n"), "question-answer" (`question` and the plain
            `answer`, as CS336's MATH prompts) or "prompt-answer" (`prompt`, `answer`).

    Returns:
        A list of row dicts (all values are strings).
    """
    if schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r}; choose {', '.join(SCHEMAS)}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        op = rng.choice("+-")
        if op == "-" and a < b:
            a, b = b, a
        result = a + b if op == "+" else a - b
        question, working, answer = f"What is {a} {op} {b}?", f"{a}{op}{b}={result}", str(result)
        if schema == "openmath":
            rows.append({"problem": question, "generated_solution": working, "expected_answer": answer})
        elif schema == "dapo":
            rows.append({"prompt": question, "solution": answer})
        elif schema == "gsm8k":
            rows.append({"question": question, "answer": f"{working}\n#### {answer}"})
        elif schema == "question-answer":
            rows.append({"question": question, "answer": answer})
        else:
            rows.append({"prompt": question, "answer": answer})
    return rows


def write_rows(rows: list[dict], path: str | Path) -> Path:
    """Write rows as JSON Lines (parent directories created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    return path
