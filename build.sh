#!/usr/bin/env bash
# Build vLLM wheels patched with this overlay. ./build.sh --help for options.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python3}
if ! "$python" -c 'import sys, packaging; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; then
    echo "build.sh: error: needs Python >= 3.9 with 'packaging' ($python -m pip install packaging)" >&2
    exit 1
fi
PYTHONPATH="$here/scripts${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m overlaytools.build "$@"
