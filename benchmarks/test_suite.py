"""Time the README's test command, `.venv/bin/python -m pytest -q`, on this machine.

Runs the whole suite once in a subprocess (nothing else should be using the CPU meanwhile) and
writes benchmarks/results/test_suite.json: the wall time, pytest's summary line, the exit status,
the machine, the date and the commit. Each run is also appended to the file's ``runs``, so that the
figure is given with the range seen from one day to the next (this shared machine's speed varies by
up to 2x). `python benchmarks/update_readme.py` then states the latest figure and that range in the
README.

    python benchmarks/test_suite.py [--log FILE] [--note TEXT]

``--log`` keeps pytest's whole output (with the slowest tests that pyproject.toml asks it to list);
``--note`` says how the run was made (e.g. "clean clone, fresh venv").
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND = ".venv/bin/python -m pytest -q"
TARGET_SECONDS = 600


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", default=None, help="write pytest's whole output here")
    ap.add_argument("--note", default="", help="how the run was made (kept with it in the JSON)")
    args = ap.parse_args()
    python = ROOT / ".venv" / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"{python} not found: create the virtual environment first (see the README)")
    t0 = time.perf_counter()
    proc = subprocess.run([str(python), "-m", "pytest", "-q"], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if args.log:
        Path(args.log).write_text(proc.stdout + proc.stderr)
    lines = [line.strip("= ") for line in proc.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else f"no output (exit status {proc.returncode})"
    result = dict(command=COMMAND, wall_seconds=seconds, target_seconds=TARGET_SECONDS, returncode=proc.returncode,
                  summary=summary, date=datetime.date.today().isoformat(),
                  device=dict(platform="cpu", cpu=cpu_name(), cpu_cores=os.cpu_count()),
                  python=sys.version.split()[0], commit=commit(), note=args.note)
    dest = ROOT / "benchmarks" / "results" / "test_suite.json"
    runs = json.loads(dest.read_text()).get("runs", []) if dest.is_file() else []
    runs.append({k: result[k] for k in ("date", "wall_seconds", "returncode", "summary", "commit", "note")})
    result["runs"] = runs
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{COMMAND}: {seconds / 60:.1f} min ({summary}; target <= {TARGET_SECONDS / 60:.0f} min)")
    print(f"wrote {dest}")
    if proc.returncode != 0:
        print(proc.stdout[-3000:], file=sys.stderr)
        raise SystemExit(proc.returncode)


if __name__ == "__main__":
    main()
