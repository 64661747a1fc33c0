"""Mutation testing of the modules that decide results (``make mutants``).

Runs mutmut (configured in pyproject.toml ``[tool.mutmut]``: which modules it mutates and
which fast tests judge each mutant) from a fresh ``mutants/`` folder, then reports: total
mutants, killed, survived, timeouts, the score, and every surviving mutant with its status
and diff. Survivors judged equivalent (no test can tell them from the original) are listed
with a one-line reason in ``tests/mutants_equivalent.md``; the score counts the others only:

    score = killed / (total - equivalent)        killed: killed, timeout, type check

The report goes to ``benchmarks/results/mutants.json``. Exit status 1 when the score is
below ``--fail-under`` (90 by default), or when mutmut itself failed.

Usage: python scripts/mutants.py [--resume] [--max-children N] [--fail-under PCT]
       python scripts/mutants.py --report-only      (report on the last run's mutants/)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT = ROOT / "tests" / "mutants_equivalent.md"
OUT = ROOT / "benchmarks" / "results" / "mutants.json"
#: mutmut's statuses that count as a kill (a timeout is a mutant that made the tests hang)
KILLED = ("killed", "timeout", "caught by type check")
#: a list entry in the equivalent-mutants file: "- `mutant name`: reason"
_ENTRY = re.compile(r"^\s*[-*]\s+`([^`]+)`\s*[:\u2014-]\s*(\S.*)$")


def equivalent_mutants(path: Path = EQUIVALENT) -> dict[str, str]:
    """Mutant name -> the reason it is equivalent, from the maintained list."""
    if not path.exists():
        return {}
    found: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = _ENTRY.match(line)
        if m:
            found[m.group(1)] = m.group(2).strip()
    return found


def run_mutmut(max_children: int, resume: bool, log: Path) -> int:
    """``mutmut run`` in the project root, output to ``log``; its exit status."""
    if not resume and (ROOT / "mutants").exists():
        shutil.rmtree(ROOT / "mutants")
    env = dict(os.environ)
    # mutmut forks one child per mutant from a process that already ran torch: a forked
    # OpenMP pool hangs, and on 2 cores one thread per child is also the fastest.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTEST_ADDOPTS", None)
    exe = Path(sys.executable).parent / "mutmut"
    cmd = [str(exe) if exe.exists() else "mutmut", "run", "--max-children", str(max_children)]
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"mutmut run --max-children {max_children} (progress: {log.relative_to(ROOT)})",
          flush=True)
    with log.open("w", encoding="utf-8") as out:
        return subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                              check=False).returncode


def collect(equivalent: dict[str, str]) -> dict:
    """Every mutant's status from mutmut's result files, and the survivors' diffs."""
    os.chdir(ROOT)  # mutmut's helpers read pyproject.toml and mutants/ from the working dir
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code
    from mutmut.utils.file_utils import walk_mutatable_files

    statuses: dict[str, tuple[str, str]] = {}  # name -> (file, status)
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        for name, code in data.exit_code_by_key.items():
            statuses[name] = (str(path), status_by_exit_code[code])

    counts = Counter(status for _, status in statuses.values())
    total = len(statuses)
    killed = sum(counts[s] for s in KILLED)
    survivors = []
    for name, (path, status) in sorted(statuses.items()):
        if status in KILLED:
            continue
        try:
            diff = get_diff_for_mutant(name, path=path)
        except Exception as exc:  # a diff is a convenience; the verdict stands without it
            diff = f"(no diff: {exc})"
        survivors.append({"mutant": name, "file": path, "status": status,
                          "equivalent": equivalent.get(name), "diff": diff})
    n_equiv = sum(1 for s in survivors if s["equivalent"] is not None)
    denominator = total - n_equiv
    by_file: dict[str, dict[str, int]] = {}
    for path, status in statuses.values():
        entry = by_file.setdefault(path, {"total": 0, "killed": 0, "survived": 0,
                                          "equivalent": 0})
        entry["total"] += 1
        entry["killed"] += status in KILLED
    for s in survivors:
        by_file[s["file"]]["equivalent" if s["equivalent"] is not None else "survived"] += 1
    return {
        "total": total,
        "killed": killed,
        "survived": counts["survived"],
        "no_tests": counts["no tests"],
        "timeout": counts["timeout"],
        "suspicious": counts["suspicious"],
        "not_checked": counts["not checked"],
        "statuses": dict(sorted(counts.items())),
        "equivalent": n_equiv,
        "score_all": round(100.0 * killed / total, 2) if total else 0.0,
        "score": round(100.0 * killed / denominator, 2) if denominator else 100.0,
        "by_file": dict(sorted(by_file.items())),
        "stale_equivalent_entries": sorted(
            n for n in equivalent if n not in statuses or statuses[n][1] in KILLED),
        "survivors": survivors,
    }


def sources(paths: list[str]) -> dict:
    """Which sources were mutated: the commit, and the mutated files changed since it."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", *paths)
    return {"commit": git("rev-parse", "HEAD") or None,
            "uncommitted": [line.split(maxsplit=1)[-1] for line in changed.splitlines()]}


def tool_config() -> dict:
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    return {k: cfg.get(k) for k in ("only_mutate", "pytest_add_cli_args_test_selection",
                                    "pytest_add_cli_args")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-children", type=int, default=os.cpu_count() or 2,
                    help="mutants tested at once (default: the CPU count)")
    ap.add_argument("--resume", action="store_true",
                    help="keep mutants/ from the last run: only mutants without a verdict "
                         "(or whose function changed) are tested again")
    ap.add_argument("--report-only", action="store_true", help="do not run mutmut")
    ap.add_argument("--fail-under", type=float, default=90.0,
                    help="exit 1 when the score (percent, equivalents excluded) is lower")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    from importlib.metadata import version

    start = time.monotonic()
    rc = 0
    log = ROOT / "mutants" / "run.log"
    if not args.report_only:
        rc = run_mutmut(args.max_children, args.resume, log)
    wall = time.monotonic() - start
    if not (ROOT / "mutants").exists():
        print("no mutants/: run mutmut first (without --report-only)")
        return 1

    cfg = tool_config()
    report = {"tool": "mutmut", "version": version("mutmut"), "config": cfg,
              "sources": sources(cfg["only_mutate"] or []),
              "max_children": args.max_children, "wall_s": None if args.report_only
              else round(wall, 1), "mutmut_exit": rc,
              **collect(equivalent_mutants())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n",
                        encoding="utf-8")

    r = report
    print(f"mutmut {r['version']}: {r['total']} mutants, {r['killed']} killed "
          f"(timeouts {r['timeout']}), {r['survived']} survived, {r['no_tests']} no tests, "
          f"{r['suspicious']} suspicious, {r['not_checked']} not checked")
    print(f"equivalent (tests/mutants_equivalent.md): {r['equivalent']}")
    print(f"score: {r['killed']}/{r['total'] - r['equivalent']} = {r['score']}% of "
          f"non-equivalent mutants killed ({r['score_all']}% of all)")
    if r["wall_s"] is not None:
        print(f"wall time: {r['wall_s'] / 60:.1f} min")
    for path, f in r["by_file"].items():
        print(f"  {path}: {f['killed']}/{f['total']} killed, {f['equivalent']} equivalent, "
              f"{f['survived']} surviving")
    if r["survivors"]:
        print("survivors:")
    for s in r["survivors"]:
        why = f"equivalent: {s['equivalent']}" if s["equivalent"] else "NOT EQUIVALENT"
        print(f"  {s['status']:<10} {s['mutant']}  ({why})")
    for name in r["stale_equivalent_entries"]:
        print(f"  stale entry in tests/mutants_equivalent.md (killed or gone): {name}")
    print(f"report: {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    if rc != 0:
        print(f"mutmut exited {rc}: see mutants/run.log")
        return 1
    if r["not_checked"]:
        print("some mutants were not checked: the run did not finish")
        return 1
    return 0 if r["score"] >= args.fail_under else 1


if __name__ == "__main__":
    sys.exit(main())
