"""`phi3tune train --dry-run`: the resolved plan, built from config files only (no weights, no data download)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from phi3tune import modeling


def _source(src: Any) -> str:
    if src is None:
        return "-"
    if getattr(src, "hub", None):
        name = f" ({src.name})" if getattr(src, "name", None) else ""
        return f"hub {src.hub}{name}, split {src.split}"
    return f"file {src.path}"


def print_plan(cfg: Any, console: Console) -> None:
    """Print model, data, LoRA targets, trainable-parameter estimate and effective batch size."""
    device = modeling.device_type()
    dtype = modeling.resolve_dtype(cfg.model.dtype, device, cfg.model.quantization)
    model_config = modeling.load_model_config(cfg.model)
    lora = modeling.build_lora_config(cfg.peft_config, modeling.leaf_module_names(model_config))
    trainable, total = modeling.estimate_lora_parameters(model_config, lora)
    tc = cfg.training_config
    batch = int(tc.get("per_device_train_batch_size", 8))
    accum = int(tc.get("gradient_accumulation_steps", 1))
    from phi3tune.speed import resolve_attn_implementation

    table = Table(title="phi3tune: dry run (nothing loaded, nothing written)", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    size = f"{total / 1e9:.2f}B" if total >= 1e8 else f"{total / 1e6:.1f}M"
    init = " (random init)" if cfg.model.random_init is not None else ""
    table.add_row("model", f"{cfg.model.name_or_path}{init}: {size} parameters, {model_config.num_hidden_layers} layers")
    table.add_row("device", f"{device}, {str(dtype).replace('torch.', '')}, attention "
                  f"{resolve_attn_implementation(cfg.model.attn_implementation, device)}"
                  + (f", {cfg.model.quantization} quantized" if cfg.model.quantization else ""))
    table.add_row("method", f"LoRA r={lora.r} alpha={lora.lora_alpha} dropout={lora.lora_dropout}")
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(sorted(lora.target_modules))
    table.add_row("targets", str(targets))
    table.add_row("trainable", f"{trainable:,} parameters ({100 * trainable / max(total, 1):.2f}% of the base)")
    table.add_row("train data", _source(cfg.data.train))
    eval_desc = _source(cfg.data.eval) if cfg.data.eval is not None else (
        f"{cfg.data.eval_fraction:.1%} of train" if cfg.data.eval_fraction else "none")
    table.add_row("eval data", eval_desc)
    table.add_row("loss on", cfg.data.loss_on)
    table.add_row("batch", f"{batch} per device x {accum} accumulation = {batch * accum} sequences per step")
    table.add_row("max_length", str(tc.get("max_length", 1024)))
    steps = tc.get("max_steps", -1)
    table.add_row("length", f"{steps} steps" if steps and steps > 0 else f"{tc.get('num_train_epochs', 3)} epochs")
    table.add_row("learning rate", f"{tc.get('learning_rate', 2e-5)} ({tc.get('lr_scheduler_type', 'linear')})")
    table.add_row("output", str(cfg.output_dir))
    console.print(table)
