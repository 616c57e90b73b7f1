#!/bin/sh
# Run `python -m cluster.cli "$@"` inside a Ray job with the cluster's own Python.
#
# Ray's job manager runs a job's entrypoint with `/bin/sh -c` in the environment of the
# JobSupervisor actor, so a bare `python` is whatever comes first on the PATH of the shell
# that ran `ray start`: often not the interpreter that has Ray (`.venv/bin/ray start` without
# activating .venv gives the system or pyenv Python). `alignray submit` therefore runs
# `sh cluster/job_entrypoint.sh train ...`, and this script picks, in order:
#
#   1. $ALIGNRAY_PYTHON, when set (e.g. through the runtime_env's env_vars);
#   2. the virtualenv of a `pip`/`uv` runtime_env: Ray activates it (under
#      .../runtime_resources/) before starting the supervisor, so $VIRTUAL_ENV/bin/python;
#   3. the interpreter Ray starts every worker with on this node: the raylet's
#      --python_worker_command, found by walking up from this shell (entrypoint shell ->
#      JobSupervisor actor -> raylet) through Linux /proc;
#   4. python3, then python, on PATH.
set -eu

pick_python() {
    if [ -n "${ALIGNRAY_PYTHON:-}" ]; then
        echo "$ALIGNRAY_PYTHON"; return
    fi
    case "${VIRTUAL_ENV:-}" in
        */runtime_resources/*)
            if [ -x "$VIRTUAL_ENV/bin/python" ]; then echo "$VIRTUAL_ENV/bin/python"; return; fi ;;
    esac
    pid=$PPID
    for _ in 1 2 3 4 5 6; do  # walk up: [sh -c] -> JobSupervisor -> raylet
        py=$(tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null | sed -n 's/^--python_worker_command=//p' | cut -d' ' -f1)
        if [ -n "$py" ] && [ -x "$py" ]; then echo "$py"; return; fi
        pid=$(sed -n 's/^PPid:[[:space:]]*//p' "/proc/$pid/status" 2>/dev/null || true)
        [ -n "$pid" ] && [ "$pid" -gt 1 ] || break
    done
    command -v python3 || command -v python
}

PY=$(pick_python)
echo "alignray job: $PY -m cluster.cli $*" >&2
exec "$PY" -m cluster.cli "$@"
