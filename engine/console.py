"""The console of a long CLI command (`geolink-engine map`): one live display of its stages; everything else in a log.

Quiet by default, everything kept: while :class:`CapturedOutput` is active, whatever this process prints that is not
the display (Ray's, Ray Data's and Ray Train's log lines, Python warnings, torch and GDAL messages written by C
code to the standard streams) goes to a log file under ``runs/<run>/logs/``; Ray's workers keep their output in Ray's
own log folder (``engine.pipelines.runtime.quiet_driver``). The display (:class:`StageDisplay`) shows a line per
stage with a bar, counts, rate and ETA where they mean something; the command prints its tables after it.

The Ray jobs (``jobs/*.py``) use neither: their logs are line-oriented.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

# the engine's own loggers: the only ones that still reach the console while the output is captured
CONSOLE_LOGGERS = ("geolink", "engine", "jobs")
UNITS = {"demo data": "cities", "prepare": "cities", "infer": "tiles", "stitch": "cities", "embed": "tiles"}


class _EngineOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] in CONSOLE_LOGGERS


def _fd_of(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # an in-memory stream (typer's CliRunner, a notebook)
        return None


class CapturedOutput:
    """Send this process's standard output and error to ``log_file`` (appended, a header line per command), at the
    Python level (``sys.stdout``/``sys.stderr``, so every logging handler and warning) and at the file-descriptor
    level (what C and C++ code write: Ray's core worker, GDAL, torch); ``console`` keeps writing to the terminal.

    The root logger gains a handler for the log file, and its console handlers keep only the engine's records
    (:data:`CONSOLE_LOGGERS`). Everything is restored on exit; the log file stays open until the process ends (a
    handler a library made meanwhile may still hold it).
    """

    def __init__(self, log_file: Path, console: Console, level: int = logging.INFO) -> None:
        self.path = Path(log_file)
        self.console = console
        self.level = level
        self.log: TextIO | None = None

    def __enter__(self) -> CapturedOutput:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 (kept open, see above)
        self.log.write(f"==== {datetime.datetime.now().isoformat(timespec='seconds')} geolink-engine {' '.join(sys.argv[1:])}\n")
        sys.stdout.flush()
        sys.stderr.flush()
        self.streams = sys.stdout, sys.stderr
        self.console_file = self.console._file  # None: the console follows sys.stdout (a terminal, or CliRunner's buffer)
        out_fd = _fd_of(self.console.file)
        # the console goes on writing where it wrote: a duplicate of its descriptor when that one is redirected below
        self.own_file = os.fdopen(os.dup(out_fd), "w", buffering=1, encoding="utf-8", errors="replace") if out_fd in (1, 2) else None
        self.console.file = self.own_file or self.console.file
        self.saved_fds: dict[int, int] = {}
        for fd in (1, 2):
            try:
                self.saved_fds[fd] = os.dup(fd)
            except OSError:  # no such descriptor (a daemon): nothing to redirect
                continue
            os.dup2(self.log.fileno(), fd)
        sys.stdout = sys.stderr = self.log
        root = logging.getLogger()
        self.filtered = [h for h in root.handlers if not isinstance(h, logging.FileHandler)]
        self.engine_only = _EngineOnly()
        for h in self.filtered:
            h.addFilter(self.engine_only)
        # Ray's loggers (ray, ray.data, ray.train...) do not propagate: their console handlers hold the stream they
        # were made with (an earlier sys.stderr), so they are pointed at the log for the command's duration
        self.streams_of: list[tuple[logging.StreamHandler, TextIO]] = []
        for logger in list(logging.root.manager.loggerDict.values()):
            if not isinstance(logger, logging.Logger) or logger.name.split(".")[0] in CONSOLE_LOGGERS:
                continue
            for h in logger.handlers:
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    self.streams_of.append((h, h.stream))  # not setStream: it flushes the old stream, which may be closed
                    h.stream = self.log
        self.handler = logging.StreamHandler(self.log)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.handler.setLevel(self.level)
        root.addHandler(self.handler)
        return self

    def write(self, line: str) -> None:
        """One line into the log (what the console showed, so the log reads as the whole story)."""
        if self.log is not None:
            self.log.write(line.rstrip("\n") + "\n")

    def __exit__(self, *exc) -> None:
        root = logging.getLogger()
        root.removeHandler(self.handler)
        for h in self.filtered:
            h.removeFilter(self.engine_only)
        for h, stream in self.streams_of:
            if h.stream is self.log:
                h.stream = stream
        self.log.flush()
        for fd, saved in self.saved_fds.items():
            os.dup2(saved, fd)
            os.close(saved)
        sys.stdout, sys.stderr = self.streams
        if self.own_file is not None:
            self.own_file.flush()
            self.own_file.close()
        self.console._file = self.console_file


class _Mark(ProgressColumn):
    """A spinner while a stage runs, then a tick, or a cross for a stage that failed."""

    def __init__(self) -> None:
        super().__init__()
        self.spinner = SpinnerColumn(finished_text="[green]✓[/]")

    def render(self, task: Task) -> Text:
        if task.fields.get("failed"):
            return Text("✗", style="red")
        return self.spinner.render(task)


class _Counts(ProgressColumn):
    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "")
        if task.total is None or not unit:
            return Text("")
        return Text(f"{int(task.completed)}/{int(task.total)} {unit}")


class _Rate(ProgressColumn):
    """Items per second, and the time left while the stage runs (only for stages counted in tiles)."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "")
        speed = task.finished_speed or task.speed
        if unit != "tiles" or not speed:
            return Text("")
        rate = f"{speed:.1f} {unit}/s"
        if task.finished or task.total is None:
            return Text(rate)
        left = (task.total - task.completed) / speed
        return Text(f"{rate}, ETA {int(left // 60)}:{int(left % 60):02d}")


class StageDisplay:
    """One live line per stage of a run: ``step(stage, done, total, note)`` adds or updates it (``total`` None: no
    count yet; ``done == total``: the stage is over). Nothing is drawn before the first step, so a run refused
    before any work prints its one error line and nothing else."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> StageDisplay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def step(self, stage: str, done: int, total: int | None = None, note: str = "", failed: bool = False) -> None:
        if self.progress is None:
            self.progress = Progress(_Mark(), TextColumn("{task.description:<10}"), BarColumn(bar_width=24), _Counts(),
                                     _Rate(), TimeElapsedColumn(), TextColumn("{task.fields[note]}"), console=self.console)
            self.progress.start()
        fields = {"note": note} if note else {}
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total, completed=done, note=note, unit=UNITS.get(stage, ""),
                                                       failed=failed)
        else:
            self.progress.update(self.tasks[stage], completed=done, total=total, failed=failed, **fields)
        task = self.tasks[stage]
        if failed or (total is not None and done >= total):
            if failed:
                self.progress.update(task, total=total if total is not None else max(done, 1))
            self.progress.stop_task(task)

    def counter(self, stage: str):
        """``on_done(done, total)`` for an engine call that counts what is done."""
        return lambda done, total: self.step(stage, done, total)

    def adder(self, stage: str):
        """``on_commit(n, total)`` for an engine call that reports how many were added, not how many are done."""
        done = [0]

        def add(n: int, total: int) -> None:
            done[0] += n
            self.step(stage, done[0], total)

        return add
