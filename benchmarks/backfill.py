"""Backfill benchmark: the demo's 8 weeks in order, one poisoned, in a home of its own.

    python benchmarks/backfill.py [--weeks 8] [--poison-week 8] [--light] [--home DIR [--resume]]

Each week's traffic is retrieved by the champion of that week, the weekly job trains and
benchmarks a challenger, and the gate decides. Prints progress as it goes and, last, one JSON
line: weeks, ndcg10_by_week (test split, champion after each week), champion_changes,
poisoned_week_blocked, wall_seconds, weeks_resumed. Starts fresh: its default home is cleared
first, and another --home must be empty, since weeks an earlier run finished are not run again
(their figures would be reported as this run's). --resume finishes an interrupted backfill
instead, and the JSON says how many weeks came from the earlier run (weeks_resumed).
Runs the default settings; --light trains and reranks with the lighter reranker settings
(flywheel/backfill.py: LIGHT), a quicker run whose reranker never serves.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_HOME = (REPO / ".flywheel" / "bench-backfill").resolve()


def fresh_home(home: Path, resume: bool) -> None:
    """Clear the default home (or refuse another non-empty one) unless resuming."""
    if resume or not home.exists() or not any(home.iterdir()):
        return
    if home != DEFAULT_HOME:
        raise SystemExit(f"--home {home} is not empty: give a fresh folder, or --resume to finish the backfill in it")
    print(f"starting fresh: clearing {home} (--resume finishes an interrupted backfill instead)", flush=True)
    shutil.rmtree(home)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weeks", type=int, default=8)
    p.add_argument("--poison-week", type=int, default=8, help="1-based week to poison (0: none)")
    p.add_argument("--home", default=str(DEFAULT_HOME))
    p.add_argument("--light", action="store_true", help="the lighter reranker settings (flywheel/backfill.py: LIGHT)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted backfill in --home")
    args = p.parse_args()
    fresh_home(Path(args.home).resolve(), args.resume)
    env = {**os.environ, "FLYWHEEL_HOME": args.home, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "flywheel.cli", "backfill", "--weeks", str(args.weeks)]
    if args.poison_week:
        cmd += ["--poison-week", str(args.poison_week)]
    if args.light:
        cmd.append("--light")
    print(f"running: FLYWHEEL_HOME={args.home} {' '.join(cmd[1:])}", flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    figures = None
    for line in proc.stdout:
        if line.startswith("{") and '"ndcg10_by_week"' in line:
            figures = json.loads(line)
        elif line.startswith("[flywheel") or "PROMOTED" in line or "blocked" in line:
            print(line.rstrip(), flush=True)
    if proc.wait() != 0 or figures is None:
        print(f"backfill failed (exit {proc.returncode})", file=sys.stderr)
        return 1
    figures["benchmark_wall_seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
