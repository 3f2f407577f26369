#!/usr/bin/env bash
# Developer entry point: `bash scripts/dev.sh test`, `bash scripts/dev.sh demo` or `bash scripts/dev.sh docs`.
# Installs what it needs (a venv in .venv, the local stack), so it works on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}

find_python() {
    # An interpreter of Python $1 that runs: on PATH, or one pyenv has (its shims
    # answer `command -v` for versions that are not selected, then refuse to run).
    local candidate
    for candidate in "$(command -v "python$1" || true)" \
        "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/"$1"*/bin/"python$1"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" -c 'import sys' 2>/dev/null
        then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

ensure_venv() {
    if [ ! -x .venv/bin/python ]; then
        echo "==> creating .venv"
        "$PY" -m venv .venv
    fi
    if ! .venv/bin/python -c 'import fastapi_rwdb, pytest, sqlmodel, uvicorn, celery, arq, alembic, mkdocs' 2>/dev/null \
        || [ pyproject.toml -nt .venv/.installed ]; then
        echo "==> installing fastapi-rwdb and its dev tools into .venv"
        .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
        touch .venv/.installed
    fi
}

stack_up() {
    # `up` starts only what is missing, so a second call finishes a start-up that
    # failed half-way (a server slow to come up on a loaded machine) without
    # touching what already runs; a second failure is a real one.
    bash scripts/stack.sh up || {
        echo "==> the stack did not come up: trying once more"
        bash scripts/stack.sh up
    }
}

load_stack_env() {
    # The app reads .env itself; when there is none, use the local stack's values.
    if [ ! -f .env ]; then
        set -a
        # shellcheck disable=SC1091
        . ./.env.example
        set +a
    fi
}

cmd=${1:-help}
shift || true
case "$cmd" in
    test)
        ensure_venv
        stack_up
        echo "==> headless Chromium for tests/stack/test_browser.py"
        bash scripts/browser.sh install
        echo "==> ruff"
        .venv/bin/ruff check .
        echo "==> mypy"
        .venv/bin/mypy
        if command -v docker-compose >/dev/null 2>&1; then
            echo "==> docker-compose config"
            docker-compose -f compose.yml config -q
        else
            echo "==> docker-compose not installed: compose.yml not validated (CI installs it)"
        fi
        echo "==> pytest"
        # the stack's address; the tests use their own database, rwdb_test, not POSTGRES_DB's
        # (tests/conftest.py; the demo's rwdb stays free of test rows)
        load_stack_env
        .venv/bin/pytest "$@"
        ;;
    test-lowest)
        # The whole suite with the lowest versions pyproject.toml allows, in .venv-lowest:
        # the reliability scenarios too, as a failover is where drivers differ most.
        if [ ! -x .venv-lowest/bin/python ]; then
            echo "==> creating .venv-lowest"
            "$PY" -m venv .venv-lowest
        fi
        if [ ci/lowest.txt -nt .venv-lowest/.installed ] || [ pyproject.toml -nt .venv-lowest/.installed ]; then
            echo "==> installing the lowest allowed versions into .venv-lowest"
            .venv-lowest/bin/python -m pip install -q --disable-pip-version-check \
                -c ci/lowest.txt -e '.[dev]'
            touch .venv-lowest/.installed
        fi
        .venv-lowest/bin/python -m pip list --disable-pip-version-check 2>/dev/null \
            | grep -iE '^(fastapi|starlette|sqlalchemy|asyncpg|psycopg|pydantic-settings) '
        stack_up
        echo "==> pytest (lowest versions)"
        load_stack_env
        .venv-lowest/bin/pytest -p no:cacheprovider "$@"
        ;;
    python-for)
        # The interpreter of one Python version, for .ci/run: `dev.sh python-for 3.13`.
        find_python "${1:?usage: dev.sh python-for VERSION}"
        ;;
    package)
        # The wheel and sdist an index would get, checked as an index checks them, and
        # the version the wheel carries is the one the package reports.
        ensure_venv
        rm -rf dist
        .venv/bin/python -m build -q --outdir dist . >/dev/null
        .venv/bin/twine check --strict dist/*
        wheel_version=$(basename dist/*.whl | cut -d- -f2)
        code_version=$(.venv/bin/python -c 'import fastapi_rwdb; print(fastapi_rwdb.__version__)')
        if [ "$wheel_version" != "$code_version" ]; then
            echo "the wheel says $wheel_version, fastapi_rwdb.__version__ says $code_version" >&2
            exit 1
        fi
        in_tree=$(find fastapi_rwdb -name '*.py' | wc -l)
        in_wheel=$(.venv/bin/python -m zipfile -l dist/*.whl | grep -c '\.py ')
        if [ "$in_tree" != "$in_wheel" ]; then
            echo "the wheel holds $in_wheel Python modules, the source tree $in_tree" >&2
            exit 1
        fi
        echo "==> dist/ holds fastapi-rwdb $wheel_version (wheel and sdist, $in_wheel modules)," \
            "twine check passed"
        ;;
    test-matrix)
        # The no-cluster layer (tests/unit) on every Python the classifiers name, each in
        # a venv of its own (.venv-py3.X). A missing interpreter fails: not tested is not passed.
        status=0
        for version in 3.11 3.12 3.13; do
            interpreter=$(find_python "$version" || true)
            if [ -z "$interpreter" ]; then
                echo "==> python$version: NOT FOUND, the unit tests did not run on it" >&2
                status=1
                continue
            fi
            venv=".venv-py$version"
            if [ ! -x "$venv/bin/python" ]; then
                "$interpreter" -m venv "$venv"
            fi
            if [ pyproject.toml -nt "$venv/.installed" ]; then
                "$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]'
                touch "$venv/.installed"
            fi
            echo "==> tests/unit on $("$venv/bin/python" --version)"
            "$venv/bin/pytest" -q -p no:cacheprovider tests/unit "$@" || status=1
        done
        exit $status
        ;;
    demo)
        ensure_venv
        stack_up
        load_stack_env
        export RWDB_DEBUG_ROUTES=${RWDB_DEBUG_ROUTES:-true}
        port=${PORT:-8000}
        echo "==> serving example_app on http://127.0.0.1:$port (docs: /docs); Ctrl-C stops it"
        echo "    stop the database stack afterwards with: bash scripts/stack.sh down"
        exec .venv/bin/uvicorn example_app.main:app --host 127.0.0.1 --port "$port"
        ;;
    docs)
        # The documentation site (mkdocs.yml) into site/; --strict: a broken link or
        # anchor, or a settings field without a docstring, fails the build.
        ensure_venv
        echo "==> mkdocs build --strict"
        NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict "$@"
        ;;
    *)
        echo "usage: bash scripts/dev.sh test [pytest args] | test-lowest [pytest args] |" \
            "test-matrix [pytest args] | package | demo | docs" >&2
        exit 2
        ;;
esac
