"""Read py-spy ``--format raw`` files (collapsed stacks): where each process spent its samples.

    python -m experiments.scale.stacks /tmp/bench-scale-*/01-fedavg/py-spy/*.txt
    python -m experiments.scale.stacks FILE --top 30 --match load_client_data train_local

For each file: the number of samples, the heaviest frames by inclusive share (a frame
counts once per stack it appears in, line numbers dropped), and the heaviest leaf frames
(self time). ``--match`` adds the inclusive share of frames whose text contains each word.
py-spy samples only threads holding or waiting on Python frames; ``--idle`` was not set,
so a process blocked in a syscall (waiting for work) is mostly absent from its samples.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r":\d+\)")


def _frame(text: str) -> str:
    return _LINE.sub(")", text.strip())


def read(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        stacks.append(([_frame(f) for f in stack.split(";")], n))
    return stacks


def analyse(path: Path, top: int, match: list[str]) -> str:
    stacks = read(path)
    total = sum(n for _, n in stacks) or 1
    inclusive: Counter = Counter()
    leaf: Counter = Counter()
    for frames, n in stacks:
        for f in set(frames):
            inclusive[f] += n
        leaf[frames[-1]] += n
    lines = [f"== {path} : {total} samples"]
    lines.append("  inclusive:")
    for f, n in inclusive.most_common(top):
        lines.append(f"    {100 * n / total:5.1f}%  {f}")
    lines.append("  self (leaf):")
    for f, n in leaf.most_common(max(10, top // 2)):
        lines.append(f"    {100 * n / total:5.1f}%  {f}")
    for word in match:
        n = sum(c for frames, c in stacks if any(word in f for f in frames))
        lines.append(f"  match {word!r}: {100 * n / total:.1f}% ({n} samples)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--match", nargs="*", default=[])
    args = p.parse_args(argv)
    for f in args.files:
        print(analyse(Path(f), args.top, args.match))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
