# Source me. Without internet, point HF_HOME at a writable copy of ../shared/hf-home (the real Phi-3
# tokenizer and config, no weights) and go offline. With HF_HOME already set, nothing changes.
if [ -z "${HF_HOME:-}" ]; then
  _repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  _shared="${PHI3TUNE_SHARED:-$_repo/../shared}/hf-home"
  if [ -d "$_shared" ]; then
    export HF_HOME="$_repo/.hf-home"
    mkdir -p "$HF_HOME" && cp -rn "$_shared/." "$HF_HOME/" 2>/dev/null || true
    chmod -R u+w "$HF_HOME" 2>/dev/null || true
    export HF_HUB_OFFLINE=1
  fi
fi
