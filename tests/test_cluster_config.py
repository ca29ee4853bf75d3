"""cluster.yaml and the KubeRay manifests: Ray's own validator, the scale-out invariants, the version pin.

Offline and fast: no Ray cluster starts and no cloud is contacted (``prepare_config`` only merges the AWS
provider's bundled defaults; the provider's bootstrap, which calls AWS, is never run).
"""

from __future__ import annotations

import copy
import re
import tomllib
from importlib.metadata import version as installed_version
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
KUBERAY = REPO / "deploy" / "kuberay"
MIN_GPU_WORKERS = 16


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


PROJECT_VERSION = _pyproject()["project"]["version"]
PIN = f"geolink-engine=={PROJECT_VERSION}"


def _ray_requirement() -> SpecifierSet:
    for dep in _pyproject()["project"]["dependencies"]:
        m = re.fullmatch(r"ray(\[[^\]]*\])?\s*(.*)", dep)
        if m:
            return SpecifierSet(m.group(2))
    raise AssertionError("pyproject.toml has no ray dependency")


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def kuberay() -> dict[str, dict]:
    docs = {}
    for name in ("raycluster.yaml", "rayjob.yaml"):
        loaded = list(yaml.safe_load_all((KUBERAY / name).read_text()))
        assert len(loaded) == 1, f"{name}: expected one manifest, got {len(loaded)}"
        docs[name] = loaded[0]
    return docs


def _node_types(cfg: dict) -> dict[str, dict]:
    return cfg["available_node_types"]


def _gpu_types(cfg: dict) -> dict[str, dict]:
    return {k: t for k, t in _node_types(cfg).items() if t.get("resources", {}).get("GPU", 0) > 0}


# -- Ray's validator ------------------------------------------------------------------------------------------------

def test_cluster_yaml_passes_rays_validator(cluster):
    validate_config(copy.deepcopy(cluster))


def test_prepared_cluster_yaml_passes_rays_validator(cluster):
    """What `ray up` does before it contacts the cloud: merge provider defaults, setup commands, per-type limits."""
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    head = prepared["head_node_type"]
    assert _node_types(prepared)[head]["max_workers"] == 0
    assert any(PIN in cmd for cmd in prepared["worker_setup_commands"])
    assert any(PIN in cmd for cmd in prepared["head_setup_commands"])


@pytest.mark.parametrize("breakage", ["missing_head_node_type", "unknown_top_level_key", "unknown_head_type",
                                      "fractional_gpu", "global_max_below_min_workers"])
def test_broken_copies_fail_rays_validator(cluster, breakage):
    broken = copy.deepcopy(cluster)
    if breakage == "missing_head_node_type":
        del broken["head_node_type"]
    elif breakage == "unknown_top_level_key":
        broken["max_gpus"] = 16
    elif breakage == "unknown_head_type":
        broken["head_node_type"] = "no-such-type"
    elif breakage == "fractional_gpu":
        next(iter(_gpu_types(broken).values()))["resources"]["GPU"] = 0.5
    elif breakage == "global_max_below_min_workers":
        next(iter(_gpu_types(broken).values()))["min_workers"] = broken["max_workers"] + 1
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(broken)


# -- the scale-out invariants ---------------------------------------------------------------------------------------

def test_gpu_worker_type_autoscales_from_zero_on_spot(cluster):
    gpu = _gpu_types(cluster)
    assert gpu, "no node type declares GPU resources"
    name, spec = next(iter(gpu.items()))
    assert name != cluster["head_node_type"]
    assert spec["min_workers"] == 0
    assert spec["max_workers"] >= MIN_GPU_WORKERS
    assert spec["resources"]["GPU"] >= 1 and spec["resources"]["CPU"] >= 1
    assert spec["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"


def test_cpu_worker_type_and_quiet_head(cluster):
    types = _node_types(cluster)
    head = cluster["head_node_type"]
    assert types[head]["resources"].get("CPU", 0) <= 4, "heavy work must not land on the head"
    assert types[head]["resources"].get("GPU", 0) == 0
    cpu = {k: t for k, t in types.items() if k != head and t["resources"].get("GPU", 0) == 0 and t["resources"].get("CPU", 0) > 0}
    assert cpu, "no CPU worker type for prepare"
    assert all(t.get("min_workers", 0) == 0 and t["max_workers"] >= 1 for t in cpu.values())


def test_cluster_limits(cluster):
    workers = sum(t.get("max_workers", 0) for k, t in _node_types(cluster).items() if k != cluster["head_node_type"])
    assert cluster["max_workers"] >= MIN_GPU_WORKERS
    assert cluster["max_workers"] <= workers
    assert cluster["idle_timeout_minutes"] > 0
    assert cluster["upscaling_speed"] > 0
    assert cluster["provider"]["type"] == "aws" and cluster["provider"]["region"] == "us-west-2"


def test_setup_commands_install_the_pinned_project(cluster):
    setup = " ".join(cluster["setup_commands"])
    assert PIN in setup
    # every geolink-engine requirement in the setup commands names exactly the project's version
    assert set(re.findall(r"geolink-engine==([\w.+-]+)", setup)) == {PROJECT_VERSION}
    assert f"'{PROJECT_VERSION}'" in setup, "the installed version is checked after the install"
    # the wheel folder is shipped to the path the install reads from
    wheels = re.search(r"--find-links (\S+)", setup).group(1)
    assert cluster["file_mounts"][wheels].rstrip("/") in ("./dist", "dist")


def test_cluster_image_runs_the_pinned_ray(cluster):
    image = cluster["docker"]["image"]
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-gpu", image)
    assert m, image
    assert Version(m.group(1)) in _ray_requirement()
    assert Version(m.group(1)) == Version(installed_version("ray")), "cluster Ray and laptop Ray must match"


# -- KubeRay --------------------------------------------------------------------------------------------------------

def test_kuberay_manifests_parse(kuberay):
    rc, job = kuberay["raycluster.yaml"], kuberay["rayjob.yaml"]
    assert rc["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    assert rc["kind"] == "RayCluster" and job["kind"] == "RayJob"


def test_kuberay_cluster_autoscales_gpu_group(kuberay):
    spec = kuberay["raycluster.yaml"]["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert Version(spec["rayVersion"]) == Version(installed_version("ray"))
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}

    def gpus(g):
        return int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))

    gpu_groups = [g for g in groups.values() if gpus(g) > 0]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for g in gpu_groups:
        assert g["minReplicas"] == 0 and g.get("replicas", 0) == 0
        assert g["maxReplicas"] >= MIN_GPU_WORKERS
    assert any(gpus(g) == 0 and g["minReplicas"] == 0 for g in groups.values()), "no CPU worker group"


def test_kuberay_images_pin_the_project(kuberay):
    spec = kuberay["raycluster.yaml"]["spec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    images = {c["image"] for p in pods for c in p["spec"]["containers"]}
    assert len(images) == 1, images
    (image,) = images
    assert image.rsplit("/", 1)[-1] == f"geolink-engine:{PROJECT_VERSION}"
    # the documented image build installs exactly that version on the matching Ray image
    text = (KUBERAY / "raycluster.yaml").read_text()
    assert PIN in text and f"-t {image} " in text
    assert f"FROM rayproject/ray:{spec['rayVersion']}-py311-gpu" in text
    assert image in (KUBERAY / "rayjob.yaml").read_text(), "rayjob.yaml names the image it runs on"


def test_kuberay_job_runs_the_national_map_on_that_cluster(kuberay):
    rc, job = kuberay["raycluster.yaml"], kuberay["rayjob.yaml"]
    # the national run as documented (options such as --model may be appended)
    assert job["spec"]["entrypoint"].startswith("python jobs/map.py --workspace s3://BUCKET/geolink --cities all --devices 16")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": rc["metadata"]["name"]}
    assert (REPO / job["spec"]["entrypoint"].split()[1]).is_file()


# --- the documented commands are the jobs' real command lines ------------------------------------------------
def _job_parser(name: str):
    """The argument parser of ``jobs/<name>.py`` (pretrain and fine-tune share ``jobs/train_args.py``)."""
    import importlib.util
    import sys

    module_name = "train_args" if name in ("pretrain", "finetune") else f"job_{name}"
    path = REPO / "jobs" / ("train_args.py" if module_name == "train_args" else f"{name}.py")
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "jobs"))
    return module.build_parser(name) if module_name == "train_args" else module.build_parser()


def _documented_jobs() -> list[tuple[str, list[str]]]:
    import shlex

    text = (REPO / "docs" / "CLUSTER.md").read_text() + "\n" + (KUBERAY / "rayjob.yaml").read_text()
    found = []
    for match in re.finditer(r"python jobs/(\w+)\.py([^`\n]*)", text):
        args = shlex.split(match.group(2).split("#")[0].split("|")[0])
        found.append((match.group(1), [a for a in args if a not in ("...",)]))
    return found


def test_every_documented_job_command_parses_with_its_job():
    commands = _documented_jobs()
    assert {name for name, _ in commands} >= {"demo_data", "prepare", "pretrain", "finetune", "map"}
    for name, args in commands:
        args = ["x" if a.isupper() and a.isalpha() else a for a in args]  # placeholders: WS, DIR
        try:
            _job_parser(name).parse_args(args)
        except SystemExit:
            pytest.fail(f"docs: `python jobs/{name}.py {' '.join(args)}` does not parse with jobs/{name}.py")


def test_a_wrong_option_in_a_documented_command_would_be_caught():
    with pytest.raises(SystemExit):
        _job_parser("map").parse_args(["--workspace", "s3://b/w", "--gpus", "16"])  # the job says --devices


def test_the_multinode_tests_run_the_documented_commands():
    from tests.test_multinode import MAP_ARGS, PRETRAIN_ARGS, RESTART_ARGS

    doc = " ".join((REPO / "docs" / "CLUSTER.md").read_text().split())
    assert f"python jobs/map.py --workspace WS {' '.join(MAP_ARGS)} --run stormy" in doc
    assert f"python jobs/map.py --workspace WS {' '.join(RESTART_ARGS)} --run restarted" in doc
    assert f"python jobs/pretrain.py --workspace WS {' '.join(PRETRAIN_ARGS)} --storage DIR" in doc
