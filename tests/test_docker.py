"""The GPU image and cluster definitions, checked as far as a machine without a Docker daemon allows.

- docker/Dockerfile installs exactly pyproject.toml's dependencies (faiss-gpu for faiss-cpu),
  pins Ray to a version pyproject accepts, and copies only paths that exist and that
  .dockerignore does not drop;
- every entry point, job script and config that the Dockerfile, the cluster files and
  docker/README.md name exists, and every config they name loads with its overrides;
- docker/cluster.yaml passes Ray's own cluster-launcher validation (the code path of `ray up`);
- docker/rayjob.yaml is a well-formed KubeRay RayJob using the same image and Ray version.
"""

from __future__ import annotations

import copy
import fnmatch
import ipaddress
import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from rayhybrid.config import ConfigError, load_config

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _req_key(req: Requirement) -> tuple:
    return (
        canonicalize_name(req.name),
        tuple(sorted(req.extras)),
        str(req.specifier),
        str(req.marker or ""),
    )


def _requirements_file(path: Path) -> list[Requirement]:
    lines = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    return [Requirement(ln) for ln in lines if ln]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions((DOCKER / "Dockerfile").read_text())


def _arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    out = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            out[k.strip()] = v.strip().strip('"')
    return out


def test_dockerfile_syntax(instructions):
    known = {
        "FROM",
        "ARG",
        "ENV",
        "WORKDIR",
        "COPY",
        "RUN",
        "LABEL",
        "USER",
        "EXPOSE",
        "ENTRYPOINT",
        "CMD",
        "VOLUME",
        "SHELL",
        "HEALTHCHECK",
        "ADD",
        "STOPSIGNAL",
    }
    words = [w for w, _ in instructions]
    assert set(words) <= known, f"unknown Dockerfile instructions: {set(words) - known}"
    first_non_arg = next(w for w in words if w != "ARG")
    assert first_non_arg == "FROM", "only ARG may come before FROM"
    # ARGs used after FROM must be declared again after it.
    after_from = words.index("FROM")
    redeclared = {rest.split("=")[0].strip() for w, rest in instructions[after_from:] if w == "ARG"}
    used_after = set(
        re.findall(
            r"\$\{?([A-Z_]+)\}?",
            " ".join(rest for w, rest in instructions[after_from + 1 :] if w == "RUN"),
        )
    )
    env_names = {
        m for w, rest in instructions if w == "ENV" for m in re.findall(r"([A-Z_]+)=", rest)
    }
    missing = used_after - redeclared - env_names - {"PATH", "HOME"}
    assert not missing, f"RUN uses {missing}, not declared as ARG/ENV after FROM"


def test_base_image_is_ray_gpu_with_a_version_pyproject_accepts(instructions):
    import ray

    args = _arg_defaults(instructions)
    base = next(rest for w, rest in instructions if w == "FROM")
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.fullmatch(r"rayproject/ray:\d+\.\d+\.\d+-py3\d+-(gpu|cu\d+)", image), image
    ray_req = next(
        Requirement(d)
        for d in _pyproject()["project"]["dependencies"]
        if canonicalize_name(Requirement(d).name) == "ray"
    )
    assert ray_req.specifier.contains(args["RAY_VERSION"]), (args["RAY_VERSION"], ray_req)
    # The image's Ray is the one developed and tested against here: clients must match nodes.
    assert args["RAY_VERSION"] == ray.__version__
    py = re.fullmatch(r"py3(\d+)", args["PYTHON_TAG"])
    assert py and SpecifierSet(_pyproject()["project"]["requires-python"]).contains(
        f"3.{py.group(1)}"
    )


def test_requirements_match_pyproject_with_faiss_gpu():
    project = _pyproject()["project"]
    wanted = [Requirement(d) for d in project["dependencies"]]
    gpu_extra = [Requirement(d) for d in project["optional-dependencies"]["gpu"]]
    assert any(canonicalize_name(r.name) == "faiss-cpu" for r in wanted)
    expected = {_req_key(r) for r in wanted if canonicalize_name(r.name) != "faiss-cpu"}
    expected |= {_req_key(r) for r in gpu_extra}
    got = _requirements_file(DOCKER / "requirements-gpu.txt")
    got_keys = [_req_key(r) for r in got]
    assert len(got_keys) == len(set(got_keys)), "duplicate requirement"
    assert set(got_keys) == expected, (
        f"docker/requirements-gpu.txt drifted from pyproject.toml: missing "
        f"{sorted(expected - set(got_keys))}, extra {sorted(set(got_keys) - expected)}"
    )


def test_dockerfile_installs_requirements_then_project_without_deps(instructions):
    runs = [rest for w, rest in instructions if w == "RUN"]
    joined = " ".join(runs)
    assert "faiss-cpu" not in joined
    assert "-r docker/requirements-gpu.txt" in joined
    assert re.search(r"-c /tmp/constraints.txt", joined) and "ray==${RAY_VERSION}" in joined
    assert re.search(r"pip install [^&]*--no-deps \.", joined), "project installed without deps"
    # Every file a RUN reads must have been copied in before it.
    copied: list[str] = []
    for word, rest in instructions:
        if word == "COPY":
            copied += [p for p in shlex.split(rest)[:-1] if not p.startswith("--")]
        if word == "RUN" and "docker/requirements-gpu.txt" in rest:
            assert "docker/requirements-gpu.txt" in copied
        if word == "RUN" and "--no-deps ." in rest:
            assert {"pyproject.toml", "rayhybrid"} <= set(copied)


def _dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for this file: a path is excluded if it or a parent matches."""
    parts = rel.split("/")
    excluded = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatch(prefix, pat) or (
                pat.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pat[3:])
            ):
                excluded = not neg
    return excluded


def test_copied_paths_exist_and_are_not_dockerignored(instructions):
    patterns = [
        ln.strip()
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    for must in (".venv", "runs", "mlruns", "mlflow.db", "data", ".git", "outputs"):
        assert _dockerignored(must, patterns), f".dockerignore should exclude {must}"
    assert _dockerignored("rayhybrid/__pycache__/x.pyc", patterns)
    sources = [
        p
        for w, rest in instructions
        if w == "COPY"
        for p in shlex.split(rest)[:-1]
        if not p.startswith("--")
    ]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
        assert not _dockerignored(src, patterns), (
            f"Dockerfile copies {src} but .dockerignore drops it"
        )


def test_console_script_named_by_the_image_exists(instructions):
    runs = " ".join(rest for w, rest in instructions if w == "RUN")
    scripts = _pyproject()["project"]["scripts"]
    assert "rayhybrid --help" in runs and "rayhybrid" in scripts
    module, func = scripts["rayhybrid"].split(":")
    mod = __import__(module, fromlist=[func])
    assert callable(getattr(mod, func))


def _commands_in(text: str) -> list[list[str]]:
    """`python .../jobs/x.py ...` and `rayhybrid ...` command lines found in ``text``."""
    text = re.sub(r"\\\n#?\s*", " ", text)  # continuation lines, also inside YAML comments
    cmds = []
    for m in re.finditer(r"(python (?:\S*/)?(?:jobs|tune)/\w+\.py[^\n`\"|;&]*)", text):
        cmds.append(shlex.split(m.group(1)))
    return cmds


def _repo_path(p: str) -> Path:
    return REPO / re.sub(r"^/home/ray/rayhybrid/", "", p)


# Scripts with a default --config (rayhybrid.cli.COMMANDS[...].default_config).
DEFAULT_CONFIGS = {
    "quickstart.py": REPO / "configs" / "quickstart.yaml",
    "evaluate.py": REPO / "configs" / "evaluate_xquad_r.yaml",
}
CLUSTER_FILES = ["cluster.yaml", "rayjob.yaml", "README.md", "Dockerfile"]


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_job_commands_name_existing_scripts_and_valid_configs(name):
    path = DOCKER / name
    text = path.read_text()
    if name == "rayjob.yaml":
        text = yaml.safe_load(text)["spec"]["entrypoint"]
    for ref in re.findall(r"--runtime-env[ =]([^\s\"']+)", text):
        assert _repo_path(ref).is_file(), f"{name}: runtime env {ref} does not exist"
    cmds = _commands_in(text)
    if name in ("rayjob.yaml", "README.md"):
        assert cmds, f"{name} names no job command"
    for argv in cmds:
        script = _repo_path(argv[1])
        assert script.is_file(), f"{name}: {argv[1]} does not exist"
        rest = argv[2:]
        config = DEFAULT_CONFIGS.get(Path(argv[1]).name)
        if "--config" in rest:
            i = rest.index("--config")
            config = _repo_path(rest[i + 1])
            rest = rest[:i] + rest[i + 2 :]
            assert config.is_file(), f"{name}: config {config} does not exist"
        overrides = [a for a in rest if "=" in a and not a.startswith("-")]
        try:
            load_config(config, overrides)
        except ConfigError as exc:  # pragma: no cover - the message is the failure
            pytest.fail(f"{name}: `{' '.join(argv)}` does not load: {exc}")


def test_cluster_yaml_passes_ray_up_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((DOCKER / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    assert raw["docker"]["image"].endswith("rayhybrid:gpu")
    opts = " ".join(raw["docker"]["run_options"])
    assert "MLFLOW_TRACKING_URI=" in opts and "/mnt/shared" in opts and "HF_HOME=" in opts
    # The validation can fail: a misspelt docker key is rejected.
    broken = copy.deepcopy(raw)
    broken["docker"]["run_option"] = broken["docker"].pop("run_options")
    with pytest.raises(Exception, match="run_option"):
        validate_config(prepare_config(broken))


def test_rayjob_manifest_is_consistent_with_the_image(instructions):
    job = yaml.safe_load((DOCKER / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    yaml.safe_load(spec["runtimeEnvYAML"])
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _arg_defaults(instructions)["RAY_VERSION"]
    pods = [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["workerGroupSpecs"]
    ]
    images = {c["image"] for pod in pods for c in pod["spec"]["containers"]}
    assert len(images) == 1 and images.pop().endswith("rayhybrid:gpu")
    workers = cluster["workerGroupSpecs"]
    gpus = sum(
        int(g["replicas"])
        * int(
            g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)
        )
        for g in workers
    )
    num_workers = int(re.search(r"train.num_workers=(\d+)", spec["entrypoint"]).group(1))
    assert num_workers <= gpus, "more Ray Train GPU workers than GPUs in the cluster"
    for pod in pods:
        container = pod["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert {"HF_HOME", "RAYHYBRID_DATA", "MLFLOW_TRACKING_URI"} <= set(env)
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/mnt/shared" in mounts
        assert {v["name"] for v in pod["spec"]["volumes"]} >= {
            m["name"] for m in container["volumeMounts"]
        }
    assert "/mnt/shared" in spec["entrypoint"], "checkpoints must go to shared storage"


def test_runtime_env_excludes_local_state():
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert set(env) <= {"excludes", "env_vars", "pip", "py_modules", "working_dir", "conda"}
    for must in (".venv*", "runs", "mlruns", "mlflow.db", "data", ".git"):
        assert must in env["excludes"]


# --------------------------------------------------------------------------- nobody gets in


def _strings(node) -> list[str]:
    """Every string in a parsed YAML document (keys and values)."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in _strings(k) + _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def _bind_problem(host: str, env_refs: dict[str, str] | None = None) -> str | None:
    """Why ``host`` (a --dashboard-host / --host value) is not a private bind, or None.

    ``$(VAR)`` is a Kubernetes env reference; it is private when VAR is the pod's own IP.
    """
    m = re.fullmatch(r"\$\((\w+)\)", host)
    if m:
        ref = (env_refs or {}).get(m.group(1))
        return None if ref == "status.podIP" else f"{host} is not the pod IP (got {ref})"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"{host} is not an address"
    if ip.is_unspecified:
        return f"{host} listens on every interface"
    if not (ip.is_loopback or ip.is_private):
        return f"{host} is a public address"
    return None


def _ray_start_flags(command: str) -> dict[str, str]:
    args = shlex.split(command.split(";")[-1])
    assert args[:2] == ["ray", "start"], command
    out = {}
    for a in args[2:]:
        if a.startswith("--"):
            key, _, value = a[2:].partition("=")
            out[key] = value
    return out


def test_bind_check_can_fail():
    assert _bind_problem("127.0.0.1") is None and _bind_problem("10.0.0.5") is None
    assert "every interface" in _bind_problem("0.0.0.0")
    assert "every interface" in _bind_problem("::")
    assert "public" in _bind_problem("8.8.8.8")
    assert _bind_problem("$(MY_POD_IP)", {"MY_POD_IP": "status.podIP"}) is None
    assert _bind_problem("$(MY_POD_IP)", {}) is not None


def test_cluster_yaml_turns_on_token_auth_and_binds_the_dashboard_privately():
    raw = yaml.safe_load((DOCKER / "cluster.yaml").read_text())
    opts = [o.split(None, 1) for o in raw["docker"]["run_options"] if o.startswith("-e ")]
    env = dict(o[1].split("=", 1) for o in opts)
    assert env.get("RAY_AUTH_MODE") == "token"
    # The token is a file copied from the launching machine, never a value in this file.
    assert "RAY_AUTH_TOKEN" not in env
    assert env["RAY_AUTH_TOKEN_PATH"] in raw["file_mounts"]
    assert raw["file_mounts"][env["RAY_AUTH_TOKEN_PATH"]] == "~/.ray/auth_token"
    heads = [c for c in raw["head_start_ray_commands"] if "ray start" in c]
    assert heads
    for cmd in heads:
        host = _ray_start_flags(cmd).get("dashboard-host")
        assert host is not None, f"head starts without --dashboard-host: {cmd}"
        assert _bind_problem(host) is None, _bind_problem(host)
    assert not [s for s in _strings(raw) if "0.0.0.0" in s]


def test_rayjob_turns_on_token_auth_and_binds_the_dashboard_privately():
    job = yaml.safe_load((DOCKER / "rayjob.yaml").read_text())
    cluster = job["spec"]["rayClusterSpec"]
    auth = cluster["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]
    head = cluster["headGroupSpec"]
    container = head["template"]["spec"]["containers"][0]
    refs = {
        e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        for e in container["env"]
    }
    host = head["rayStartParams"]["dashboard-host"]
    assert _bind_problem(host, refs) is None, _bind_problem(host, refs)
    # KubeRay's default probes ask localhost:8265; ours must ask where the dashboard listens.
    var = re.fullmatch(r"\$\((\w+)\)", host).group(1)
    for probe in ("readinessProbe", "livenessProbe"):
        script = " ".join(container[probe]["exec"]["command"])
        assert f"${var}:8265" in script and "localhost:8265" not in script, script
    assert not [s for s in _strings(job) if "0.0.0.0" in s]
    # The jobs log to the protected MLflow server with credentials from a Secret.
    for pod in [head["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert "secretKeyRef" in env[key]["valueFrom"], key


def test_docker_readme_documents_the_protected_servers():
    text = (DOCKER / "README.md").read_text()
    flat = re.sub(r"\\\n\s*", " ", text)
    servers = re.findall(r"mlflow server [^\n`]*", flat)
    assert servers, "docker/README.md starts no mlflow server"
    for cmd in servers:
        argv = shlex.split(cmd)
        assert "--app-name" in argv and argv[argv.index("--app-name") + 1] == "basic-auth", cmd
        assert "--allowed-hosts" in argv, cmd
        assert _bind_problem(argv[argv.index("--host") + 1]) is None, cmd
    assert "RAY_AUTH_MODE=token" in text and "ray get-auth-token" in text
    assert "MLFLOW_TRACKING_USERNAME" in text and "MLFLOW_TRACKING_PASSWORD" in text
