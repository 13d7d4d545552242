"""Lint the cluster configuration under cluster/ (CI can parse it, not launch it). See cluster/README.md.

Checks: every YAML parses (multi-document for k8s), k8s manifests are well-formed KubeRay objects with the
settings docs/ray-operations.md §3, §9 require, launcher YAMLs validate against Ray's own cluster schema and keep the
CPU-0 head / scale-from-0 GPU layout with token auth and a loopback dashboard, the runtime env excludes what
must not be uploaded and carries no secrets, the image is pinned and never a Ray ML image, and every job
config referenced from cluster/ exists.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from psamf.tune import SearchSpace

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
JOB_CONFIGS = ROOT / "jobs" / "configs"

RAY_VERSION = "2.60.0"


def _files(base: Path, *suffixes: str) -> list[Path]:
    return sorted(p for p in base.rglob("*") if p.is_file() and (not suffixes or p.suffix in suffixes))


def _yaml_files() -> list[Path]:
    return _files(CLUSTER, ".yaml", ".yml")


def _load_all(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _load_one(path: Path) -> dict:
    docs = _load_all(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, got {len(docs)}"
    assert isinstance(docs[0], dict), f"{path}: top level must be a mapping"
    return docs[0]


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


K8S_FILES = sorted((CLUSTER / "k8s").glob("*.yaml"))
VM_FILES = sorted((CLUSTER / "vm").glob("*.yaml"))


def _k8s_objects(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p in K8S_FILES for d in _load_all(p) if d.get("kind") == kind]


def _cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec: standalone RayClusters and the rayClusterSpec of each RayJob."""
    out = [(f"{_rel(p)}:RayCluster", d["spec"]) for p, d in _k8s_objects("RayCluster")]
    out += [(f"{_rel(p)}:RayJob", d["spec"]["rayClusterSpec"]) for p, d in _k8s_objects("RayJob")]
    return out


# --------------------------------------------------------------------------------------------
# Presence and parsing
# --------------------------------------------------------------------------------------------


def test_expected_files_exist():
    for rel in ("docker/Dockerfile", "docker/requirements.txt", "runtime_env.yaml", "vm/aws.yaml",
                "vm/gcp.yaml", "k8s/raycluster.yaml", "k8s/rayjob-train.yaml", "k8s/rayjob-train-smoke.yaml",
                "k8s/rayjob-tune.yaml", "local/autoscaling.yaml", "README.md"):
        assert (CLUSTER / rel).is_file(), f"cluster/{rel} is missing"


@pytest.mark.parametrize("path", _yaml_files(), ids=_rel)
def test_every_yaml_parses(path):
    docs = _load_all(path)
    assert docs, f"{_rel(path)} is empty"
    for d in docs:
        assert isinstance(d, dict), f"{_rel(path)}: every document must be a mapping, got {type(d).__name__}"


@pytest.mark.parametrize("path", K8S_FILES, ids=_rel)
def test_k8s_manifests_have_api_version_kind_and_name(path):
    for d in _load_all(path):
        assert d.get("apiVersion") and d.get("kind"), f"{_rel(path)}: document without apiVersion/kind"
        assert d.get("metadata", {}).get("name"), f"{_rel(path)}: {d['kind']} without metadata.name"
        if d["kind"] in ("RayCluster", "RayJob"):
            assert d["apiVersion"] == "ray.io/v1", f"{_rel(path)}: KubeRay objects are ray.io/v1"


# --------------------------------------------------------------------------------------------
# No Ray ML image, no secrets
# --------------------------------------------------------------------------------------------

_SCANNED = _files(CLUSTER) + _files(JOB_CONFIGS)
_SECRET_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids (long-term / temporary)
    re.compile(r"aws_secret_access_key", re.IGNORECASE),
    re.compile(r"aws_session_token", re.IGNORECASE),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


@pytest.mark.parametrize("path", _SCANNED, ids=_rel)
def test_no_ray_ml_image_and_no_secrets(path):
    text = path.read_text(errors="replace")
    assert "ray-ml" not in text.lower(), f"{_rel(path)} mentions the discontinued Ray ML image"
    for pat in _SECRET_PATTERNS:
        m = pat.search(text)
        assert m is None, f"{_rel(path)} contains a secret-looking string {m.group(0)!r}"


def test_secret_scan_catches_examples():
    # the patterns above really match what they are meant to catch
    fake = "AKIA" + "ABCDEFGHIJKLMNOP"
    assert _SECRET_PATTERNS[0].search(f"key: {fake}")
    assert _SECRET_PATTERNS[1].search("AWS_SECRET_ACCESS_KEY: x")


_SECRET_ENV_NAME = re.compile(r"SECRET|PASSWORD|ACCESS_KEY|SESSION_TOKEN|AUTH_TOKEN$|API_KEY|HF_TOKEN")


def _runtime_envs() -> list[tuple[str, dict]]:
    envs = [("cluster/runtime_env.yaml", _load_one(CLUSTER / "runtime_env.yaml"))]
    for p, d in _k8s_objects("RayJob"):
        envs.append((f"{_rel(p)}:runtimeEnvYAML", yaml.safe_load(d["spec"]["runtimeEnvYAML"])))
    return envs


@pytest.mark.parametrize("name,env", _runtime_envs(), ids=lambda x: x if isinstance(x, str) else None)
def test_runtime_envs_are_valid_and_carry_no_secrets(name, env):
    from ray.runtime_env import RuntimeEnv

    allowed = {"working_dir", "excludes", "env_vars", "py_modules", "pip", "uv", "config"}
    assert set(env) <= allowed, f"{name}: unexpected runtime_env keys {sorted(set(env) - allowed)}"
    RuntimeEnv(**env)  # Ray's own type checks (env_vars must be str -> str, ...)
    for key in env.get("env_vars", {}):
        assert not _SECRET_ENV_NAME.search(key), f"{name}: env var {key} looks like a secret; use node identity"


# --------------------------------------------------------------------------------------------
# runtime_env.yaml
# --------------------------------------------------------------------------------------------


def test_runtime_env_excludes_what_must_not_be_uploaded():
    try:  # the matcher Ray itself uses for runtime_env excludes (ray/_private/runtime_env/packaging.py)
        from ray._private.thirdparty.pathspec import PathSpec
    except ImportError:
        PathSpec = pytest.importorskip("pathspec").PathSpec
    env = _load_one(CLUSTER / "runtime_env.yaml")
    assert env["working_dir"] == "."
    excludes = env["excludes"]
    assert ".git" in excludes
    # Ray matches excludes with gitwildmatch on paths relative to working_dir
    spec = PathSpec.from_lines("gitwildmatch", excludes)
    for path in (".git/config", ".venv/bin/python", "data/shards/mosi/part-0.parquet", "runs/r1/ckpt.pt",
                 "outputs/x.json", "shards/part-0.parquet", "data/raw/aligned_50.pkl",
                 "psamf/__pycache__/x.pyc"):
        assert spec.match_file(path), f"runtime_env excludes do not drop {path}"
    for path in ("psamf/metrics.py", "psamf/data.py", "psamf/data/__init__.py", "jobs/train.py",
                 "jobs/configs/mosi-reference.yaml", "cluster/runtime_env.yaml", "pyproject.toml",
                 "psamf/assets/tiny-vocab.txt"):
        assert not spec.match_file(path), f"runtime_env excludes drop {path}, which the job needs"
    assert env["env_vars"].get("RAY_AUTH_MODE") in (None, "token")


# --------------------------------------------------------------------------------------------
# Docker image
# --------------------------------------------------------------------------------------------


def test_dockerfile_base_and_pins():
    text = (CLUSTER / "docker" / "Dockerfile").read_text()
    m = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.MULTILINE)
    assert m, "Dockerfile: the base image must be an ARG RAY_IMAGE default"
    assert m.group(1).startswith(f"rayproject/ray:{RAY_VERSION}-py3"), m.group(1)
    assert re.search(r"-cu12\d*$", m.group(1)), "the base image must be a CUDA 12 (GPU) variant"
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", text, re.MULTILINE)
    assert "confirm" in text.lower(), "the Dockerfile must say the base tag must be confirmed"
    assert "requirements.txt" in text and "--no-deps" in text

    reqs = [ln.strip() for ln in (CLUSTER / "docker" / "requirements.txt").read_text().splitlines()
            if ln.strip() and not ln.strip().startswith("#")]
    assert reqs
    for ln in reqs:
        pinned = re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[a-z,]+\])?==[0-9][\w.+]*", ln)
        assert pinned, f"requirements.txt: not pinned: {ln!r}"
    assert f"ray[default,data,train,tune]=={RAY_VERSION}" in reqs


def test_dockerignore_whitelists_the_build_context():
    lines = (CLUSTER / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert lines[0] == "*" or "*" in lines
    assert "!psamf/" in lines and "!pyproject.toml" in lines


# --------------------------------------------------------------------------------------------
# Cluster launcher (cluster/vm)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", VM_FILES, ids=_rel)
def test_launcher_yaml_matches_ray_schema(path):
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    if not schema_path.is_file():
        pytest.skip("this Ray build ships no ray-schema.json")
    cfg = _load_one(path)
    jsonschema.validate(cfg, json.loads(schema_path.read_text()))
    # the checks Ray's validate_config adds on top of the schema
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert sum(t.get("min_workers", 0) for t in cfg["available_node_types"].values()) <= cfg["max_workers"]


def test_local_autoscaling_cluster_matches_ray_schema_and_mirrors_the_aws_layout():
    """cluster/local/autoscaling.yaml (the fake multi-node cluster the autoscaling tests start) is a valid launcher
    config with the node types of vm/aws.yaml: a CPU-0 head with TRAIN_DRIVER, a worker group from 0 whose custom
    resource stands in for the GPU, an optional data group from 0."""
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    local = _load_one(CLUSTER / "local" / "autoscaling.yaml")
    jsonschema.validate(local, json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text()))
    assert local["provider"]["type"] == "fake_multinode" and local["provider"]["gcs_address"].startswith("127.0.0.1:")
    aws = _load_one(CLUSTER / "vm" / "aws.yaml")
    lt, at = local["available_node_types"], aws["available_node_types"]
    assert lt[local["head_node_type"]]["resources"] == at[aws["head_node_type"]]["resources"]  # CPU 0, TRAIN_DRIVER
    gpu = lt["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 2 and gpu["resources"]["accel"] == 1
    assert "GPU" not in gpu["resources"] and at["gpu_worker"]["min_workers"] == 0
    assert lt["cpu_data"]["labels"] == at["cpu_data"]["labels"] and lt["cpu_data"]["min_workers"] == 0
    assert sum(t.get("max_workers", 0) for n, t in lt.items() if n != local["head_node_type"]) <= local["max_workers"]


@pytest.mark.parametrize("path", VM_FILES, ids=_rel)
def test_launcher_layout_auth_and_dashboard(path):
    cfg = _load_one(path)
    types = cfg["available_node_types"]
    for name, t in types.items():
        assert "resources" in t, f"{_rel(path)}: node type {name} needs a resources key"
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "head must advertise CPU 0"
    assert head["resources"].get("TRAIN_DRIVER", 0) >= 1, "head must carry the TRAIN_DRIVER resource"
    head_nc = json.dumps(head["node_config"]).lower()
    assert "spot" not in head_nc and "preemptible" not in head_nc, "head must be on-demand"

    gpu = [n for n, t in types.items() if t["resources"].get("GPU", 0) > 0]
    assert gpu, f"{_rel(path)}: no GPU worker group"
    for n in gpu:
        assert types[n].get("min_workers", 0) == 0, f"{n}: GPU group must scale from 0"
        assert types[n].get("max_workers", 0) >= 1
    data = [n for n, t in types.items() if t.get("labels", {}).get("ray-subcluster") == "data"]
    assert data, "expected an optional CPU data group labelled ray-subcluster=data"
    for n in data:
        assert types[n]["resources"].get("GPU", 0) == 0 and types[n].get("min_workers", 0) == 0

    provider = cfg["provider"]["type"]
    if provider == "aws":
        for n in gpu:
            assert "IamInstanceProfile" in types[n]["node_config"], f"{n}: workers need an instance profile for S3"
        assert "IamInstanceProfile" in head["node_config"], "head: least-privilege profile, not the launcher's"
    if provider == "gcp":
        for n in gpu:
            nc = types[n]["node_config"]
            assert nc.get("guestAccelerators"), f"{n}: GCP GPUs need guestAccelerators"
            assert {"onHostMaintenance": "TERMINATE"} in nc.get("scheduling", []), f"{n}: onHostMaintenance"

    docker = cfg["docker"]
    assert "-e RAY_AUTH_MODE=token" in docker["run_options"]
    assert any(k.endswith("/.ray/auth_token") for k in cfg["file_mounts"]), "token must be file-mounted"
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in json.dumps(cfg)


# --------------------------------------------------------------------------------------------
# KubeRay (cluster/k8s)
# --------------------------------------------------------------------------------------------


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


@pytest.mark.parametrize("name,spec", _cluster_specs(), ids=lambda x: x if isinstance(x, str) else None)
def test_kuberay_cluster_spec(name, spec):
    assert spec["rayVersion"] == RAY_VERSION
    assert spec.get("enableInTreeAutoscaling") is True
    assert spec.get("authOptions", {}).get("mode") == "token", f"{name}: token auth"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", f"{name}: head num-cpus must be the string \"0\""
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{name}: never expose the head service"
    images = {c["image"] for c in _containers(head)}
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] == 0, f"{name}/{g['groupName']}: scale from 0"
        assert g["maxReplicas"] >= 1
        images |= {c["image"] for c in _containers(g)}
        limits = [c.get("resources", {}).get("limits", {}) for c in _containers(g)]
        if any("nvidia.com/gpu" in lim for lim in limits):
            tol = g["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tol), f"{g['groupName']}: GPU toleration"
    assert any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
               for g in spec["workerGroupSpecs"] for c in _containers(g)) or "smoke" in name, \
        f"{name}: no GPU worker group"
    assert len(images) == 1, f"{name}: head and workers must run one image, got {images}"


def test_rayjobs_lifecycle_and_entrypoints():
    jobs = {p.name: d for p, d in _k8s_objects("RayJob")}
    assert set(jobs) == {"rayjob-train.yaml", "rayjob-train-smoke.yaml", "rayjob-tune.yaml"}
    for fname, d in jobs.items():
        s = d["spec"]
        assert s["shutdownAfterJobFinishes"] is True
        for k in ("ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit"):
            assert isinstance(s.get(k), int) and s[k] >= 0, f"{fname}: {k}"
        ep = s["entrypoint"]
        if fname == "rayjob-tune.yaml":
            m = re.match(r"python jobs/tune\.py --config (jobs/search/[\w.-]+\.yaml) --name \$\{SEARCH_ID\} "
                         r"--storage s3://\S+((?: [\w.]+=\S+)*)$", ep)
            assert m and (ROOT / m.group(1)).is_file(), ep
            assert s["jobId"] == "${SEARCH_ID}", f"{fname}: submission id must equal the search name"
            overrides = m.group(2).split()  # section.key=value after the options, as `psamf tune` takes them
            assert any(o.startswith("data.uri=s3://") for o in overrides), ep
            space = SearchSpace.from_yaml(ROOT / m.group(1), overrides)  # valid, and sized for the cluster
            assert space.base.data.uri == next(o.split("=", 1)[1] for o in overrides if o.startswith("data.uri="))
            groups = s["rayClusterSpec"]["workerGroupSpecs"]
            assert space.max_concurrent_trials and space.max_concurrent_trials <= sum(g["maxReplicas"] for g in groups)
            continue
        assert re.match(r"python jobs/train\.py --config jobs/configs/[\w.-]+\.yaml --run-name \$\{?RUN_ID\}?", ep), ep
        assert s["jobId"] == "${RUN_ID}", f"{fname}: submission id must equal the run name"
        env = yaml.safe_load(s["runtimeEnvYAML"])
        assert re.match(r"(s3|gs)://.+\.zip$", env["working_dir"]), "RayJob code must come from a remote zip"
    assert "--smoke-test" in jobs["rayjob-train-smoke.yaml"]["spec"]["entrypoint"]
    assert "--smoke-test" not in jobs["rayjob-train.yaml"]["spec"]["entrypoint"]
    smoke, full = jobs["rayjob-train-smoke.yaml"]["spec"], jobs["rayjob-train.yaml"]["spec"]
    assert smoke["activeDeadlineSeconds"] < full["activeDeadlineSeconds"]


# --------------------------------------------------------------------------------------------
# Cross references
# --------------------------------------------------------------------------------------------

_CONFIG_REF = re.compile(r"jobs/configs/[\w./-]+?\.ya?ml")


def test_referenced_job_configs_exist():
    refs = {m.group(0) for p in _files(CLUSTER) for m in _CONFIG_REF.finditer(p.read_text(errors="replace"))}
    assert refs, "cluster/ references no jobs/configs file"
    missing = sorted(r for r in refs if not (ROOT / r).is_file())
    assert not missing, f"cluster/ references missing job configs: {missing}"


def test_readme_documents_submission_and_resume():
    text = (CLUSTER / "README.md").read_text()
    for needle in ("ray up", "ray job submit", "--submission-id", "--run-name", "--working-dir",
                   "--runtime-env cluster/runtime_env.yaml", "port-forward", "RAY_AUTH_MODE=token",
                   "8265", "10001", "6379", "IRSA"):
        assert needle in text, f"cluster/README.md should mention {needle!r}"
    assert re.search(r"resum", text, re.IGNORECASE)
