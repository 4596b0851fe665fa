"""The checks behind deploy/check.sh; run by it with the Python of its tool environment.

    python check.py manifests  K8S_VERSION... (needs kubernetes-validate, PyYAML)
    python check.py compose    COMPOSE_COMMAND...
    python check.py dockerfiles
    python check.py hostagent-unit

Paths are relative to the repository root (the working directory). The dev-built binaries are
$CARGO_TARGET_DIR/debug/{switchboard,hostagent} (target/ by default). Each check prints what it
checked; the first failure exits non-zero with a message saying what is wrong and where.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path.cwd()
TARGET = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
K8S_DIR = Path("deploy/kubernetes")
DOCKER_DIR = Path("deploy/docker")
COMPOSE_FILE = Path("deploy/compose.yaml")
SECRET_EXAMPLE = "secret.example.yaml"

# Configuration keys of type `config::Secret` (server/src/config.rs, server/src/cloud/config.rs).
# `--dump-config` shows them as "[redacted]", which the checks below also rely on, so a new Secret
# field is caught even before it is added here.
SECRET_KEYS = [
    "database.url",
    "hosts.credential_secret",
    "redis.url",
    "billing.stripe_secret_key",
    "billing.webhook_secret",
    "cloud.ec2.access_key_id",
    "cloud.ec2.secret_access_key",
]

checked = 0


def ok(message: str) -> None:
    global checked
    checked += 1
    print(f"  ok    {message}", flush=True)


def note(message: str) -> None:
    print(f"  note  {message}", flush=True)


def fail(message: str) -> None:
    print(f"\033[31merror:\033[0m {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def switchboard_bin() -> Path:
    path = TARGET / "debug" / "switchboard"
    if not path.is_file():
        fail(f"{path} is missing: build it first (cargo build --locked -p switchboard-server --bin switchboard)")
    return path


def hostagent_bin() -> Path:
    path = TARGET / "debug" / "hostagent"
    if not path.is_file():
        fail(f"{path} is missing: build it first (cargo build --locked -p hostagent-client --bin hostagent)")
    return path


def dump_config(what: str, config_file: Path | None, env: dict[str, str]) -> str:
    """Runs `switchboard [--config FILE] serve --dump-config` on a scratch SQLite database.

    The configuration is deny_unknown_fields throughout, so an unknown key in the file or in a
    SWITCHBOARD__* variable, or a value of the wrong type, fails here as it would at start-up.
    Returns the dump (secrets redacted)."""
    with tempfile.TemporaryDirectory() as scratch:
        run_env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD")}
        run_env.update(env)
        run_env["SWITCHBOARD__DATABASE__URL"] = f"sqlite://{scratch}/check.db"
        run_env["RUST_BACKTRACE"] = "0"
        args = [str(switchboard_bin())]
        if config_file is not None:
            args += ["--config", str(config_file)]
        args += ["serve", "--dump-config"]
        result = subprocess.run(args, env=run_env, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            fail(f"{what}: `switchboard serve --dump-config` refused it:\n{result.stderr.strip()}")
        return result.stdout


def redacted_count(dump: str) -> int:
    return dump.count("[redacted]")


# ---------------------------------------------------------------- Kubernetes manifests


def load_yaml_documents(path: Path) -> list[dict]:
    import yaml

    try:
        with path.open() as handle:
            return [doc for doc in yaml.safe_load_all(handle) if doc is not None]
    except yaml.YAMLError as error:
        fail(f"{path}: not valid YAML: {error}")
        raise  # unreachable


def schema_validate(docs: list[tuple[str, dict]], version: str) -> None:
    import kubernetes_validate
    from kubernetes_validate import utils

    for origin, doc in docs:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            used = kubernetes_validate.validate(doc, version, strict=True)
        except utils.SchemaNotFoundError as error:
            fail(f"{origin}: {name}: {error.message}")
        except utils.ValidationError as error:
            where = ".".join(str(p) for p in error.path) or "(top level)"
            fail(f"{origin}: {name} is not a valid {doc.get('apiVersion')} {doc.get('kind')} for "
                 f"Kubernetes {error.version} (strict): at {where}: {error.message}")
        ok(f"{origin}: {name} valid for Kubernetes {used} (strict schema, offline)")


def check_manifests(versions: list[str]) -> None:
    from kubernetes_validate import utils

    versions = [utils.latest_version() if v == "latest" else v for v in versions]
    files = sorted(K8S_DIR.glob("*.yaml"))
    if not files:
        fail(f"no manifests in {K8S_DIR}")
    kustomization_path = K8S_DIR / "kustomization.yaml"
    manifests: list[tuple[str, dict]] = []
    by_file: dict[str, list[dict]] = {}
    for path in files:
        docs = load_yaml_documents(path)
        by_file[path.name] = docs
        if path == kustomization_path:
            continue
        manifests += [(str(path), doc) for doc in docs]

    for version in versions:
        schema_validate(manifests, version)

    # kustomization.yaml: lists every manifest but the example Secret, and nothing else.
    if kustomization_path.name not in by_file:
        fail(f"{kustomization_path} is missing")
    kustomization = by_file[kustomization_path.name][0]
    resources = kustomization.get("resources", [])
    for resource in resources:
        if not (K8S_DIR / resource).is_file():
            fail(f"{kustomization_path}: resource {resource} does not exist")
    expected = {p.name for p in files} - {kustomization_path.name, SECRET_EXAMPLE}
    if set(resources) != expected:
        fail(f"{kustomization_path}: resources {sorted(resources)} should be exactly {sorted(expected)} "
             f"({SECRET_EXAMPLE} must stay out: applying it would overwrite the real Secret)")
    ok(f"{kustomization_path}: lists every manifest, and not {SECRET_EXAMPLE}")

    kubectl = shutil.which("kubectl")
    if kubectl:
        result = subprocess.run([kubectl, "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            fail(f"kubectl kustomize {K8S_DIR} failed:\n{result.stderr.strip()}")
        import yaml

        rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]
        ok(f"kubectl kustomize {K8S_DIR} renders {len(rendered)} objects")
        for version in versions:
            schema_validate([("kustomize output", doc) for doc in rendered], version)
        for doc in rendered:
            namespace = doc.get("metadata", {}).get("namespace")
            if doc["kind"] != "Namespace" and namespace != kustomization.get("namespace"):
                fail(f"kustomize output: {doc['kind']}/{doc['metadata']['name']} is in namespace {namespace!r}")
        ok("kustomize output: every object in namespace " + repr(kustomization.get("namespace")))
    else:
        note("kubectl is not installed: `kubectl kustomize` not run (the resources list was checked above)")

    check_manifest_consistency(by_file)


def only(by_file: dict[str, list[dict]], kind: str, exclude: str | None = None) -> dict:
    found = [d for name, docs in by_file.items() if name != exclude for d in docs if d.get("kind") == kind]
    if len(found) != 1:
        fail(f"{K8S_DIR}: expected exactly one {kind}, found {len(found)}")
    return found[0]


def check_manifest_consistency(by_file: dict[str, list[dict]]) -> None:
    deployment = only(by_file, "Deployment")
    configmap = only(by_file, "ConfigMap")
    service_account = only(by_file, "ServiceAccount")
    secret = only(by_file, "Secret")
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    if deployment["spec"]["selector"]["matchLabels"].items() - labels.items():
        fail("deployment.yaml: the selector does not match the pod template's labels")
    containers = pod["containers"]
    if len(containers) != 1:
        fail("deployment.yaml: expected one container")
    container = containers[0]

    # Selectors of the Services, the PDB, the topology spread; the HPA's target.
    for name, docs in by_file.items():
        for doc in docs:
            kind, doc_name = doc.get("kind"), doc.get("metadata", {}).get("name")
            selector = None
            if kind == "Service":
                selector = doc["spec"]["selector"]
                port_names = {p.get("name") for p in container.get("ports", [])}
                for port in doc["spec"]["ports"]:
                    if isinstance(port.get("targetPort"), str) and port["targetPort"] not in port_names:
                        fail(f"{name}: targetPort {port['targetPort']!r} is not a port of the container")
            elif kind == "PodDisruptionBudget":
                selector = doc["spec"]["selector"]["matchLabels"]
            elif kind == "HorizontalPodAutoscaler":
                target = doc["spec"]["scaleTargetRef"]
                if (target["kind"], target["name"]) != ("Deployment", deployment["metadata"]["name"]):
                    fail(f"{name}: scaleTargetRef does not name the Deployment")
                if doc["spec"].get("minReplicas", 1) > deployment["spec"].get("replicas", 1):
                    fail(f"{name}: minReplicas is above the Deployment's replicas")
                ok(f"{name}: {kind}/{doc_name} scales Deployment/{target['name']}")
            if selector is not None:
                if selector.items() - labels.items():
                    fail(f"{name}: {kind}/{doc_name} selects {selector}, which the pods do not carry")
                ok(f"{name}: {kind}/{doc_name} selects the Deployment's pods")
    for constraint in pod.get("topologySpreadConstraints", []):
        if constraint["labelSelector"]["matchLabels"].items() - labels.items():
            fail("deployment.yaml: a topologySpreadConstraint does not select the pods")

    if pod.get("serviceAccountName") != service_account["metadata"]["name"]:
        fail("deployment.yaml: serviceAccountName is not the ServiceAccount of serviceaccount.yaml")
    if "eks.amazonaws.com/role-arn" not in service_account["metadata"].get("annotations", {}):
        fail("serviceaccount.yaml: no eks.amazonaws.com/role-arn annotation (IRSA)")
    ok("deployment.yaml: runs as the ServiceAccount with the IRSA role annotation")

    # Secrets: every secretKeyRef names a key of the example Secret; secret keys come from it only.
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    env = container.get("env", [])
    env_by_name = {e["name"]: e for e in env}
    secret_env: dict[str, str] = {}
    for entry in env:
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            continue
        if ref["name"] != secret["metadata"]["name"]:
            fail(f"deployment.yaml: {entry['name']} refers to Secret {ref['name']!r}, not {secret['metadata']['name']!r}")
        if ref["key"] not in secret_keys:
            fail(f"deployment.yaml: {entry['name']} refers to key {ref['key']!r}, which {SECRET_EXAMPLE} does not have")
        secret_env[entry["name"]] = ref["key"]
    for key in ["database.url", "hosts.credential_secret", "redis.url", "billing.stripe_secret_key",
                "billing.webhook_secret"]:
        variable = "SWITCHBOARD__" + key.upper().replace(".", "__")
        if variable not in secret_env:
            fail(f"deployment.yaml: {variable} must come from the Secret (valueFrom.secretKeyRef)")
    unused = secret_keys - set(secret_env.values())
    if unused:
        fail(f"{SECRET_EXAMPLE}: keys {sorted(unused)} are not used by deployment.yaml")
    ok(f"deployment.yaml: {', '.join(sorted(secret_env))} come from Secret {secret['metadata']['name']}")
    for value in secret.get("stringData", {}).values():
        if "REPLACE-ME" not in value:
            fail(f"{SECRET_EXAMPLE}: every value must be a marked placeholder (REPLACE-ME), not {value[:12]!r}…")
    ok(f"{SECRET_EXAMPLE}: placeholders only")

    # The ConfigMap: mounted where SWITCHBOARD_CONFIG points, no secrets, only real keys.
    config_name = configmap["metadata"]["name"]
    config_path = env_by_name.get("SWITCHBOARD_CONFIG", {}).get("value", "/etc/switchboard/switchboard.toml")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounted = False
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        if volume.get("configMap", {}).get("name") == config_name:
            file_name = os.path.relpath(config_path, mount["mountPath"])
            if file_name.startswith("..") or file_name not in configmap["data"]:
                fail(f"deployment.yaml: SWITCHBOARD_CONFIG={config_path} is not a key of ConfigMap {config_name} "
                     f"mounted at {mount['mountPath']}")
            mounted = True
    if not mounted:
        fail(f"deployment.yaml: ConfigMap {config_name} is not mounted")
    ok(f"deployment.yaml: ConfigMap {config_name} is mounted as {config_path}")
    toml_text = configmap["data"][os.path.basename(config_path)]
    try:
        config = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as error:
        fail(f"configmap.yaml: {os.path.basename(config_path)} is not valid TOML: {error}")
    for key in SECRET_KEYS:
        node = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node not in (None, ""):
            fail(f"configmap.yaml: {key} is a secret: it belongs in the Secret, not the ConfigMap")
    with tempfile.TemporaryDirectory() as scratch:
        file = Path(scratch) / "switchboard.toml"
        file.write_text(toml_text)
        dump = dump_config("configmap.yaml", file, {})
        if redacted_count(dump) != 1:  # database.url, set by dump_config itself
            fail(f"configmap.yaml: sets a secret value (redacted in --dump-config):\n{dump}")
        ok("configmap.yaml: accepted by `switchboard serve --dump-config` (only real keys), no secret in it")
        dummy = {name: f"placeholder-{key}" for name, key in secret_env.items()}
        dump = dump_config("configmap.yaml + deployment.yaml env", file, dummy)
        if redacted_count(dump) != len(secret_env):
            fail(f"deployment.yaml: expected the {len(secret_env)} Secret variables to land in secret keys:\n{dump}")
        ok("deployment.yaml: every SWITCHBOARD__* variable is a real (secret) configuration key")

    # Ports, probes, shutdown timing.
    listen_port = int(str(config.get("listen", "127.0.0.1:7400")).rsplit(":", 1)[1])
    container_ports = {p["containerPort"] for p in container.get("ports", [])}
    if listen_port not in container_ports:
        fail(f"deployment.yaml: the ConfigMap listens on {listen_port}, the container exposes {sorted(container_ports)}")
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"]:
        grpc = container.get(probe, {}).get("grpc")
        if grpc is None:
            fail(f"deployment.yaml: {probe} must be a native gRPC probe (grpc: {{port: {listen_port}}})")
        if grpc["port"] != listen_port:
            fail(f"deployment.yaml: {probe} probes port {grpc['port']}, the server listens on {listen_port}")
    ok(f"deployment.yaml: startup, readiness and liveness are gRPC health probes on port {listen_port}")
    strategy = deployment["spec"].get("strategy", {}).get("rollingUpdate", {})
    if strategy.get("maxUnavailable") != 0:
        fail("deployment.yaml: rollingUpdate.maxUnavailable must be 0")
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    command = pre_stop.get("exec", {}).get("command", [])
    if len(command) != 2 or command[0] != "sleep":
        fail("deployment.yaml: preStop must be exec [sleep, SECONDS] (the image has no shell tools beyond coreutils)")
    pre_stop_secs = int(command[1])
    grace_secs = config.get("shutdown_grace_ms", 10_000) / 1000
    termination = pod.get("terminationGracePeriodSeconds", 30)
    needed = pre_stop_secs + grace_secs + 2  # + the scaler giving its leases up (app.rs)
    if termination <= needed:
        fail(f"deployment.yaml: terminationGracePeriodSeconds {termination} must exceed preStop {pre_stop_secs}s + "
             f"shutdown_grace_ms {grace_secs:g}s + 2s")
    ok(f"deployment.yaml: terminationGracePeriodSeconds {termination} > preStop {pre_stop_secs}s + "
       f"shutdown_grace {grace_secs:g}s + 2s")
    security = container.get("securityContext", {})
    if not (pod.get("securityContext", {}).get("runAsNonRoot") and security.get("readOnlyRootFilesystem")
            and security.get("allowPrivilegeEscalation") is False):
        fail("deployment.yaml: must run non-root, read-only root filesystem, no privilege escalation")
    ok("deployment.yaml: non-root, read-only root filesystem, no privilege escalation")


# ---------------------------------------------------------------- compose


def check_compose(compose: list[str]) -> None:
    label = " ".join(os.path.basename(c) if i == 0 else c for i, c in enumerate(compose))
    base = compose + ["-f", str(COMPOSE_FILE)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD")}
    quiet = subprocess.run(base + ["config", "--quiet"], capture_output=True, text=True, env=env, timeout=60)
    if quiet.returncode != 0 or quiet.stderr.strip():
        fail(f"{COMPOSE_FILE}: `{label} config` refused it:\n{quiet.stderr.strip()}")
    ok(f"{COMPOSE_FILE}: `{label} config` accepts it (compose specification schema, interpolation)")
    result = subprocess.run(base + ["config", "--format", "json"], capture_output=True, text=True, env=env, timeout=60)
    if result.returncode != 0:
        fail(f"{COMPOSE_FILE}: `{label} config --format json` failed:\n{result.stderr.strip()}")
    project = json.loads(result.stdout)
    services = project["services"]

    hostagent_env = set(re.findall(r"\[env: (HOSTAGENT_[A-Z_]+)", subprocess.run(
        [str(hostagent_bin()), "--help"], capture_output=True, text=True, timeout=30).stdout))
    if not hostagent_env:
        fail("could not read the HOSTAGENT_* variables from `hostagent --help`")

    seen_server_envs: set[tuple] = set()
    seed_sql: list[str] = []
    for name, service in sorted(services.items()):
        build = service.get("build")
        if build:
            context = Path(build["context"])
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                fail(f"{COMPOSE_FILE}: service {name} builds {dockerfile}, which does not exist")
            ok(f"{COMPOSE_FILE}: service {name} builds {os.path.relpath(dockerfile, ROOT)}")
        for dependency, condition in (service.get("depends_on") or {}).items():
            if condition.get("condition") == "service_healthy" and not services[dependency].get("healthcheck"):
                fail(f"{COMPOSE_FILE}: {name} waits for {dependency} to be healthy, which has no healthcheck")
            if condition.get("condition") == "service_completed_successfully" and \
                    services[dependency].get("restart", "no") != "no":
                fail(f"{COMPOSE_FILE}: {name} waits for one-shot {dependency}, which restarts")
        environment = service.get("environment") or {}
        switchboard_env = {k: v for k, v in environment.items() if k.startswith("SWITCHBOARD")}
        if switchboard_env:
            key = tuple(sorted(switchboard_env.items()))
            if key not in seen_server_envs:
                seen_server_envs.add(key)
                dump_config(f"{COMPOSE_FILE}: service {name}", ROOT / DOCKER_DIR / "switchboard.toml",
                            {k: v or "" for k, v in switchboard_env.items()})
            ok(f"{COMPOSE_FILE}: service {name}: its SWITCHBOARD__* variables are real configuration keys")
        agent_env = {k for k in environment if k.startswith("HOSTAGENT_")}
        if agent_env:
            unknown = agent_env - hostagent_env
            if unknown:
                fail(f"{COMPOSE_FILE}: service {name} sets {sorted(unknown)}, which hostagent does not read")
            for required in ["HOSTAGENT_ENDPOINT", "HOSTAGENT_HOST_ID", "HOSTAGENT_REGION"]:
                if required not in environment:
                    fail(f"{COMPOSE_FILE}: service {name} does not set {required}")
            ok(f"{COMPOSE_FILE}: service {name}: HOSTAGENT_* variables are the agent's ({', '.join(sorted(agent_env))})")
        for arg in service.get("command") or []:
            if arg.startswith("--command="):
                seed_sql.append(arg.removeprefix("--command="))

    # The region seed's SQL against the migrated schema (the SQLite flavour has the same tables).
    with tempfile.TemporaryDirectory() as scratch:
        run_env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD")}
        run_env.update({"SWITCHBOARD__DATABASE__URL": f"sqlite://{scratch}/seed.db", "RUST_BACKTRACE": "0"})
        subprocess.run([str(switchboard_bin()), "serve", "--dump-config"], env=run_env, capture_output=True,
                       check=True, timeout=60)
        database = sqlite3.connect(f"{scratch}/seed.db")
        for sql in seed_sql:
            try:
                database.execute(sql)
                database.execute(sql)  # twice: it must be idempotent
            except sqlite3.Error as error:
                fail(f"{COMPOSE_FILE}: region seed SQL fails on the migrated schema: {error}\n  {sql}")
            ok(f"{COMPOSE_FILE}: region seed SQL runs (twice) on the migrated schema: {sql}")
        database.close()


# ---------------------------------------------------------------- Dockerfiles


def dockerfile_instructions(path: Path) -> list[tuple[int, str, str]]:
    """(line, INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    instructions = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        pending += stripped
        word, _, rest = pending.partition(" ")
        instructions.append((start, word.upper(), rest.strip()))
        pending = ""
    if pending:
        fail(f"{path}: ends inside a continued instruction")
    return instructions


def split_flags(arguments: str) -> tuple[dict[str, str], str]:
    flags = {}
    while arguments.startswith("--"):
        flag, _, arguments = arguments.partition(" ")
        name, _, value = flag[2:].partition("=")
        flags.setdefault(name, value)
        arguments = arguments.strip()
    return flags, arguments


class DockerIgnore:
    """.dockerignore matching as Docker does it: Go filepath.Match patterns plus `**`, a pattern
    matching a directory excludes everything below it, `!` re-includes, the last match wins."""

    def __init__(self, path: Path):
        self.rules: list[tuple[bool, re.Pattern]] = []
        if not path.is_file():
            return
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
            self.rules.append((include, re.compile("^" + self._regex(pattern) + "$")))

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "", 0
        while i < len(pattern):
            c = pattern[i]
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
                continue
            if pattern.startswith("**", i):
                out, i = out + ".*", i + 2
                continue
            out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c))
            i += 1
        return out

    def excluded(self, relative: str) -> bool:
        parts = relative.split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for include, regex in self.rules:
            if any(regex.match(c) for c in candidates):
                result = not include
        return result


def dep_info_sources(binary: str) -> list[str]:
    """Files cargo recorded as inputs of the dev build of `binary`, relative to the repository."""
    dep_info = TARGET / "debug" / f"{binary}.d"
    if not dep_info.is_file():
        fail(f"{dep_info} is missing after the build")
    text = dep_info.read_text()
    first = text.splitlines()[0]
    _, _, deps = first.partition(": ")
    sources = []
    for token in re.split(r"(?<!\\) ", deps):
        token = token.replace("\\ ", " ").strip()
        if not token:
            continue
        path = Path(os.path.normpath(token))
        try:
            sources.append(str(path.relative_to(ROOT)))
        except ValueError:
            continue  # the registry, the toolchain
    return [s for s in sources if not s.startswith(os.path.relpath(TARGET, ROOT) + "/")]


def workspace_manifests() -> list[str]:
    workspace = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]
    return ["Cargo.toml", "Cargo.lock"] + [f"{member}/Cargo.toml" for member in workspace["members"]]


def check_dockerfiles() -> None:
    ignore = DockerIgnore(ROOT / ".dockerignore")
    if not ignore.rules:
        fail(".dockerignore is missing or empty: the build context would include target/ and .git/")
    for directory in ["target", ".git", "tests/web/node_modules", ".switchboard"]:
        if not ignore.excluded(directory + "/x"):
            fail(f".dockerignore does not exclude {directory}/")
    ok(".dockerignore excludes target/, .git/, node_modules, .switchboard/")
    workspace = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]
    rust_version = workspace.get("package", {}).get("rust-version")

    dockerfiles = sorted(DOCKER_DIR.glob("*.Dockerfile"))
    if not dockerfiles:
        fail(f"no Dockerfiles in {DOCKER_DIR}")
    parsed = [parse_dockerfile(path, rust_version) for path in dockerfiles]
    run_builds([command for dockerfile in parsed for command in dockerfile["cargo"]])
    for dockerfile in parsed:
        check_runtime_stage(dockerfile, ignore)


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def parse_dockerfile(path: Path, rust_version: str | None) -> dict:
    """Stages, exec-form JSON, the builder's steps (only `COPY . .` and `cargo build`: anything else
    fails, so that a new build step cannot go unchecked). Returns what the later checks need."""
    instructions = dockerfile_instructions(path)
    args: dict[str, str] = {}
    stages: list[dict] = []
    for line, word, rest in instructions:
        if word == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        if word == "FROM":
            flags, rest = split_flags(rest)
            parts = rest.split()
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append({"name": name, "image": image, "workdir": "/", "steps": [], "line": line})
            continue
        if not stages:
            if word != "ARG":
                fail(f"{path}:{line}: {word} before the first FROM")
            continue
        stage = stages[-1]
        if word == "WORKDIR":
            stage["workdir"] = os.path.join(stage["workdir"], rest)
        stage["steps"].append((line, word, rest))
        # Exec form must be valid JSON, or Docker silently runs it through a shell.
        body = rest
        if word == "HEALTHCHECK":
            _, body = split_flags(rest)
            body = body.partition(" ")[2] if body.upper().startswith("CMD ") else ""
        if word in ("CMD", "ENTRYPOINT", "HEALTHCHECK") and body.lstrip().startswith("["):
            try:
                json.loads(body)
            except json.JSONDecodeError as error:
                fail(f"{path}:{line}: {word} looks like exec form but is not valid JSON ({error})")
    if len(stages) < 2:
        fail(f"{path}: expected a multi-stage build (builder + runtime)")
    runtime = stages[-1]
    by_name = {s["name"]: s for s in stages}

    cargo: list[dict] = []
    copies_from = {split_flags(rest)[0].get("from") for _, word, rest in runtime["steps"] if word == "COPY"} - {None}
    for stage_name in sorted(copies_from):
        stage = by_name.get(stage_name)
        if stage is None:
            fail(f"{path}: COPY --from={stage_name}: no such stage")
        match = re.match(r"rust:(\d+(?:\.\d+)*)", stage["image"])
        if match and rust_version and version_tuple(match.group(1)) < version_tuple(rust_version):
            fail(f"{path}: builder image {stage['image']} is older than the workspace's rust-version {rust_version}")
        if match:
            here = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
            ok(f"{path}: builder {stage['image']} (workspace rust-version {rust_version}; here: {here})")
        copied_context = False
        for line, word, rest in stage["steps"]:
            if word == "COPY":
                flags, rest = split_flags(rest)
                if rest.split() != [".", "."]:
                    fail(f"{path}:{line}: the check only knows the builder's `COPY . .`; teach deploy/check.py this one")
                copied_context = True
            elif word == "RUN":
                flags, command = split_flags(rest)
                unknown = set(flags) - {"mount"}
                if unknown:
                    fail(f"{path}:{line}: RUN flags {sorted(unknown)} are not understood by the check")
                for segment in re.split(r"&&|;", command):
                    words = shlex.split(segment)
                    if words:
                        cargo.append(parse_cargo_build(path, line, words))
        if not copied_context:
            fail(f"{path}: builder stage {stage_name} never copies the build context")
    return {"path": path, "stages": by_name, "runtime": runtime, "cargo": cargo}


def parse_cargo_build(path: Path, line: int, words: list[str]) -> dict:
    text = " ".join(words)
    if words[:2] != ["cargo", "build"]:
        fail(f"{path}:{line}: builder step `{text}` is not a cargo build; the check cannot run it as a plain command")
    command = {"where": f"{path}:{line}", "words": words, "packages": [], "bins": []}
    rest = iter(words[2:])
    for word in rest:
        if word in ("-p", "--package"):
            command["packages"].append(next(rest, ""))
        elif word == "--bin":
            command["bins"].append(next(rest, ""))
        elif word not in ("--release", "--locked"):
            fail(f"{path}:{line}: `{text}`: the check does not know {word!r} (it knows -p, --bin, --release, --locked)")
    if "--locked" not in words:
        fail(f"{path}:{line}: `{text}` must pass --locked (builds exactly Cargo.lock)")
    if len(command["packages"]) != 1 or len(command["bins"]) != 1:
        fail(f"{path}:{line}: `{text}`: expected one -p PACKAGE and one --bin NAME")
    return command


def run_builds(commands: list[dict]) -> None:
    """The builder stages' cargo commands with the dev profile.

    Each `-p PACKAGE --bin NAME` is first checked against `cargo metadata` (a workspace member with
    that binary). Then, by default, the binaries are built with the feature resolution of CI's
    `cargo build --workspace --all-targets` — features unified over every member, dev-dependencies
    included (`--workspace ... --examples` turns that on; the workspace has no examples) — so that
    after CI's build this is a no-op. Built on its own, `-p PACKAGE` resolves fewer features, which
    rebuilds ~60 crates (aws-sdk-ec2 among them: minutes on 2 cores) as a Docker build does;
    DEPLOY_CHECK_EXACT=1 runs each command exactly as written instead (--release dropped)."""
    metadata = json.loads(subprocess.run(["cargo", "metadata", "--locked", "--no-deps", "--format-version", "1"],
                                         cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    members = {p["name"]: p for p in metadata["packages"] if p["id"] in metadata["workspace_members"]}
    for command in commands:
        package, binary = command["packages"][0], command["bins"][0]
        if package not in members:
            fail(f"{command['where']}: -p {package} is not a workspace member ({', '.join(sorted(members))})")
        bins = [t["name"] for t in members[package]["targets"] if "bin" in t["kind"]]
        if binary not in bins:
            fail(f"{command['where']}: package {package} has no binary {binary!r} (it has {bins})")
        ok(f"{command['where']}: `{' '.join(command['words'])}`: {package} is a workspace member with binary {binary}")
    if os.environ.get("DEPLOY_CHECK_EXACT") == "1":
        builds = [([w for w in c["words"] if w != "--release"], f"{c['where']}, exactly, --release dropped")
                  for c in commands]
    else:
        unified = ["cargo", "build", "--locked", "--workspace", "--examples"]
        for command in commands:
            unified += ["--bin", command["bins"][0]]
        wheres = ", ".join(c["where"] for c in commands)
        builds = [(unified, f"{wheres}: dev profile, CI's feature resolution; DEPLOY_CHECK_EXACT=1 for the -p builds")]
    for words, why in builds:
        print(f"  run   {' '.join(words)}   ({why})", flush=True)
        started = time.monotonic()
        if subprocess.run(words, cwd=ROOT).returncode != 0:
            fail(f"`{' '.join(words)}` failed")
        ok(f"`{' '.join(words)}` built in {time.monotonic() - started:.1f}s")


def check_runtime_stage(dockerfile: dict, ignore: DockerIgnore) -> None:
    path, by_name, runtime = dockerfile["path"], dockerfile["stages"], dockerfile["runtime"]
    # Every input cargo recorded for the binaries is in the build context.
    for command in dockerfile["cargo"]:
        binary = command["bins"][0]
        sources = dep_info_sources(binary) + workspace_manifests()
        missing = [s for s in sources if not (ROOT / s).exists()]
        if missing:
            fail(f"{path}: {binary} is built from {missing}, which do not exist")
        ignored = [s for s in sources if ignore.excluded(s)]
        if ignored:
            fail(f"{path}: {binary} is built from {ignored}, which .dockerignore leaves out of the build context")
        ok(f"{path}: all {len(sources)} inputs of {binary} (cargo dep-info + workspace manifests) are in the build context")

    # The runtime stage: what it copies exists, the entrypoint is one of those copies.
    destinations = []
    for line, word, rest in runtime["steps"]:
        if word != "COPY":
            continue
        flags, rest = split_flags(rest)
        parts = rest.split()
        sources, destination = parts[:-1], parts[-1]
        for source in sources:
            if "from" in flags:
                stage = by_name[flags["from"]]
                relative = os.path.relpath(source, stage["workdir"])
                if not relative.startswith("target/release/"):
                    fail(f"{path}:{line}: the check only maps the builder's target/release/… artefacts, not {source}")
                local = relative.replace("target/release/", os.path.relpath(TARGET, ROOT) + "/debug/", 1)
                file = ROOT / local
                if not (file.is_file() and os.access(file, os.X_OK)):
                    fail(f"{path}:{line}: COPY --from={flags['from']} {source}: {local} was not built")
                ok(f"{path}:{line}: COPY --from={flags['from']} {source} exists after the build (as {local})")
            else:
                if not (ROOT / source).exists():
                    fail(f"{path}:{line}: COPY {source}: no such file in the build context")
                if ignore.excluded(os.path.normpath(source)):
                    fail(f"{path}:{line}: COPY {source}: .dockerignore leaves it out of the build context")
                ok(f"{path}:{line}: COPY {source} is in the build context")
                if source.endswith(".toml") and "switchboard" in source:
                    dump_config(f"{path}:{line}: {source}", ROOT / source, {})
                    ok(f"{path}:{line}: {source} is accepted by `switchboard serve --dump-config`")
            target = destination if not destination.endswith("/") else destination + os.path.basename(source)
            destinations.append(target)
    user = [rest for _, word, rest in runtime["steps"] if word == "USER"]
    if not user or user[-1].split(":")[0] in ("root", "0"):
        fail(f"{path}: the runtime stage must switch to a non-root USER")
    entrypoint = [json.loads(rest) for _, word, rest in runtime["steps"] if word == "ENTRYPOINT"]
    if not entrypoint or entrypoint[-1][0] not in destinations:
        fail(f"{path}: ENTRYPOINT must run a binary the runtime stage copies ({destinations})")
    cmd = [json.loads(rest) for _, word, rest in runtime["steps"] if word == "CMD"]
    shown = " ".join(entrypoint[-1] + (cmd[-1] if cmd else []))
    binary = TARGET / "debug" / os.path.basename(entrypoint[-1][0])
    invocation = [str(binary)] + entrypoint[-1][1:] + (cmd[-1] if cmd else []) + ["--help"]
    if subprocess.run(invocation, capture_output=True, timeout=30).returncode != 0:
        fail(f"{path}: `{shown} --help` fails with the dev build")
    ok(f"{path}: runs as USER {user[-1]}; ENTRYPOINT/CMD `{shown}` is a command the binary has")


# ---------------------------------------------------------------- the EC2 host unit


def check_hostagent_unit() -> None:
    unit = Path("deploy/hostagent.service")
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        note("systemd-analyze is not installed: deploy/hostagent.service not verified")
        return
    with tempfile.TemporaryDirectory() as scratch:
        # verify insists that ExecStart exists: point it at the dev build of the same binary.
        copy = Path(scratch) / "hostagent.service"
        text = (ROOT / unit).read_text()
        if "ExecStart=/usr/local/bin/hostagent" not in text:
            fail(f"{unit}: ExecStart is no longer /usr/local/bin/hostagent (the AMI's path, deploy/EC2.md)")
        copy.write_text(text.replace("ExecStart=/usr/local/bin/hostagent", f"ExecStart={hostagent_bin()}"))
        result = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True,
                                timeout=60)
        output = (result.stdout + result.stderr).strip()
        if result.returncode != 0 or output:
            fail(f"{unit}: systemd-analyze verify complains:\n{output}")
    ok(f"{unit}: systemd-analyze verify (systemd {subprocess.run([analyze, '--version'], capture_output=True, text=True).stdout.split()[1]}) has nothing to say")


def main() -> None:
    if len(sys.argv) < 2:
        fail(__doc__)
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "manifests":
        check_manifests(rest or ["1.29"])
    elif command == "compose":
        check_compose(rest)
    elif command == "dockerfiles":
        check_dockerfiles()
    elif command == "hostagent-unit":
        check_hostagent_unit()
    else:
        fail(f"unknown check {command!r}")
    print(f"  checks passed: {checked}", flush=True)


if __name__ == "__main__":
    main()
