"""QLoRA preparation on the fast path keeps norms in bf16 and honours the Trainer-only checkpointing keys."""

from __future__ import annotations


def test_prepare_kbit_model_accepts_the_trainer_only_checkpointing_keys() -> None:
    """Regression: every_n_layers was forwarded through torch.utils.checkpoint to the layers and ignored."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    from phi3tune.model.kbit import prepare_kbit_model

    config = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)
    model = prepare_kbit_model(Phi3ForCausalLM(config), True, {"use_reentrant": False, "every_n_layers": 2})
    model.train()
    out = model(input_ids=torch.randint(0, 64, (1, 8)), labels=torch.randint(0, 64, (1, 8)))
    assert torch.isfinite(out.loss)
    assert all(not p.requires_grad for p in model.parameters())
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, False, True, False]
