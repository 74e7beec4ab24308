"""Record a benchmark run: raw JSON, report and plot into ``benchmarks/results/``, and the device's current
table in ``benchmarks/RESULTS.md`` regenerated from them (the table it replaces stays linked in the history).

    python benchmarks/record.py [--device cpu|cuda] [--note TEXT] [-- extra pytest arguments]
    python benchmarks/record.py --from-json benchmarks/results/cpu-....json    # re-render a recorded run

Files: ``results/<device>-<date>-<commit>.json`` (pytest-benchmark JSON), ``.png`` (the plot), ``.txt`` (the
report with ``--detail``). A dirty working tree is recorded as ``<commit>+dirty``: commit first to record a
run others can reproduce.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")
RESULTS_MD = os.path.join(HERE, "RESULTS.md")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def commit_label() -> str:
    sha = git("rev-parse", "--short=7", "HEAD")
    return sha + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def report(json_path: str, png_path: str | None) -> tuple[str, str]:
    """``(summary, summary + detail)`` of the report command on ``json_path``; writes the plot if asked."""

    def run(*extra):
        proc = subprocess.run(
            [sys.executable, "-m", "hierkern.bench", "report", json_path, *extra],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            raise SystemExit(f"the report command failed:\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    summary = run()
    detail = run("--detail", *(("--plot", png_path) if png_path else ()))
    return summary.rstrip(), detail


def replace_between(text: str, begin: str, end: str, body: str) -> str:
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"RESULTS.md has no {begin} ... {end} markers")
    return pattern.sub(lambda _: f"{begin}\n{body}\n{end}", text)


def update_results_md(device: str, stem: str, summary: str, command: str, wall: str, note: str) -> None:
    """Put this run in ``device``'s current section; move the run it replaces to the history list."""
    with open(RESULTS_MD) as f:
        text = f.read()
    begin, end = f"<!-- current:{device}:begin -->", f"<!-- current:{device}:end -->"
    previous = re.search(re.escape(begin) + r"\n<!-- run:(\S+) (.*?) -->", text)
    links = f"[JSON](results/{stem}.json), [plot](results/{stem}.png), [report](results/{stem}.txt)"
    body = "\n".join(
        [
            f"<!-- run:{stem} {note} -->",
            f"Run `{stem}`: {note}" if note else f"Run `{stem}`.",
            "",
            f"- Command: `{command}` ({wall}).",
            f"- Files: {links}.",
            "",
            "```",
            summary,
            "```",
        ]
    )
    text = replace_between(text, begin, end, body)
    if previous and previous.group(1) != stem:
        old, old_note = previous.group(1), previous.group(2)
        history = f"<!-- history:{device} -->"
        line = (
            f"- `{old}`: {old_note + ' ' if old_note else ''}[JSON](results/{old}.json), "
            f"[plot](results/{old}.png), [report](results/{old}.txt)"
        )
        text = text.replace(history, f"{history}\n{line}", 1)
    with open(RESULTS_MD, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="the suite to run (--hk-device) and the RESULTS.md section (default: cpu)",
    )
    parser.add_argument("--note", default="", help="one line on the machine and its state, for RESULTS.md")
    parser.add_argument("--from-json", metavar="JSON", help="do not run: re-render this recorded run")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    if args.from_json:
        json_path = os.path.abspath(args.from_json)
        stem = os.path.splitext(os.path.basename(json_path))[0]
        command, wall = "pytest benchmarks --benchmark-json <this JSON>", "wall time not recorded"
    else:
        stem = f"{args.device}-{datetime.date.today().isoformat()}-{commit_label()}"
        json_path = os.path.join(RESULTS_DIR, stem + ".json")
        pytest_cmd = [
            sys.executable,
            "-m",
            "pytest",
            "benchmarks",
            f"--hk-device={args.device}",
            f"--benchmark-json={json_path}",
            "-q",
            "-rs",
            *args.pytest_args,
        ]
        command = " ".join(["pytest", "benchmarks", f"--hk-device={args.device}", *args.pytest_args])
        start = time.monotonic()
        proc = subprocess.run(pytest_cmd, cwd=REPO)
        wall = f"{(time.monotonic() - start) / 60:.1f} min wall"
        if proc.returncode:
            print(f"pytest failed (exit {proc.returncode}); nothing recorded in RESULTS.md", file=sys.stderr)
            return proc.returncode
    png = os.path.join(RESULTS_DIR, stem + ".png")
    summary, detail = report(json_path, png)
    with open(os.path.join(RESULTS_DIR, stem + ".txt"), "w") as f:
        f.write(detail)
    update_results_md(args.device, stem, summary, command, wall, args.note)
    print(detail)
    print(f"recorded {stem}: benchmarks/results/{stem}.{{json,png,txt}} and benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
