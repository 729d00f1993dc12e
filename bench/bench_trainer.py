"""The trainer itself on one GPU at real widths, with random weights (no checkpoint needed).

Two commands; the GPU run is part of bench/gpu_checks.sh:

  python bench/bench_trainer.py models --out DIR [--size real|tiny]
      writes, from configs, local model folders with random weights in the formats the trainer
      loads: a Llama-3.2-1B-shaped LLM (transformers folder, 128k vocabulary, tied embeddings) with a
      BPE tokenizer trained on the clips' transcripts, a Whisper-medium-shaped encoder (transformers
      folder, encoder tensors only) and an AV-HuBERT-Large-shaped checkpoint (official fairseq key
      names). `--size tiny`: the same at toy widths, for the CPU dry run.

  python bench/bench_trainer.py run --models DIR --shards DIR --zero 3 --out DIR [--parts ...]
      builds the real Trainer (launch/train.py's code path: DeepSpeed engine, ZeRO-3 or ZeRO-2, bf16 on
      a GPU) from launch/recipes/lrs3_avsr_decorr.yaml (LoRA r 48 on q/v, frame budget 1800 per GPU,
      decorrelation loss lambda 1e4 with pre-fusion LayerNorm) with the model paths above, MLflow off,
      one process, and measures, part by part (each part fail-soft, results written as they come):
        throughput  samples/s, LLM tokens/s, MFU (trainer/engine/flops.py), step time, peak memory,
                    per-step losses (a few optimizer steps: the loss should go down);
        profile     one step split by CUDA events: encoders, projectors, LLM forward, LM head + CE,
                    backward, optimizer step; the profiler's kernel totals (decorrelation kernels,
                    NCCL/ZeRO collectives); the decorrelation loss on this step's real hidden states,
                    Triton kernel vs the PyTorch reference (forward + backward);
        monitor     cost of one sink-monitor probe as in training, overhead at N = 200;
        checkpoint  save, two steps, resume from the checkpoint, the same two steps: losses compared;
        decode      greedy decoding of a few test clips (WER of a random model: it only has to run).
      Results: DIR/results.json and DIR/summary.md (plus the eval report).

Figures depend on the machine; without a GPU this is a dry run of every code path (fp32 on CPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

PARTS = ("throughput", "learn", "profile", "monitor", "checkpoint", "decode")
RECIPE = REPO / "launch" / "recipes" / "lrs3_avsr_decorr.yaml"


# ----------------------------------------------------------------------------- model folders

def _sizes(size: str):
    """(LlamaConfig, WhisperConfig, AVHubertConfig) at real or toy widths."""
    from estimate_lrs3 import LLAMA3_VOCAB, llama32_1b_config, whisper_medium_config
    from transformers import LlamaConfig, WhisperConfig

    from trainer.model.avhubert import AVHubertConfig

    if size == "real":
        return llama32_1b_config(LLAMA3_VOCAB), whisper_medium_config(80), AVHubertConfig.large()
    llm = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    whisper = WhisperConfig(num_mel_bins=80, d_model=32, encoder_layers=1, decoder_layers=1,
                            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                            decoder_ffn_dim=64, max_source_positions=1500)
    return llm, whisper, AVHubertConfig(layers=1, width=64, heads=2, ffn=128, resnet_channels=4,
                                        conv_pos=16, conv_pos_groups=4)


def make_models(out: Path, shards: Path, size: str, device: str) -> dict:
    """Random weights at the given widths, saved where the trainer's loaders read them."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from trainer.data.text import iter_transcripts
    from trainer.model.avhubert import AVHubertVideoEncoder, export_official_state_dict
    from trainer.model.tokenizer import train_bpe_tokenizer

    t0 = time.perf_counter()
    torch.manual_seed(0)
    llm_cfg, whisper_cfg, av_cfg = _sizes(size)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_bpe_tokenizer(iter_transcripts(str(shards), "train"), vocab_size=1000)
    llm_cfg.bos_token_id, llm_cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
    dtype = torch.bfloat16 if size == "real" else torch.float32
    with torch.device(device):
        llm = LlamaForCausalLM(llm_cfg).to(dtype)
    llm.save_pretrained(out / "llm")
    tok.save_pretrained(out / "llm")
    n_llm = sum(p.numel() for p in llm.parameters())
    del llm
    with torch.device(device):
        enc = WhisperEncoder(whisper_cfg).to(dtype)
    (out / "whisper").mkdir(exist_ok=True)
    whisper_cfg.save_pretrained(out / "whisper")
    save_file({f"encoder.{k}": v.contiguous().cpu() for k, v in enc.state_dict().items()},
              str(out / "whisper" / "model.safetensors"), metadata={"format": "pt"})
    n_whisper = sum(p.numel() for p in enc.parameters())
    del enc
    with torch.device(device):
        av = AVHubertVideoEncoder(av_cfg).to(dtype)
    torch.save({"model": {k: v.cpu() for k, v in export_official_state_dict(av).items()}}, out / "avhubert.pt")
    n_av = sum(p.numel() for p in av.parameters())
    info = {"size": size, "llm_params": n_llm, "whisper_encoder_params": n_whisper, "avhubert_params": n_av,
            "tokenizer_vocab": len(tok), "llm_vocab": llm_cfg.vocab_size, "seconds": time.perf_counter() - t0}
    (out / "models.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))
    return info


# ----------------------------------------------------------------------------- the trainer

def build_config(args, device: str):
    """The decorrelation recipe with this bench's model paths, clips and a short schedule."""
    from trainer.config import load_recipe

    bf16 = args.precision == "bf16"
    ds_json = REPO / "ds_configs" / f"zero{args.zero}.json"
    if args.optimizer != "auto":        # an explicit choice in the JSON; auto: the trainer's (choose_adam)
        ds = json.loads(ds_json.read_text())
        ds["optimizer"]["params"]["torch_adam"] = args.optimizer == "torch"
        ds_json = args.out / f"ds_zero{args.zero}_{args.optimizer}_adam.json"
        ds_json.write_text(json.dumps(ds, indent=2))
    cfg = load_recipe(RECIPE, config=str(ds_json))
    cfg.model = dataclasses.replace(
        cfg.model, llm_path=str(args.models / "llm"), whisper_path=str(args.models / "whisper"),
        avhubert_path=str(args.models / "avhubert.pt"), load_dtype="bfloat16" if bf16 else "float32")
    cfg.data = dataclasses.replace(cfg.data, shard_dir=str(args.shards), num_workers=args.num_workers,
                                   max_frames_per_batch=args.max_frames_per_batch,
                                   max_clip_frames=min(cfg.data.max_clip_frames, args.max_frames_per_batch))
    cfg.train = dataclasses.replace(
        cfg.train, run_dir=str(args.run_dir or args.out / "run"), max_steps=1000, warmup_steps=2, lr=args.lr, log_every=1000,
        precision=args.precision, device=device, eval_beams=1, eval_max_new_tokens=args.max_new_tokens,
        eval_untrained=False, final_eval_splits=(cfg.data.eval_split,), save_every=0, keep_last=2, resume="never",
        export_on_finish=False)
    cfg.monitor = dataclasses.replace(cfg.monitor, every=200, probe_batch_size=4, figures=True)
    cfg.tracking = dataclasses.replace(cfg.tracking, enabled=False)
    return cfg


class Sections:
    """Wall time of named sections of one step, by CUDA events on the current stream (perf_counter
    on CPU); forward sections from module hooks, the rest from explicit begin/end."""

    def __init__(self, cuda: bool):
        import torch

        self.torch, self.cuda = torch, cuda
        self.marks: list[tuple[str, object, object]] = []
        self.open: dict[str, object] = {}
        self.handles = []

    def _now(self):
        if self.cuda:
            e = self.torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def begin(self, name: str) -> None:
        self.open[name] = self._now()

    def end(self, name: str) -> None:
        self.marks.append((name, self.open.pop(name), self._now()))

    def hook(self, module, name: str) -> None:
        if module is None:
            return
        self.handles.append(module.register_forward_pre_hook(lambda *_: self.begin(name)))
        self.handles.append(module.register_forward_hook(lambda *_: self.end(name)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def totals_ms(self) -> dict[str, float]:
        if self.cuda:
            self.torch.cuda.synchronize()
        out: dict[str, float] = {}
        for name, a, b in self.marks:
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
            out[name] = out.get(name, 0.0) + ms
        return out


class Run:
    def __init__(self, args):
        import torch

        from bench_monitor import single_process_env

        self.args = args
        self.torch = torch
        self.device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        single_process_env(self.device)
        self.cfg = build_config(args, self.device)
        self.results: dict = {"zero_stage": args.zero, "device": self.device, "optimizer": args.optimizer,
                              "device_name": torch.cuda.get_device_name() if self.device == "cuda"
                              else (platform.processor() or "cpu"),
                              "torch": torch.__version__, "parts": {}}
        self.cuda = self.device == "cuda"
        self.old_queues = []          # sink-figure processes, drained at the end (not inside a timed part)

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def save(self):
        (self.args.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str))

    def build(self):
        from trainer.engine.trainer import Trainer

        t0 = time.perf_counter()
        self.t = Trainer(self.cfg)
        self.t._resume_or_start()          # data stream and the monitor's fixed probe batch
        self.results["build_s"] = time.perf_counter() - t0
        from trainer.engine.ds_config import describe_optimizer
        self.results["optimizer"] = describe_optimizer(self.t.ds_config)     # what DeepSpeed built
        self.results["params"] = self.t.param_counts
        self.results["zero_local_param_fraction"] = self.t._local_param_fraction()
        self.save()

    def step(self, meter=None) -> dict:
        from trainer.engine.throughput import ThroughputMeter

        stats = self.t._train_step(meter or ThroughputMeter(1))
        self.t.step += 1
        return self.t.step_values(stats)

    # ---- parts -------------------------------------------------------------------------------------
    def throughput(self) -> dict:
        from trainer.engine.throughput import ThroughputMeter, peak_memory_gb

        losses = []
        t0 = time.perf_counter()
        for _ in range(self.args.warmup):
            losses.append(self.step())
        warm_s = time.perf_counter() - t0
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        meter = ThroughputMeter(1)
        self.sync()
        meter.reset()
        for _ in range(self.args.steps):
            losses.append(self.step(meter))
        self.sync()
        rates = meter.rates()
        return {"warmup_steps": self.args.warmup, "warmup_s": warm_s, "timed_steps": self.args.steps, **rates,
                **peak_memory_gb(),
                "losses": [{k: round(v, 5) for k, v in s.items()} for s in losses],
                "loss_first": losses[0]["loss"], "loss_last": losses[-1]["loss"],
                "ce_first": losses[0]["ce_loss"], "ce_last": losses[-1]["ce_loss"]}

    def learn(self) -> dict:
        """The trainer's own step on one fixed batch, a few times: the loss must go down (on a stream of
        different clips the per-batch loss varies more than a few steps can lower it)."""
        import itertools

        t = self.t
        stream = t.stream
        batch = next(stream)
        t.stream = itertools.repeat(batch)
        try:
            losses = [self.step() for _ in range(self.args.learn_steps)]
        finally:
            t.stream = stream
        first, last = losses[0], losses[-1]
        return {"clips": len(batch["keys"]), "steps": len(losses),
                "losses": [{k: round(v, 5) for k, v in s.items()} for s in losses],
                "loss_first": first["loss"], "loss_last": last["loss"], "ce_first": first["ce_loss"],
                "ce_last": last["ce_loss"], "loss_went_down": last["loss"] < first["loss"]}

    def profile(self) -> dict:
        from torch.profiler import ProfilerActivity, profile

        from trainer.engine.throughput import ThroughputMeter

        t, model = self.t, self.t.model
        sec = Sections(self.cuda)
        sec.hook(model.audio_encoder, "audio encoder (Whisper, frozen)")
        sec.hook(model.video_encoder, "video encoder (AV-HuBERT, frozen)")
        sec.hook(model.audio_projector, "projectors")
        sec.hook(model.video_projector, "projectors")
        sec.hook(model.decoder, "LLM forward (decoder blocks)")
        sec.hook(model.base_llm.get_output_embeddings(), "LM head (target rows)")
        engine = t.ds_engine
        real_backward, real_step = engine.backward, engine.step

        def backward(loss, *a, **k):
            sec.begin("backward (LLM, projectors, decorrelation)")
            r = real_backward(loss, *a, **k)
            sec.end("backward (LLM, projectors, decorrelation)")
            return r

        def step(*a, **k):
            sec.begin("optimizer step (+ ZeRO bookkeeping)")
            r = real_step(*a, **k)
            sec.end("optimizer step (+ ZeRO bookkeeping)")
            return r

        engine.backward, engine.step = backward, step      # instance attributes: the bound methods stay as they are
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        try:
            self.sync()
            t0 = time.perf_counter()
            with profile(activities=acts) as prof:
                self.step(ThroughputMeter(1))
                self.sync()
            wall_ms = (time.perf_counter() - t0) * 1e3
        finally:
            del engine.backward, engine.step
            sec.remove()
        sections = sec.totals_ms()
        kernels = self._kernel_totals(prof)
        out = {"step_wall_ms (profiler on)": wall_ms, "sections_ms": sections,
               "sections_share": {k: v / wall_ms for k, v in sections.items()}, "kernels": kernels}
        out["decorrelation"] = self._decorrelation_on_real_states()
        if self.args.trace:
            prof.export_chrome_trace(str(self.args.out / "profile_trace.json"))
        return out

    def _kernel_totals(self, prof) -> dict:
        """Device time of kernels by name: decorrelation (Triton), collectives (NCCL), all."""
        total = dec = comm = 0.0
        top = []
        for ev in prof.key_averages():
            dev_us = getattr(ev, "self_device_time_total", None)
            if dev_us is None:
                dev_us = getattr(ev, "self_cuda_time_total", 0.0)
            if not dev_us:
                continue
            name = ev.key
            total += dev_us
            low = name.lower()
            if "decorrelation" in low or "_decorr" in low:
                dec += dev_us
            if "nccl" in low or "allgather" in low or "reducescatter" in low or "all_gather" in low:
                comm += dev_us
            top.append((dev_us, name))
        top.sort(reverse=True)
        return {"device_total_ms": total / 1e3, "decorrelation_kernels_ms": dec / 1e3,
                "collectives_ms": comm / 1e3, "top": [(n[:90], round(us / 1e3, 3)) for us, n in top[:15]]}

    def _decorrelation_on_real_states(self) -> dict:
        """This step's real hidden states and prefix: the loss + gradient by both implementations."""
        import torch

        from trainer.kernels import decorrelation_loss
        from trainer.model.prompt_text import with_transcript_ids
        from trainer.model.roles import prefix_mask

        model = self.t.model
        batch = self.t.to_device(with_transcript_ids(self.t.tokenizer, next(self.t.stream)))
        with torch.no_grad():
            inputs = model.assemble(batch)
            out = model.decoder(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                                position_ids=inputs.position_ids, output_hidden_states=True, use_cache=False)
        layers = [out.hidden_states[i].detach() for i in model.decorrelation_layers]
        mask = prefix_mask(inputs.token_roles)
        del out
        impls = ("triton", "torch") if (self.cuda or os.environ.get("TRITON_INTERPRET") == "1") else ("torch",)
        res: dict = {"shape [L, B, T, D]": [len(layers), *layers[0].shape], "dtype": str(layers[0].dtype),
                     "prefix_tokens": int(mask.sum())}
        values = {}
        for impl in impls:
            times = []
            for rep in range(4):
                leaves = [h.clone().requires_grad_() for h in layers]
                if self.cuda:
                    torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() if self.cuda else 0
                self.sync()
                t0 = time.perf_counter()
                loss = decorrelation_loss(leaves, mask, impl=impl)
                loss.backward()
                self.sync()
                times.append((time.perf_counter() - t0) * 1e3)
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if self.cuda else float("nan")
                values[impl] = float(loss)
                del leaves, loss
            res[impl] = {"fwd_bwd_ms_median_of_3": sorted(times[1:])[1], "first_call_ms": times[0],
                         "peak_extra_mib": peak, "loss": values[impl]}
        if len(values) == 2:
            res["kernel_speedup"] = res["torch"]["fwd_bwd_ms_median_of_3"] / res["triton"]["fwd_bwd_ms_median_of_3"]
            res["loss_rel_diff"] = abs(values["triton"] - values["torch"]) / max(abs(values["torch"]), 1e-12)
        return res

    def monitor(self) -> dict:
        t = self.t

        def timed(fn):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            return time.perf_counter() - t0

        first = timed(t._probe_sinks)           # one-off: eager attention path, figure process start
        probes = []
        for _ in range(2):
            t.step += 1                          # a fresh sinks/step_XXXXXXX folder, as in training
            probes.append(timed(t._probe_sinks))
        step_s = self.results["parts"].get("throughput", {}).get("perf/step_time_s")
        probe = sum(probes) / len(probes)
        out = {"first_probe_s": first, "probe_s": probe, "probe_batch_size": t.cfg.monitor.probe_batch_size,
               "every": 200}
        if step_s:
            out["overhead_at_200_pct"] = 100 * probe / (200 * step_s)
        return out

    def checkpoint(self) -> dict:
        t = self.t
        t0 = time.perf_counter()
        t._save()
        save_s = time.perf_counter() - t0
        saved_at = t.step
        before = [self.step()["loss"] for _ in range(2)]
        if t.figure_queue is not None:           # _resume_or_start sets up the monitor (and its queue) again
            self.old_queues.append(t.figure_queue)
            t.figure_queue = None
        t.cfg.train.resume = "auto"
        t0 = time.perf_counter()
        t._resume_or_start()
        load_s = time.perf_counter() - t0
        resumed_at = t.step
        after = [self.step()["loss"] for _ in range(2)]
        diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(before, after))
        size = sum(f.stat().st_size for f in (t.run_dir / "checkpoints").rglob("*") if f.is_file())
        return {"saved_at_step": saved_at, "resumed_at_step": resumed_at, "save_s": save_s, "load_s": load_s,
                "checkpoint_mib": size / 2**20, "losses_before": before, "losses_after_resume": after,
                "max_rel_diff": diff, "resume_matches": diff < 1e-3}

    def decode(self) -> dict:
        t = self.t
        t0 = time.perf_counter()
        result = t._evaluate(t.cfg.data.test_split, self.args.decode_clips, tag="bench")
        seconds = time.perf_counter() - t0
        reports = sorted((t.run_dir / "eval").glob("*bench*.json"))
        hyps = json.loads(reports[-1].read_text()) if reports else None
        if hyps is not None:
            (self.args.out / "decode_report.json").write_text(json.dumps(hyps, indent=2))
        return {**result, "seconds": seconds, "max_new_tokens": t.cfg.train.eval_max_new_tokens}

    def finish(self, drain: bool = True) -> None:
        """Wait for the sink figures (drawn in background processes) unless the time cap is reached."""
        t = getattr(self, "t", None)
        if t is not None and drain:
            t0 = time.perf_counter()
            for queue in [*self.old_queues, t.figure_queue]:
                if queue is not None:
                    t._log_sink_files(queue.close())
            self.results["figures_drain_s"] = time.perf_counter() - t0


class TimeCap(BaseException):
    """SIGTERM from the caller's time cap (timeout): stop the parts, still write what was measured."""


def _on_sigterm(signum, frame):
    raise TimeCap("stopped by SIGTERM (time cap)")


def run(args) -> int:
    import signal

    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    signal.signal(signal.SIGTERM, _on_sigterm)
    r = None
    try:                                        # the build is guarded like a part: reported, not raised
        r = Run(args)
        r.build()
    except (Exception, TimeCap) as err:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        print(f"[bench_trainer] zero{args.zero} build FAILED: {err!r}", flush=True)
        traceback.print_exc()
        results = r.results if r is not None else {"zero_stage": args.zero, "parts": {}}
        results["parts"]["build"] = {"error": repr(err), "traceback": traceback.format_exc()[-4000:]}
        (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        (args.out / "summary.md").write_text(render(results))
        print(render(results))
        return 1
    try:
        r.t.stop.uninstall()                    # the trainer's stop-and-checkpoint handler: not wanted here
        signal.signal(signal.SIGTERM, _on_sigterm)
        for part in args.parts:
            t0 = time.perf_counter()
            try:
                r.results["parts"][part] = getattr(r, part)()
                r.results["parts"][part]["part_s"] = time.perf_counter() - t0
                print(f"[bench_trainer] zero{args.zero} {part}: done in {time.perf_counter() - t0:.1f} s", flush=True)
            except Exception as err:            # fail-soft: the other parts still run and report
                failed.append(part)
                r.results["parts"][part] = {"error": repr(err), "traceback": traceback.format_exc()[-4000:]}
                print(f"[bench_trainer] zero{args.zero} {part} FAILED: {err!r}", flush=True)
                traceback.print_exc()
            r.save()
    except TimeCap as cap:
        failed.append("time cap")
        r.results["stopped"] = str(cap)
        print(f"[bench_trainer] zero{args.zero}: {cap}", flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            r.finish(drain="stopped" not in r.results)
        except Exception as err:                # a part killed mid-way may leave the figure queue broken
            r.results["finish_error"] = repr(err)
        r.save()
        (args.out / "summary.md").write_text(render(r.results))
        t = getattr(r, "t", None)
        if t is not None and t.stream is not None:
            t.stream.close()    # its DataLoader workers ignore SIGTERM: left alive, they hung the exit (seen)
        print(render(r.results))
    return 1 if failed else 0


def render(res: dict) -> str:
    p = res.get("parts", {})
    lines = [f"## Trainer, ZeRO-{res.get('zero_stage')}, 1 process, {res.get('device_name')} "
             f"(torch {res.get('torch')}, AdamW: {res.get('optimizer')})", ""]
    if "params" in res:
        lines.append(f"- parameters: {res['params']}; build {res.get('build_s', 0):.1f} s; "
                     f"local param fraction {res.get('zero_local_param_fraction', 0):.3f}")
    tp = p.get("throughput", {})
    if "perf/samples_per_s" in tp:
        mfu = tp.get("perf/mfu")
        lines.append(f"- {tp['timed_steps']} steps: {tp['perf/samples_per_s']:.2f} samples/s, "
                     f"{tp['perf/tokens_per_s']:.0f} LLM tokens/s, step {tp['perf/step_time_s'] * 1e3:.1f} ms, "
                     f"MFU {'n/a' if mfu is None else f'{mfu:.3f}'}, peak GPU alloc "
                     f"{tp.get('mem/gpu_peak_alloc_gb', float('nan')):.2f} GB "
                     f"(reserved {tp.get('mem/gpu_peak_reserved_gb', float('nan')):.2f} GB)")
        lines.append("- per-step loss on the clip stream (batches differ): "
                     + ", ".join(f"{s['loss']:.3f}" for s in tp["losses"]))
    le = p.get("learn", {})
    if "losses" in le:
        lines.append(f"- {le['steps']} steps on one fixed batch of {le['clips']} clips: loss "
                     + " -> ".join(f"{s['loss']:.3f}" for s in le["losses"])
                     + f" (CE {le['ce_first']:.4f} -> {le['ce_last']:.4f})")
    pr = p.get("profile", {})
    if "sections_ms" in pr:
        wall = pr["step_wall_ms (profiler on)"]
        lines += ["", f"Profiled step: {wall:.1f} ms (profiler on)", "", "| section | ms | share |", "|---|---|---|"]
        for k, v in sorted(pr["sections_ms"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {k} | {v:.1f} | {100 * v / wall:.1f} % |")
        k = pr["kernels"]
        lines.append(f"| kernels: decorrelation (Triton) | {k['decorrelation_kernels_ms']:.2f} | "
                     f"{100 * k['decorrelation_kernels_ms'] / wall:.2f} % |")
        lines.append(f"| kernels: collectives (NCCL) | {k['collectives_ms']:.2f} | "
                     f"{100 * k['collectives_ms'] / wall:.2f} % |")
        d = pr.get("decorrelation", {})
        if "torch" in d:
            s = f"- decorrelation on this step's hidden states {d['shape [L, B, T, D]']} {d['dtype']}: " \
                f"reference {d['torch']['fwd_bwd_ms_median_of_3']:.2f} ms"
            if "triton" in d:
                s += (f", kernel {d['triton']['fwd_bwd_ms_median_of_3']:.2f} ms (x{d['kernel_speedup']:.1f}); "
                      f"extra memory {d['torch']['peak_extra_mib']:.0f} vs {d['triton']['peak_extra_mib']:.0f} MiB; "
                      f"loss rel. diff {d['loss_rel_diff']:.1e}")
            lines.append(s)
    mo = p.get("monitor", {})
    if "probe_s" in mo:
        lines.append(f"- sink-monitor probe: {mo['probe_s'] * 1e3:.0f} ms (first {mo['first_probe_s'] * 1e3:.0f} ms); "
                     f"overhead at N = 200: {mo.get('overhead_at_200_pct', float('nan')):.3f} %")
    ck = p.get("checkpoint", {})
    if "save_s" in ck:
        lines.append(f"- checkpoint at step {ck['saved_at_step']}: save {ck['save_s']:.1f} s "
                     f"({ck['checkpoint_mib']:.0f} MiB), resume {ck['load_s']:.1f} s; losses {ck['losses_before']} "
                     f"vs after resume {ck['losses_after_resume']} (max rel diff {ck['max_rel_diff']:.1e})")
    de = p.get("decode", {})
    if "seconds" in de:
        lines.append(f"- greedy decoding: {int(de.get('num_utterances', 0))} test clips in {de['seconds']:.1f} s "
                     f"(<= {de['max_new_tokens']} new tokens; WER {100 * de.get('wer', float('nan')):.0f} %: "
                     f"random weights)")
    for name, part in p.items():
        if "error" in part:
            lines.append(f"- {name}: FAILED {part['error']}")
    if res.get("stopped"):
        lines.append(f"- {res['stopped']}: later parts did not run")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("models", help="write random-weight model folders")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--shards", type=Path, required=True, help="clips whose transcripts train the tokenizer")
    m.add_argument("--size", choices=["real", "tiny"], default="real")
    m.add_argument("--device", default="auto", help="where weights are initialised (auto: cuda if any)")
    r = sub.add_parser("run", help="build the trainer and measure")
    r.add_argument("--models", type=Path, required=True)
    r.add_argument("--shards", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--run-dir", type=Path, default=None,
                   help="the trainer's run folder (checkpoints, sink reports; default OUT/run)")
    r.add_argument("--zero", type=int, choices=[2, 3], default=3)
    r.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    r.add_argument("--warmup", type=int, default=3, help="untimed steps (first ones compile and allocate)")
    r.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    r.add_argument("--lr", type=float, default=1e-3, help="peak lr (the recipe's), after 2 warmup steps")
    r.add_argument("--learn-steps", type=int, default=6, help="steps on one fixed batch (part 'learn')")
    r.add_argument("--max-frames-per-batch", type=int, default=1800, help="the recipe's budget per GPU")
    r.add_argument("--num-workers", type=int, default=4)
    r.add_argument("--decode-clips", type=int, default=4)
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="bf16 as a GPU run trains (the CPU dry run too); fp32 for comparison")
    r.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: cuda if torch sees a GPU, else cpu (passed on as --train.device)")
    r.add_argument("--trace", action="store_true", help="also write the profiled step's Chrome trace")
    r.add_argument("--optimizer", choices=["auto", "deepspeed", "torch"], default="auto",
                   help="auto: the trainer's choice (torch's fused AdamW on a GPU unless DeepSpeed's FusedAdam is "
                        "prebuilt); deepspeed: FusedAdam (JIT-compiled with nvcc on first use); torch: torch's AdamW")
    args = ap.parse_args(argv)
    for name in ("out", "models", "shards", "run_dir"):
        if getattr(args, name, None) is not None:
            setattr(args, name, getattr(args, name).resolve())
    if args.cmd == "models":
        import torch
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        make_models(args.out, args.shards, args.size, device)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
