#!/usr/bin/env bash
# Instructions per call of bench/inproc.py under callgrind: steadier than any clock on a shared VM.
# The difference between 700 and 200 calls, so start-up and warm-up cancel out. Arguments go to
# bench/inproc.py: `bench/instructions.sh --real redis` counts the Redis client's share too.
# PYTHON=/path/to/python counts under another interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
count() {
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "${PYTHON:-.venv/bin/python}" bench/inproc.py --calls "$1" "${@:2}" 2>&1 \
        | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
small=$(count 200 "$@")
large=$(count 700 "$@")
echo "$(( (large - small) / 500 )) instructions per call"
