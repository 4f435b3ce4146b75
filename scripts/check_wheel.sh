#!/usr/bin/env bash
# The package installs like a package: build the wheel, install it (no -e) into a fresh virtual environment,
# and from a folder outside the checkout run `layerboost --help`, a bad-input line and `layerboost eval` on a
# tiny model. Dependencies come from ./.venv (run scripts/install.sh first) through a path entry, so nothing
# is downloaded again; the project's own code comes only from the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" . 2>&1 | grep -v "^WARNING: Location" || true
python3 -m venv "$work/venv"
site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
fresh_site="$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# A plain path line: the dependencies' modules are importable, but .venv's own .pth files (its editable
# install of this project) are not processed, so `layerboost` can only come from the wheel.
echo "$site" > "$fresh_site/layerboost-deps.pth"
"$work/venv/bin/python" -m pip install -q --no-deps "$work"/dist/layerboost-*.whl 2>&1 | grep -v "^WARNING: Location" || true
mkdir "$work/elsewhere" && cd "$work/elsewhere"
where="$("$work/venv/bin/python" -c 'import layerboost, layerboost.config as c; print(layerboost.__file__, c.conf_dir())')"
case "$where" in *"$work/venv/"*) ;; *) echo "wheel check: layerboost imported from outside the wheel: $where" >&2; exit 1;; esac
"$work/venv/bin/layerboost" --help > help.txt && grep -q "verbs:" help.txt
set +e
"$work/venv/bin/layerboost" search budget=abc 2> err.txt
status=$?
set -e
[ "$status" -eq 2 ] && [ "$(grep -c '^error: budget' err.txt)" -eq 1 ] && ! grep -q Traceback err.txt \
  || { echo "wheel check: bad input gave exit $status: $(cat err.txt)" >&2; exit 1; }
"$work/venv/bin/layerboost" eval model=tiny:llama plan=SSNN eval=none progress=false output_dir=out > eval.txt
grep -q "kl" eval.txt && [ -f out/eval/*.json ] || { echo "wheel check: eval wrote nothing" >&2; cat eval.txt >&2; exit 1; }
echo "wheel check: built, installed into a fresh venv, --help, bad input (exit 2) and eval on a tiny model passed"
