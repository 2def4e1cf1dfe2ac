#!/usr/bin/env bash
# The built-in demo: train a tiny random-init Phi-3 on the bundled sample chat data (CPU, ~2 minutes),
# then evaluate it against its base and merge it into a standalone model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/offline_env.sh
RUN=${RUN:-runs/demo}
.venv/bin/phi3tune train configs/tiny.yaml --output-dir "$RUN" --overwrite
.venv/bin/phi3tune eval "$RUN" --compare-base
rm -rf "$RUN-merged"
.venv/bin/phi3tune merge-adapter "$RUN" "$RUN-merged"
.venv/bin/phi3tune chat "$RUN-merged" --prompt "Reverse these words: apple river stone" --max-new-tokens 12
