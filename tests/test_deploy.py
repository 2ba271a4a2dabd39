"""deploy/ (KubeRay on Kubernetes) and configs/production.yaml: render, validate, cross-check.

Tool-free checks read deploy/base directly; the rendered overlays need the tools that
``bash scripts/ci/k8s_tools.sh`` installs into .tools/ (kubectl for `kubectl kustomize`,
kubernetes-validate), and skip with a one-line reason without them. Nothing here uses the network.

The RayJob / RayCronJob fields are checked by a small structural schema written from KubeRay
v1.7.0 (tag v1.7.0, commit 59d663aeec13760646da3db9c1cf8cfe883e30b7): the CRDs'
openAPIV3Schema (ray-operator/config/crd/bases/ray.io_rayjobs.yaml, ray.io_raycronjobs.yaml, version
v1) and the operator's own checks (ray-operator/controllers/ray/utils/validation.go, constant.go).
Only the fields these manifests may use are listed, with the CRD's types and required keys; an
unlisted key fails the check because the API server would silently prune a misspelt one. The pod
templates inside are core PodTemplateSpecs: kubernetes-validate checks them, wrapped as PodTemplates.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

import hetcomp_dist.config as config

try:  # RunConfig may move from pipeline.py to run.py
    from hetcomp_dist.run import RunConfig
except ImportError:
    from hetcomp_dist.run import RunConfig

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
TOOLS = REPO / ".tools" / "bin"
KUBECTL = TOOLS / "kubectl"
KUBERNETES_VALIDATE = TOOLS / "kubernetes-validate"
NO_TOOLS = "needs .tools/bin/{}: run `bash scripts/ci/k8s_tools.sh`"
K8S_VERSION = "1.33.0"  # the oldest Kubernetes the manifests target (EKS standard support)
OVERLAYS = ("overlays/cpu", "overlays/gpu")
SERVICE_ACCOUNT = "hetcomp-ray"
PENDING_JOBS: dict[str, str] = {}        # entry points a manifest may name before they exist (none now)

# --- the structural schema (KubeRay v1.7.0, see the module docstring) ---------------------------

INT32 = {"type": "integer", "int32": True}
STR = {"type": "string"}
BOOL = {"type": "boolean"}
NUMBER = {"type": "number"}
STR_MAP = {"type": "object", "values": STR}
OBJECT = {"type": "object"}  # contents not checked here (pod templates: kubernetes-validate)

HEAD_GROUP = {"type": "object", "required": ["template"], "properties": {
    "template": OBJECT, "rayStartParams": STR_MAP, "resources": STR_MAP, "labels": STR_MAP,
    "serviceType": STR, "enableIngress": BOOL, "headService": OBJECT, "ingressOptions": OBJECT}}
WORKER_GROUP = {"type": "object", "required": ["groupName", "maxReplicas", "minReplicas", "template"], "properties": {
    "groupName": STR, "replicas": INT32, "minReplicas": INT32, "maxReplicas": INT32, "idleTimeoutSeconds": INT32,
    "priority": INT32, "numOfHosts": INT32, "suspend": BOOL, "resources": STR_MAP, "labels": STR_MAP,
    "rayStartParams": STR_MAP, "template": OBJECT, "scaleStrategy": OBJECT}}
RAY_CLUSTER_SPEC = {"type": "object", "required": ["headGroupSpec"], "properties": {
    "headGroupSpec": HEAD_GROUP, "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
    "rayVersion": STR, "enableInTreeAutoscaling": BOOL, "suspend": BOOL, "managedBy": STR,
    "authOptions": {"type": "object", "properties": {
        "mode": {"type": "string", "enum": ["disabled", "token"]}, "secretName": STR, "enableK8sTokenAuth": BOOL}},
    "autoscalerOptions": OBJECT, "headServiceAnnotations": STR_MAP, "gcsFaultToleranceOptions": OBJECT,
    "historyServerOptions": OBJECT, "networkPolicy": OBJECT, "tlsOptions": OBJECT, "upgradeStrategy": OBJECT}}
RAY_JOB_SPEC = {"type": "object", "properties": {
    "entrypoint": STR, "runtimeEnvYAML": STR, "shutdownAfterJobFinishes": BOOL,
    "ttlSecondsAfterFinished": {**INT32, "minimum": 0}, "activeDeadlineSeconds": {**INT32, "minimum": 1},
    "preRunningDeadlineSeconds": {**INT32, "minimum": 1}, "backoffLimit": {**INT32, "minimum": 0},
    # The CRD types it as a string; these are the operator's JobSubmissionMode values.
    "submissionMode": {"type": "string", "enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
    "rayClusterSpec": RAY_CLUSTER_SPEC, "clusterSelector": STR_MAP, "jobId": STR, "metadata": STR_MAP,
    "entrypointNumCpus": NUMBER, "entrypointNumGpus": NUMBER, "entrypointResources": STR, "suspend": BOOL,
    "submitterPodTemplate": OBJECT, "submitterConfig": OBJECT, "deletionStrategy": OBJECT, "managedBy": STR}}
RAY_CRON_JOB_SPEC = {"type": "object", "required": ["jobTemplate", "schedule"], "properties": {
    "jobTemplate": RAY_JOB_SPEC, "schedule": {"type": "string", "minLength": 1},
    "timeZone": {"type": "string", "minLength": 1}, "suspend": BOOL}}
# validation.go / constant.go: MaxRayJobNameLength = 53 - 6, MaxRayCronJobNameLength = 47 - 11.
MAX_NAME = {"RayJob": 47, "RayCronJob": 36}
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")

_PY_TYPES = {"string": str, "boolean": bool, "object": dict, "array": list, "number": (int, float), "integer": int}


def schema_errors(value: Any, schema: dict, where: str) -> list[str]:
    """Why ``value`` does not fit ``schema`` (empty if it does)."""
    tp = _PY_TYPES[schema["type"]]
    if not isinstance(value, tp) or (schema["type"] in ("integer", "number") and isinstance(value, bool)):
        return [f"{where}: expected {schema['type']}, got {value!r}"]
    errors = []
    if schema.get("int32") and not -2**31 <= value < 2**31:
        errors.append(f"{where}: {value} is out of int32 range")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{where}: {value} < {schema['minimum']}")
    if "minLength" in schema and len(value) < schema["minLength"]:
        errors.append(f"{where}: shorter than {schema['minLength']}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if "properties" in schema:
        errors += [f"{where}: missing required {k}" for k in schema.get("required", []) if k not in value]
        for k, v in value.items():
            if k not in schema["properties"]:
                errors.append(f"{where}: unknown field {k} (KubeRay v1.7.0 would drop it)")
            else:
                errors += schema_errors(v, schema["properties"][k], f"{where}.{k}")
    if "values" in schema:
        for k, v in value.items():
            errors += schema_errors(v, schema["values"], f"{where}.{k}")
    if "items" in schema:
        for i, v in enumerate(value):
            errors += schema_errors(v, schema["items"], f"{where}[{i}]")
    return errors


# --- the manifests --------------------------------------------------------------------------------


def _load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def base_docs() -> list[dict]:
    """deploy/base's resources as written (no kustomize)."""
    kust = yaml.safe_load((DEPLOY / "base" / "kustomization.yaml").read_text())
    return [d for name in kust["resources"] for d in _load_all(DEPLOY / "base" / name)]


@functools.lru_cache(maxsize=None)
def _render(target: str) -> str:
    if not KUBECTL.exists():
        pytest.skip(NO_TOOLS.format("kubectl"))
    out = subprocess.run([str(KUBECTL), "kustomize", str(DEPLOY / target)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize deploy/{target} failed:\n{out.stderr}"
    return out.stdout


def docs_of(source: str) -> list[dict]:
    """``base-files``: the base as written; else the kustomize rendering of deploy/<source>."""
    if source == "base-files":
        return base_docs()
    return [d for d in yaml.safe_load_all(_render(source)) if d]


def job_specs(docs: list[dict]) -> Iterator[tuple[str, dict]]:
    """(name, RayJob spec) of every RayJob and every RayCronJob's jobTemplate."""
    for d in docs:
        if d["kind"] == "RayJob":
            yield d["metadata"]["name"], d["spec"]
        elif d["kind"] == "RayCronJob":
            yield d["metadata"]["name"], d["spec"]["jobTemplate"]


def groups(spec: dict) -> Iterator[tuple[str, int, dict]]:
    """(group name, replicas, pod template) of the head (1 replica) and each worker group."""
    rc = spec["rayClusterSpec"]
    yield "head", 1, rc["headGroupSpec"]["template"]
    for g in rc.get("workerGroupSpecs", []):
        yield g["groupName"], g.get("replicas", g["minReplicas"]), g["template"]


def ray_container(template: dict) -> dict:
    return template["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def cpu(quantity: str | int | float) -> float:
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def pod_capacity(template: dict) -> tuple[float, float]:
    """(CPUs, GPUs) that Ray advertises for a pod: from the limits, as KubeRay passes them to `ray start`."""
    limits = ray_container(template)["resources"]["limits"]
    return cpu(limits["cpu"]), float(limits.get("nvidia.com/gpu", 0))


_ENTRY = argparse.ArgumentParser(add_help=False)
_ENTRY.add_argument("--config", required=True)
_ENTRY.add_argument("--set", dest="overrides", action="append", default=[])


def parse_entrypoint(entrypoint: str) -> tuple[str, argparse.Namespace, list[str]]:
    """``python jobs/X.py --config F [--set K=V]...`` -> (script, parsed flags, every token)."""
    tokens = shlex.split(entrypoint)
    assert tokens[0] == "python" and tokens[1].startswith("jobs/") and tokens[1].endswith(".py"), entrypoint
    args, rest = _ENTRY.parse_known_args(tokens[2:])
    assert not rest, f"{entrypoint}: unexpected {rest} (only --config/--set are checked here)"
    return tokens[1], args, tokens


def load_run_config(args: argparse.Namespace) -> RunConfig:
    return config.load(RunConfig, REPO / args.config, args.overrides)


def all_entrypoints() -> list[str]:
    """Entrypoints in the base and in the overlays' JSON patches (read at collection, no tools)."""
    found = [spec["entrypoint"] for _, spec in job_specs(base_docs())]
    for patch in DEPLOY.glob("overlays/*/*.yaml"):
        for doc in _load_all(patch):
            if isinstance(doc, list):
                found += [op["value"] for op in doc if op.get("path", "").endswith("/entrypoint")]
    return sorted(set(found))


SOURCES = ["base-files", *OVERLAYS]

# --- tests ----------------------------------------------------------------------------------------


def test_production_config_loads_strictly_and_lives_on_s3():
    cfg = config.load(RunConfig, REPO / "configs" / "production.yaml")
    assert cfg.run.startswith("s3://") and cfg.data.source.startswith("s3://")
    assert cfg.distill.out is None or cfg.distill.out.startswith("s3://")
    # Endpoint and credentials come from the environment / IAM role, not from the file.
    assert cfg.storage.endpoint_url is None
    assert cfg.ray.address is None  # inside a RayJob, Ray sets RAY_ADDRESS
    import hetcomp_dist.models  # noqa: F401  (registers the families)
    from hetcomp_dist.models.base import MODELS
    for t in cfg.teachers:  # models.build's own check, without data
        assert t.model in MODELS, t.model
        allowed = set(inspect.signature(MODELS[t.model]).parameters)
        assert set(t.params) <= allowed, (t.name, set(t.params) - allowed)


def test_no_secret_literals():
    files = [*DEPLOY.rglob("*.yaml"), REPO / "configs" / "production.yaml"]
    for f in files:
        text = f.read_text()
        for word in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "aws_secret_access_key"):
            assert word not in text, f"{f.relative_to(REPO)} names {word}"
        for doc in _load_all(f) if f.suffix == ".yaml" else []:
            assert not (isinstance(doc, dict) and doc.get("kind") == "Secret"), f"{f.relative_to(REPO)} holds a Secret"


@pytest.mark.parametrize("source", SOURCES)
def test_kuberay_fields(source):
    docs = docs_of(source)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Namespace", "RayCronJob", "RayJob", "RayJob", "ServiceAccount"], kinds
    errors = []
    for d in docs:
        if d["kind"] not in MAX_NAME:
            continue
        assert d["apiVersion"] == "ray.io/v1"
        name = d["metadata"]["name"]
        assert len(name) <= MAX_NAME[d["kind"]] and DNS1035.fullmatch(name), name
        errors += schema_errors(d["spec"], RAY_CRON_JOB_SPEC if d["kind"] == "RayCronJob" else RAY_JOB_SPEC,
                                f"{d['kind']}/{name}.spec")
        if d["kind"] == "RayCronJob":
            assert len(d["spec"]["schedule"].split()) == 5, "a standard 5-field cron schedule"
    assert not errors, "\n".join(errors)

    for name, spec in job_specs(docs):
        # The requirements, and validation.go's rules for them.
        assert spec["shutdownAfterJobFinishes"] is True, name
        assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0, name
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict), f"{name}: runtimeEnvYAML is no mapping"
        rc = spec["rayClusterSpec"]
        if rc.get("authOptions", {}).get("mode") == "token":  # token auth needs Ray >= 2.52.0
            assert tuple(map(int, rc["rayVersion"].split("."))) >= (2, 52, 0)
        for g in rc["workerGroupSpecs"]:
            assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], (name, g["groupName"])
        for group, _, template in groups(spec):
            assert template["spec"]["containers"], (name, group)
            start = (rc["headGroupSpec"] if group == "head" else
                     next(g for g in rc["workerGroupSpecs"] if g["groupName"] == group)).get("rayStartParams", {})
            assert "labels" not in start, (name, group)


def test_nightly_refresh_outlasts_no_schedule_tick():
    # RayCronJob has no concurrencyPolicy: a run must end before the next daily tick.
    (cron,) = [d for d in base_docs() if d["kind"] == "RayCronJob"]
    minute, hour, dom, month, dow = cron["spec"]["schedule"].split()
    assert (dom, month, dow) == ("*", "*", "*") and minute.isdigit() and hour.isdigit(), "a daily schedule"
    assert cron["spec"]["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600


@pytest.mark.parametrize("entrypoint", all_entrypoints())
def test_entrypoint_script_exists_and_its_config_loads(entrypoint):
    script, args, tokens = parse_entrypoint(entrypoint)
    load_run_config(args)  # strict: unknown keys, wrong types and bad --set paths fail
    if not (REPO / script).exists():
        if script in PENDING_JOBS:
            pytest.xfail(PENDING_JOBS[script])
        pytest.fail(f"{script} (named by a manifest) does not exist")
    out = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in (t for t in tokens if t.startswith("--")):
        assert flag in out.stdout, f"{script} --help does not list {flag}"


def _fits(items: list[tuple[float, float]], pods: list[tuple[float, float]]) -> bool:
    """Do all (cpu, gpu) items run at once on the pods? (first fit, largest first)"""
    free = [list(p) for p in pods]
    for c, g in sorted(items, reverse=True):
        pod = next((p for p in free if p[0] >= c and p[1] >= g), None)
        if pod is None:
            return False
        pod[0] -= c
        pod[1] -= g
    return True


@pytest.mark.parametrize("source", SOURCES)
def test_pods_match_the_configs_resources(source):
    for name, spec in job_specs(docs_of(source)):
        script, args, _ = parse_entrypoint(spec["entrypoint"])
        cfg = load_run_config(args)
        workers = []  # (group, (cpus, gpus)) per worker pod
        for group, replicas, template in groups(spec):
            res = ray_container(template)["resources"]
            # Ray counts the limit; a request below it would let Kubernetes overcommit what Ray hands out.
            for key in ("cpu", "memory"):
                assert res["requests"][key] == res["limits"][key], (name, group, key)
            assert template["spec"]["serviceAccountName"] == SERVICE_ACCOUNT, (name, group)
            assert template["spec"]["securityContext"]["runAsNonRoot"] is True, (name, group)
            if group != "head":
                workers += [(group, pod_capacity(template))] * replicas
        rc = spec["rayClusterSpec"]
        assert rc["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{name}: no actors on the head"
        pods = [cap for _, cap in workers]
        teachers = [(t.cpus, t.gpus) for t in cfg.teachers]
        d = cfg.distill
        student = [(d.cpus_per_worker, d.gpus_per_worker)] * d.workers
        gpus = sum(g for _, g in pods)
        if script == "jobs/train_teachers.py":
            assert _fits(teachers, pods), f"{name}: the teachers {teachers} do not all fit in {pods}"
            assert gpus == sum(g for _, g in teachers), f"{name}: {gpus} GPUs for teachers asking {teachers}"
        elif script == "jobs/distill.py":
            # One Ray Train worker per pod, each pod exactly one worker's share.
            assert pods == [(d.cpus_per_worker, math.ceil(d.gpus_per_worker))] * d.workers, (name, pods, d)
        else:  # the nightly refresh: teachers, then the student, on one cluster
            assert _fits(teachers, pods) and _fits(student, pods), (name, pods, teachers, student)
            assert gpus == sum(g for _, g in teachers + student), f"{name}: {gpus} GPUs, idle or missing"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_images_and_gpus(overlay):
    target = overlay.rsplit("/", 1)[1]
    for name, spec in job_specs(docs_of(overlay)):
        images = {ray_container(t)["image"] for _, _, t in groups(spec)}
        # One image per cluster: Ray and Python must be the same on every node.
        assert len(images) == 1, (name, images)
        repo, tag = images.pop().rsplit(":", 1)
        assert repo == "hetcomp-dist" and tag.endswith("cpu" if target == "cpu" else "cuda"), (name, repo, tag)
        _, args, _ = parse_entrypoint(spec["entrypoint"])
        gpus_per_worker = load_run_config(args).distill.gpus_per_worker
        assert gpus_per_worker == (1 if target == "gpu" and name != "train-teachers" else 0), (name, gpus_per_worker)
        for group, _, template in groups(spec):
            if pod_capacity(template)[1]:
                tolerations = template["spec"].get("tolerations", [])
                assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), (name, group)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_kinds_validate(overlay, tmp_path):
    if not KUBERNETES_VALIDATE.exists():
        pytest.skip(NO_TOOLS.format("kubernetes-validate"))
    docs = docs_of(overlay)
    core = [d for d in docs if d["apiVersion"] == "v1"]
    sa = next(d for d in core if d["kind"] == "ServiceAccount")
    assert sa["metadata"]["name"] == SERVICE_ACCOUNT and sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    # Each Ray pod template is a core PodTemplateSpec: validate it as a PodTemplate.
    for name, spec in job_specs(docs):
        for group, _, template in groups(spec):
            core.append({"apiVersion": "v1", "kind": "PodTemplate",
                         "metadata": {"name": f"{name}-{group}", "namespace": "hetcomp"}, "template": template})
    path = tmp_path / "core.yaml"
    path.write_text(yaml.safe_dump_all(core))
    out = subprocess.run([str(KUBERNETES_VALIDATE), "--strict", "--quiet", "-k", K8S_VERSION, str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
