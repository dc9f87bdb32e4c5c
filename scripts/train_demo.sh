#!/usr/bin/env bash
# Retrains the demo model (convert/demo_model) as the committed one was made (docs/design.md §10):
# stages 1-2 into a checkpoint, stage 3 from it into another, stage 4 from that, then stage 5.
# About 2 h 50 min on 2 CPU cores.
#     scripts/train_demo.sh OUT_DIR          # then: cp OUT_DIR/* convert/demo_model/
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/train_demo.sh OUT_DIR}
stages12="$out.stages-1-2" stage3="$out.stage-3" stage4="$out.stage-4"
later="--stage3-steps 0 --stage4-steps 0 --stage5-steps 0"
.venv/bin/python -m owl2_edge.convert.train_demo "$stages12" $later --eval-per-type 0
.venv/bin/python -m owl2_edge.convert.train_demo "$stage3" --init "$stages12" \
    --stage1-steps 0 --stage2-steps 0 --stage4-steps 0 --stage5-steps 0 --eval-per-type 0
.venv/bin/python -m owl2_edge.convert.train_demo "$stage4" --init "$stage3" \
    --stage1-steps 0 --stage2-steps 0 --stage3-steps 0 --stage5-steps 0 --eval-per-type 0
.venv/bin/python -m owl2_edge.convert.train_demo "$out" --init "$stage4" \
    --stage1-steps 0 --stage2-steps 0 --stage3-steps 0 --stage4-steps 0
