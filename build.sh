#!/usr/bin/env bash
# Build vLLM wheels patched with this overlay. ./build.sh --help for options.
# Runs under $PYTHON (default python3), which only makes and then runs the cached build
# environment of build-requirements.txt (scripts/overlaytools/buildenv.py).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; then
    echo "build.sh: error: needs Python >= 3.9 with venv and pip (set PYTHON to one; found: $python)" >&2
    exit 1
fi
PYTHONPATH="$here/scripts${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m overlaytools.buildenv "$@"
