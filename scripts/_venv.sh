# Sourced by the scripts: make sure .venv exists and has the project with the given extra.
# Needs only python3 (3.10+). Idempotent: a second run installs nothing new.
set -euo pipefail
ensure_venv() {
    local extra="$1"
    local python="${PYTHON:-python3}"
    if [ ! -x .venv/bin/python ]; then
        echo "Creating .venv with $($python --version 2>&1)..."
        "$python" -m venv .venv
    fi
    if [ ! -x .venv/bin/uv ]; then
        .venv/bin/python -m pip install --quiet --disable-pip-version-check uv
    fi
    # uv resolves and installs in seconds; when everything is present it only checks.
    .venv/bin/uv pip install --quiet --python .venv/bin/python -e ".[${extra}]"
}
