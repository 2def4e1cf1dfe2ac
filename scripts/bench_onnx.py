#!/usr/bin/env python3
"""Benchmark `phi3tune export onnx` (int4, CPU) of a random-init Phi-3-mini, and CPU generation speed.

    source scripts/offline_env.sh && export PYTHONPATH=$PWD
    python scripts/bench_onnx.py --work /tmp/bench-onnx                # full size (32 layers): ~15 GB fp32 on disk
    python scripts/bench_onnx.py --work /tmp/bench-onnx --layers 8     # reduced depth, where RAM is short

Steps, each in its own subprocess so its peak RAM (ru_maxrss from wait4) is its own:
  make       a random-init Phi-3-mini from the real config (``--layers`` overrides num_hidden_layers), fp32,
             saved as a merged-model folder (safetensors, tokenizer, generation config stopping at 32007/32000)
  export     `phi3tune export onnx MODEL OUT --precision int4 --device cpu --no-verify` through the CLI
             (verification would load the fp32 model a second time; its correctness is the test suite's job)
  ort        onnxruntime-genai on the export: one chat prompt, greedy, exactly --new-tokens tokens
  hf         transformers (fp32, sdpa) on the same weights, same prompt, same count (what `phi3tune chat` does
             on a CPU today)
Generation reports time to first token (prefill + one step) and decode tokens/s over the remaining tokens;
random weights never stop early because both sides are held to exactly --new-tokens tokens. Prints one
JSON object per step and a markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PHI3_ID = "microsoft/Phi-3-mini-4k-instruct"
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]


def _make(work: Path, layers: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from phi3tune.model.loading import phi3_generation_config

    config = AutoConfig.from_pretrained(PHI3_ID)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = work / "model"
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(PHI3_ID).save_pretrained(out)
    phi3_generation_config(config).save_pretrained(out)
    return {"parameters": sum(p.numel() for p in model.parameters())}


def _prompt_ids(folder: Path) -> list[int]:
    from phi3tune.model.chat_template import render_prompt
    from phi3tune.model.loading import load_tokenizer

    return render_prompt(load_tokenizer(str(folder)), PROMPT)


def _ort(work: Path, new_tokens: int) -> dict:
    import onnxruntime_genai as og

    folder = work / "onnx-int4"
    prompt = _prompt_ids(folder)
    started = time.perf_counter()
    model = og.Model(str(folder))
    load = time.perf_counter() - started
    params = og.GeneratorParams(model)
    # min_length holds the random model to exactly new_tokens tokens (it would otherwise stop at a random <|end|>).
    params.set_search_options(max_length=len(prompt) + new_tokens, min_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    started = time.perf_counter()
    generator.append_tokens(prompt)
    generator.generate_next_token()
    first = time.perf_counter() - started
    count = 1
    while not generator.is_done():
        generator.generate_next_token()
        count += 1
    total = time.perf_counter() - started
    return {"load_s": round(load, 2), "prompt_tokens": len(prompt), "new_tokens": count,
            "first_token_s": round(first, 3), "decode_tokens_per_s": round((count - 1) / (total - first), 2)}


def _hf(work: Path, new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    folder = work / "model"
    prompt = torch.tensor([_prompt_ids(folder)])
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    load = time.perf_counter() - started
    times = []

    class Clock:  # a streamer that only notes when each token arrives
        def put(self, value):
            times.append(time.perf_counter())

        def end(self):
            pass

    with torch.no_grad():
        started = time.perf_counter()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, streamer=Clock(),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=32000)
    count = out.shape[1] - prompt.shape[1]
    first = times[1] - started  # times[0] is the prompt being handed to the streamer
    return {"load_s": round(load, 2), "prompt_tokens": prompt.shape[1], "new_tokens": count, "torch_threads": torch.get_num_threads(),
            "first_token_s": round(first, 3), "decode_tokens_per_s": round((count - 1) / (times[-1] - times[1]), 2)}


def _measure(argv: list[str]) -> dict:
    """Run one step in a subprocess; its wall time, peak RSS and the JSON it printed last."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    output = proc.stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"step failed ({' '.join(argv)}):\n{output[-2000:]}")
    lines = [line for line in output.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    return {**result, "wall_s": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


def _size_gib(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**30, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (the fp32 model is written here)")
    parser.add_argument("--layers", type=int, default=32, help="num_hidden_layers (Phi-3-mini: 32)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--step", choices=["make", "ort", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        result = {"make": lambda: _make(args.work, args.layers), "ort": lambda: _ort(args.work, args.new_tokens),
                  "hf": lambda: _hf(args.work, args.new_tokens)}[args.step]()
        print(json.dumps(result), flush=True)
        return

    args.work.mkdir(parents=True, exist_ok=True)
    for name in ("model", "onnx-int4"):
        shutil.rmtree(args.work / name, ignore_errors=True)
    me = [sys.executable, __file__, "--work", str(args.work), "--layers", str(args.layers), "--new-tokens", str(args.new_tokens)]
    results = {"layers": args.layers, "cpu_count": os.cpu_count()}
    results["make"] = _measure(me + ["--step", "make"])
    results["make"]["folder_gib"] = _size_gib(args.work / "model")
    print(json.dumps({"make": results["make"]}), flush=True)
    export = [sys.executable, "-m", "phi3tune.cli", "export", "onnx", str(args.work / "model"), str(args.work / "onnx-int4"),
              "--precision", "int4", "--device", "cpu", "--no-verify"]
    results["export"] = _measure(export)
    results["export"]["folder_gib"] = _size_gib(args.work / "onnx-int4")
    print(json.dumps({"export": results["export"]}), flush=True)
    for step in ("ort", "hf"):
        results[step] = _measure(me + ["--step", step])
        print(json.dumps({step: results[step]}), flush=True)
    print(json.dumps(results, indent=2))
    make, exp, ort, hf = results["make"], results["export"], results["ort"], results["hf"]
    print(f"""
| what | value |
| --- | --- |
| model | random-init Phi-3-mini, {args.layers} layers, {make['parameters'] / 1e9:.2f} B parameters, fp32 folder {make['folder_gib']} GiB |
| export int4 (CPU, --no-verify): wall time | {exp['wall_s']} s |
| export: peak RAM | {exp['peak_rss_gib']} GiB |
| export folder size | {exp['folder_gib']} GiB |
| onnxruntime-genai int4: first token / decode | {ort['first_token_s']} s / {ort['decode_tokens_per_s']} tokens/s (peak RAM {ort['peak_rss_gib']} GiB) |
| transformers fp32: first token / decode | {hf['first_token_s']} s / {hf['decode_tokens_per_s']} tokens/s (peak RAM {hf['peak_rss_gib']} GiB) |
| decode speed-up | {ort['decode_tokens_per_s'] / hf['decode_tokens_per_s']:.1f}x |
""")


if __name__ == "__main__":
    main()
