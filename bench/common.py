"""Shared helpers for benchmarks: machine description, the results file format, and running a measured child."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def write_results(bench: str, metrics: dict, extra: dict | None = None) -> Path:
    """Write ``bench/results/<bench>.json`` as ``{"machine", "date", "metrics", ...}``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{bench}.json"
    doc = {"machine": machine(), "date": dt.date.today().isoformat(), "metrics": metrics, **(extra or {})}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return out


def merge_results(bench: str, metrics: dict, extra: dict | None = None) -> Path:
    """Update ``bench/results/<bench>.json`` in place: the given metrics and sections replace theirs, every other
    metric and section of the file stays (for a bench run in parts); ``kept`` says which machine and date the
    metrics not rerun come from."""
    out = RESULTS / f"{bench}.json"
    old = json.loads(out.read_text()) if out.is_file() else {}
    sections = {k: v for k, v in old.items() if k not in ("machine", "date", "metrics", "kept")}
    kept = [k for k in old.get("metrics", {}) if k not in metrics]
    if kept:
        before = old.get("kept", {})
        sections["kept"] = {"machine": before.get("machine", old.get("machine")), "date": before.get("date", old.get("date")),
                            "metrics": kept}
    return write_results(bench, {**old.get("metrics", {}), **metrics}, {**sections, **(extra or {})})


def run_json_child(command: list[str], env: dict[str, str] | None = None) -> dict:
    """Run a bench child process (a fresh interpreter: its timing and peak RSS are its own) and return the JSON
    object it printed last; a failed child is one error with the end of its stderr."""
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"bench child {' '.join(command[:3])} ... failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
