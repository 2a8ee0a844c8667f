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


def test_raycluster_groups_resources_and_credentials():
    rc = _one("kuberay/raycluster.yaml", "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1" and rc["spec"]["rayVersion"] == ray.__version__
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu-decode", "gpu-train"}
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
        assert set(refs) == S3_VARS, where
        assert all(r["name"] == secret["metadata"]["name"] and r["key"] == k for k, r in refs.items()), where
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


def test_cluster_launcher_yaml_matches_rays_schema():
    cfg = _docs("aws/cluster.yaml")[0]
    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        jsonschema.validate(cfg, json.load(f))
    types = cfg["available_node_types"]
    assert set(types) == {"head", "cpu_decode", "gpu_train"} and cfg["head_node_type"] == "head"
    assert types["head"]["resources"]["CPU"] == 0
    assert types["gpu_train"]["resources"]["GPU"] > 0 and "GPU" not in types["cpu_decode"]["resources"]
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())


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
