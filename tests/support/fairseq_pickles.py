"""Checkpoint pickles as fairseq writes them, for the AV-HuBERT loader's tests.

fairseq's config enums are `StrEnum`s made by `ChoiceEnum` (fairseq/dataclass/constants.py); new-style
checkpoints pickle the hydra config as an omegaconf `DictConfig` under "cfg", old-style ones an argparse
`Namespace` under "args"; fine-tuned models keep the pretrained model's config in `w2v_args`
(av_hubert's hubert_asr.py). Only the real omegaconf builds the DictConfig here.
"""
from __future__ import annotations

import argparse
from enum import Enum

import numpy as np
import torch


class StrEnum(str, Enum):
    def __str__(self):
        return self.value


def ChoiceEnum(choices):            # noqa: N802 - fairseq's name
    return StrEnum("Choices", {k: k for k in choices})


Choices = ChoiceEnum(["default", "layer_norm"])      # the module-level name pickle records


def avhubert_model_section(width: int, layers: int, ffn: int, heads: int, layer_norm_first: bool,
                           conv_pos: int, conv_pos_groups: int) -> dict:
    """The fields of av_hubert's AVHubertConfig that shape the encoder, with the neighbours fairseq
    writes next to them (an enum, an interpolation)."""
    return {
        "_name": "av_hubert", "extractor_mode": Choices.default, "label_rate": "${task.label_rate}",
        "encoder_layers": layers, "encoder_embed_dim": width, "encoder_ffn_embed_dim": ffn,
        "encoder_attention_heads": heads, "layer_norm_first": layer_norm_first, "conv_pos": conv_pos,
        "conv_pos_groups": conv_pos_groups, "modality_fuse": "concat", "resnet_relu_type": "prelu",
        "dropout": 0.1, "latent_temp": [2.0, 0.5, 0.999995],
    }


def new_style(path, state: dict, model: dict, finetuned: str | None = None):
    """cfg = DictConfig(common, task, model); finetuned "seq2seq"/"ctc": the AV-HuBERT section nested
    as model.w2v_args.model of a fine-tuning config."""
    from omegaconf import OmegaConf

    task = {"_name": "av_hubert_pretraining", "label_rate": 25, "normalize": True}
    if finetuned:
        model = {"_name": f"av_hubert_{finetuned}", "w2v_path": "/pt/large_vox_iter5.pt",
                 "mask_selection": Choices.default, "w2v_args": {"task": task, "model": model}}
    cfg = OmegaConf.create({"common": {"seed": 1337, "fp16": True}, "task": task, "model": model})
    extra = {"best_loss": np.float64(3.25), "epoch": np.int64(40)}      # numpy scalars, as fairseq keeps them
    torch.save({"args": None, "cfg": cfg, "model": state, "optimizer_history": [], "extra_state": extra}, path)
    return path


def old_style(path, state: dict, model: dict):
    """args = argparse.Namespace with the model's fields flat, as fairseq wrote before hydra (numpy
    scalars among them, where a value came from numpy)."""
    model = dict(model, dropout=np.float64(model["dropout"]), encoder_layers=np.int64(model["encoder_layers"]))
    args = argparse.Namespace(arch="av_hubert", task="av_hubert_pretraining", **model)
    torch.save({"args": args, "model": state}, path)
    return path
