#!/usr/bin/env bash
# Issue 29, end to end: a search with a non-default model, data and workload, then `layerboost export` and
# `layerboost heal` given nothing but its best file, each folder loaded and run in plain transformers (layerboost
# not importable there), and an override contradicting the file refused in one line (exit status 2).
#   bash benchmarks/demo_best_file_alone.sh [work folder [key=value ...]]   (the search's extra overrides)
# The search takes 4-10 min on 2 cores without AMX; healing (65,536 tokens of LoRA training on Gemma 3 270M) took
# over 20 min there. A rerun in the same folder resumes the healing where it stopped.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$(mktemp -d -t layerboost-demo-XXXXXX)}"
shift || true
PY="$ROOT/.venv/bin/python"
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$WORK" && cd "$WORK"
echo "== search ($(date +%T))"
# The agreement floor is lowered to 0.75: Gemma 3 270M's plans in this small budget keep 0.75-0.8 of the
# original's next tokens at the low end of their intervals (a setting a user states, recorded in the study).
time "$PY" "$ROOT/search.py" model=gemma3-270m data.source=builtin:-news workload=chat workload.prefill=256 \
  workload.decode=64 budget=10 fidelity.top_k=2 eval.top_k=1 fidelity.agreement_floor=0.75 progress=false "$@" \
  | tee search.log | sed -n '/## What to ship/,/## Pareto/p'
RUN=$(sed -n 's/^report: \(\S*\).*/\1/p' search.log)
BEST=$(ls "$RUN"/best/*.json 2>/dev/null | head -1 || true)
[ -n "$BEST" ] || { echo "no best file: see $RUN/summary.md"; exit 1; }
echo "== best file: $BEST"
"$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); m=d['made_with']; print('plan', d['plan']); print('made_with model', m['model']['name'], m['model']['source'], '| data', m['data']['source'], '| workload', {k: m['workload'][k] for k in ('prefill', 'decode')})" "$BEST"
LOAD='
import sys
class NoLayerBoost:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0].startswith("layerboost"):
            raise ImportError(name + " must not be imported here")
sys.meta_path.insert(0, NoLayerBoost())
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = tok("The river flows through the old town and", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=12, do_sample=False)
print("plain transformers:", type(model).__name__, "plan", model.config.layerboost_plan, "->", repr(tok.decode(out[0, ids.shape[1]:])))
'
for VERB in export heal; do
  echo "== layerboost $VERB plan=<best file> ($(date +%T))"
  ( time "$ROOT/.venv/bin/layerboost" "$VERB" plan="$BEST" ) 2>&1 | tail -n 8 | tee "$VERB.log"
  FOLDER=$(ls -td outputs/"${VERB/export/exported}"*/*/ | head -1)  # outputs/exported/<id>, outputs/healed/<id>
  echo "folder: $FOLDER"
  "$PY" -I -c "$LOAD" "$FOLDER"
done
echo "== a contradicting override (workload.prefill=512 against the file's 256)"
set +e
"$ROOT/.venv/bin/layerboost" export plan="$BEST" workload.prefill=512; echo "exit status $?"
