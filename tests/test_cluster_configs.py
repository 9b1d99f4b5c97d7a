"""The cluster configs, checked without a cluster: the launcher files pass Ray's own launcher
validation, the KubeRay manifests parse and agree with the code they run (modules, flags,
config keys, GPU requests, the Serve app), so that a typo fails here and not on a cloud bill."""

from __future__ import annotations

import ast
import copy
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from cube.config import load_config, resolve_key
from cube.job_config import TrainConfig
from jobs.common import fits

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER_FILES = ["ray_cluster.yaml", "cluster/onprem.yaml"]
KUBERAY = ROOT / "cluster" / "kuberay"
SHARED = "/mnt/cube"  # where every pod mounts the shared PVC


def load(rel: str) -> dict:
    return yaml.safe_load((ROOT / rel).read_text(encoding="utf-8"))


# ---------------------------------------------------------------- `ray up` files


@pytest.mark.parametrize("rel", LAUNCHER_FILES)
def test_launcher_config_passes_rays_validation(rel):
    """The file as written against Ray's schema, then as `ray up` sees it after prepare_config
    (defaults of the provider filled in, per-node-type worker counts set)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(rel)
    validate_config(copy.deepcopy(raw))
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    for name, node_type in prepared["available_node_types"].items():
        assert "min_workers" in node_type and "max_workers" in node_type, name


def test_top_level_min_workers_is_rejected():
    """The control for the test above: the old on-premise file's legacy key fails validation."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    legacy = {**load("cluster/onprem.yaml"), "min_workers": 2}
    with pytest.raises(jsonschema.ValidationError, match="min_workers"):
        validate_config(legacy)


def test_aws_cluster_shape():
    from jobs.trainer import worker_resources

    cfg = load("ray_cluster.yaml")
    assert cfg["provider"]["type"] == "aws" and cfg["idle_timeout_minutes"] > 0
    types = cfg["available_node_types"]
    head, gpu, cpu = types[cfg["head_node_type"]], types["gpu_worker"], types["cpu_worker"]
    assert "GPU" not in head["resources"] and "GPU" not in cpu["resources"] and gpu["resources"]["GPU"] >= 1
    assert sum(t.get("max_workers", 0) for t in types.values()) <= cfg["max_workers"]
    # A Ray Train worker with use_gpu=true fits a GPU node, and two of them fit the GPU type.
    bundle = worker_resources(load_config(TrainConfig, None, ["use_gpu=true"]))
    assert fits([bundle] * 2, [gpu["resources"]] * gpu["max_workers"])
    assert not fits([bundle], [head["resources"], cpu["resources"]])
    setup = "\n".join(cfg["setup_commands"])
    assert "torch==2.13.0" in setup and "download.pytorch.org/whl/cu" in setup and ".[gpu]" in setup
    assert "--dashboard-host=0.0.0.0" in " ".join(cfg["head_start_ray_commands"])
    for cmd in cfg["head_start_ray_commands"][1:] + cfg["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in cmd
    assert cfg["file_mounts"]["~/cube"] == "." and ".venv" in cfg["rsync_exclude"]


# ---------------------------------------------------------------- KubeRay manifests


def manifests() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text(encoding="utf-8")) for p in sorted(KUBERAY.glob("*.yaml"))}


def cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[
        doc["kind"]
    ]


def pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]


def test_kuberay_manifests_parse_and_mount_shared_storage():
    docs = manifests()
    kinds = {name: doc["kind"] for name, doc in docs.items()}
    assert kinds == {
        "pvc.yaml": "PersistentVolumeClaim",
        "raycluster.yaml": "RayCluster",
        "rayjob-train.yaml": "RayJob",
        "rayjob-tune.yaml": "RayJob",
        "rayservice.yaml": "RayService",
    }
    claim = docs["pvc.yaml"]["metadata"]["name"]
    assert "ReadWriteMany" in docs["pvc.yaml"]["spec"]["accessModes"]
    for name, doc in docs.items():
        if doc["kind"] == "PersistentVolumeClaim":
            continue
        assert doc["apiVersion"] == "ray.io/v1", name
        spec = cluster_spec(doc)
        assert spec["rayVersion"] == version("ray"), name
        assert spec.get("authOptions", {}).get("mode") == "token", name
        for template in pod_templates(spec):
            pod = template["spec"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            for container in pod["containers"]:
                assert version("ray") in container["image"], name
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                assert volumes[mounts[SHARED]]["persistentVolumeClaim"]["claimName"] == claim, name


def test_raycluster_has_cpu_head_gpu_and_cpu_groups():
    spec = manifests()["raycluster.yaml"]["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpu = groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu["nvidia.com/gpu"]) >= 1 and "nvidia.com/gpu" not in cpu
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def rayjobs() -> dict[str, dict]:
    return {name: doc for name, doc in manifests().items() if doc["kind"] == "RayJob"}


def entrypoint(doc: dict) -> tuple[str, list[str]]:
    """(module, argv) of a RayJob's `python -m jobs.<verb> ...` entrypoint."""
    words = shlex.split(doc["spec"]["entrypoint"])
    assert words[:2] == ["python", "-m"] and words[2].startswith("jobs."), words
    return words[2], words[3:]


@pytest.fixture(scope="module")
def help_texts() -> dict[str, str]:
    """`python -m jobs.<verb> --help` of every module a RayJob runs, run at once."""
    modules = sorted({entrypoint(doc)[0] for doc in rayjobs().values()})
    procs = {m: subprocess.Popen([sys.executable, "-m", m, "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for m in modules}
    texts = {}
    for module, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{module} --help failed:\n{out}"
        texts[module] = out
    return texts


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayjob-tune.yaml"])
def test_rayjob_entrypoint_names_real_module_and_options(name, help_texts):
    module, argv = entrypoint(rayjobs()[name])
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
    flags = [w for w in argv if w.startswith("--")]
    assert flags, argv
    for flag in flags:
        assert flag in help_texts[module], f"{name}: {module} has no {flag}"
    values = dict(zip(argv, argv[1:]))
    overrides = [v for k, v in zip(argv, argv[1:]) if k == "--set"]
    for item in overrides:
        resolve_key(TrainConfig, item.split("=", 1)[0])
    load_config(TrainConfig, None, overrides)  # the values have the keys' types
    for flag in ("--data", "--space"):
        if flag in values and not values[flag].startswith("/"):
            assert (ROOT / values[flag]).is_file(), f"{name}: {flag} {values[flag]} is not in the repository"
    assert values["--output"].startswith(SHARED + "/"), f"{name}: the output must be on the shared PVC"


def gpu_nodes(spec: dict) -> list[dict[str, float]]:
    """Every pod the cluster can grow to, as Ray resources (CPU, GPU) from its container limits."""
    def resources(template: dict) -> dict[str, float]:
        limits = template["spec"]["containers"][0]["resources"]["limits"]
        return {"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}

    nodes = [resources(spec["headGroupSpec"]["template"])]
    for group in spec.get("workerGroupSpecs", []):
        nodes += [resources(group["template"])] * group["maxReplicas"]
    return nodes


def job_bundles(module: str, argv: list[str]) -> list[dict[str, float]]:
    """The bundles the job asks Ray for, computed by the job's own code from its own flags."""
    if module == "jobs.train":
        from jobs.train import build_parser
        from jobs.trainer import worker_resources

        cfg = load_config(TrainConfig, None, build_parser().parse_args(argv).overrides)
        assert cfg.use_gpu, "the GPU RayJob trains without GPUs"
        return [worker_resources(cfg)] * cfg.workers
    from jobs.sweep import trial_resources
    from jobs.tune import build_parser, tune_config

    settings = tune_config(build_parser().parse_args(argv))
    assert settings.gpus_per_trial > 0, "the GPU RayJob tunes without GPUs"
    at_once = max(1, settings.max_concurrent)
    return [trial_resources(settings)] * max(1, settings.workers_per_trial) * at_once


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayjob-tune.yaml"])
def test_rayjob_gpu_requests_fit_the_gpu_group(name):
    """use_gpu=true x workers (train) or --gpus-per-trial x trials at once (tune) fit the GPU
    group's limits x maxReplicas, both of the job's own cluster and of raycluster.yaml."""
    doc = rayjobs()[name]
    bundles = job_bundles(*entrypoint(doc))
    assert sum(b["GPU"] for b in bundles) >= 1
    for spec in (cluster_spec(doc), manifests()["raycluster.yaml"]["spec"]):
        assert fits(bundles, gpu_nodes(spec)), f"{name}: {bundles} do not fit {gpu_nodes(spec)}"


def serve_deployments() -> dict[str, float]:
    """The @serve.deployment classes of the serve/ package (one module each) and their num_cpus,
    read without importing them; REPLICA_CPUS is the constant of serve/settings.py."""
    settings = ast.parse((ROOT / "serve" / "settings.py").read_text(encoding="utf-8"))
    consts = {
        t.id: n.value.value
        for n in settings.body
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    found = {}
    for module in sorted((ROOT / "serve").glob("*.py")):
        for node in ast.parse(module.read_text(encoding="utf-8")).body:
            if not isinstance(node, ast.ClassDef):
                continue
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and ast.unparse(dec.func) == "serve.deployment":
                    options = {k.arg: k.value for k in dec.keywords}
                    name = ast.literal_eval(options["name"]) if "name" in options else node.name
                    cpus = ast.literal_eval(
                        ast.unparse(options["ray_actor_options"]).replace("REPLICA_CPUS", repr(consts["REPLICA_CPUS"]))
                    )
                    found[name] = cpus["num_cpus"]
    return found


def test_rayservice_serves_the_app_of_serve_config():
    local = load("serve/config.yaml")["applications"]
    service = yaml.safe_load(manifests()["rayservice.yaml"]["spec"]["serveConfigV2"])
    apps = service["applications"]
    assert [a["name"] for a in apps] == [a["name"] for a in local]
    for app, ref in zip(apps, local):
        assert app["import_path"] == ref["import_path"] == "serve.app:build_app"
        assert app["route_prefix"] == ref["route_prefix"]
        assert set(app["args"]) == set(ref["args"])
        assert app["args"]["run_dir"].startswith(SHARED + "/")
        code = serve_deployments()
        assert {dep["name"] for dep in app.get("deployments", [])} == set(code), "list every deployment of serve/"
        for dep in app.get("deployments", []):
            assert dep["name"] in code, f"the serve package has no deployment {dep['name']}"
            cpus = dep["ray_actor_options"]["num_cpus"]
            assert 0 < cpus <= 1 and cpus == code[dep["name"]], dep
    assert service["http_options"]["host"] == "0.0.0.0"
