"""The LLM: a local transformers causal LM or a tiny Llama, frozen, with LoRA adapters (peft)."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from .config import ModelConfig
from .tokenizer import SpecialTokenIds

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tiny_llama_config(cfg: ModelConfig, vocab_size: int, specials: SpecialTokenIds) -> LlamaConfig:
    heads = cfg.tiny.llm_heads
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.tiny.llm_width, intermediate_size=cfg.tiny.llm_ffn,
        num_hidden_layers=cfg.tiny.llm_layers, num_attention_heads=heads,
        num_key_value_heads=2 if heads % 2 == 0 else heads, max_position_embeddings=4096,
        bos_token_id=specials.bos, eos_token_id=specials.eos, pad_token_id=specials.pad,
        tie_word_embeddings=False, initializer_range=cfg.tiny.llm_init_std,
    )


def load_llm(cfg: ModelConfig, vocab_size: int, specials: SpecialTokenIds) -> PreTrainedModel:
    """Pretrained from cfg.llm_path (hub name or folder) or tiny; embeddings resized to the tokenizer.
    Under ZeRO-3 (an HfDeepSpeedConfig alive) transformers partitions the weights as it loads."""
    if cfg.llm_path is None:
        model = LlamaForCausalLM._from_config(tiny_llama_config(cfg, vocab_size, specials),
                                              attn_implementation=cfg.llm_attn_implementation)
    else:
        from .hub import local_folder

        model = AutoModelForCausalLM.from_pretrained(
            local_folder(cfg.llm_path, cfg.llm_revision), dtype=DTYPES[cfg.load_dtype], local_files_only=True,
            attn_implementation=cfg.llm_attn_implementation)
        old_rows = model.get_input_embeddings().num_embeddings
        if old_rows < vocab_size:
            model.resize_token_embeddings(vocab_size, mean_resizing=False)
            set_new_rows_to_mean(model, old_rows)
    model.config.pad_token_id = specials.pad
    model.generation_config.pad_token_id = specials.pad
    model.requires_grad_(False)
    return model


@torch.no_grad()
def set_new_rows_to_mean(model: PreTrainedModel, old_rows: int) -> None:
    """Rows added for the new special tokens = mean of the pretrained rows, in the input and the
    output embedding. Deterministic (transformers' mean_resizing samples them randomly), so a model
    rebuilt from the same checkpoint has the same frozen base and adapters can be saved without the
    embedding tables. The input rows are never used as such (prompt.py overrides them) and the model
    is never asked to emit these tokens; the output rows only enter the softmax normaliser."""
    tables = {id(t.weight): t.weight for t in (model.get_input_embeddings(), model.get_output_embeddings())
              if t is not None}
    weights = list(tables.values())
    from .loading import is_partitioned

    gather = nullcontext()
    if any(is_partitioned(t) for t in (model.get_input_embeddings(), model.get_output_embeddings()) if t is not None):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(weights, modifier_rank=0)
    with gather:
        for w in weights:
            w[old_rows:] = w[:old_rows].float().mean(0).to(w.dtype)


def add_lora(model: PreTrainedModel, cfg: ModelConfig) -> PeftModel:
    """Wrap with LoRA on cfg.lora_targets; only the adapters are trainable. Done outside zero.Init:
    peft initialises lora_B to zero after construction, which a partitioned tensor would ignore."""
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    if cfg.llm_gradient_checkpointing:
        peft_model.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    return peft_model


def llm_hidden_size(cfg) -> int:
    """The LLM width, without building it (the DeepSpeed bucket sizes depend on it)."""
    if cfg.llm_path is None:
        return cfg.tiny.llm_width
    import json

    from .hub import local_folder

    config_file = Path(local_folder(cfg.llm_path, cfg.llm_revision)) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model.llm_path {cfg.llm_path}: no config.json (a transformers model folder)")
    raw = json.loads(config_file.read_text())
    return int(raw.get("hidden_size") or raw["text_config"]["hidden_size"])
