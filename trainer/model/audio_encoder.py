"""Whisper encoder wrapper: natural-length log-mel batches in, 50 Hz frames with lengths out.

Whisper has no attention mask: every output frame sees the whole input window, padding
included. So padding is made to look like what Whisper was trained on (zero audio, i.e. the
clip's log-mel floor): every mel frame past a clip's length is set to that clip's minimum
value, which is the silence floor (max - 8, normalised) of any clip with a silent frame. A
clip's encoding then does not depend on what the batch padded with or on its neighbours.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .projector import frame_mask


def whisper_output_lengths(mel_lengths: torch.Tensor) -> torch.Tensor:
    """conv2 (k=3, s=2, p=1) maps n mel frames to ceil(n / 2) encoder frames (100 Hz -> 50 Hz)."""
    return torch.div(mel_lengths + 1, 2, rounding_mode="floor")


class WhisperAudioEncoder(nn.Module):
    def __init__(self, encoder: nn.Module, pad_to_window: bool = True):
        super().__init__()
        self.encoder = encoder                      # transformers WhisperEncoder
        self.pad_to_window = pad_to_window

    @property
    def out_dim(self) -> int:
        return self.encoder.config.d_model

    @property
    def n_mels(self) -> int:
        return self.encoder.config.num_mel_bins

    @property
    def window_frames(self) -> int:
        """Mel frames in the encoder's fixed input window (3000 = 30 s for real Whisper)."""
        return 2 * self.encoder.config.max_source_positions

    def forward(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, n_mels, Tm] (100 frames/s), mel_lengths [B] -> (frames [B, ceil(Tm/2), D], lengths [B])."""
        B, n_mels, Tm = mel.shape
        if n_mels != self.n_mels:
            raise ValueError(f"audio has {n_mels} mel bins but the Whisper encoder expects {self.n_mels} "
                             "(the data pipeline decodes for the model's input_streams, which carry these)")
        if Tm > self.window_frames:
            raise ValueError(f"audio of {Tm} mel frames is longer than the Whisper window of {self.window_frames} "
                             f"frames ({self.window_frames / 100:.1f} s); filter or split longer clips")
        valid = frame_mask(mel_lengths, Tm, mel.device)[:, None, :]                        # [B, 1, Tm]
        floor = mel.masked_fill(~valid, float("inf")).amin(dim=(1, 2), keepdim=True)
        mel = torch.where(valid, mel, floor).to(self.encoder.conv1.weight.dtype)
        if self.pad_to_window:
            pad = self.window_frames - Tm
            mel = torch.cat([mel, floor.to(mel.dtype).expand(B, n_mels, pad)], dim=2) if pad else mel
            hidden = self.encoder(input_features=mel).last_hidden_state
        else:
            hidden = self._natural_length_forward(mel)
        n_out = -(-Tm // 2)
        return hidden[:, :n_out], whisper_output_lengths(mel_lengths)

    def _natural_length_forward(self, mel: torch.Tensor) -> torch.Tensor:
        """WhisperEncoder.forward without its fixed-length check: positions 0..T-1 only.
        Sub-modules are called (not their weights read) so ZeRO-3 hooks gather them."""
        enc = self.encoder
        x = F.gelu(enc.conv1(mel))
        x = F.gelu(enc.conv2(x)).transpose(1, 2)
        x = x + enc.embed_positions(torch.arange(x.shape[1], device=x.device))
        for layer in enc.layers:
            x = layer(x, None)
        return enc.layer_norm(x)


def read_whisper_encoder_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Encoder tensors of a local Whisper checkpoint (WhisperModel: `encoder.*`, or
    WhisperForConditionalGeneration: `model.encoder.*`), keys relative to the encoder. Only the
    encoder's tensors are read; single or sharded safetensors, or a legacy pytorch_model.bin."""
    folder = Path(folder)
    if (folder / "model.safetensors.index.json").is_file():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (folder / "pytorch_model.bin").is_file():
        files = ["pytorch_model.bin"]
    else:
        raise FileNotFoundError(f"no Whisper weights (model.safetensors[.index.json] or pytorch_model.bin) in {folder}")
    out: dict[str, torch.Tensor] = {}
    for name in files:
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(folder / name), framework="pt") as f:
                for key in f.keys():
                    short = _encoder_key(key)
                    if short is not None:
                        out[short] = f.get_tensor(key)
        else:
            state = torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True)
            out.update({short: v for k, v in state.items() if (short := _encoder_key(k)) is not None})
    if not out:
        raise KeyError(f"no encoder weights (encoder.* / model.encoder.*) found in {folder}")
    return out


def _encoder_key(key: str) -> str | None:
    for prefix in ("model.encoder.", "encoder."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return None
