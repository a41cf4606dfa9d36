"""The code sandbox's cost per completion: before (one `nobody` process, audit hook, tests run
inside it) and after (Linux namespaces, read-only root, private /tmp, split grading).

A batch of 64 honest completions of `add(a, b)` with 3 assert tests each, scored by
code_correctness. Two figures per version:
- latency: each completion scored alone, one after another (median and p90 ms);
- batch: the whole batch through `code_correctness(...)` with its default 4 workers, ms per
  completion (wall time / 64).

The "before" code is the repository at --old-ref (default: the last commit before the change),
extracted with `git archive`; each version runs in its own process with its own PYTHONPATH.

    python bench/sandbox_cost.py
    python bench/sandbox_cost.py --old-src /path/to/old/src --n 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

OLD_REF = "56176f6"  # main before the namespace sandbox
ROOT = Path(__file__).resolve().parents[1]

_MEASURE = r'''
import json, statistics, sys, time
from opensloth.rewards import code_correctness
n = int(sys.argv[1])
good = "```python\ndef add(a, b):\n    return a + b\n```"
tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]
code_correctness.score_one(good, tests)  # warm-up: interpreter probe, namespace probe
lat = []
for _ in range(n):
    t = time.perf_counter()
    assert code_correctness.score_one(good, tests) == 1.0
    lat.append((time.perf_counter() - t) * 1000)
t = time.perf_counter()
assert code_correctness(["q"] * n, [good] * n, tests=[tests] * n) == [1.0] * n
batch = (time.perf_counter() - t) * 1000 / n
lat.sort()
print(json.dumps({"median_ms": statistics.median(lat), "p90_ms": lat[int(0.9 * (n - 1))], "batch_ms": batch}))
'''


def measure(src: Path, n: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(n)], env=env, capture_output=True, text=True,
                         check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def old_source(ref: str, into: Path) -> Path:
    """`src/` of the repository at `ref`, extracted under `into`."""
    archive = into / "old.tar"
    with archive.open("wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"], stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="completions in the batch")
    parser.add_argument("--old-ref", default=OLD_REF, help="git ref of the 'before' code")
    parser.add_argument("--old-src", type=Path, help="use this src/ directory as the 'before' code instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old_src = args.old_src or old_source(args.old_ref, Path(tmp))
        before = measure(old_src, args.n)
        after = measure(ROOT / "src", args.n)
    print(f"{args.n} honest completions, 3 assert tests each")
    print(f"{'':8}{'median ms':>11}{'p90 ms':>9}{'batch ms/completion (4 workers)':>34}")
    for name, r in (("before", before), ("after", after)):
        print(f"{name:8}{r['median_ms']:>11.1f}{r['p90_ms']:>9.1f}{r['batch_ms']:>34.1f}")
    print(f"after / before: median x{after['median_ms'] / before['median_ms']:.2f}, "
          f"batch x{after['batch_ms'] / before['batch_ms']:.2f}")


if __name__ == "__main__":
    main()
