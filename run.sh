#!/usr/bin/env bash
# The one entry point. First use creates .venv and installs requirements.txt; later uses skip that step
# unless requirements.txt changed. Then it dispatches to the Python commands in src/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV="${VENV:-.venv}"
PY="$VENV/bin/python"

usage() {
  cat <<'EOF'
usage: bash run.sh COMMAND [args]

  demo [EXP]                the EXP (default exp001) pipeline end to end on a generated miniature MILK10k with
                            exp/demo's small settings (CPU, minutes); demo blend EXP ... blends demo runs
  test                      the test suite (pytest; extra args go to pytest, e.g. -m "not slow")
  download [--dest DIR]     fetch, unpack and verify the official files into input/
  synth OUT --from-csvs DIR generated 600x450 JPEGs for real CSVs, to rehearse at full scale (--help)
  EXP [key=value ...]       train every missing fold of exp/EXP, then blend into a validated submission
                            (GPUS=0,1,... runs folds in parallel, one per GPU); EXP --help lists the keys
  blend EXP [EXP ...]       blend experiments (weights fitted on out-of-fold predictions) into a submission
  tune EXP [key=value ...]  Optuna study over loss weighting and learning rate (resumable, shareable)
  score TRUTH.csv PRED.csv  score a prediction CSV exactly as the leaderboard does (--json for machines)
  predict SOURCE --data DIR new lesions through a trained experiment, blend or export: a submission-format CSV
                            and a readable one; --clinical A.jpg --dermoscopic B.jpg for one lesion (--help)
  export SOURCE [--out DIR] a self-contained folder + .tar.gz (safetensors, JSON, manifest, model card) to predict
                            from anywhere (--help)
  spread EXP [--fold-seeds 42,7,2026]
                            EXP under several fold splits: honest macro F1 of every decision rule, mean +- std
  bench [options]           training/inference throughput benchmark (--help for options)
  setup                     only create/refresh the virtual environment

experiments: exp/*/config.py
EOF
}

setup() {
  local stamp="$VENV/.requirements.sha256"
  local want
  want="$(sha256sum requirements.txt | cut -d' ' -f1)"
  if [[ -x "$PY" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  echo "[run.sh] setting up $VENV (first run, or requirements.txt changed)" >&2
  [[ -x "$PY" ]] || python3 -m venv "$VENV"
  "$PY" -m pip install --quiet --upgrade pip
  "$PY" -m pip install --quiet -r requirements.txt
  echo "$want" > "$stamp"
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  ""|-h|--help|help) usage ;;
  setup) setup ;;
  test) setup; exec "$PY" -m pytest -q tests "$@" ;;
  demo) setup; exec "$PY" -m src.cli demo "$@" ;;
  download) setup; exec "$PY" -m src.tools.download "$@" ;;
  synth) setup; exec "$PY" -m src.tools.synth "$@" ;;
  score) setup; exec "$PY" -m src.scoring "$@" ;;
  blend) setup; exec "$PY" -m src.cli blend "$@" ;;
  tune) setup; exec "$PY" -m src.cli tune "$@" ;;
  spread) setup; exec "$PY" -m src.cli spread "$@" ;;
  predict) setup; exec "$PY" -m src.cli predict "$@" ;;
  export) setup; exec "$PY" -m src.cli export "$@" ;;
  bench) setup; exec "$PY" -m src.tools.bench "$@" ;;
  *)
    if [[ -f "exp/$cmd/config.py" ]]; then
      setup; exec "$PY" -m src.cli run "$cmd" "$@"
    fi
    echo "run.sh: unknown command or experiment '$cmd'" >&2
    usage >&2
    exit 2 ;;
esac
