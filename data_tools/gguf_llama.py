"""A Llama-architecture GGUF file -> a standard transformers Llama folder (fp32 safetensors).

transformers (with the `gguf` package) dequantises a GGUF to fp32 in `from_pretrained(folder,
gguf_file=...)`, but the model it returns keeps a GGUF quantization config and `save_pretrained`
refuses it. Its state dict copied into a plain `LlamaForCausalLM` built from the same config,
minus `quantization_config`, saves normally and gives identical logits (checked here).
"""
from __future__ import annotations

from pathlib import Path

import torch

LLAMA_ARCHITECTURES = ("llama",)
# A fixed check prompt: a few ordinary tokens after the chosen BOS.
CHECK_TEXT = "The capital of France is Paris, and the capital of Italy is"


def gguf_architecture(path: Path) -> str:
    """general.architecture of a GGUF file; a clear error naming the file if it is not one."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
    except KeyError:
        raise ValueError(f"{path}: GGUF file without general.architecture") from None
    except Exception as err:               # gguf raises ValueError / struct errors on foreign bytes
        raise ValueError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None
    return str(field.contents())


def load_gguf_llama(path: Path):
    """(model, tokenizer) as transformers loads them from the GGUF (dequantised, fp32, eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = gguf_architecture(path)
    if arch not in LLAMA_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture is {arch!r}, not a Llama model ({'/'.join(LLAMA_ARCHITECTURES)})")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def plain_llama(gguf_model):
    """The same weights in a LlamaForCausalLM without GGUF quantization config (so it can be saved)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    raw = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        raw.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**raw)).to(torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    return model.eval()


def check_ids(tokenizer, bos_id: int) -> torch.Tensor:
    return torch.tensor([[bos_id] + tokenizer(CHECK_TEXT, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def logits_max_diff(a, b, ids: torch.Tensor) -> float:
    return float((a(ids).logits - b(ids).logits).abs().max())


def convert_gguf_llama(path: Path, out_dir: Path, bos_token: str) -> dict:
    """Write the converted model and tokenizer to out_dir (which must not exist) and check that the
    saved folder, loaded back by transformers, gives the GGUF model's logits exactly.
    bos_token: the token the prompt starts with; set as the tokenizer's BOS (see pretrained.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    gguf_model, tokenizer = load_gguf_llama(path)
    bos_id = tokenizer.convert_tokens_to_ids(bos_token)
    if bos_id is None or (bos_id == tokenizer.unk_token_id and bos_token != tokenizer.unk_token):
        raise ValueError(f"{path}: the tokenizer has no token {bos_token!r} to use as BOS")
    tokenizer.bos_token = bos_token
    model = plain_llama(gguf_model)
    model.config.bos_token_id = bos_id
    model.generation_config.bos_token_id = bos_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

    reloaded = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32, local_files_only=True).eval()
    tok2 = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    ids = check_ids(tok2, tok2.bos_token_id)
    if not torch.equal(ids, check_ids(tokenizer, bos_id)):
        raise ValueError(f"{out_dir}: the saved tokenizer encodes the check text differently from the GGUF's")
    diff = logits_max_diff(gguf_model, reloaded, ids)
    if diff != 0.0:
        raise ValueError(f"{out_dir}: converted logits differ from the GGUF model's by up to {diff:g}")
    cfg = reloaded.config
    return {"architecture": "llama", "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
            "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size,
            "bos_token": bos_token, "bos_token_id": int(bos_id), "check_tokens": ids.shape[1],
            "logits_max_abs_diff": diff}
