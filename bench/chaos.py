"""The durability table: every fault scenario of ``tests/chaos/`` run at a larger scale, one
row each: jobs accepted, lost, run twice, wrongly failed, and the time to recover.

    python bench/chaos.py                      # every scenario, scale 4
    python bench/chaos.py --scale 10 --only lease_outage redis_restarts

The tests run the same functions small (scale 1) and assert zeros; this prints the figures
that ``docs/reliability.md`` reports. Every scenario starts its own Redis server and
processes on 127.0.0.1, is bounded in count and time, and stops what it started by pid.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.chaos.harness import Row  # noqa: E402


def scenarios() -> dict[str, Callable[..., Row]]:
    """Every ``scenario_<name>`` function of ``tests/chaos/test_*.py``, by name."""
    found: dict[str, Callable[..., Row]] = {}
    for path in sorted((ROOT / "tests" / "chaos").glob("test_*.py")):
        module = importlib.import_module(f"tests.chaos.{path.stem}")
        for name, function in inspect.getmembers(module, inspect.isfunction):
            if name.startswith("scenario_") and function.__module__ == module.__name__:
                found[name.removeprefix("scenario_")] = function
    return found


def base_env() -> dict[str, str]:
    """The environment the scenarios' processes start from, as the tests give them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLAZE_")}
    env.update(
        BLAZE_MODEL_DIR=os.environ.get("BLAZE_MODEL_DIR", str(Path.home() / ".cache" / "blaze-jobs" / "models")),
        BLAZE_WEBHOOK_ALLOW_PRIVATE="1",
        BLAZE_WEBHOOK_RETRY_SCHEDULE="0.2,0.5,1",
        BLAZE_WEBHOOK_TIMEOUT_S="2",
        # An admin token of this run's own: the scenarios' APIs take it, and their requests send it.
        BLAZE_ADMIN_TOKEN=f"bench-chaos-{secrets.token_urlsafe(16)}",
        PYTHONUNBUFFERED="1",
    )
    return env


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | accepted | lost | run twice | wrongly failed | recovery (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        recovery = "-" if row["recovery_s"] is None else f"{row['recovery_s']:.1f}"
        cells = (row["scenario"], row["accepted"], row["lost"], row["run_twice"], row["wrongly_failed"], recovery)
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def main() -> int:
    known = scenarios()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=4, help="how much bigger than the tests' runs (1 = as in CI)")
    parser.add_argument("--only", nargs="*", choices=sorted(known), help="run only these scenarios")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.scale < 1:
        parser.error("--scale: must be at least 1")
    rows = []
    for name in args.only or sorted(known):
        with tempfile.TemporaryDirectory(prefix=f"blaze-chaos-{name}-") as tmp:
            started = time.monotonic()
            print(f"running {name} at scale {args.scale} …", file=sys.stderr, flush=True)
            row = known[name](env=base_env(), tmp_path=Path(tmp), scale=args.scale)
            row.notes["wall_s"] = round(time.monotonic() - started, 1)
            rows.append(row.as_dict())
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(table(rows))
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(r["lost"] == 0 and r["wrongly_failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
