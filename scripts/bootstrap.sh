#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine: system packages, a project virtualenv with the
# locked Python dependencies, and stepguard itself (editable). Sourced by scripts/main.sh and
# scripts/test.sh; safe to run again (it only installs what is missing).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${STEPGUARD_VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH"

say() { printf '[stepguard setup] %s\n' "$*" >&2; }

# --- Debian packages -------------------------------------------------------------------------
need_pkgs=()
command -v bwrap >/dev/null 2>&1 || need_pkgs+=(bubblewrap)
command -v b3sum >/dev/null 2>&1 || need_pkgs+=(b3sum)
command -v openssl >/dev/null 2>&1 || need_pkgs+=(openssl)
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need_pkgs+=(postgresql)
fi
# Pods for real (tests/plugins/test_pods_podman.py, main.sh --cluster): podman runs our Pod and
# ConfigMap manifests with `kube play`; runc (crun refuses the hybrid cgroup mount some hosts
# have), catatonit for the pod's infra container, iptables + uidmap for podman's networking and
# user namespaces, mmdebstrap + a keyring to build the image's base root filesystem.
command -v podman >/dev/null 2>&1 || need_pkgs+=(podman)
command -v runc >/dev/null 2>&1 || need_pkgs+=(runc)
command -v catatonit >/dev/null 2>&1 || need_pkgs+=(catatonit)
command -v iptables >/dev/null 2>&1 || need_pkgs+=(iptables)
command -v newuidmap >/dev/null 2>&1 || need_pkgs+=(uidmap)
command -v mmdebstrap >/dev/null 2>&1 || need_pkgs+=(mmdebstrap)
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || need_pkgs+=(debian-archive-keyring)
if ((${#need_pkgs[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Debian packages: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
  else
    say "missing Debian packages: ${need_pkgs[*]}"
    say "install them with: sudo apt-get install ${need_pkgs[*]}  (tests that need them will be skipped)"
  fi
fi

# --- Python ----------------------------------------------------------------------------------
PY="${STEPGUARD_PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY="$cand"; break
    fi
  done
fi
[ -n "$PY" ] || { say "Python 3.11+ is required (apt-get install python3)"; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtualenv $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
if [ ! -x "$VENV/bin/uv" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check uv
fi
stamp="$VENV/.stepguard-lock.sha256"
want="$(cat "$ROOT/requirements.lock" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing locked Python dependencies (requirements.lock)"
  "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" -r "$ROOT/requirements.lock"
  "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --no-deps -e "$ROOT"
  echo "$want" >"$stamp"
fi
