"""`make mutation`: how often the in-process tests notice a subtle bug in the pure modules.

mutmut (configured in pyproject's ``[tool.mutmut]``) makes one-at-a-time mutants of the
lifecycle, the prober bookkeeping, the HTTP/1 framing functions and the config rules, and runs
each against the tests that cover the mutated function, in-process (forked), so a run takes
minutes. This script then sorts the verdicts per module: killed (a test failed, mypy rejected
the mutant, or it hung past mutmut's timeout), survived, and equivalent — a survivor listed in
``bench/mutation_equivalents.toml`` with a one-line reason why no test can tell it apart.
The score is killed / (all - equivalent); the target is ≥ 95 % per module (issue 17).

    python bench/mutation.py            # run mutmut, then write bench/MUTATION.md
    python bench/mutation.py --report   # only re-read the last run's verdicts
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tomllib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EQUIVALENTS = REPO / "bench" / "mutation_equivalents.toml"
REPORT = REPO / "bench" / "MUTATION.md"
MUTMUT = [sys.executable, "-m", "mutmut"]
#: mutmut's verdicts that mean the mutant was noticed.
KILLED = {"killed", "caught by type check", "timeout", "segfault"}
TARGET = 0.95


@dataclass(frozen=True)
class Mutation:
    """A mutant as its function and changed line, so equivalents survive renumbering."""

    function: str
    before: str
    after: str


def function_of(name: str) -> str:
    """mutmut's ``drainproxy.core.lifecycle.xǁDrainLifecycleǁpoll__mutmut_7`` as
    ``lifecycle.DrainLifecycle.poll``."""
    qualified = name.split(".", 2)[2].rsplit("__mutmut_", 1)[0]
    return qualified.replace(".xǁ", ".").replace("ǁ", ".").replace(".x_", ".")


def module_of(name: str) -> str:
    """mutmut's ``drainproxy.core.lifecycle.xǁ...`` as ``lifecycle`` (the layer dropped)."""
    return name.split(".", 3)[2]


def verdicts() -> dict[str, tuple[str, Path]]:
    """Every mutant's verdict and source file, from the ``.meta`` files of the last run."""
    from mutmut.__main__ import SourceFileMutationData, walk_mutatable_files
    from mutmut.stats import status_by_exit_code

    found = {}
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        for name, code in data.exit_code_by_key.items():
            found[name] = (status_by_exit_code[code], path)
    return found


def mutation_of(name: str, path: Path) -> Mutation:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    diff = get_diff_for_mutant(name, path=path).splitlines()
    removed = [line[1:].strip() for line in diff if re.match(r"^-(?!--)", line)]
    added = [line[1:].strip() for line in diff if re.match(r"^\+(?!\+\+)", line)]
    return Mutation(function_of(name), " / ".join(removed), " / ".join(added))


def load_equivalents() -> dict[Mutation, str]:
    table = tomllib.loads(EQUIVALENTS.read_text()) if EQUIVALENTS.exists() else {}
    return {
        Mutation(entry["function"], entry["before"], entry["after"]): entry["reason"]
        for entry in table.get("equivalent", [])
    }


def report(found: dict[str, tuple[str, Path]]) -> tuple[str, bool]:
    equivalents = load_equivalents()
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    survivors: dict[str, list[tuple[Mutation, str | None]]] = defaultdict(list)
    for name, (status, path) in sorted(found.items()):
        module = module_of(name)
        if status in KILLED:
            counts[module]["killed"] += 1
            continue
        mutation = mutation_of(name, path)
        reason = equivalents.get(mutation)
        counts[module]["equivalent" if reason else "survived"] += 1
        survivors[module].append((mutation, reason))
    lines = [
        "| module | mutants | killed | equivalent | survived | score |",
        "|---|---|---|---|---|---|",
    ]
    met = True
    for module, count in sorted(counts.items()):
        total = sum(count.values())
        scored = total - count["equivalent"]
        score = count["killed"] / scored if scored else 1.0
        met &= score >= TARGET
        lines.append(
            f"| {module} | {total} | {count['killed']} | {count['equivalent']} "
            f"| {count['survived']} | {score:.1%} |"
        )
    for module, rows in sorted(survivors.items()):
        lines += ["", f"### {module}: survivors", ""]
        for mutation, reason in rows:
            verdict = f"equivalent: {reason}" if reason else "**survived**"
            lines.append(
                f"- `{mutation.function}`: `{mutation.before}` → `{mutation.after}` — {verdict}"
            )
    return "\n".join(lines), met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="only report the last run")
    args = parser.parse_args()
    if not args.report:
        # mutmut runs the type checker by name: the venv's mypy, activated or not.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        subprocess.run(
            [*MUTMUT, "run"],
            cwd=REPO,
            check=True,
            stdout=subprocess.DEVNULL,
            env={**os.environ, "PATH": path},
        )
    table, met = report(verdicts())
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    skipped = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mutmut"].get(
        "do_not_mutate_patterns", []
    )
    REPORT.write_text(
        "# Mutation score (issue 17)\n\n"
        f"`make mutation` at {head}; score = killed / (mutants - equivalent), target ≥ 95 %.\n"
        "Killed counts mutants a test failed on, mypy rejected, or that hung (a busy loop).\n"
        "Not mutated: the lines matching "
        + ", ".join(f"`{pattern}`" for pattern in skipped)
        + " (pyproject's `do_not_mutate_patterns`: the schema helpers' def lines, whose"
        " default arguments run at import, before mutmut activates a mutant; their bodies"
        " are mutated).\n\n"
        f"{table}\n"
    )
    print(table)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
