"""GPU check of `phi3tune merge-adapter` on a full-size random-init Phi-3-mini (issue 3, acceptance 5).

    HF_HOME=.hf-home HF_HUB_OFFLINE=1 python scripts/merge_gpu_check.py --out /tmp/merge-check

Builds the real Phi-3-mini-4k-instruct architecture (3.8B parameters, random weights, bf16) from the
cached config, saves it as a base, makes two adapters with non-zero LoRA B (as if trained: r=16,
alpha=32, all-linear) — one recorded as a LoRA run, one as a QLoRA (4bit) run — and merges each with
``merge_and_save`` (verification on). Prints one JSON line per adapter: max |logit diff|, tolerance,
the adapter's own effect on the logits, and the time. No trl/bitsandbytes needed: the QLoRA adapter
is merged into the unquantized base either way, which is what this checks.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

PHI3_ID = "microsoft/Phi-3-mini-4k-instruct"


def build_base(out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(PHI3_ID)
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialising 3.8B parameters on the CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(PHI3_ID).save_pretrained(out)
    del model
    torch.cuda.empty_cache()


def build_adapter(base: Path, run: Path, quantization: str | None, seed: int) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).cuda()
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero; a trained adapter's is not
                param.normal_(0.0, 0.02)
    adapter = run / "adapter"
    peft_model.save_pretrained(adapter, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(adapter)
    (run / "run_config.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(base),
                                                                   "quantization": quantization}}))
    del peft_model, model
    torch.cuda.empty_cache()


def main() -> None:
    from rich.console import Console

    from phi3tune.merge import VERIFICATION_FILE, merge_and_save

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("/tmp/merge-check"))
    args = parser.parse_args()
    base = args.out / "base"
    started = time.perf_counter()
    build_base(base)
    print(json.dumps({"step": "base built", "seconds": round(time.perf_counter() - started, 1)}), flush=True)
    for name, quantization, seed in (("lora", None, 1), ("qlora", "4bit", 2)):
        run = args.out / f"run_{name}"
        build_adapter(base, run, quantization, seed)
        merged = args.out / f"merged_{name}"
        t0 = time.perf_counter()
        merge_and_save(run, merged, verify=True, console=Console(stderr=True))
        result = json.loads((merged / VERIFICATION_FILE).read_text())
        result.update(adapter=name, wall_seconds=round(time.perf_counter() - t0, 1),
                      gpu=torch.cuda.get_device_name(0),
                      shards=sorted(p.name for p in merged.glob("*.safetensors")))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
