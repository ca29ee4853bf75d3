"""A multi-node Ray cluster on one machine (``ray.cluster_utils.Cluster``) that runs the job entry points the way
``docs/CLUSTER.md`` does (``python jobs/<name>.py ...`` with ``RAY_ADDRESS`` pointing at the cluster), and breaks
it on cue: a worker node removed (a lost spot instance), a node added (the autoscaler's replacement), the driver
killed (a lost head process). Run as a script by ``tests/test_multinode.py``, in its own process, because the
test session already holds a Ray of its own; prints one JSON line with what happened.

    python -m tests.cluster_harness map-node-loss --workspace WS -- --model M --run R
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _job(name: str, args: list[str], address: str, log: Path) -> subprocess.Popen:
    """``python jobs/<name>.py args`` against the cluster, as ``ray job submit --working-dir . --`` would run it."""
    # a worker group that cannot start (its resources vanished with a node) is given up after 15 s, not 60 s
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONPATH": str(REPO), "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}
    return subprocess.Popen([sys.executable, str(REPO / "jobs" / f"{name}.py"), *args], cwd=REPO, env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout_s: float, what: str) -> float:
    """Poll until ``condition``; returns the seconds waited. Raises if the job ended first or time ran out."""
    t0 = time.monotonic()
    while not condition():
        if proc.poll() is not None:
            raise RuntimeError(f"the job ended (exit {proc.returncode}) before {what}")
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"no {what} after {timeout_s:.0f} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def _committed(log: Path) -> int:
    """Tiles the map driver has committed to its ledger so far (its progress lines: ``committed N/M tiles``)."""
    found = re.findall(r"committed (\d+)/\d+ tiles", log.read_text(errors="replace")) if log.is_file() else []
    return int(found[-1]) if found else 0


def _parts(workspace: Path, run: str) -> int:
    return sum(1 for _ in (workspace / "runs" / run / "predictions").glob("city=*/*.parquet"))


def _checkpoints(storage: Path, name: str) -> int:
    """Checkpoints Ray Train has registered (a checkpoint folder alone may still be in flight: a restart would not
    see it)."""
    snapshot = storage / name / "checkpoint_manager_snapshot.json"
    try:
        return len(json.loads(snapshot.read_text()).get("checkpoint_results", []))
    except (OSError, ValueError):
        return 0


def _busiest(workers: list, actor_class: str):
    """The worker node running most live actors of ``actor_class`` (the node whose loss hurts the job most)."""
    import ray

    alive = ray._private.state.actors(actor_state_name="ALIVE").values()
    hosts = [a["Address"]["NodeID"] for a in alive if actor_class in a["ActorClassName"]]
    return max(workers, key=lambda node: hosts.count(node.node_id)), len(hosts)


def _busiest_count(node, actor_class: str) -> int:
    import ray

    return sum(a["Address"]["NodeID"] == node.node_id and actor_class in a["ActorClassName"]
               for a in ray._private.state.actors(actor_state_name="ALIVE").values())


def _group_sizes(log: Path) -> list[int]:
    """Sizes of the training worker groups Ray Train started, in order (from the job's log)."""
    return [int(m) for m in re.findall(r"Started training worker group of size (\d+)", log.read_text(errors="replace"))]


def _lose_a_node(cluster, workers: list, actor_class: str, story: dict, before_replacement: Callable[[], None] | None = None,
                 **facts) -> None:
    """Remove the busiest worker node without warning (a reclaimed spot node), then add a fresh one (the
    autoscaler's replacement), after ``before_replacement`` returns."""
    victim, actors = _busiest(workers, actor_class)
    facts["actors_on_lost_node"] = _busiest_count(victim, actor_class)
    cluster.remove_node(victim, allow_graceful=False)
    workers.remove(victim)
    story["events"].append({"event": "removed a worker node", "time": time.time(), "actors_of_job": actors, **facts})
    if before_replacement:
        before_replacement()
    workers.append(cluster.add_node(num_cpus=2))
    story["events"].append({"event": "added a worker node", "time": time.time()})


def _finish(proc: subprocess.Popen, timeout_s: float) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return -9


def run(scenario: str, workspace: Path, job_args: list[str], log: Path, timeout_s: float) -> dict:
    """Start the cluster (head + 2 workers), run the scenario's job, break the cluster on cue; return the story."""
    import ray
    from ray.cluster_utils import Cluster

    # the head schedules nothing (as in cluster.yaml): the work runs on the worker nodes, so losing one matters
    # a lost node is noticed in ~3 s, not the production ~30 s (GCS health checks; as Ray's own tests do)
    fast_failure = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": fast_failure})
    story: dict = {"scenario": scenario, "events": [], "started": time.time()}
    try:
        workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="ERROR")  # only to see where the job's actors run
        if scenario == "map-node-loss":
            run_name = job_args[job_args.index("--run") + 1]
            proc = _job("map", ["--workspace", str(workspace), *job_args], cluster.address, log)
            _wait_for(lambda: _parts(workspace, run_name) >= 2, proc, timeout_s, "prediction parts")
            _lose_a_node(cluster, workers, "MapBatches(PredictAndWrite)", story, parts=_parts(workspace, run_name))
            story["exit"] = _finish(proc, timeout_s)
        elif scenario == "map-driver-restart":
            run_name = job_args[job_args.index("--run") + 1]
            proc = _job("map", ["--workspace", str(workspace), *job_args], cluster.address, log)
            _wait_for(lambda: _committed(log) > 0, proc, timeout_s, "committed tiles")
            proc.send_signal(signal.SIGKILL)  # the driver dies without any cleanup
            proc.wait()
            story["events"].append({"event": "killed the driver", "time": time.time(), "committed": _committed(log),
                                    "parts": _parts(workspace, run_name)})
            proc = _job("map", ["--workspace", str(workspace), *job_args], cluster.address, log)
            story["exit"] = _finish(proc, timeout_s)
        elif scenario == "pretrain-elastic":
            name = job_args[job_args.index("--name") + 1]
            storage = Path(job_args[job_args.index("--storage") + 1])
            proc = _job("pretrain", ["--workspace", str(workspace), *job_args], cluster.address, log)
            _wait_for(lambda: _checkpoints(storage, name) >= 1, proc, timeout_s, "a checkpoint")
            # the replacement comes only once training went on without the lost node (a smaller group: elastic)
            _lose_a_node(cluster, workers, "RayTrainWorker", story, checkpoints=_checkpoints(storage, name),
                          before_replacement=lambda: _wait_for(lambda: len(_group_sizes(log)) >= 2, proc, timeout_s, "a restarted worker group"))
            story["exit"] = _finish(proc, timeout_s)
            story["group_sizes"] = _group_sizes(log)
        else:
            raise ValueError(f"unknown scenario {scenario!r}")
    finally:
        ray.shutdown()
        cluster.shutdown()
    return story


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=["map-node-loss", "map-driver-restart", "pretrain-elastic"])
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=300.0)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # after "--": the job's own arguments
    args, job_args = parser.parse_args(argv[:cut]), argv[cut + 1:]
    print(json.dumps(run(args.scenario, args.workspace, job_args, args.log, args.timeout)))


if __name__ == "__main__":
    main()
