#!/usr/bin/env bash
# make gpu-check: install the offline kit into this machine's Python, then run bench.gpu_check.
#
#   scripts/gpu_check.sh [--smoke] [--budget-s S] [--out DIR]       (arguments go to bench.gpu_check)
#
# PYTHON (default python3) is the interpreter that holds the machine's CUDA torch. With a kit folder
# (GPU_KIT, default .gpu-kit; made by `make gpu-kit` on a machine with network) the project's requirements
# are installed from it with --no-index: nothing is fetched, and the machine's torch stays as it is
# (the project asks torch>=2.6). Without one, the requirements must already be installed
# (`pip install -e '.[dev]'` on a machine with network). Output goes to --out, else $OUT, else
# bench/results/gpu; the install log (in gpu_check.log) and the machine's package list go there too.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
KIT=${GPU_KIT:-.gpu-kit}
DEST=${OUT:-bench/results/gpu}
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [[ ${args[i]} == --out ]] && DEST=${args[i + 1]}
  [[ ${args[i]} == --out=* ]] && DEST=${args[i]#--out=}
done
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

"$PY" -m pip list --format=freeze > "$DEST/device_packages.txt" 2>/dev/null
torch_before=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null) || {
  echo "gpu-check: $PY cannot import torch; set PYTHON to the interpreter that holds the CUDA build of torch" >&2
  exit 2
}

if [[ -d $KIT ]]; then
  "$PY" scripts/gpu_kit.py --check --out "$KIT" || exit 2
  t0=$SECONDS
  # The project and its requirements from the kit; the machine's own packages satisfy the rest.
  if ! "$PY" -m pip install -q --no-index --find-links "$KIT" --no-build-isolation -e '.[dev,cuda]' \
      >> "$DEST/gpu_check.log" 2>&1; then
    echo "gpu-check: the editable install failed (log in $DEST/gpu_check.log); installing the requirements only" >&2
    reqs=$("$PY" -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["dev"] + p["optional-dependencies"]["cuda"]))')
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --find-links "$KIT" $reqs >> "$DEST/gpu_check.log" 2>&1 || {
      echo "gpu-check: installing from the kit failed:" >&2
      tail -15 "$DEST/gpu_check.log" >&2
      exit 2
    }
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  echo "gpu-check: kit installed in $((SECONDS - t0)) s" >&2
fi

torch_after=$("$PY" -c 'import torch; print(torch.__version__)')
if [[ $torch_before != "$torch_after" ]]; then
  echo "gpu-check: installing replaced torch $torch_before with $torch_after; the project must not pin torch" >&2
  exit 2
fi
if ! err=$("$PY" -c 'import deepspeed, megatron.core, neox_zoology' 2>&1); then
  echo "gpu-check: the project does not import after the install:" >&2
  tail -5 <<< "$err" >&2
  exit 2
fi
exec "$PY" -m bench.gpu_check "$@"
