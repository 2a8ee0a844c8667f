"""infra/: every manifest parses and says what the cluster needs; the image pins match the project's.

`docker build` and `kubectl apply` cannot run here (no docker, no Kubernetes on CI); these checks catch
what can be caught offline: YAML syntax, kinds, group names, GPU/CPU split, credentials wiring, Ray's own
cluster-launcher schema, and version drift between the Dockerfile, the Makefile and the installed Ray.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import sys

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

from jobs.cli import COMMANDS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INFRA = os.path.join(REPO, "infra")
S3_VARS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"}


def _docs(rel: str) -> list[dict]:
    with open(os.path.join(INFRA, rel)) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _one(rel: str, kind: str) -> dict:
    docs = [d for d in _docs(rel) if d.get("kind") == kind]
    assert len(docs) == 1, f"{rel}: expected one {kind}, got {[d.get('kind') for d in _docs(rel)]}"
    return docs[0]


def test_every_infra_yaml_parses_with_expected_kinds():
    found = {}
    for path in sorted(glob.glob(os.path.join(INFRA, "**", "*.y*ml"), recursive=True)):
        rel = os.path.relpath(path, INFRA)
        docs = _docs(rel)
        assert docs and all(isinstance(d, dict) for d in docs), rel
        found[rel] = [d.get("kind") for d in docs]
    assert found == {
        "aws/cluster.yaml": [None],
        "kuberay/raycluster.yaml": ["RayCluster"],
        "kuberay/rayjob.yaml": ["RayJob"],
        "kuberay/s3-secret.example.yaml": ["Secret"],
        "kuberay/serviceaccount.yaml": ["ServiceAccount"],
    }


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _check_ray_auth(env: list[dict], where: str) -> None:
    """Token authentication on, the token from the Secret vmae-ray-auth (required: a pod without it must not
    start) and never a literal value."""
    by_name = {e["name"]: e for e in env}
    assert by_name["RAY_AUTH_MODE"].get("value") == "token", where
    token = by_name["RAY_AUTH_TOKEN"]
    assert "value" not in token and token["valueFrom"]["secretKeyRef"] == {
        "name": "vmae-ray-auth",
        "key": "auth_token",
    }
    assert not token["valueFrom"]["secretKeyRef"].get("optional"), where


def test_raycluster_groups_resources_and_credentials():
    rc = _one("kuberay/raycluster.yaml", "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1" and rc["spec"]["rayVersion"] == ray.__version__
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu-decode", "gpu-train"}
    # loader.decode=remote places its decode actors by this resource (RemoteDecodeConfig.resource)
    from pipeline.loader.config import RemoteDecodeConfig

    decode = json.loads(yaml.safe_load(groups["cpu-decode"]["rayStartParams"]["resources"]))
    assert decode == {
        RemoteDecodeConfig().resource: float(groups["cpu-decode"]["rayStartParams"]["num-cpus"])
    }
    for name, group in groups.items():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        limits = _containers(group["template"])[0]["resources"]["limits"]
        wants_gpu = "num-gpus" in group["rayStartParams"]
        assert ("nvidia.com/gpu" in limits) == wants_gpu == (name == "gpu-train"), name
        if wants_gpu:
            assert group["rayStartParams"]["num-gpus"] == limits["nvidia.com/gpu"]
        # Ray may not claim more CPUs than the container has.
        assert float(group["rayStartParams"]["num-cpus"]) <= float(limits["cpu"]), name
    secret = _one("kuberay/s3-secret.example.yaml", "Secret")
    assert set(secret["stringData"]) == S3_VARS
    for where, template in [("head", head["template"])] + [(n, g["template"]) for n, g in groups.items()]:
        spec = template["spec"]
        assert (
            spec["serviceAccountName"]
            == _one("kuberay/serviceaccount.yaml", "ServiceAccount")["metadata"]["name"]
        )
        container = _containers(template)[0]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
        assert set(refs) == S3_VARS | {"RAY_AUTH_TOKEN"}, where
        assert all(r["name"] == secret["metadata"]["name"] and r["key"] == k
                   for k, r in refs.items() if k in S3_VARS), where  # fmt: skip
        _check_ray_auth(container["env"], where)
        # object store: /dev/shm is memory-backed and at least as large as Ray's object store
        params = (head if where == "head" else groups[where])["rayStartParams"]
        (shm,) = [v for v in spec["volumes"] if v["name"] == "dshm"]
        assert shm["emptyDir"]["medium"] == "Memory"
        assert (
            int(params["object-store-memory"]) <= int(shm["emptyDir"]["sizeLimit"].removesuffix("Gi")) * 2**30
        )
        assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"]), where


def test_rayjob_runs_a_vmae_command_on_the_cluster():
    job = _one("kuberay/rayjob.yaml", "RayJob")
    rc = _one("kuberay/raycluster.yaml", "RayCluster")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": rc["metadata"]["name"]}
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.cli"] and argv[3] in COMMANDS
    config = argv[argv.index("--config") + 1]
    assert os.path.isfile(os.path.join(REPO, config)), config
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["PYTHONUNBUFFERED"] == "1"
    (submitter,) = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    _check_ray_auth(submitter["env"], "rayjob submitter")  # the Jobs API asks for the cluster's token


def test_cluster_launcher_yaml_matches_rays_schema():
    cfg = _docs("aws/cluster.yaml")[0]
    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        jsonschema.validate(cfg, json.load(f))
    types = cfg["available_node_types"]
    assert set(types) == {"head", "cpu_decode", "gpu_train"} and cfg["head_node_type"] == "head"
    assert types["head"]["resources"]["CPU"] == 0
    assert types["gpu_train"]["resources"]["GPU"] > 0 and "GPU" not in types["cpu_decode"]["resources"]
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
    # decode actors (loader.decode=remote) on the CPU nodes, one per core, and on the GPU nodes' spare cores
    assert types["cpu_decode"]["resources"]["decode"] == types["cpu_decode"]["resources"]["CPU"]
    assert 0 < types["gpu_train"]["resources"]["decode"] < types["gpu_train"]["resources"]["CPU"]
    # token auth: on in every node's `ray start`, the token only as Ray's default file, copied by file_mounts
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in cfg[key] if "ray start" in c]
        assert start.index("export RAY_AUTH_MODE=token") < start.index("ray start"), key
    assert cfg["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert "RAY_AUTH_TOKEN" not in open(os.path.join(INFRA, "aws", "cluster.yaml")).read()


def test_dockerfile_pins_match_the_project():
    with open(os.path.join(INFRA, "Dockerfile")) as f:
        docker = f.read()
    with open(os.path.join(REPO, "Makefile")) as f:
        make_pins = dict(re.findall(r"\b(torch|torchvision)==([0-9.]+)", f.read()))
    args = dict(re.findall(r"^ARG (\w+)=(\S*)", docker, flags=re.M))
    assert make_pins == {"torch": args["TORCH_VERSION"], "torchvision": args["TORCHVISION_VERSION"]}
    assert args["RAY_VERSION"] == ray.__version__  # Ray Jobs: client and cluster on the same Ray
    assert args["PYTHON_VERSION"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert '"torch==${TORCH_VERSION}"' in docker and '"torchvision==${TORCHVISION_VERSION}"' in docker
    copied = [p for line in re.findall(r"^COPY (.+)$", docker, flags=re.M) for p in line.split()[:-1]]
    assert {"pyproject.toml", "jobs", "configs"} <= set(copied)
    for path in copied:
        assert os.path.exists(os.path.join(REPO, path)), f"Dockerfile copies missing {path}"


def _gpu_node_types() -> dict[str, tuple[dict[str, float], int]]:
    """Every shipped GPU node type: (Ray resources of one node, most nodes of that type)."""
    out = {}
    for group in _one("kuberay/raycluster.yaml", "RayCluster")["spec"]["workerGroupSpecs"]:
        params = group["rayStartParams"]
        if int(params.get("num-gpus", 0)):
            out[f"kuberay:{group['groupName']}"] = (
                {"CPU": float(params["num-cpus"]), "GPU": float(params["num-gpus"])},
                int(group["maxReplicas"]),
            )
    with open(os.path.join(INFRA, "aws", "cluster.yaml")) as f:
        aws = yaml.safe_load(f)
    for name, t in aws["available_node_types"].items():
        if t["resources"].get("GPU"):
            out[f"aws:{name}"] = ({k: float(v) for k, v in t["resources"].items()}, int(t["max_workers"]))
    return out


def _gpu_train_configs() -> list[tuple[str, object]]:
    from jobs.config import load_config
    from jobs.study.study import StudyConfig, expand_grid, resolve_cell
    from jobs.train.config import FinetuneConfig, PretrainConfig
    from tests.jobs.study.test_study import fake_data

    out = []
    for cls, folder in ((PretrainConfig, "pretrain"), (FinetuneConfig, "finetune")):
        for path in sorted(glob.glob(os.path.join(REPO, "configs", folder, "*.yaml"))):
            cfg = load_config(cls, path)
            if cfg.scaling.use_gpu:
                out.append((os.path.relpath(path, REPO), cfg))
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "study", "*_gpu.yaml"))):
        study = load_config(StudyConfig, path)
        run = resolve_cell(study, expand_grid(study)[0], fake_data(study), study.seeds[0])
        out.append((os.path.relpath(path, REPO) + " pretrain", run.pretrain))
        if run.job["finetune"] is not None:
            from jobs.config import from_dict

            out.append(
                (os.path.relpath(path, REPO) + " finetune", from_dict(FinetuneConfig, run.job["finetune"]))
            )
    return out


def test_every_cluster_spec_places_every_gpu_config():
    """A config whose min_workers the cluster cannot place makes an elastic run wait forever: every shipped
    GPU node type, at its most nodes, must hold every shipped GPU config's min_workers (else num_workers)."""
    from jobs.train.launch import placeable

    nodes, configs = _gpu_node_types(), _gpu_train_configs()
    assert len(nodes) == 2 and len(configs) >= 6
    for where, cfg in configs:
        need = cfg.scaling.min_workers or cfg.scaling.num_workers
        for node_type, (resources, most) in nodes.items():
            got = placeable(cfg.worker_bundle, [resources] * most)
            assert got >= need, (
                f"{node_type} places {got} workers of {cfg.worker_bundle}, {where} needs {need}"
            )
            per_node = placeable(cfg.worker_bundle, [resources])
            assert per_node == resources["GPU"], (
                f"{node_type}: {per_node} workers per node leave GPUs idle ({where})"
            )


def test_unplaceable_workers_fail_with_a_clear_error(monkeypatch):
    import jobs.train.launch as launch
    from jobs.config import load_config
    from jobs.train.config import PretrainConfig

    cfg = load_config(PretrainConfig, os.path.join(REPO, "configs", "pretrain", "vit_b.yaml"))
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 48.0, "GPU": 4.0}}])
    with pytest.raises(
        ValueError, match=r"32 workers of \{'CPU': 10.0, 'GPU': 1.0\} cannot be placed.* hold 4"
    ):
        launch.wait_for_resources(cfg, wait_s=0)


def test_image_has_a_c_compiler_for_torch_compile():
    """Triton builds its launcher with gcc/clang on the first compiled step: the image must install one
    (the dev box has gcc, so tests pass without; the image would not)."""
    text = open(os.path.join(INFRA, "Dockerfile")).read()
    installs = " ".join(re.findall(r"apt-get install[^&]*", text))
    assert re.search(r"\b(gcc|clang|build-essential)\b", installs), installs
    assert "libc6-dev" in installs or "build-essential" in installs  # headers gcc needs to link
