#!/usr/bin/env bash
# Download (here, with PyPI) the Python 3.12 wheels that the GPU machine lacks into .whl/, for
#   device run ... carry: [".whl", ".hf-home"]
# and on the GPU:  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#                  export PYTHONPATH=/tmp/site:. HF_HOME=.hf-home HF_HUB_OFFLINE=1
# Also copy the tokenizer cache: cp -r ../shared/hf-home .hf-home  (both folders are git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=(accelerate==1.15.0 annotated-doc==0.0.7 annotated-types==0.8.0 bitsandbytes==0.50.2 click==8.5.1
      datasets==5.2.0 dill==0.4.1 fsspec==2026.9.0 huggingface-hub==1.33.0 liger-kernel==0.8.5
      multiprocess==0.70.19 peft==0.21.2 pydantic==2.14.4 pydantic-core==2.50.5 regex==2026.11.19
      safetensors==0.8.0 tokenizers==0.23.3 transformers==5.17.0 trl==1.16.0 typer==0.29.2
      typing-inspection==0.4.5
      sacrebleu==2.6.0 portalocker==4.4.2 tabulate==0.10.0 colorama==0.4.6 lxml==6.1.3
      absl-py==2.5.1 nltk==3.10.4 six==1.17.0 joblib==1.6.0)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${pkgs[@]}"
# rouge-score is published as a source archive only: build its (pure-Python) wheel here.
python3 -m pip wheel -q --no-deps -w .whl rouge-score==0.1.2
# The GPU image runs CUDA 13: keep bitsandbytes' cuda13x and cpu libraries only (43 MB -> ~9 MB), so the
# carried tree stays under the device tool's 64 MiB.
python3 - <<'PY'
import glob, os, zipfile
for path in glob.glob(".whl/bitsandbytes-*.whl"):
    tmp = path + ".tmp"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            name = os.path.basename(item.filename)
            if name.startswith("libbitsandbytes_") and not (name.startswith("libbitsandbytes_cuda13") or "cpu" in name):
                continue
            dst.writestr(item, src.read(item.filename))
    os.replace(tmp, path)
PY
[ -d .hf-home ] || cp -r ../shared/hf-home .hf-home
du -sh .whl .hf-home
