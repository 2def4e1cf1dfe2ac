"""Issue 13's rows of scripts/bench.py: how long `phi3tune eval --generate` takes, against the old sequential path.

Setup, shared by every gen-* row of one call: bench.py's random-init base (full-size Phi-3-mini on a GPU), a
LoRA adapter on it (r=16, all-linear, random non-zero B so adapter and base answer differently), saved once,
and two run folders around it: `gen-run-lora/` and `gen-run-qlora/` (its run_config.yaml says
`model.quantization: 4bit`, so eval loads the base in 4-bit as for a QLoRA run). Eval data: 200 synthetic
chats (bench.py's generator, seed 7), the prompts being their user turns.

- gen-lora / gen-qlora: `phi3tune eval RUN --data CHATS --generate --compare-base --max-new-tokens 256
  --max-samples 200` in-process through the CLI. Reported: the generation seconds after loading (adapter +
  base, from eval_metrics.json's `generation` section), tokens/s, the batch size eval chose, eval's whole wall.
- gen-sequential / gen-qlora-sequential: the pre-issue-13 path on the same prompts and the same budget: one
  `model.generate` per prompt with the adapter unmerged, then with `disable_adapter()`, on the first
  --gen-sequential-samples prompts; the seconds are extrapolated linearly to all 200 (the path has no
  batch effects, and measuring all of it would take most of an hour).

A random model never stops, so every answer runs the full 256 tokens: the worst case for both paths.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _eval_chats(ctx: dict, n: int) -> Path:
    from transformers import AutoTokenizer

    from bench import PHI3_ID, synthetic_chats

    path = Path(ctx["tmp"]) / f"gen-chats-{n}-{ctx['max_length']}.jsonl"
    if not path.is_file():
        rows = synthetic_chats(n, seed=7, tokenizer=AutoTokenizer.from_pretrained(PHI3_ID), cap=ctx["max_length"])
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _adapter(ctx: dict) -> Path:
    """A random LoRA adapter on the bench base, built once per call."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(ctx["tmp"]) / "gen-adapter"
    if (out / "adapter_model.safetensors").is_file():
        return out
    device = ctx["device"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(ctx["base"], dtype=dtype).to(device)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(ctx["base"]).save_pretrained(out)
    del model, base
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def _run_folder(ctx: dict, quant: str | None) -> Path:
    import yaml

    run = Path(ctx["tmp"]) / f"gen-run-{'qlora' if quant else 'lora'}"
    if not (run / "adapter" / "adapter_model.safetensors").is_file():
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        shutil.copytree(_adapter(ctx), run / "adapter")
        model = {"name_or_path": ctx["base"], **({"quantization": quant} if quant else {})}
        config = {"model": model, "training_config": {"max_length": ctx["max_length"]},
                  "resolved": {"dtype": "bfloat16" if ctx["device"] == "cuda" else "float32"}}
        (run / "run_config.yaml").write_text(yaml.safe_dump(config))
    return run


def _sizes(spec: dict, ctx: dict) -> tuple[int, int]:
    # On a CPU the row only checks the script end to end.
    return (8, 16) if ctx.get("gen_smoke") else (spec["samples"], spec["max_new_tokens"])


def _batched(spec: dict, ctx: dict, run: Path, chats: Path, samples: int, max_new: int) -> dict:
    from phi3tune.cli import app

    out = Path(ctx["tmp"]) / f"{spec['name']}-eval" / "eval_metrics.json"
    shutil.rmtree(out.parent, ignore_errors=True)
    argv = ["eval", str(run), "--data", str(chats), "--generate", "--compare-base", "--max-new-tokens", str(max_new),
            "--max-samples", str(samples), "--output", str(out)]
    try:
        app(argv, standalone_mode=False)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    metrics = json.loads(out.read_text())
    gen = metrics["generation"]
    seconds = gen["adapter"]["seconds"] + gen["base"]["seconds"]
    tokens = sum(gen[t]["mean_new_tokens"] * gen[t]["n_samples"] for t in ("adapter", "base"))
    return {
        "argv": argv, "samples": gen["adapter"]["n_samples"], "max_new_tokens": max_new,
        "generation_seconds": round(seconds, 2), "generation_tokens_per_second": round(tokens / seconds, 1),
        "batch_size": gen["adapter"]["batch_size"], "adapter_merged": gen["settings"]["adapter_merged"],
        "adapter": gen["adapter"], "base": gen["base"], "eval_seconds_after_loading": metrics["seconds"],
    }


def _sequential(spec: dict, ctx: dict, run: Path, chats: Path, samples: int, max_new: int) -> dict:
    """The pre-issue-13 `evaluate.generations` loop: one unpadded generate per prompt, adapter then base."""
    import torch

    from phi3tune.data.evaluation import load_eval_dataset
    from phi3tune.evaluation.answers import prompts_of
    from phi3tune.model import loading
    from phi3tune.model.targets import load_for_inference, resolve_target

    target = resolve_target(str(run), allow_hub=False)
    model, tokenizer = load_for_inference(target, device=ctx["device"])
    dataset, _ = load_eval_dataset(target, tokenizer, data=chats)
    prompts = prompts_of(dataset.select(range(min(samples, len(dataset)))), tokenizer.convert_tokens_to_ids("<|assistant|>"))
    measured = max(2, int(ctx["gen_sequential_samples"] * spec.get("sequential_share", 1.0)))
    device = next(model.parameters()).device

    @torch.no_grad()
    def greedy(prompt: list[int]) -> int:
        ids = torch.tensor([prompt], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                             eos_token_id=list(loading.PHI3_STOP_IDS), pad_token_id=loading.PHI3_EOS_ID)
        return out.shape[1] - len(prompt)

    tokens = 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for prompt in prompts.prompts[:measured]:
        tokens += greedy(prompt)
        with model.disable_adapter():
            tokens += greedy(prompt)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    n = len(prompts.prompts)
    return {
        "samples": n, "max_new_tokens": max_new, "measured_samples": min(measured, n),
        "measured_seconds": round(seconds, 2), "generation_tokens_per_second": round(tokens / seconds, 1),
        "generation_seconds": round(seconds * n / min(measured, n), 1), "batch_size": 1,
        "extrapolated": f" (extrapolated from {min(measured, n)})",
    }


def run_generation_row(spec: dict, ctx: dict) -> dict:
    """One gen-* row (called by bench.py's run_row in the row's own subprocess)."""
    import torch

    samples, max_new = _sizes(spec, ctx)
    if spec.get("quant") and ctx["device"] != "cuda":
        raise SystemExit(f"{spec['name']}: a 4-bit base needs a GPU")
    run = _run_folder(ctx, spec.get("quant"))
    chats = _eval_chats(ctx, samples)
    if ctx["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    measure = _batched if spec["via"] == "generate" else _sequential
    out = {"row": spec["name"], "spec": spec, **measure(spec, ctx, run, chats, samples, max_new)}
    out["wall_seconds"] = round(time.perf_counter() - started, 1)
    if ctx["device"] == "cuda":
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out
