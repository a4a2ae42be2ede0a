"""Every file under clusters/ is checked: the launcher YAML against Ray's own schema, the KubeRay manifests against
the fields they use, every entrypoint they name runs with --dry-run, the local scripts are valid bash, and no library
code imports clusters/. The DeepSpeed configs go through DeepSpeed's own parser in
tests/integration/test_deepspeed_configs.py."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "clusters"
KUBERAY = sorted((CLUSTERS / "kuberay").glob("*.yaml"))
LAUNCHER = sorted((CLUSTERS / "launcher").glob("*.yaml"))
DEEPSPEED = sorted((CLUSTERS / "deepspeed").glob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_every_cluster_file_is_covered_by_a_check():
    checked = (
        set(KUBERAY + LAUNCHER + DEEPSPEED)
        | set((CLUSTERS / "configs").glob("*.yaml"))
        | {
            CLUSTERS / "README.md",
            CLUSTERS / "RELEASED_WEIGHTS.md",
            CLUSTERS / "constraints.txt",
            CLUSTERS / "image" / "Dockerfile",
            CLUSTERS / "local" / "t2v",
            CLUSTERS / "local" / "ray-head.sh",
            CLUSTERS / "local" / "mlflow-server.sh",
            CLUSTERS / "local" / "flow.yaml",
        }
    )
    files = {p for p in CLUSTERS.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert files - checked == set(), "a new file under clusters/ needs a check in tests/unit/test_cluster_files.py"
    assert KUBERAY and LAUNCHER and len(DEEPSPEED) >= 3


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_yaml_matches_rays_cluster_schema(path):
    import importlib.util

    import jsonschema

    ray_package = Path(importlib.util.find_spec("ray").origin).parent  # the schema file only: no need to import Ray
    schema = json.loads((ray_package / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, schema)
    # the head schedules no work and its dashboard stays on loopback (reach it with `ray dashboard`)
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--num-cpus=0" in head_start and "--dashboard-host=127.0.0.1" in head_start
    gpu_types = [
        t for t in config["available_node_types"].values() if t["node_config"]["InstanceType"].startswith("p5")
    ]
    assert gpu_types and all(t["min_workers"] == 0 for t in gpu_types)  # GPU workers autoscale from zero
    bad = json.loads(json.dumps(config))
    bad["available_node_types"]["head"]["min_worker"] = 1  # a typo the schema must catch
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def _cluster_specs(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifests_use_valid_fields(path):
    for doc in _docs(path):
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
        assert doc["metadata"]["name"]
        spec = _cluster_specs(doc)
        assert spec["rayVersion"] == "2.60.0"
        assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"  # a string: KubeRay passes them to `ray start`
        assert all(isinstance(v, str) for v in head["rayStartParams"].values())
        for container in _containers(head):
            assert "nvidia.com/gpu" not in container["resources"]["limits"]  # the head is CPU-only
        for group in spec["workerGroupSpecs"]:
            assert group["groupName"] and 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            for container in _containers(group):
                limits, requests = container["resources"]["limits"], container["resources"]["requests"]
                assert limits == requests  # Ray advertises limits; equal requests keep scheduling honest
                if "nvidia.com/gpu" in limits:
                    assert isinstance(limits["nvidia.com/gpu"], int) and limits["nvidia.com/gpu"] >= 1
                    tolerations = group["template"]["spec"].get("tolerations", [])
                    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
        if doc["kind"] == "RayJob":
            job = doc["spec"]
            assert job["shutdownAfterJobFinishes"] is True and job["entrypoint"].strip()
            runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
            assert runtime_env["working_dir"] == "/home/ray/t2v"  # the project inside the image (Dockerfile)
            assert set(runtime_env) <= {"working_dir", "env_vars", "pip", "excludes", "py_modules"}


def _entrypoints() -> list[tuple[str, list[str]]]:
    found = []
    for path in KUBERAY:
        for doc in _docs(path):
            if doc["kind"] == "RayJob":
                found.append((path.name, shlex.split(doc["spec"]["entrypoint"])))
    return found


@pytest.mark.parametrize("name,argv", _entrypoints(), ids=lambda x: x if isinstance(x, str) else "")
def test_rayjob_entrypoints_exist_and_pass_dry_run(name, argv, capsys, monkeypatch):
    from flows import cli

    assert argv[:3] == ["python", "-m", "flows.cli"], f"{name}: entrypoints run the project CLI"
    command = argv[3]
    assert command in cli.COMMANDS, f"{name}: unknown t2v command {command!r}"
    for i, arg in enumerate(argv):
        if arg == "--config":
            assert (ROOT / argv[i + 1]).is_file(), f"{name}: config {argv[i + 1]} is not in the project"
    monkeypatch.chdir(ROOT)  # the job's working_dir is the project
    assert cli.main(argv[3:] + ["--dry-run"]) == 0
    assert capsys.readouterr().out.strip()  # the resolved config was printed


def test_flow_and_step_configs_load():
    from flows.retrain import load_config, validate
    from pipelines import settings

    flow = load_config(CLUSTERS / "local" / "flow.yaml", ["input=runs/incoming"])
    validate(flow)
    assert flow.cluster.address is None  # the local profile runs steps in-process
    from pipelines.curation.config import CurateConfig

    settings.load(CurateConfig, CLUSTERS / "configs" / "curate.yaml")
    assert flow.curate.clips.width == 32 and flow.train.zero_stage == 2  # from the train_base file
    assert flow.train.steps == 2000  # the flow's own train settings win over train_base


def test_local_scripts_are_valid_bash_and_bind_loopback():
    for script in ("ray-head.sh", "mlflow-server.sh", "t2v"):
        subprocess.run(["bash", "-n", str(CLUSTERS / "local" / script)], check=True)
    assert "RAY_DASHBOARD_HOST:-127.0.0.1" in (CLUSTERS / "local" / "ray-head.sh").read_text()
    assert "MLFLOW_HOST:-127.0.0.1" in (CLUSTERS / "local" / "mlflow-server.sh").read_text()
    dockerfile = (CLUSTERS / "image" / "Dockerfile").read_text()
    assert "clusters/constraints.txt" in dockerfile and "ray[default]" in dockerfile
    assert "/home/ray/t2v" in dockerfile


def test_library_code_never_imports_clusters():
    for package in ("model", "pipelines", "flows"):
        for source in (ROOT / package).rglob("*.py"):
            text = source.read_text()
            assert "import clusters" not in text and "from clusters" not in text, source


def test_readme_names_every_cluster_file():
    readme = (CLUSTERS / "README.md").read_text()
    for path in KUBERAY + LAUNCHER + DEEPSPEED:
        assert path.name in readme, f"clusters/README.md does not mention {path.name}"
    for needle in ("ray job submit", "port-forward", "MLFLOW_TRACKING_URI"):
        assert needle in readme


def test_kuberay_flow_config_loads():
    from flows.retrain import load_config, train_config

    flow = load_config(CLUSTERS / "configs" / "flow-kuberay.yaml", ["input=/data/incoming"])
    assert flow.cluster.address == "http://127.0.0.1:8265"
    assert flow.step_tracking_uri() == flow.cluster.tracking_uri != flow.mlflow.tracking_uri
    train = train_config(flow, Path("/data/flow/cycles/0001"), None)
    assert train.zero_stage == 2 and train.num_workers == 8 and train.steps == 5000
    assert train.mlflow.tracking_uri == flow.cluster.tracking_uri and train.data == ["/data/flow/curated"]


def test_released_weights_doc_names_what_exists():
    import re

    from flows.import_weights import SOURCES
    from model.registry import MODEL_CONFIGS
    from pipelines.training.config import TrainConfig

    doc = (CLUSTERS / "RELEASED_WEIGHTS.md").read_text()
    assert set(re.findall(r"--from (\S+) ", doc)) <= set(SOURCES)
    assert set(re.findall(r"--model (\S+) ", doc)) <= set(MODEL_CONFIGS)
    assert {"modelscope-1.7b", "tf-t2v"} <= set(re.findall(r"`([a-z0-9.-]+)`", doc))
    fields = set(TrainConfig.__dataclass_fields__)
    assert {"condition_sampling", "p_all_zero", "p_all_keep", "image_frame", "export_dtype"} <= fields
    for name in re.findall(r"`([a-z_]+): ", doc):  # `key: value` settings it names are training settings
        assert name in fields, name
    for path in re.findall(r"clusters/deepspeed/[\w.-]+\.yaml", doc):
        assert (CLUSTERS.parent / path).is_file(), path
