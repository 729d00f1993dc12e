"""Per-layer activation capture for one probe forward of a (peft-wrapped) transformers Llama.

Attention probabilities: during the probe only, the decoder's config is flipped to the "eager"
attention implementation, whose attention function always returns the softmax probabilities
as the second output of `self_attn`; a forward hook on `self_attn` reads them and hands them to
the analysis at once. We do not pass `output_attentions=True`, so transformers does not keep
all L maps until the end of the forward. Re-deriving softmax(QK^T) from captured Q/K would need
RoPE (applied by a plain function, not a module, so not hookable), GQA and scaling re-implemented
per model; the eager path reuses the model's own code and equals `output_attentions` exactly.
The previous implementation (sdpa / flash) is restored on exit, even after an exception.

Only activations are read (never weights), so this works when parameters are partitioned by
DeepSpeed ZeRO-3: the forward itself gathers them, hence every rank must run the probe.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LayerCapture:
    """Activations of one decoder block for the probe batch (shapes: B batch, T tokens, D width)."""

    layer: int
    attn_probs: torch.Tensor
    """[B, H, T, T] attention probabilities (rows = queries), as the eager attention computes them."""
    attn_out: torch.Tensor
    """[B, T, D] what attention adds to the residual stream (the o_proj output)."""
    mlp_out: torch.Tensor
    """[B, T, D] what the MLP adds to the residual stream (the down_proj output)."""
    resid: torch.Tensor
    """[B, T, D] H^l: residual stream after the block (not the final-normed state for the last layer)."""


def find_decoder(llm: nn.Module) -> nn.Module:
    """The module holding `.layers` (LlamaModel) inside a LlamaForCausalLM, possibly peft-wrapped."""
    model = llm
    while isinstance(getattr(model, "module", None), nn.Module):  # DeepSpeedEngine / DDP wrappers
        model = model.module
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    for _ in range(4):  # ForCausalLM.model -> LlamaModel; tolerate one more wrapper level
        if isinstance(getattr(model, "layers", None), nn.ModuleList):
            return model
        inner = getattr(model, "model", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    raise TypeError(f"cannot find decoder layers (.model.layers) in {type(llm).__name__}")


def _configs(module: nn.Module) -> list:
    """Distinct transformers configs referenced by the module tree (attention reads its own)."""
    seen: dict[int, object] = {}
    for m in module.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def _set_attn_impl(cfg, value) -> None:
    # The internal attribute avoids the setter's recursion into sub-configs and any re-validation.
    if hasattr(cfg, "_attn_implementation_internal"):
        cfg._attn_implementation_internal = value
    else:
        cfg._attn_implementation = value


@contextmanager
def eager_attention(module: nn.Module) -> Iterator[None]:
    """Temporarily switch every config in `module` to eager attention; always restore."""
    saved = [(cfg, cfg._attn_implementation) for cfg in _configs(module)]
    try:
        for cfg, _ in saved:
            _set_attn_impl(cfg, "eager")
        yield
    finally:
        for cfg, prev in saved:
            _set_attn_impl(cfg, prev)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """eval() for the probe (no dropout, no activation checkpointing), then restore each module's own flag."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def capture_layers(
    llm: nn.Module,
    on_layer: Callable[[LayerCapture], None],
    layers: Sequence[int] | None = None,
) -> Iterator[nn.Module]:
    """Hook the chosen decoder layers; yield the decoder module to call (see `probe_forward`).

    `on_layer` is called once per hooked layer, as soon as the block has finished, so the caller
    can reduce the maps right away and drop them. Everything is undone on exit: hooks removed,
    attention implementation and train/eval flags restored.
    """
    decoder = find_decoder(llm)
    blocks = decoder.layers
    wanted = range(len(blocks)) if layers is None else layers
    pending: dict[int, dict[str, torch.Tensor]] = {}
    handles = []

    def attn_hook(idx: int):
        def hook(_module, _args, output):
            if not isinstance(output, (tuple, list)) or len(output) < 2 or output[1] is None:
                raise RuntimeError(
                    f"layer {idx}: self_attn returned no attention probabilities; "
                    "the model does not honour config._attn_implementation='eager'"
                )
            pending[idx] = {"attn_out": output[0].detach(), "attn_probs": output[1].detach()}

        return hook

    def mlp_hook(idx: int):
        def hook(_module, _args, output):
            pending.setdefault(idx, {})["mlp_out"] = _first(output).detach()

        return hook

    def block_hook(idx: int):
        def hook(_module, _args, output):
            parts = pending.pop(idx, {})
            missing = {"attn_out", "attn_probs", "mlp_out"} - parts.keys()
            if missing:
                raise RuntimeError(f"layer {idx}: hooks did not capture {sorted(missing)}")
            on_layer(LayerCapture(layer=idx, resid=_first(output).detach(), **parts))

        return hook

    try:
        for idx in wanted:
            block = blocks[idx]
            mlp = block.mlp
            mlp_proj = getattr(mlp, "down_proj", mlp)  # Llama: down_proj output == mlp output
            handles.append(block.self_attn.register_forward_hook(attn_hook(idx)))
            handles.append(mlp_proj.register_forward_hook(mlp_hook(idx)))
            handles.append(block.register_forward_hook(block_hook(idx)))
        with eval_mode(llm), eager_attention(decoder):
            yield decoder
    finally:
        for h in handles:
            h.remove()
        pending.clear()


@torch.no_grad()
def probe_forward(decoder: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Run the decoder stack only (no LM head: the logits are not needed and are the largest tensor)."""
    decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
