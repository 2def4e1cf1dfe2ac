#!/usr/bin/env bash
# Download (here, with PyPI) the Python 3.12 wheels that the GPU machine lacks, and copy the tokenizer cache
# (../shared/hf-home -> .hf-home). All three folders are git-ignored.
#   bash scripts/gpu_wheels.sh        .whl/       device run ... carry: [".whl", ".hf-home"]
#   bash scripts/gpu_wheels.sh onnx   .whl-onnx/ as well: everything `export onnx` needs on the GPU machine
#       (tests/test_export.py's GPU test, scripts/bench_onnx.py): the onnx extra, pytest and the training
#       wheels, without the eval-metric and Liger ones, recompressed (LZMA) so that the tree, .whl-onnx and
#       .hf-home stay under the device tool's 64 MiB:  carry: [".whl-onnx", ".hf-home"]  (not .whl)
# On the GPU (.whl-onnx/*.whl for the onnx set):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD HF_HOME=$PWD/.hf-home HF_HUB_OFFLINE=1
set -euo pipefail
cd "$(dirname "$0")/.."
variant="${1:-}"
case "$variant" in ""|onnx) ;; *) echo "usage: $0 [onnx]" >&2; exit 2 ;; esac
download() {  # download DIR NAME==VERSION...
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$@"
}
pkgs=(accelerate==1.15.0 annotated-doc==0.0.7 annotated-types==0.8.0 bitsandbytes==0.50.2 click==8.5.1
      datasets==5.2.0 dill==0.4.1 fsspec==2026.9.0 huggingface-hub==1.33.0 liger-kernel==0.8.5
      multiprocess==0.70.19 peft==0.21.2 pydantic==2.14.4 pydantic-core==2.50.5 regex==2026.11.19
      safetensors==0.8.0 tokenizers==0.23.3 transformers==5.17.0 trl==1.16.0 typer==0.29.2
      typing-inspection==0.4.5
      sacrebleu==2.6.0 portalocker==4.4.2 tabulate==0.10.0 colorama==0.4.6 lxml==6.1.3
      absl-py==2.5.1 nltk==3.10.4 six==1.17.0 joblib==1.6.0)
download .whl "${pkgs[@]}"
# rouge-score is published as a source archive only: build its (pure-Python) wheel here.
python3 -m pip wheel -q --no-deps -w .whl rouge-score==0.1.2

# repack.py [--lzma] [--drop REGEX] WHEEL...: rewrite wheels without the members REGEX matches (pip does not
# check a wheel's RECORD against its members), LZMA-compressed with --lzma (pip unpacks those with Python's
# zipfile: no tool is needed on the GPU machine).
repack() {
  python3 - "$@" <<'PY'
import argparse, os, re, zipfile
parser = argparse.ArgumentParser()
parser.add_argument("--lzma", action="store_true")
parser.add_argument("--drop", default=r"(?!)")
parser.add_argument("wheels", nargs="+")
args = parser.parse_args()
drop = re.compile(args.drop)
for path in args.wheels:
    tmp = path + ".tmp"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if drop.search(item.filename):
                continue
            data = src.read(item.filename)
            if args.lzma:
                item.compress_type = zipfile.ZIP_LZMA
            dst.writestr(item, data)  # the member's ZipInfo: its permissions and compression travel with it
    os.replace(tmp, path)
PY
}
# The GPU image runs CUDA 13: keep bitsandbytes' cuda13x and cpu libraries only (43 MB -> ~9 MB), so the
# carried tree stays under the device tool's 64 MiB.
repack --drop '(^|/)libbitsandbytes_(?!cuda13|cpu)' .whl/bitsandbytes-*.whl
[ -d .hf-home ] || cp -r ../shared/hf-home .hf-home

if [ "$variant" = onnx ]; then
  rm -rf .whl-onnx && mkdir .whl-onnx
  # The onnx extra at constraints.txt's versions (the image's onnxruntime 1.30 is older than onnxruntime-genai
  # 0.18 needs), their compiled needs, and pytest; ml-dtypes 0.7 needs numpy>=2 (the image has 2.x).
  download .whl-onnx onnxruntime-genai==0.18.0 onnxruntime==1.32.0 onnx==1.23.2 onnx-ir==1.1.0 \
    ml-dtypes==0.7.0 protobuf==7.36.2 flatbuffers==25.12.19 pytest==8.4.2 iniconfig==2.1.0 pluggy==1.6.0
  # The training wheels; not the eval metrics' (sacrebleu, rouge-score, nltk, lxml, ...) nor liger-kernel.
  for w in .whl/*.whl; do
    case "$(basename "$w")" in
      liger_kernel-*|sacrebleu-*|portalocker-*|tabulate-*|colorama-*|lxml-*|absl_py-*|nltk-*|six-*|joblib-*|rouge_score-*) ;;
      *) cp "$w" .whl-onnx/ ;;
    esac
  done
  # onnx's backend test data (5 MB) is never imported; the image's torch is cu130, so bitsandbytes' cuda130
  # library is the one it loads. LZMA takes ~1.5 min here and shrinks the set by ~25%.
  repack --lzma --drop '^onnx/backend/test/data/|(^|/)libbitsandbytes_cuda13[1-9]' .whl-onnx/*.whl
  # Requires-Dist of the set that it does not satisfy itself: these must come from the GPU image
  # (docs: all of them are in its package list).
  python3 - <<'PY'
import glob, re, zipfile
from pip._vendor.packaging.requirements import Requirement
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython", "extra": ""}
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
have, needs = set(), {}
for path in glob.glob(".whl-onnx/*.whl"):
    with zipfile.ZipFile(path) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    have.add(norm(re.search(r"^Name: (.+)$", meta, re.M).group(1).strip()))
    for line in re.findall(r"^Requires-Dist: (.+)$", meta, re.M):
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            needs.setdefault(norm(req.name), set()).add(f"{req.specifier}" or "any")
print("from the GPU image:", ", ".join(f"{n} {' '.join(sorted(s))}" for n, s in sorted(needs.items()) if n not in have))
PY
fi

du -sh .whl .hf-home $([ "$variant" = onnx ] && echo .whl-onnx)
# What a device run carries: the working tree (tracked and untracked-not-ignored files) and the carried folders.
carried=(.hf-home); [ "$variant" = onnx ] && carried+=(.whl-onnx) || carried+=(.whl)
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
total=$(( tree + $(du -sb "${carried[@]}" | awk '{s+=$1} END {print s}') ))
echo "device run carrying ${carried[*]}: $(( total / 1048576 )) MiB of the 64 MiB limit (tree $(( tree / 1048576 )) MiB)"
[ "$total" -le $(( 64 * 1048576 )) ] || { echo "over the limit: carry less" >&2; exit 1; }
