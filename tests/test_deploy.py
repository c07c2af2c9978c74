"""Deployment artefacts: Kustomize renders and validates, the manifests agree with the
server's settings and with each other, alerts pass promtool's unit tests, every metric the
dashboard, alerts and autoscaler use exists on a live server, and the image lints."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from common import Models, face_image, make_store
from facemux.client import FacemuxClient
from facemux.service.auth import insecure_tokens_problem
from facemux.service.metrics import GPU_METRICS, GpuCollector, Metrics
from facemux.service.server import LIVENESS_SERVICE, ServerThread
from facemux.service.settings import ENV_PREFIX, Settings
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_metrics import FakeNvml, scrape

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OVERLAYS = ("gpu", "cpu")
KUSTOMIZATIONS = {
    "gpu": DEPLOY / "k8s" / "overlays" / "gpu",
    "cpu": DEPLOY / "k8s" / "overlays" / "cpu",
    "training": DEPLOY / "k8s" / "training",
}
# The oldest Kubernetes the manifests claim (native gRPC probes GA, Job pod labels), and
# the validator's newest schema.
K8S_VERSIONS = ("1.27.0", None)
ALERTS = {
    "FacemuxHighErrorRate",
    "FacemuxHighLatency",
    "FacemuxGPUMemoryNearlyFull",
    "FacemuxNoReadyReplicas",
    "FacemuxQueueBacklog",
}
SETTING_ENV = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}


def tool(name: str) -> str:
    """A command-line tool on PATH or in this virtual environment, else skip."""
    found = shutil.which(name)
    local = Path(sys.executable).parent / name
    if found is None and local.exists():
        found = str(local)
    if found is None:
        pytest.skip(f"{name} is not installed here (.ci/run installs it)")
    return found


@functools.cache
def _render(path: Path) -> str:
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def rendered(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(_render(KUSTOMIZATIONS[name])) if d]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in docs
        if d["kind"] == kind and (name is None or d["metadata"]["name"].startswith(name))
    ]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def container(docs: list[dict[str, Any]], kind: str = "Deployment") -> dict[str, Any]:
    spec = one(docs, kind)["spec"]["template"]["spec"]
    assert len(spec["containers"]) == 1
    return dict(spec["containers"][0])


def settings_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    return dict(one(docs, "ConfigMap", "facemux-settings")["data"])


# -- Kustomize and schema validation -------------------------------------------------------


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_kustomizations_render(name: str) -> None:
    kinds = {d["kind"] for d in rendered(name)}
    if name == "training":
        assert {"Job", "Service", "NetworkPolicy"} <= kinds
    else:
        assert {
            "Namespace",
            "ConfigMap",
            "PersistentVolumeClaim",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "NetworkPolicy",
            "ScaledObject",
            "ServiceMonitor",
            "PrometheusRule",
        } <= kinds
        assert "HorizontalPodAutoscaler" not in kinds  # KEDA makes its own
    for d in rendered(name):
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "facemux", d["metadata"]["name"]


def _validate(path: Path, version: str | None) -> subprocess.CompletedProcess[str]:
    cmd = [tool("kubernetes-validate"), "--strict", "--quiet"]
    if version:
        cmd += ["-k", version]
    return subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_rendered_objects_pass_strict_schema_validation(name: str, tmp_path: Path) -> None:
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(_render(KUSTOMIZATIONS[name]))
    for version in K8S_VERSIONS:
        out = _validate(manifest, version)
        report = out.stdout + out.stderr
        assert out.returncode == 0 and "ERROR" not in report, report
        # Only the CRDs (no schema in the validator) may warn.
        for line in report.splitlines():
            if line.startswith("WARN"):
                assert re.search(r"kind (ScaledObject|ServiceMonitor|PrometheusRule)\b", line), line


def test_validator_is_strict(tmp_path: Path) -> None:
    # A control: the same validator rejects a misspelt field, so passing above means something.
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\n"
        "spec: {ports: [{port: 1, targetPrt: 1}]}\n"
    )
    assert _validate(bad, None).returncode != 0


# -- the manifests agree with the server and with each other --------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_configmap_is_what_the_server_reads(overlay: str) -> None:
    env = settings_env(rendered(overlay))
    assert set(env) <= SETTING_ENV, set(env) - SETTING_ENV
    settings = Settings.load(environ=env)  # raises on a bad value
    assert settings.device == ("cuda" if overlay == "gpu" else "cpu")
    assert settings.host == "0.0.0.0" and settings.metrics_port > 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment(overlay: str) -> None:
    docs = rendered(overlay)
    deploy = one(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    c = container(docs)
    settings = Settings.load(environ=settings_env(docs))
    assert "replicas" not in deploy["spec"]  # the autoscaler owns it

    cm_name = one(docs, "ConfigMap", "facemux-settings")["metadata"]["name"]
    assert c["envFrom"] == [{"configMapRef": {"name": cm_name}}]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {
        "grpc": settings.port,
        "metrics": settings.metrics_port,
        "health": settings.health_port,
    }

    # Tokens never cross the network in clear text: TLS from a Secret, mounted where the
    # settings point (the server would refuse to start otherwise).
    assert settings.auth == "tokens" and not settings.allow_insecure_tokens
    assert insecure_tokens_problem(settings.auth, settings.host, settings.tls_cert) == ""
    tls_dir = str(Path(settings.tls_cert).parent)
    assert str(Path(settings.tls_key).parent) == tls_dir
    tls_volume = {v["name"]: v for v in pod["volumes"]}[
        {m["mountPath"]: m["name"] for m in c["volumeMounts"]}[tls_dir]
    ]
    assert tls_volume["secret"]["secretName"] == "facemux-tls"

    # Native gRPC probes against grpc.health.v1, on the plain-text health-only port (kubelet's
    # gRPC probes cannot speak TLS): readiness on the whole server, liveness and startup on
    # the always-SERVING liveness name.
    assert settings.health_port > 0 and ports["health"] == settings.health_port
    assert c["readinessProbe"]["grpc"] == {"port": settings.health_port}
    for probe in ("livenessProbe", "startupProbe"):
        assert c[probe]["grpc"] == {"port": settings.health_port, "service": LIVENESS_SERVICE}

    # Drain fits: preStop sleep + the server's grace < terminationGracePeriodSeconds.
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = float(pre_stop[1]) + settings.grace_seconds
    assert pod["terminationGracePeriodSeconds"] >= needed + 10

    # Non-root, read-only root, writable volumes where the server writes.
    sec, csec = pod["securityContext"], c["securityContext"]
    assert sec["runAsNonRoot"] is True and sec["runAsUser"] > 0
    assert sec["seccompProfile"]["type"] == "RuntimeDefault"
    assert csec["readOnlyRootFilesystem"] is True
    assert csec["allowPrivilegeEscalation"] is False
    assert csec["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts[str(settings.store)] == "store" and "/tmp" in mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    pvc = one(docs, "PersistentVolumeClaim")
    assert volumes["store"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]

    limits = c["resources"]["limits"]
    if overlay == "gpu":
        assert limits["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"
        ]
    else:
        assert "nvidia.com/gpu" not in _render(KUSTOMIZATIONS[overlay])
        assert int(limits["cpu"]) == settings.torch_threads


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_and_ports_line_up(overlay: str) -> None:
    docs = rendered(overlay)
    deploy = one(docs, "Deployment")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str]) -> bool:
        return selector.items() <= pod_labels.items()

    assert selects(deploy["spec"]["selector"]["matchLabels"])
    svc = one(docs, "Service")
    assert selects(svc["spec"]["selector"])
    assert {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]} == {
        "grpc": "grpc",
        "metrics": "metrics",
    }
    assert selects(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    assert selects(one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"])
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    policy_ports = [
        p["port"] for rule in one(docs, "NetworkPolicy")["spec"]["ingress"] for p in rule["ports"]
    ]
    assert sorted(policy_ports) == ["grpc", "metrics"]
    scaled = one(docs, "ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == deploy["metadata"]["name"]
    assert scaled["minReplicaCount"] >= 2  # with the PDB's maxUnavailable 1, one stays up
    dashboard = one(docs, "ConfigMap", "facemux-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["facemux-dashboard.json"])["uid"] == "facemux-overview"


def test_training_job() -> None:
    docs = rendered("training")
    job = one(docs, "Job")
    spec = job["spec"]
    pod = spec["template"]["spec"]
    c = container(docs, "Job")
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert c["command"] == ["torchrun"]
    args = c["args"]
    assert args[args.index("-m") + 1] == "facemux.service.training.standalone"
    nnodes = int(env["NNODES"])
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == nnodes
    assert int(env["GPUS_PER_NODE"]) == c["resources"]["limits"]["nvidia.com/gpu"]
    assert "--node-rank=$(NODE_RANK)" in args
    headless = one(docs, "Service")
    assert headless["spec"]["clusterIP"] == "None"
    assert pod["subdomain"] == headless["metadata"]["name"]
    assert headless["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    master = next(a for a in args if a.startswith("--master-addr="))
    assert master == f"--master-addr={job['metadata']['name']}-0.{headless['metadata']['name']}"
    # The same store as the servers.
    server_pvc = one(rendered("gpu"), "PersistentVolumeClaim")["metadata"]["name"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["store"]["persistentVolumeClaim"]["claimName"] == server_pvc
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


# -- alerts ---------------------------------------------------------------------------------


def _prometheus_rule() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "k8s" / "base" / "prometheusrule.yaml").read_text())


def test_alert_rules_pass_promtool_check_and_unit_tests(tmp_path: Path) -> None:
    promtool = tool("promtool")
    rule = _prometheus_rule()
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == ALERTS
    rules_file = tmp_path / "facemux-rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    shutil.copy(DEPLOY / "prometheus" / "facemux-rules.test.yaml", tmp_path)
    check = subprocess.run(
        [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [promtool, "test", "rules", "facemux-rules.test.yaml"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
    tested = set(
        re.findall(
            r"alertname:\s*(\w+)", (DEPLOY / "prometheus" / "facemux-rules.test.yaml").read_text()
        )
    )
    assert tested == ALERTS  # every alert has a unit test


# -- every metric used anywhere exists ------------------------------------------------------

_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {
    *("and", "or", "unless", "bool", "offset", "inf", "nan"),
    *("by", "without", "on", "ignoring", "group_left", "group_right"),
}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names (in matchers or grouping clauses) or Grafana variables."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = _GROUPING.sub(" ", e)
    names = set()
    for m in re.finditer(r"(?<![\w$.])[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        if e[m.end() :].lstrip().startswith("(") or m.group(0).lower() in _KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def dashboard() -> dict[str, Any]:
    return dict(json.loads((DEPLOY / "grafana" / "facemux-dashboard.json").read_text()))


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def alert_exprs() -> list[str]:
    return [r["expr"] for g in _prometheus_rule()["spec"]["groups"] for r in g["rules"]]


def keda_queries() -> list[str]:
    so = yaml.safe_load((DEPLOY / "k8s" / "base" / "scaledobject.yaml").read_text())
    return [t["metadata"]["query"] for t in so["spec"]["triggers"]]


def test_metric_name_extraction() -> None:
    got = metric_names(
        'histogram_quantile(0.99, sum by (grpc_method, le) (rate(a_bucket{job="x", '
        'le=~"1|2"}[$__rate_interval]))) / on (pod) group_left b_total > 0.5 or absent(c)'
    )
    assert got == {"a_bucket", "b_total", "c"}


@pytest.fixture(scope="module")
def live_metric_names(
    tmp_path_factory: pytest.TempPathFactory, models: Models
) -> Iterator[set[str]]:
    """Sample names scraped from a real server after a few swaps of each kind."""
    root = tmp_path_factory.mktemp("live") / "store"
    make_store(root, models, ("alice",))
    settings = Settings(port=0, auth="off", metrics_port=0, store=root, max_batch_wait_ms=0)
    with ServerThread(settings) as srv, FacemuxClient(srv.target, timeout=30, retries=1) as c:
        c.wait_ready(30)
        c.swap_faces([face_image(0), face_image(1)], "alice")
        list(c.swap_stream([face_image(2)], "alice", aligned=True))
        c.decode(c.encode([face_image(3)]), "alice")
        assert srv.app is not None and srv.app.metrics_port
        text = scrape(srv.app.metrics_port)
        gpu_here = srv.app.metrics.gpu is not None
    names = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    if not gpu_here:
        # No GPU on this host, so the GPU series are absent; take their names from the
        # collector driven by a stand-in NVML instead.
        m = Metrics()
        collector = GpuCollector.create(FakeNvml())
        assert collector is not None
        m.registry.register(collector)
        gpu_text = generate_latest(m.registry).decode()
        gpu_names = {
            s.name
            for f in text_string_to_metric_families(gpu_text)
            for s in f.samples
            if s.name.startswith("facemux_gpu_")
        }
        assert gpu_names == set(GPU_METRICS)
        names |= gpu_names
    yield names


@pytest.mark.parametrize("source", ["dashboard", "alerts", "autoscaler"])
def test_every_queried_metric_exists(source: str, live_metric_names: set[str]) -> None:
    exprs = {"dashboard": dashboard_exprs, "alerts": alert_exprs, "autoscaler": keda_queries}[
        source
    ]()
    assert exprs
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        missing = names - live_metric_names
        assert not missing, f"{sorted(missing)} in {expr}"


def test_dashboard_and_autoscaler_queries_parse(tmp_path: Path) -> None:
    # promtool has no query checker, but it parses every expression of a rules file.
    promtool = tool("promtool")
    grafana_vars = {"$__rate_interval": "1m", "$namespace": "facemux", "$pod": ".*"}
    rules = []
    for i, expr in enumerate(dashboard_exprs() + keda_queries()):
        for var, val in grafana_vars.items():
            expr = expr.replace(var, val)
        assert "$" not in expr, expr
        rules.append({"record": f"check:expr_{i}", "expr": expr})
    path = tmp_path / "exprs.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    out = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_covers_the_operations_view() -> None:
    d = dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}"
    variables = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "namespace", "pod"} <= variables
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    for needed in (
        "facemux_faces_swapped_total",
        "facemux_frames_swapped_total",
        "grpc_server_handling_seconds_bucket",
        "grpc_server_handled_total",
        "facemux_batch_size_bucket",
        "facemux_queue_depth",
        "facemux_gpu_utilization_ratio",
        "facemux_gpu_memory_used_bytes",
        "facemux_resident_decoders",
        "facemux_training_jobs",
    ):
        assert needed in used, needed
    text = json.dumps(d)
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (grpc_method, le)" in text


# -- the image ------------------------------------------------------------------------------


def test_dockerfile_lints() -> None:
    out = subprocess.run(
        [tool("hadolint"), str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path (or a parent) decides."""
    import fnmatch

    ignored = False
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        if any(fnmatch.fnmatch(p, pat) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerfile_structure() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.replace("\\\n", " ").splitlines()]
    instructions = [ln for ln in lines if ln and not ln.startswith("#")]
    base = next(ln for ln in instructions if ln.startswith("ARG BASE_IMAGE="))
    assert "nvidia/cuda:" in base and "-runtime-" in base
    froms = [ln for ln in instructions if ln.startswith("FROM ")]
    assert froms and all("${BASE_IMAGE}" in f for f in froms)
    user = [ln for ln in instructions if ln.startswith("USER ")][-1]
    uid = user.split()[1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, user
    health = next(ln for ln in instructions if ln.startswith("HEALTHCHECK "))
    assert "facemux health" in health
    assert 'pip install ".[server,gpu]"' in text
    # torchvision (nvjpeg) is the release built for the pinned torch: 2.N pairs with 0.(N+15).
    torch_minor = re.search(r'ARG TORCH_SPEC="torch==2\.(\d+)\.', text)
    vision_minor = re.search(r'ARG VISION_SPEC="torchvision==0\.(\d+)\.', text)
    assert torch_minor and vision_minor
    assert int(vision_minor.group(1)) == int(torch_minor.group(1)) + 15
    # The torch pin is the one .ci/setup installs.
    setup_pin = re.search(r"TORCH_SPEC:-(torch==[\d.]+)", (ROOT / ".ci" / "setup").read_text())
    assert setup_pin and f'ARG TORCH_SPEC="{setup_pin.group(1)}"' in text
    expose = next(ln for ln in instructions if ln.startswith("EXPOSE "))
    assert expose.split()[1:] == [str(Settings.port), str(Settings.metrics_port)]
    env_keys = set(re.findall(r"\b(FACEMUX_[A-Z_]+)=", text))
    assert env_keys and env_keys <= SETTING_ENV
    assert "ENTRYPOINT" in text and 'CMD ["serve"]' in text

    # Every folder the package is built from is copied, and not excluded by .dockerignore.
    ignore = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    # pyproject.toml without a TOML parser (tomllib is 3.11+, the project supports 3.10).
    pyproject = (ROOT / "pyproject.toml").read_text()
    block = pyproject.split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
    package_dirs = {d.split("/")[0] for d in re.findall(r'=\s*"([^"]+)"', block)}
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', pyproject, re.M)
    assert package_dirs and readme
    copied = set()
    for ln in instructions:
        if ln.startswith("COPY ") and "--from" not in ln:
            copied |= {s.rstrip("/") for s in ln.split()[1:-1]}
    assert package_dirs | {"pyproject.toml", readme.group(1)} <= copied
    for src in copied:
        assert (ROOT / src).exists(), src
        assert not _dockerignored(src, ignore), src
    for junk in (".venv", ".git", "tests", "facemux-demo/store"):
        assert _dockerignored(junk, ignore), junk


def test_healthcheck_command_probes_the_server(tmp_path: Path, models: Models) -> None:
    """The image's HEALTHCHECK runs `facemux health`: 0 when SERVING, non-zero otherwise."""
    exe = Path(sys.executable).parent / "facemux"
    make_store(tmp_path / "store", models)
    with ServerThread(Settings(port=0, auth="off", store=tmp_path / "store")) as srv:
        with FacemuxClient(srv.target) as c:
            c.wait_ready(30)
        ok = subprocess.run(
            [str(exe), "health", "--target", srv.target, "--timeout", "5"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ok.returncode == 0 and ok.stdout.strip() == "SERVING", ok.stderr
        live = subprocess.run(
            [str(exe), "health", "--target", srv.target, "--service", LIVENESS_SERVICE],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert live.returncode == 0, live.stderr
        port = srv.port
    down = subprocess.run(
        [str(exe), "health", "--target", f"127.0.0.1:{port}", "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode != 0
