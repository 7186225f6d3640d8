#!/usr/bin/env bash
# The inheritance measurements of docs/benchmarks.md on the embedded SmolLM2, from the repository root:
#   bash benchmarks/inheritance_study.sh OUT_DIR [toxicity-profile|passive|length|toxicity|mtld ...]
# Benchmark data: ../shared/data (see its README); nothing here is shipped in the package.
#   toxicity-profile  the paper's toxicity profile of the untouched model: 300 RealToxicityPrompts prompts x 25
#                     samples, T 1, top_p 0.9 (recipe profile-toxicity)
#   passive           the passive-inheritance study (recipe demo-passive) with every likelihood probe (200 items
#                     each) and a toxicity profile (60 prompts x 10 samples) per model
#   length, toxicity, mtld
#                     the paper's active-inheritance objectives against random selection and the base
#   table             the objectives table of docs/benchmarks.md from those runs (benchmarks/objectives_table.py)
set -euo pipefail
OUT=${1:?usage: inheritance_study.sh OUT_DIR [stage ...]}
shift
STAGES=${*:-toxicity-profile passive length toxicity mtld table}
DATA=${DATA:-../shared/data}
DS=${DATASTEER:-.venv/bin/datasteer}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
timed() { local name=$1; shift; local t0=$SECONDS; "$@"; echo "$name: $((SECONDS - t0)) s" >> "$OUT/seconds.txt"; }

for stage in $STAGES; do
  case $stage in
    toxicity-profile)
      timed "$stage" "$DS" profile embedded:smollm2 --config profile-toxicity --prompts "$DATA/rtp/rtp_toxic_test_set.json" \
        --out "$OUT/toxicity-profile" -q ;;
    passive)
      timed "$stage" "$DS" passive demo-passive --out "$OUT/passive" -q \
        --set "profile.probes={bbq: $DATA/bbq, stereoset: $DATA/stereoset/stereoset.jsonl, crows_pairs: $DATA/crows-pairs/crows_pairs_anonymized.csv, openbookqa: $DATA/mcqa/openbookqa.jsonl, mmlu: $DATA/mcqa/mmlu.jsonl}" \
        --set profile.probe_limit=200 \
        --set "toxicity={prompts: {path: $DATA/rtp/rtp_toxic_test_set.json, limit: 60}, k: 10}" ;;
    length)
      # room to differ in length: teachers, training and profiles ask for brief answers (SmolLM2 still writes ~120
      # tokens), 256 new tokens, and a candidate cut at the limit is not "long" (without the brevity prompt the
      # base's greedy answers fill 229 of 256 tokens, and the cut-off hides any lengthening)
      BRIEF="Answer briefly, in two or three sentences."
      timed "$stage" "$DS" demo inherit --out "$OUT/objective-length" -q --set name=objective-length \
        --set "description=The longest finished answer of 4 per prompt (length_words:max), against a random one." \
        --set 'selection.objectives=[length_words:max]' --set 'selection.constraints=[length_tokens<256]' \
        --set teachers.0.sampling.max_new_tokens=256 --set profile.sampling.max_new_tokens=256 \
        --set "teachers.0.system_prompt=$BRIEF" --set "finetune.system_prompt=$BRIEF" \
        --set "profile.system_prompt=$BRIEF" ;;
    mtld)
      # the paper keeps the best of ~10 candidates: 8 here (the demo's 4 left MTLD within noise)
      timed "$stage" "$DS" demo inherit --out "$OUT/objective-mtld" -q --set name=objective-mtld \
        --set "description=The most lexically diverse answer of 8 per prompt (mtld:max), against a random one." \
        --set 'selection.objectives=[mtld:max]' --set teachers.0.k=8 ;;
    toxicity)
      # train on 200 of the 300 RealToxicityPrompts prefixes, profile toxicity on the other 100 (5 samples each)
      python3 - "$DATA/rtp/rtp_toxic_test_set.json" "$OUT" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8") if line.strip()]
for name, part in (("rtp-train", rows[:200]), ("rtp-heldout", rows[200:])):
    with open(f"{sys.argv[2]}/{name}.jsonl", "w", encoding="utf-8") as fh:
        for i, r in enumerate(part):
            fh.write(json.dumps({"prompt_id": f"{name}-{i}", "prompt": r["prompt"]}) + "\n")
PY
      timed "$stage" "$DS" demo inherit --out "$OUT/objective-toxicity" -q --set name=objective-toxicity \
        --set "description=The least profane continuation of 4 per RealToxicityPrompts prefix (toxicity_profanity:min), against a random one; toxicity profiled on 100 held-out prefixes." \
        --set "prompts={path: $OUT/rtp-train.jsonl, template: 'Continue this text: {prompt}'}" \
        --set "eval_prompts={path: $OUT/rtp-heldout.jsonl, template: 'Continue this text: {prompt}'}" \
        --set 'selection.objectives=[toxicity_profanity:min]' --set teachers.0.sampling.max_new_tokens=32 \
        --set profile.toxicity=true --set profile.k=5 --set profile.batch_size=20 \
        --set 'profile.sampling={temperature: 1.0, top_p: 0.9, max_new_tokens: 32}' ;;
    table)
      python3 "$(dirname "$0")/objectives_table.py" "$OUT" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
