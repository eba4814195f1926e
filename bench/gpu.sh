#!/usr/bin/env bash
# The GPU rows of bench/RESULTS.md (step scheduler against batch on the real 1B and 7B architectures, eager
# and compiled) in one call of the device tool, for a session that has one. Its image holds torch and most of
# what the bench imports, but not these packages, so they travel as wheels:
#
#   bash bench/gpu.sh fetch      # here: the wheels, at the versions of .venv, into .whl/ (git-ignored)
#   device run: command "bash bench/gpu.sh run", carry [".whl"], timeout_s 600
#
# `run` installs the wheels, then runs each benchmark under its own time limit, most wanted first, so a slow
# one costs only its own rows; each one's log lands in $OUT. Overrides, for a dry run on the CPU:
#   OUT=/tmp/out PYTHON=.venv/bin/python DEVICE=cpu DTYPE=float32 RUNS="tiny:eager:60" bash bench/gpu.sh run
set -u
cd "$(dirname "$0")/.."

PACKAGES="transformers pydantic pydantic_core pydantic-settings python-dotenv annotated-types typing-inspection
typing_extensions spandrel"
# size:mode:seconds; together well inside the device tool's 600 s per call.
RUNS=${RUNS:-"1b:eager:150 7b:eager:200 7b:compiled:220"}

fetch() {
    local wanted=()
    for package in $PACKAGES; do
        wanted+=("$package==$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$package'))")")
    done
    rm -rf .whl && mkdir .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${wanted[@]}" && ls .whl && du -sh .whl
}

run() {
    local python=${PYTHON:-python3} out=${OUT:?OUT must name the folder for the logs}
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
    for entry in $RUNS; do
        IFS=: read -r size mode seconds <<<"$entry"
        local options=(--size "$size" --device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}")
        [ "$mode" = compiled ] && options+=(--compile)
        echo "== $size $mode (at most ${seconds}s)"
        timeout "$seconds" "$python" -m bench.scheduler "${options[@]}" >"$out/$size-$mode.log" 2>&1
        echo "exit $? after $SECONDS s in all"
        tail -n 30 "$out/$size-$mode.log"
    done
}

case "${1:-}" in
    fetch) fetch ;;
    run) run ;;
    *) echo "usage: bash bench/gpu.sh fetch|run" >&2 && exit 2 ;;
esac
