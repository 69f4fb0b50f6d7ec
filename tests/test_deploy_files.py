"""Deployment files: Dockerfile, docker-compose, Kubernetes manifests and the Helm chart.

No Docker daemon, cluster or Helm binary is needed. The checks tie the files to the code:
the variables they set are the ones ``settings.py`` reads (found in its source at test
time, so renaming a variable there breaks these tests), and where a file gives the worker
its environment, ``Settings`` is built from exactly that environment.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import itertools
import json
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

import hypha_conda_plugin
from hypha_conda_plugin.settings import Settings

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
K8S = EXAMPLES / "k8s"
CHART = REPO / "helm" / "hypha-conda-worker"
TEMPLATES = CHART / "templates"
STARTUP = "hypha_conda_plugin:hypha_startup"
K8S_VERSION = "1.30"  # oldest Kubernetes the manifests are checked against

# --------------------------------------------------------------------------- helpers


@cache
def read_variables() -> frozenset[str]:
    """Every HYPHA_*/CONDA_* variable that settings.py reads (string literals there)."""
    source = (REPO / "hypha_conda_plugin" / "settings.py").read_text()
    names = frozenset(re.findall(r"[\"']((?:HYPHA|CONDA)_[A-Z0-9_]+)[\"']", source))
    assert {n for n in names if n.startswith("HYPHA_")}, "no HYPHA_* variable found"
    assert {n for n in names if n.startswith("CONDA_")}, "no CONDA_* variable found"
    return names


@cache
def hypha_server_variables() -> frozenset[str]:
    """HYPHA_<ARG> variables `python -m hypha.server --from-env` reads, from its argument
    parser's source (importing hypha.server builds an application as a side effect)."""
    origin = importlib.util.find_spec("hypha.server").origin
    flags = re.findall(r"add_argument\(\s*\"--([a-z0-9-]+)\"", Path(origin).read_text())
    names = frozenset("HYPHA_" + f.upper().replace("-", "_") for f in flags)
    assert {"HYPHA_HOST", "HYPHA_PORT", "HYPHA_STARTUP_FUNCTIONS"} <= names
    return names


def server_startup(argv: list[str], env: dict[str, str]) -> dict[str, str | None]:
    """Host, port and startup functions of a `python -m hypha.server` command, from its
    arguments or, with --from-env, from HYPHA_<ARG> variables the arguments leave unset."""
    assert argv[:3] == ["python", "-m", "hypha.server"], argv
    unknown = ours(env) - read_variables() - hypha_server_variables()
    assert not unknown, f"variables neither the worker nor Hypha reads: {unknown}"
    from_env = "--from-env" in argv
    if not from_env:
        hypha_only = ours(env) & (hypha_server_variables() - read_variables())
        assert not hypha_only, f"{hypha_only} are ignored without --from-env"

    def option(flag: str) -> str | None:
        for i, arg in enumerate(argv):
            if arg == flag and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
        name = "HYPHA_" + flag[2:].upper().replace("-", "_")
        return env.get(name) if from_env else None

    return {
        "host": option("--host"),
        "port": option("--port"),
        "startup": option("--startup-functions"),
    }


def standalone_variables() -> frozenset[str]:
    """The HYPHA_* variables: the standalone worker's own settings."""
    return frozenset(n for n in read_variables() if n.startswith("HYPHA_"))


def ours(names: set[str] | dict[str, Any]) -> set[str]:
    return {n for n in names if n.startswith(("HYPHA_", "CONDA_"))}


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@cache
def dockerfile() -> dict[str, Any]:
    """The runtime stage of examples/Dockerfile: instructions, ENV, USER, CMD, COPY sources."""
    text = (EXAMPLES / "Dockerfile").read_text()
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip()[:-1] + " " if raw.rstrip().endswith("\\") else raw
        if not raw.rstrip().endswith("\\"):
            lines.append(current.strip())
            current = ""
    instructions = [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]
    stages = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    runtime = instructions[stages[-1] :]
    env: dict[str, str] = {}
    for op, arg in runtime:
        if op == "ENV":
            for item in shlex.split(arg):
                key, _, value = item.partition("=")
                env[key] = value
    return {
        "all": instructions,
        "runtime": runtime,
        "env": env,
        "from": [arg for op, arg in instructions if op == "FROM"],
        "user": [arg for op, arg in runtime if op == "USER"],
        "entrypoint": [json.loads(arg) for op, arg in runtime if op == "ENTRYPOINT"],
        "cmd": [json.loads(arg) for op, arg in runtime if op == "CMD"],
        "run": " ".join(arg for op, arg in runtime if op == "RUN"),
        "copy_sources": [
            src
            for op, arg in instructions
            if op == "COPY" and not arg.startswith("--from")
            for src in arg.split()[:-1]
        ],
    }


def image_home() -> str:
    return dockerfile()["env"].get("HOME", "/home/hypha")


def follows(argv: list[str], flag: str, value: str) -> bool:
    """`flag value` or `flag=value` in an argument list."""
    pairs = itertools.pairwise(argv)
    return any(a == flag and b == value for a, b in pairs) or f"{flag}={value}" in argv


def k8s_env(container: dict[str, Any], secrets: dict[str, str]) -> dict[str, str]:
    """A container's environment as Kubernetes builds it: fieldRefs and secretKeyRefs
    resolved with test values, $(VAR) references to earlier variables expanded."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        name = item["name"]
        if "value" in item:
            value = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: env.get(m.group(1), m.group(0)),
                str(item["value"]),
            )
        else:
            source = item["valueFrom"]
            if "fieldRef" in source:
                assert source["fieldRef"]["fieldPath"] == "metadata.name"
                value = "worker-pod-abc12"
            else:
                ref = source["secretKeyRef"]
                value = secrets.get(f"{ref['name']}/{ref['key']}", "")
        env[name] = value
    return env


def mounted(path: Path | str, mount_points: list[str]) -> bool:
    """Whether ``path`` lies on one of the mounts (both resolved as Settings resolves
    paths, so /tmp -> /private/tmp on macOS compares alike)."""
    target = Path(path).resolve()
    points = [Path(m).resolve() for m in mount_points]
    return any(target == m or m in target.parents for m in points)


# --------------------------------------------------------------------- all YAML parses


YAML_FILES = sorted(
    [*EXAMPLES.glob("*.y*ml"), *K8S.glob("*.y*ml"), CHART / "Chart.yaml", CHART / "values.yaml"]
)


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_file_parses(path):
    assert load_all(path), f"{path} is empty"


def test_the_deployment_files_exist():
    for path in [
        EXAMPLES / "Dockerfile",
        EXAMPLES / "docker-compose.yml",
        K8S / "README.md",
        CHART / "values.schema.json",
        REPO / "helm" / "README.md",
        *(TEMPLATES / n for n in ("_helpers.tpl", "deployment.yaml", "secret.yaml", "pvc.yaml")),
        *(TEMPLATES / f"server-{n}.yaml" for n in ("deployment", "service", "pvc")),
        TEMPLATES / "NOTES.txt",
    ]:
        assert path.is_file(), f"missing {path.relative_to(REPO)}"


def test_settings_reads_the_documented_variables():
    # The anchor of every other check here: if settings.py stopped reading these, the
    # deployment files would configure nothing.
    assert {"HYPHA_SERVER_URL", "HYPHA_WORKSPACE", "HYPHA_TOKEN", "CONDA_CACHE_DIR"} <= (
        read_variables()
    )


# ------------------------------------------------------------------------- Dockerfile


def test_dockerfile_builds_from_python_slim_and_installs_the_project():
    image = dockerfile()
    assert image["from"][-1].startswith("python:3.11-slim")
    # The project's own files, not the whole tree (.venv, .git): and all that a build needs.
    sources = image["copy_sources"]
    assert "hypha_conda_plugin" in sources and "pyproject.toml" in sources
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert readme and readme.group(1) in sources, (
        "setuptools needs the readme named in pyproject.toml"
    )
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such file in the build context"
    assert "[server]" in image["run"] and "pip install" in image["run"]
    assert "--no-cache-dir" in image["run"] or image["env"].get("PIP_NO_CACHE_DIR") == "1"
    installs_conda = re.search(
        r"\b(micromamba|mamba|miniconda|miniforge|anaconda)\b|\bconda (install|create)\b",
        " ".join(arg for op, arg in image["all"] if op in ("RUN", "FROM")),
    )
    assert not installs_conda, "no conda in the image: the embedded solver builds environments"


def test_dockerfile_runs_as_uid_1000_with_the_plugin_in_hypha_by_default():
    image = dockerfile()
    assert image["user"] and image["user"][-1].split(":")[0] in ("1000", "hypha")
    assert "--uid 1000" in image["run"]
    cmd = image["cmd"][-1]
    assert cmd[:3] == ["python", "-m", "hypha.server"]
    assert follows(cmd, "--startup-functions", STARTUP)
    assert follows(cmd, "--host", "0.0.0.0")
    # tini as PID 1 forwards SIGTERM (the worker then stops its kernels) and reaps orphans.
    assert image["entrypoint"] and "tini" in image["entrypoint"][-1][0]
    assert "tini" in image["run"]
    module, _, function = STARTUP.partition(":")
    assert asyncio.iscoroutinefunction(getattr(hypha_conda_plugin, function))
    assert module == hypha_conda_plugin.__name__
    # Both modes' cache defaults point at the folder the image prepares for UID 1000.
    cache_dir = image["env"]["CONDA_CACHE_DIR"]
    assert "CONDA_CACHE_DIR" in read_variables()
    assert cache_dir in image["run"] and "chown" in image["run"]


# ----------------------------------------------------------------------- docker-compose


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / "docker-compose.yml").read_text())


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment with `${NAME:-default}` replaced by the default."""
    raw = service.get("environment", {})
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {
        key: re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", str(value))
        for key, value in raw.items()
    }


def compose_mounts(service: dict[str, Any]) -> list[str]:
    volumes = [v.split(":")[1] for v in service.get("volumes", [])]
    return volumes + [t.split(":")[0] for t in service.get("tmpfs", [])]


def test_compose_server_runs_hypha_with_the_plugin():
    services = compose()["services"]
    server = services["hypha-server"]
    command = server["command"]
    command = shlex.split(command) if isinstance(command, str) else command
    env = compose_env(server)
    startup = server_startup(command, env)
    assert STARTUP in (startup["startup"] or "").split()
    assert startup["host"] == "0.0.0.0"
    assert any(str(p).endswith(f":{startup['port']}") for p in server["ports"])
    context = (EXAMPLES / server["build"]["context"]).resolve()
    assert context == REPO, "the build context is the repository root"
    assert (context / server["build"]["dockerfile"]).resolve() == EXAMPLES / "Dockerfile"

    settings = Settings.from_env(env)
    assert mounted(settings.cache_dir, compose_mounts(server))
    assert mounted(settings.working_dir, compose_mounts(server))
    # The cache is on a named volume (kept across restarts), declared at the top level.
    named = {v.split(":")[0] for v in server["volumes"]}
    assert named <= set(compose()["volumes"])
    cache_volume = next(
        v for v in server["volumes"] if mounted(settings.cache_dir, [v.split(":")[1]])
    )
    assert not cache_volume.startswith((".", "/")), "the cache should be a named volume"


def test_compose_standalone_worker_connects_to_the_server():
    services = compose()["services"]
    worker = services["conda-worker"]
    command = worker["command"]
    command = shlex.split(command) if isinstance(command, str) else command
    assert command == ["python", "-m", "hypha_conda_plugin"]
    assert worker.get("profiles"), "the standalone worker is optional"
    env = compose_env(worker)
    unknown = ours(env) - read_variables()
    assert not unknown, f"variables the worker does not read: {unknown}"
    # The token comes from an env file (or the shell), never from this file.
    assert "HYPHA_TOKEN" not in env
    assert worker.get("env_file")
    settings = Settings.from_cli({}, {**env, "HYPHA_WORKSPACE": "ws", "HYPHA_TOKEN": "t"})
    server = services["hypha-server"]
    port = server_startup(server["command"], compose_env(server))["port"]
    assert settings.server_url == f"http://hypha-server:{port}"
    assert settings.visibility == env["HYPHA_VISIBILITY"]
    assert mounted(settings.cache_dir, compose_mounts(worker))
    assert mounted(settings.working_dir, compose_mounts(worker))
    assert worker["image"] == services["hypha-server"]["image"]
    for service in services.values():
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in compose()["volumes"]


def test_compose_services_run_as_uid_1000_on_a_read_only_root():
    for name, service in compose()["services"].items():
        assert str(service["user"]).split(":")[0] == "1000", name
        if service.get("read_only"):
            assert mounted(image_home(), compose_mounts(service)), f"{name}: HOME not writable"
            assert mounted("/tmp", compose_mounts(service)), f"{name}: /tmp not writable"


# ------------------------------------------------------------------ Kubernetes manifests


@cache
def k8s_docs() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in load_all(path)]


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}"
    return found[0]


def pod_checks(deployment: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Checks every pod here passes; returns the pod spec and its one container."""
    spec = deployment["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    # Service-link variables (HYPHA_PORT=tcp://... for a Service named hypha) would be
    # read as settings by the worker or `hypha.server --from-env`.
    assert pod["enableServiceLinks"] is False
    assert pod["terminationGracePeriodSeconds"] >= 30
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "command" not in container, "keep the image's entrypoint (tini); set args"
    resources = container["resources"]
    assert resources["requests"]["memory"] and resources["limits"]["memory"]
    volumes = {v["name"] for v in pod["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= volumes
    for volume in pod["volumes"]:
        # `emptyDir:` with nothing after it is null: the API then finds no volume type.
        sources = [v for k, v in volume.items() if k != "name"]
        assert sources and all(v is not None for v in sources), f"no source: {volume}"
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    assert mounted(image_home(), mounts) and mounted("/tmp", mounts)
    return pod, container


def test_k8s_manifests_have_the_expected_objects():
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in k8s_docs())
    assert kinds == [
        ("Deployment", "hypha-conda-worker"),
        ("Deployment", "hypha-server"),
        ("PersistentVolumeClaim", "hypha-conda-cache"),
        ("Service", "hypha-server"),
    ]


@pytest.mark.parametrize("doc", k8s_docs(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_k8s_manifest_is_valid_kubernetes(doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_k8s_server_runs_the_plugin_with_its_cache_on_the_claim():
    deployment = k8s_object("Deployment", "hypha-server")
    pod, container = pod_checks(deployment)
    env = k8s_env(container, {})
    startup = server_startup(container["args"], env)
    assert STARTUP in (startup["startup"] or "").split()
    assert startup["host"] == "0.0.0.0"
    settings = Settings.from_env(env)
    claim = k8s_object("PersistentVolumeClaim", "hypha-conda-cache")
    by_volume = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claim_volumes = [
        v["name"]
        for v in pod["volumes"]
        if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]
    ]
    assert mounted(settings.cache_dir, [by_volume[v] for v in claim_volumes])
    ephemeral = [by_volume[v["name"]] for v in pod["volumes"] if "emptyDir" in v]
    assert mounted(settings.working_dir, ephemeral)
    # Probes hit Hypha's health endpoints on the container's port.
    port_names = {p["name"] for p in container["ports"]} | {
        p["containerPort"] for p in container["ports"]
    }
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"].startswith("/health/")
        assert container[probe]["httpGet"]["port"] in port_names
    service = k8s_object("Service", "hypha-server")
    assert service["spec"]["selector"].items() <= pod_labels(deployment).items()
    assert service["spec"]["ports"][0]["targetPort"] in port_names
    assert startup["port"] == str(container["ports"][0]["containerPort"])


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def test_k8s_workers_set_what_the_worker_reads():
    deployment = k8s_object("Deployment", "hypha-conda-worker")
    assert deployment["spec"]["replicas"] == 2
    _, container = pod_checks(deployment)
    assert container["args"] == ["python", "-m", "hypha_conda_plugin"]
    # No HTTP endpoint in standalone mode: no HTTP probe either.
    assert not any("httpGet" in container.get(p, {}) for p in ("livenessProbe", "readinessProbe"))
    names = {item["name"] for item in container["env"]}
    assert standalone_variables() <= names, f"missing {standalone_variables() - names}"
    assert not ours(names) - read_variables(), f"unread: {ours(names) - read_variables()}"
    token = next(item for item in container["env"] if item["name"] == "HYPHA_TOKEN")
    assert "secretKeyRef" in token["valueFrom"], "the token comes from a Secret"

    env = k8s_env(container, {"hypha-conda-worker/token": "secret-token"})
    settings = Settings.from_cli({}, env)
    assert settings.token == "secret-token"
    assert settings.service_id == "conda-worker-worker-pod-abc12", "one id per replica"
    server = k8s_object("Service", "hypha-server")
    assert settings.server_url == f"http://hypha-server:{server['spec']['ports'][0]['port']}"
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    assert mounted(settings.cache_dir, mounts) and mounted(settings.working_dir, mounts)


def test_k8s_readme_says_how_to_apply_and_scale():
    text = (K8S / "README.md").read_text()
    assert "kubectl" in text and "apply -f examples/k8s/" in text
    assert "kubectl -n hypha scale deployment/hypha-conda-worker" in text
    assert "create secret generic hypha-conda-worker" in text


# ----------------------------------------------------------------------------- Helm


@cache
def values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


@cache
def schema() -> dict[str, Any]:
    loaded = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(loaded)
    return loaded


def schema_errors(data: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema())
    return [error.message for error in validator.iter_errors(data)]


def with_values(**changes: Any) -> dict[str, Any]:
    """values.yaml with dotted-path changes; the value DELETE removes the key."""
    data = json.loads(json.dumps(values()))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = data
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return data


DELETE = object()


def templates() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(TEMPLATES.iterdir()) if p.is_file()}


def actions(text: str) -> list[str]:
    """The template actions ({{ ... }}) of a file, comments left out."""
    found = re.findall(r"\{\{-?\s*(.*?)\s*-?\}\}", text, flags=re.DOTALL)
    return [a for a in found if not a.startswith("/*")]


def values_paths_used() -> set[str]:
    used = set()
    for text in templates().values():
        used |= set(re.findall(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text))
    return {path.lstrip(".") for path in used}


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == CHART.name
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    assert chart["appVersion"] == hypha_conda_plugin.__version__
    assert chart.get("type", "application") == "application"


def test_values_yaml_matches_its_schema():
    assert schema_errors(values()) == []
    assert set(schema()["required"]) <= set(values())
    # A typical install: the values a user sets.
    assert (
        schema_errors(
            with_values(
                hypha__serverUrl="https://hypha.example.org",
                hypha__workspace="my-workspace",
                hypha__authorizedWorkspaces=["ws-a", "ws-b"],
                token__existingSecret="worker-token",
                replicaCount=6,
                cache__persistence__enabled=True,
                conda__buildTimeout=600,
                extraEnv=[{"name": "CONDA_CHANNEL_ALIAS", "value": "https://m.example.org/"}],
            )
        )
        == []
    )


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"replicaCount": -1}, "negative replicas"),
        ({"replicaCount": "2"}, "replicas as a string"),
        ({"hypha__serverUrl": DELETE}, "missing serverUrl"),
        ({"hypha__workspace": DELETE}, "missing workspace"),
        ({"hypha__serverUrl": "hypha.example.org"}, "serverUrl without a scheme"),
        ({"hypha__visibility": "private"}, "unknown visibility"),
        ({"hypha__authorizedWorkspaces": "a,b"}, "workspaces as a string, not a list"),
        ({"replicas": 3}, "misspelled top-level key"),
        ({"token__existingSecretKey": ""}, "empty secret key"),
        ({"cache__persistence__accessModes": ["ReadWriteAll"]}, "unknown access mode"),
        ({"cache__persistence__size": "lots"}, "size that is no quantity"),
        ({"workingDir__path": "/data/sessions"}, "sessions outside the /tmp emptyDir"),
        ({"conda__buildTimeout": 0}, "zero build timeout"),
        ({"extraEnv": [{"value": "x"}]}, "extraEnv item without a name"),
        ({"image__pullPolicy": "Sometimes"}, "unknown pull policy"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_schema_rejects_bad_values(changes, reason):
    assert schema_errors(with_values(**changes)), f"accepted: {reason}"


def test_every_values_path_a_template_uses_exists():
    for path in sorted(values_paths_used()):
        node: Any = values()
        for key in path.split("."):
            assert isinstance(node, dict) and key in node, f".Values.{path} is not in values.yaml"
            node = node[key]


def test_every_value_is_used_by_a_template():
    used = values_paths_used()

    def leaves(node: Any, prefix: str = "") -> list[str]:
        if isinstance(node, dict) and node:
            return [p for k, v in node.items() for p in leaves(v, f"{prefix}{k}.")]
        return [prefix.rstrip(".")]

    unused = [
        leaf
        for leaf in leaves(values())
        if not any(leaf == u or leaf.startswith(u + ".") for u in used)
    ]
    assert not unused, f"values no template reads: {unused}"


def test_every_value_is_described_in_the_schema():
    def check(node: dict[str, Any], props: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            assert key in props, f"{prefix}{key} is not in values.schema.json"
            sub = props[key]
            if isinstance(value, dict) and "properties" in sub:
                check(value, sub["properties"], f"{prefix}{key}.")

    check(values(), schema()["properties"], "")


@pytest.mark.parametrize(
    "name",
    [
        "deployment.yaml",
        "secret.yaml",
        "pvc.yaml",
        "_helpers.tpl",
        "server-deployment.yaml",
        "server-service.yaml",
        "server-pvc.yaml",
    ],
)
def test_template_blocks_balance(name):
    text = templates()[name]
    assert text.count("{{") == text.count("}}")
    depth = 0
    for action in actions(text):
        word = action.split(None, 1)[0] if action else ""
        if word in ("if", "with", "range", "define", "block"):
            depth += 1
        elif word == "end":
            depth -= 1
            assert depth >= 0, f"{name}: an end without a block"
    assert depth == 0, f"{name}: {depth} block(s) not closed"


def test_included_helpers_are_defined():
    defined = set(re.findall(r'define\s+"([^"]+)"', templates()["_helpers.tpl"]))
    for name, text in templates().items():
        for helper in re.findall(r'include\s+"([^"]+)"', text):
            assert helper in defined, f"{name} includes undefined {helper}"


def skeleton(text: str) -> Any:
    """The YAML a template has without its template actions: lines that are only actions
    dropped, inline actions replaced by a placeholder. Catches indentation mistakes in
    the fixed part of a template; it renders nothing."""
    kept = []
    for line in text.splitlines():
        if re.fullmatch(r"\s*(\{\{.*?\}\}\s*)+", line):
            continue
        kept.append(re.sub(r"\{\{.*?\}\}", "X", line))
    return yaml.safe_load("\n".join(kept))


def test_deployment_template_runs_the_standalone_worker():
    text = templates()["deployment.yaml"]
    doc = skeleton(text)
    assert doc["kind"] == "Deployment" and doc["apiVersion"] == "apps/v1"
    pod = doc["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    assert container["args"][:3] == ["python", "-m", "hypha_conda_plugin"]
    assert "command" not in container, "keep the image's entrypoint; set args"
    assert not any(p in container for p in ("livenessProbe", "readinessProbe"))
    volumes = {v["name"] for v in pod["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= volumes

    names = set(re.findall(r"- name: ([A-Z][A-Z0-9_]*)", text))
    assert standalone_variables() <= names, f"missing {standalone_variables() - names}"
    assert not ours(names) - read_variables(), f"unread: {ours(names) - read_variables()}"
    # Distinct service id per replica from the pod name (downward API, defined first).
    assert names and "POD_NAME" in names
    assert text.index("name: POD_NAME") < text.index("name: HYPHA_SERVICE_ID")
    assert re.search(r"HYPHA_SERVICE_ID\s+value: \"[^\"]*-\$\(POD_NAME\)\"", text)
    assert "fieldPath: metadata.name" in text
    # Installing without the required values fails with a message, not a broken pod.
    assert re.search(r'required "[^"]+" \.Values\.hypha\.workspace\b', text)
    # The server URL: hypha.serverUrl, or this chart's own server in the in-server layout.
    assert re.search(r'required "[^"]+" \(include "hypha-conda-worker\.serverUrl" \.\)', text)
    assert ".Values.hypha.serverUrl" in templates()["_helpers.tpl"]
    assert "secretKeyRef" in text and 'include "hypha-conda-worker.tokenSecretName"' in text


def test_secret_and_claim_are_conditional():
    secret, pvc = templates()["secret.yaml"], templates()["pvc.yaml"]
    assert actions(secret)[0].startswith("if") and ".Values.token.value" in actions(secret)[0]
    assert skeleton(secret)["kind"] == "Secret"
    first = actions(pvc)[0]
    assert first.startswith("if") and ".Values.cache.persistence.enabled" in first
    assert skeleton(pvc)["kind"] == "PersistentVolumeClaim"
    helpers = templates()["_helpers.tpl"]
    assert "fail " in helpers, "no token at all must fail the install"


def test_helm_readme_documents_values_and_the_in_server_worker():
    text = (REPO / "helm" / "README.md").read_text()
    top = {k for k in values() if k not in ("nameOverride", "fullnameOverride")}
    missing = [k for k in top if f"`{k}" not in text]
    assert not missing, f"values not in the README table: {missing}"
    assert STARTUP in text and "HYPHA_STARTUP_FUNCTIONS" in text and "CONDA_CACHE_DIR" in text


# ------------------------------------------------------------ Helm: rendered for real
# helm-python-sdk binds Helm's own Go SDK (libhelm_c): the chart is linted, its schema
# applied and its templates rendered exactly as `helm lint` / `helm template` would,
# offline and without a helm binary or cluster.

REQUIRED = {
    "hypha": {"serverUrl": "https://hypha.example.org", "workspace": "my-workspace"},
    "token": {"existingSecret": "worker-token"},
}


@cache
def helm_chart() -> Any:
    import helm_python

    return helm_python.Chart.load(CHART)


def render(overrides: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Rendered manifests by template file name (NOTES.txt as text)."""
    rendered = helm_chart().render(overrides, name="rel", namespace="ns", is_install=True)
    out: dict[str, Any] = {}
    for path, text in rendered.items():
        name = Path(path).name
        out[name] = text if name == "NOTES.txt" else [d for d in yaml.safe_load_all(text) if d]
    return out


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(result.get(key), dict):
                result[key] = merged(result[key], value)
            else:
                result[key] = value
    return result


def test_chart_lints_without_warnings():
    import helm_python

    report = helm_python.lint(CHART, REQUIRED, strict=True, kube_version=f"v{K8S_VERSION}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hypha": {"serverUrl": ""}}, "hypha.serverUrl"),
        ({"hypha": {"workspace": ""}}, "hypha.workspace"),
        ({"token": {"existingSecret": ""}}, "token.existingSecret"),
        ({"replicaCount": -1}, "replicaCount"),
        ({"hypha": {"visibility": "private"}}, "visibility"),
    ],
    ids=["no-server-url", "no-workspace", "no-token", "negative-replicas", "bad-visibility"],
)
def test_chart_refuses_incomplete_or_bad_values(overrides, message):
    with pytest.raises(Exception, match=re.escape(message)):
        render(merged(REQUIRED, overrides))


VARIANTS = {
    "defaults": {},
    "token-value": {"token": {"existingSecret": "", "value": "tok-123"}},
    "shared-cache": {"cache": {"persistence": {"enabled": True, "storageClass": "nfs"}}},
    "existing-claim": {"cache": {"persistence": {"enabled": True, "existingClaim": "mine"}}},
    "no-size-limits": {
        "cache": {"emptyDir": {"sizeLimit": None}},
        "workingDir": {"sizeLimit": None},
    },
    "everything": {
        "replicaCount": 5,
        "verbose": True,
        "image": {"repository": "registry.example.org/hcp", "tag": "9.9.9"},
        "imagePullSecrets": [{"name": "regcred"}],
        "hypha": {"authorizedWorkspaces": ["ws-a", "ws-b"], "visibility": "public"},
        "conda": {
            "channelAlias": "https://mirror.example.org/conda/",
            "defaultChannels": ["conda-forge", "bioconda"],
            "buildTimeout": 600,
            "executeTimeout": 30,
        },
        "extraEnv": [{"name": "CONDA_KERNEL_START_TIMEOUT", "value": "300"}],
        "podAnnotations": {"a": "b"},
        "podLabels": {"team": "ml"},
        "nodeSelector": {"disk": "large"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"app": "x"}},
                        },
                    }
                ]
            }
        },
    },
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_chart_is_valid_kubernetes_and_configures_the_worker(variant):
    overrides = merged(REQUIRED, VARIANTS[variant])
    out = render(overrides)
    docs = [d for name, ds in out.items() if name != "NOTES.txt" for d in ds]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    kinds = sorted(d["kind"] for d in docs)
    persistence = merged(values(), overrides)["cache"]["persistence"]
    expected = ["Deployment"]
    if overrides["token"].get("value"):
        expected.append("Secret")
    if persistence["enabled"] and not persistence["existingClaim"]:
        expected.append("PersistentVolumeClaim")
    assert kinds == sorted(expected)

    (deployment,) = out["deployment.yaml"]
    assert deployment["spec"]["replicas"] == overrides.get("replicaCount", 2)
    pod, container = pod_checks(deployment)
    assert container["args"][:3] == ["python", "-m", "hypha_conda_plugin"]
    assert ("--verbose" in container["args"]) == bool(overrides.get("verbose"))

    secrets = {"worker-token/token": "tok-existing"}
    for secret in out.get("secret.yaml", []):
        secrets[f"{secret['metadata']['name']}/token"] = base64.b64decode(
            secret["data"]["token"]
        ).decode()
    env = k8s_env(container, secrets)
    assert not ours(env) - read_variables(), f"unread: {ours(env) - read_variables()}"
    settings = Settings.from_cli({}, env)
    assert settings.server_url == "https://hypha.example.org"
    assert settings.workspace == "my-workspace"
    assert settings.token == (overrides["token"].get("value") or "tok-existing")
    assert settings.service_id == "conda-worker-worker-pod-abc12", "one id per replica"
    assert settings.visibility == overrides["hypha"].get("visibility", "protected")
    assert settings.authorized_workspaces == tuple(
        overrides["hypha"].get("authorizedWorkspaces", ())
    )
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    cache_mount = next(p for p in mounts if mounted(settings.cache_dir, [p]))
    cache_volume = volumes[mounts[cache_mount]]
    if persistence["enabled"]:
        claim = cache_volume["persistentVolumeClaim"]["claimName"]
        assert claim == (persistence["existingClaim"] or out["pvc.yaml"][0]["metadata"]["name"])
    else:
        assert "emptyDir" in cache_volume
    work_mount = next(p for p in mounts if mounted(settings.working_dir, [p]))
    assert "emptyDir" in volumes[mounts[work_mount]], "sessions are ephemeral"

    conda = overrides.get("conda", {})
    full = Settings.from_env(env)  # the CONDA_* build settings apply to this worker too
    if conda:
        assert full.channel_alias == conda["channelAlias"]
        assert full.default_channels == tuple(conda["defaultChannels"])
        assert full.build_timeout == conda["buildTimeout"]
        assert full.default_execute_timeout == conda["executeTimeout"]
        assert env["CONDA_KERNEL_START_TIMEOUT"] == "300"
        assert pod["nodeSelector"] == overrides["nodeSelector"]
        assert pod["tolerations"] == overrides["tolerations"]
        assert pod["affinity"] == overrides["affinity"]
        assert container["image"] == "registry.example.org/hcp:9.9.9"
    else:
        assert container["image"] == f"hypha-conda-plugin:{hypha_conda_plugin.__version__}"
    assert "rel" in out["NOTES.txt"] and "https://hypha.example.org" in out["NOTES.txt"]


# ------------------------------------------------------- Helm: the in-server layout
# The values block of Hypha's conda-worker documentation, as users copy it.

SPEC_VALUES_BLOCK = """
# Configure built-in conda worker
condaWorker:
  enabled: true
  workingDir: "/tmp/conda-sessions"  # Temporary storage for session data
  cacheDir: "/data/conda-cache"       # Persistent storage for environment cache (optional)
  authorizedWorkspaces: ""             # Empty means all workspaces

# Add conda worker to startup functions
env:
  - name: HYPHA_STARTUP_FUNCTIONS
    value: "hypha.workers.conda:hypha_startup"

# Optional: Enable persistent storage only if you want to cache conda environments
# This can significantly speed up environment creation
persistence:
  enabled: true
  size: 10Gi
  accessModes:
    - ReadWriteMany
"""


def spec_values(keep_env: bool = False) -> dict[str, Any]:
    block = yaml.safe_load(SPEC_VALUES_BLOCK)
    if not keep_env:
        del block["env"]
    return block


IN_SERVER_VARIANTS = {
    "documented-block": spec_values(),
    "no-persistence": merged(spec_values(), {"persistence": {"enabled": False}}),
    "listed-and-configured": merged(
        spec_values(),
        {
            "condaWorker": {
                "authorizedWorkspaces": ["lab-a", "lab-b"],
                "workingDir": "/scratch/sessions",
            },
            "persistence": {"accessModes": ["ReadWriteOnce"], "storageClass": "fast"},
            "conda": {"channelAlias": "https://mirror.example.org/conda/", "buildTimeout": 600},
            "env": [{"name": "CONDA_KERNEL_START_TIMEOUT", "value": "300"}],
            "server": {"port": 9520, "extraArgs": ["--public-base-url=https://h.example.org"]},
        },
    ),
    "with-standalone-workers": merged(
        spec_values(),
        {"hypha": {"workspace": "my-workspace"}, "token": {"existingSecret": "worker-token"}},
    ),
}


@pytest.mark.parametrize("variant", IN_SERVER_VARIANTS)
def test_in_server_layout_is_valid_kubernetes_and_configures_the_worker(variant):
    overrides = IN_SERVER_VARIANTS[variant]
    full = merged(values(), overrides)
    assert schema_errors(full) == []
    out = render(overrides)
    docs = [d for name, ds in out.items() if name != "NOTES.txt" for d in ds]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    workers = bool(full["hypha"]["workspace"])
    expected = ["Deployment", "Service"]
    expected += ["PersistentVolumeClaim"] if full["persistence"]["enabled"] else []
    expected += ["Deployment"] if workers else []
    assert sorted(d["kind"] for d in docs) == sorted(expected)

    (server,) = out["server-deployment.yaml"]
    pod, container = pod_checks(server)
    env = k8s_env(container, {})
    startup = server_startup(container["args"], env)
    assert startup["startup"] == STARTUP and startup["host"] == "0.0.0.0"
    port = full["server"]["port"]
    assert startup["port"] == str(port) == str(container["ports"][0]["containerPort"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"].startswith("/health/")

    # The worker inside the server reads exactly what the values say.
    settings = Settings.from_env(env)
    conda_worker = full["condaWorker"]
    assert settings.working_dir == Path(conda_worker["workingDir"]).resolve()
    assert settings.cache_dir == Path(conda_worker["cacheDir"]).resolve()
    listed = conda_worker["authorizedWorkspaces"]
    listed = listed if isinstance(listed, list) else [w for w in listed.split(",") if w]
    assert settings.authorized_workspaces == tuple(listed)
    if "conda" in overrides:
        assert settings.channel_alias == overrides["conda"]["channelAlias"]
        assert settings.build_timeout == overrides["conda"]["buildTimeout"]
        assert env["CONDA_KERNEL_START_TIMEOUT"] == "300"
        assert follows(container["args"], "--public-base-url", "https://h.example.org")

    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    cache_volume = volumes[mounts[next(p for p in mounts if mounted(settings.cache_dir, [p]))]]
    if full["persistence"]["enabled"]:
        (claim,) = out["server-pvc.yaml"]
        assert cache_volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert claim["spec"]["accessModes"] == full["persistence"]["accessModes"]
        assert claim["spec"]["resources"]["requests"]["storage"] == full["persistence"]["size"]
    else:
        assert "emptyDir" in cache_volume
    ephemeral = [p for p, name in mounts.items() if "emptyDir" in volumes[name]]
    work_mount = max((p for p in ephemeral if mounted(settings.working_dir, [p])), key=len)
    assert not mounted(settings.working_dir, [p for p in mounts if p not in ephemeral])
    assert work_mount

    (service,) = out["server-service.yaml"]
    assert service["spec"]["selector"].items() <= pod_labels(server).items()
    assert service["spec"]["ports"][0]["port"] == port
    if workers:
        (deployment,) = out["deployment.yaml"]
        # The two Deployments' selectors never claim each other's pods.
        assert (
            not deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels(server).items()
        )
        assert (
            not server["spec"]["selector"]["matchLabels"].items() <= pod_labels(deployment).items()
        )
        _, worker = pod_checks(deployment)
        worker_settings = Settings.from_cli({}, k8s_env(worker, {"worker-token/token": "t"}))
        assert worker_settings.server_url == f"http://{service['metadata']['name']}:{port}"
    else:
        assert not out.get("deployment.yaml") and not out.get("secret.yaml")
    assert "public/conda-worker" in out["NOTES.txt"]


def test_the_documented_block_as_copied_is_refused_with_what_to_change():
    # Its env entry starts Hypha's *built-in* worker; the chart wires ours itself.
    with pytest.raises(Exception, match="Remove HYPHA_STARTUP_FUNCTIONS from env"):
        render(spec_values(keep_env=True))


def test_in_server_layout_lints_without_warnings():
    import helm_python

    report = helm_python.lint(CHART, spec_values(), strict=True, kube_version=f"v{K8S_VERSION}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"condaWorker__workingDir": "sessions"}, "relative working dir"),
        ({"condaWorker__workingDir": "/tmp"}, "working dir that is the whole /tmp mount"),
        ({"condaWorker__cacheDir": "/home/hypha"}, "cache on HOME's mount"),
        ({"condaWorker__authorizedWorkspaces": "a b"}, "workspaces separated by a space"),
        ({"condaWorker__enable": True}, "misspelled condaWorker key"),
        ({"persistence__accessModes": ["ReadWriteAll"]}, "unknown access mode"),
        ({"persistence__size": "big"}, "size that is no quantity"),
        ({"server__port": 0}, "port 0"),
        ({"server__extraArgs": ["public-base-url"]}, "argument without --"),
        ({"env": [{"value": "x"}]}, "env item without a name"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_schema_rejects_bad_in_server_values(changes, reason):
    assert schema_errors(with_values(**changes)), f"accepted: {reason}"
