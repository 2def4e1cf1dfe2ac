#!/usr/bin/env python3
"""Benchmark `phi3tune export onnx` (int4, CPU) of a random-init Phi-3-mini, and CPU generation speed.

    source scripts/offline_env.sh && export PYTHONPATH=$PWD
    python scripts/bench_onnx.py --work /tmp/bench-onnx                # full size (32 layers): ~15 GB fp32 on disk
    python scripts/bench_onnx.py --work /tmp/bench-onnx --layers 8     # reduced depth, where RAM is short
    # the GPU machine's CPU (16 cores, 128 GiB): full size, results in $OUT, transformers held to 32 tokens
    python scripts/bench_onnx.py --work /tmp/bench-onnx --threads 16 --hf-new-tokens 32 --out $OUT

Steps, each in its own subprocess so its peak RAM (ru_maxrss from wait4) is its own:
  make       a random-init Phi-3-mini from the real config (``--layers`` overrides num_hidden_layers), fp32,
             saved as a merged-model folder (safetensors, tokenizer, generation config stopping at 32007/32000)
  export     `phi3tune export onnx MODEL OUT --precision int4 --device cpu --no-verify` through the CLI
             (verification would load the fp32 model a second time; its correctness is the test suite's job)
  ort        onnxruntime-genai on the export: one chat prompt, greedy, exactly --new-tokens tokens
  hf         transformers (fp32, sdpa: what `phi3tune chat` does on a CPU today) on the same weights, same
             prompt, exactly --hf-new-tokens tokens (default --new-tokens; fewer keeps the slow full-size fp32
             decode within a time budget)
Generation reports time to first token (prefill + one step) and decode tokens/s over the remaining tokens;
random weights never stop early because both sides are held to exactly their token count. Every step runs
on --threads threads (torch's intra-op threads; onnxruntime's intra_op_num_threads; OMP_NUM_THREADS).
Prints one JSON object per step and a markdown table at the end; with --out, also writes bench_onnx.json
(rewritten after every step, so a run cut short keeps what it measured) and bench_onnx.md there. A failed
ort or hf step is recorded and the other still runs.
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
from typing import Any

PHI3_ID = "microsoft/Phi-3-mini-4k-instruct"
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]


def _make(work: Path, layers: int, threads: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from phi3tune.model.loading import phi3_generation_config

    torch.set_num_threads(threads)
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


def _ort(work: Path, new_tokens: int, threads: int) -> dict:
    import onnxruntime_genai as og

    folder = work / "onnx-int4"
    prompt = _prompt_ids(folder)
    started = time.perf_counter()
    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
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
    return {"load_s": round(load, 2), "prompt_tokens": len(prompt), "new_tokens": count, "intra_op_threads": threads,
            "onnxruntime_genai": og.__version__, "first_token_s": round(first, 3), "decode_tokens_per_s": round((count - 1) / (total - first), 2)}


def _hf(work: Path, new_tokens: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
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


def _measure(argv: list[str], threads: int) -> dict:
    """Run one step in a subprocess; its wall time, peak RSS and the JSON it printed last.

    Raises:
        RuntimeError: The step exited non-zero (its last output in the message).
    """
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)  # stderr: live, into the log
    output = proc.stdout.read()  # read before waiting: a full pipe would block the step
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"step failed (exit {os.waitstatus_to_exitcode(status)}, {' '.join(argv)}; its "
                           f"messages are above):\n{output[-2000:]}")
    lines = [line for line in output.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    return {**result, "wall_s": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


def _size_gib(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**30, 3)


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _machine() -> dict[str, Any]:
    """What the numbers were measured on (CPU model, cores, RAM, library versions)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "usable_cores": _usable_cores(), "python": platform.python_version()}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        info["cpu"] = names[0] if names else None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():  # grows with use on some VMs: a reading, not the limit
        total = next((line.split()[1] for line in meminfo.read_text().splitlines() if line.startswith("MemTotal")), None)
        info["mem_total_gib_at_start"] = round(int(total) / 2**20, 1) if total else None
    for name in ("torch", "transformers", "onnxruntime", "onnxruntime-genai", "onnx", "onnx-ir"):
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            info[name] = None
    return info


def _table(results: dict[str, Any]) -> str:
    """The markdown table of whatever steps finished."""
    rows = []
    make, exp, ort, hf = (results.get(k) or {} for k in ("make", "export", "ort", "hf"))
    if "parameters" in make:
        rows.append(f"| model | random-init Phi-3-mini, {results['layers']} layers, {make['parameters'] / 1e9:.2f} B "
                    f"parameters, fp32 folder {make['folder_gib']} GiB (made in {make['wall_s']} s) |")
    if "wall_s" in exp:
        rows += [f"| export int4 (CPU, --no-verify): wall time | {exp['wall_s']} s |",
                 f"| export: peak RAM | {exp['peak_rss_gib']} GiB |",
                 f"| export folder size | {exp['folder_gib']} GiB |"]
    for name, label in ((ort, "onnxruntime-genai int4"), (hf, "transformers fp32")):
        if "decode_tokens_per_s" in name:
            rows.append(f"| {label}: first token / decode ({name['new_tokens']} tokens) | {name['first_token_s']} s / "
                        f"{name['decode_tokens_per_s']} tokens/s (load {name['load_s']} s, peak RAM {name['peak_rss_gib']} GiB) |")
    if "decode_tokens_per_s" in ort and "decode_tokens_per_s" in hf:
        rows.append(f"| decode speed-up | {ort['decode_tokens_per_s'] / hf['decode_tokens_per_s']:.1f}x |")
    rows += [f"| {step} | failed: {results[step]['error'].splitlines()[0]} |"
             for step in ("make", "export", "ort", "hf") if "error" in (results.get(step) or {})]
    machine = results["machine"]
    rows.append(f"| CPU | {machine.get('cpu')}, {results['threads']} threads ({machine['usable_cores']} usable cores) |")
    return "| what | value |\n| --- | --- |\n" + "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (the fp32 model is written here)")
    parser.add_argument("--layers", type=int, default=32, help="num_hidden_layers (Phi-3-mini: 32)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens onnxruntime-genai generates")
    parser.add_argument("--hf-new-tokens", type=int, help="tokens transformers generates (default: --new-tokens)")
    parser.add_argument("--threads", type=int, default=_usable_cores(), help="CPU threads for every step (default: "
                        "the usable cores, %(default)s here)")
    parser.add_argument("--out", type=Path, help="write bench_onnx.json and bench_onnx.md here")
    parser.add_argument("--step", choices=["make", "ort", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    hf_tokens = args.hf_new_tokens or args.new_tokens
    if min(args.new_tokens, hf_tokens) < 2:
        parser.error("--new-tokens and --hf-new-tokens must be at least 2 (first token + decode)")
    if args.step:
        result = {"make": lambda: _make(args.work, args.layers, args.threads),
                  "ort": lambda: _ort(args.work, args.new_tokens, args.threads),
                  "hf": lambda: _hf(args.work, hf_tokens, args.threads)}[args.step]()
        print(json.dumps(result), flush=True)
        return

    args.work.mkdir(parents=True, exist_ok=True)
    for name in ("model", "onnx-int4"):
        shutil.rmtree(args.work / name, ignore_errors=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, __file__, "--work", str(args.work), "--layers", str(args.layers), "--new-tokens",
          str(args.new_tokens), "--hf-new-tokens", str(hf_tokens), "--threads", str(args.threads)]
    results: dict[str, Any] = {"layers": args.layers, "threads": args.threads, "machine": _machine()}

    def record(step: str, value: dict) -> None:
        results[step] = value
        print(json.dumps({step: value}), flush=True)
        if args.out:  # after every step: a run cut short keeps what it measured
            (args.out / "bench_onnx.json").write_text(json.dumps(results, indent=2) + "\n")

    def run(step: str, argv: list[str], folder: Path | None = None) -> bool:
        try:
            value = _measure(argv, args.threads)
        except RuntimeError as exc:
            print(exc, file=sys.stderr, flush=True)
            record(step, {"error": str(exc)[-2000:]})
            return False
        record(step, {**value, **({"folder_gib": _size_gib(folder)} if folder else {})})
        return True

    export = [sys.executable, "-m", "phi3tune.cli", "export", "onnx", str(args.work / "model"), str(args.work / "onnx-int4"),
              "--precision", "int4", "--device", "cpu", "--no-verify"]
    built = run("make", me + ["--step", "make"], args.work / "model") and run("export", export, args.work / "onnx-int4")
    # A failed generation side is recorded; the other is still worth measuring.
    failed = not built or not all([run(step, me + ["--step", step]) for step in ("ort", "hf")])
    table = _table(results)
    print(json.dumps(results, indent=2))
    print("\n" + table)
    if args.out:
        (args.out / "bench_onnx.md").write_text(table)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
