"""Sink / massive-activation monitor on a tiny Llama with a sink planted by hand."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.model.roles import TokenRole
from trainer.monitor import MonitorConfig, SinkMonitor
from trainer.monitor.analysis import SinkAnalyzer
from trainer.monitor.capture import capture_layers, probe_forward

D, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 64, 4, 2, 16, 4
S, R, J = 5, 6, 17  # special-token marker, constant "bias" feature, planted massive feature
MASSIVE_LAYER = 1  # the MLP of this layer writes the massive activation
ROPE_SLOW = 7  # head dim whose RoPE frequency is ~0: q.k there is position independent


def tiny_llama(seed: int = 0, vocab_size: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=D, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).float()


@torch.no_grad()
def plant_sink(model: LlamaForCausalLM, gain: float = 2.0, out: float = 50.0, qk: float = 2.0) -> None:
    """Layer 1's MLP turns the S marker into a huge value in feature J; layers 2-3 attend to J."""
    layers = model.model.layers
    for layer in layers:  # nothing but the planted unit writes S, R or J
        for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
            w[[S, R, J]] = 0.0
    mlp = layers[MASSIVE_LAYER].mlp
    mlp.gate_proj.weight[0] = 0.0
    mlp.gate_proj.weight[0, S] = gain
    mlp.up_proj.weight[0] = 0.0
    mlp.up_proj.weight[0, S] = gain
    mlp.down_proj.weight[:, 0] = 0.0
    mlp.down_proj.weight[J, 0] = out  # silu(g) * u ~ 130 for marked tokens, exactly 0 otherwise
    for layer in layers[MASSIVE_LAYER + 1:]:
        attn = layer.self_attn
        for h in range(HEADS):
            attn.q_proj.weight[h * HEAD_DIM + ROPE_SLOW] = 0.0
            attn.q_proj.weight[h * HEAD_DIM + ROPE_SLOW, R] = qk  # every ordinary query asks for J
        for g in range(KV_HEADS):
            attn.k_proj.weight[g * HEAD_DIM + ROPE_SLOW] = 0.0
            attn.k_proj.weight[g * HEAD_DIM + ROPE_SLOW, J] = qk  # keys with a massive J answer


def make_inputs(lengths: list[int], mids: list[int], seed: int = 1):
    """Right-padded embeddings; BOS and position mids[b] carry the S marker; roles like an AVSR prompt."""
    torch.manual_seed(seed)
    b, t = len(lengths), max(lengths)
    x = torch.randn(b, t, D)
    x[..., [S, J]] = 0.0
    x[..., R] = 1.0
    mask = torch.zeros(b, t, dtype=torch.long)
    roles = torch.full((b, t), int(TokenRole.PAD))
    for i, (n, m) in enumerate(zip(lengths, mids)):
        mask[i, :n] = 1
        x[i, 0, S] = x[i, m, S] = 8.0
        roles[i, :n] = int(TokenRole.AUDIO)
        roles[i, 0] = int(TokenRole.BOS)
        roles[i, m] = int(TokenRole.DELIMITER)
        roles[i, n - 4 : n - 1] = int(TokenRole.TRANSCRIPT)
        roles[i, n - 1] = int(TokenRole.EOS)
        x[i, n:] = 0.0
    return x, mask, roles


def monitor(**kw) -> SinkMonitor:
    return SinkMonitor(MonitorConfig(every=1, **kw))


def direct_attention(model, x, mask):
    """Eager attention maps and hidden states via output_attentions (independent of the monitor)."""
    prev = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(inputs_embeds=x, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    finally:
        model.set_attn_implementation(prev)
    return out.attentions, out.hidden_states


def direct_alpha(attn: torch.Tensor, n: int) -> torch.Tensor:
    """alpha[h, k] for one sample of real length n, by the definition, with loops."""
    heads = attn.shape[0]
    alpha = torch.zeros(heads, n)
    for h in range(heads):
        for k in range(n):
            alpha[h, k] = sum(float(attn[h, i, k]) for i in range(k, n)) / (n - k)
    return alpha


def test_planted_sink_is_found():
    model = tiny_llama()
    plant_sink(model)
    x, mask, roles = make_inputs([20, 20], [3, 7])
    rep = monitor(top_k=4).run(model, x, mask, roles)

    assert rep.first_massive_layer == MASSIVE_LAYER
    for s in rep.layers:
        expect_massive = s.layer >= MASSIVE_LAYER
        got = {(e.batch, e.token, e.feature) for e in s.massive_entries}
        assert got == ({(0, 0, J), (0, 3, J), (1, 0, J), (1, 7, J)} if expect_massive else set()), s.layer
        if expect_massive:
            assert s.massive_features == [J]
            assert s.max_abs > 1000 and s.massive_ratio > 1000
            assert {(e.batch, e.token, e.feature) for e in s.top_k[:4]} == got
        sinks = {(t.batch, t.token) for t in s.sink_tokens}
        if s.layer > MASSIVE_LAYER:  # sinks appear in the layers reading the massive residual
            assert sinks == {(0, 0), (0, 3), (1, 0), (1, 7)}
            assert s.bos_sink_head_frac == 1.0 and s.intermediate_sink_count == 1.0
            assert all(t.head_frac == 1.0 and t.massive_features == [J] for t in s.sink_tokens)
            assert s.sink_features_shared is True
            assert s.sinks_by_role == {"bos": 2, "delimiter": 2}
            assert s.cos_to_bos_sink > 0.99 and s.cos_to_bos_nonsink < 0.2
        else:
            assert sinks == set() and s.sink_features_shared is None
    origin = rep.layer(MASSIVE_LAYER)
    assert origin.mlp_share == pytest.approx(1.0) and origin.attn_abs_at_massive == 0.0
    assert float(origin.cos_to_bos[0, 3]) > 0.99  # the marked token turns into a copy of BOS

    m = rep.to_metrics()
    assert m["sinks/first_massive_layer"] == MASSIVE_LAYER
    assert m["sinks/origin_mlp_share"] == pytest.approx(1.0)
    assert m["sinks/L02/bos_sink_head_frac"] == 1.0 and m["sinks/L00/bos_sink_head_frac"] == 0.0
    assert m["sinks/L03/intermediate_sink_count"] == 1.0
    assert m["sinks/L01/massive_count"] == 4 and m["sinks/L00/massive_count"] == 0
    assert m["sinks/role/delimiter"] == 4 and m["sinks/role/audio"] == 0
    assert all(isinstance(v, float) and not math.isnan(v) for v in m.values())
    js = rep.to_json()
    assert js["layers"][2]["sink_tokens"][1]["token"] == 3 and js["first_massive_layer"] == MASSIVE_LAYER


@pytest.mark.parametrize("planted", [False, True])
def test_sink_scores_match_output_attentions(planted):
    model = tiny_llama(seed=3)
    if planted:
        plant_sink(model)
    x, mask, roles = make_inputs([20, 13], [3, 5], seed=4)
    rep_cfg = MonitorConfig(every=1)
    rep = SinkMonitor(rep_cfg).run(model, x, mask, roles)
    attns, hidden = direct_attention(model, x, mask)
    eps = rep.sink_epsilon
    for s in rep.layers:
        direct_sinks = set()
        for b, n in enumerate([20, 13]):
            alpha = direct_alpha(attns[s.layer][b], n)
            torch.testing.assert_close(s.sink_scores[b, :, :n], alpha, atol=1e-5, rtol=1e-5)
            assert float(s.sink_scores[b, :, n:].abs().sum()) == 0.0
            needed = max(1, min(rep_cfg.sink_min_queries, n // 4))
            classified = [k for k in range(n) if k == 0 or n - k >= needed]
            direct_sinks |= {(b, k) for k in classified if bool((alpha[:, k] > eps).any())}
        assert {(t.batch, t.token) for t in s.sink_tokens} == direct_sinks
        if s.layer < LAYERS - 1:  # hidden_states[-1] is the final-normed state, not H^{L-1}
            h = hidden[s.layer + 1]
            real = mask.bool()
            vals = h.abs()[real]
            median = float(vals.median())
            n_massive = int(((vals > 100) & (vals > 1000 * median)).sum())
            assert s.massive_count == n_massive
            assert s.max_abs == pytest.approx(float(vals.max()))
    if not planted:  # a clean random model: nothing massive, and no sink besides what the maps say
        assert rep.first_massive_layer == -1
        assert all(s.massive_count == 0 and s.max_abs < 100 for s in rep.layers)


def test_end_of_sequence_self_attention_is_not_a_sink():
    """A local head gives every token 0.35 of attention to itself: by the literal score the last
    token (one query) is a sink. It is not classified as one unless sink_min_queries allows it."""
    from trainer.monitor.capture import LayerCapture

    B, H, T, Dm = 1, 8, 40, 16
    p = torch.zeros(B, H, T, T)
    for i in range(T):
        p[0, :, i, 0] += 0.6                                   # every head: BOS sink
        p[0, :7, i, : i + 1] += 0.4 / (i + 1)
        p[0, 7, i, i] += 0.35                                  # head 7 is local
        p[0, 7, i, : i + 1] += 0.05 / (i + 1)
    h = torch.randn(B, T, Dm) * 0.1
    h[0, 0, 3] = 500.0
    cap = LayerCapture(0, p, torch.zeros(B, T, Dm), torch.zeros(B, T, Dm), h)
    results = {}
    for min_queries in (1, 8):
        analyzer = SinkAnalyzer(MonitorConfig(sink_min_queries=min_queries), torch.ones(B, T, dtype=torch.long))
        analyzer(cap)
        results[min_queries] = analyzer.layers[0]
    literal, default = results[1], results[8]
    assert float(literal.sink_scores[0, 7, T - 1]) > 0.3                 # the score itself is unchanged
    assert torch.equal(literal.sink_scores, default.sink_scores)
    assert {t.token for t in literal.sink_tokens} == {0, T - 1} and literal.sink_features_shared is False
    assert [(t.token, t.massive_features) for t in default.sink_tokens] == [(0, [3])]
    assert default.intermediate_sink_count == 0.0 and default.sink_features_shared is True
    assert MonitorConfig().sink_min_queries == 8
    with pytest.raises(ValueError, match="--monitor.sink-min-queries"):
        MonitorConfig(sink_min_queries=0)


def test_residual_capture_matches_hidden_states():
    model = tiny_llama()
    x, mask, _ = make_inputs([12], [2])
    _, hidden = direct_attention(model, x, mask)
    got = {}
    with capture_layers(model, lambda cap: got.__setitem__(cap.layer, cap)) as dec:
        probe_forward(dec, x, mask)
    for layer in range(LAYERS - 1):
        torch.testing.assert_close(got[layer].resid, hidden[layer + 1])
    torch.testing.assert_close(model.model.norm(got[LAYERS - 1].resid), hidden[LAYERS])
    # the block output is input + attention + MLP contributions
    torch.testing.assert_close(got[1].resid, got[0].resid + got[1].attn_out + got[1].mlp_out, atol=1e-5, rtol=1e-5)


def test_padding_gives_per_sample_results():
    model = tiny_llama()
    plant_sink(model)
    lengths, mids = [20, 14], [3, 5]
    x, mask, roles = make_inputs(lengths, mids)
    batch = monitor().run(model, x, mask, roles)
    for b, n in enumerate(lengths):
        alone = monitor().run(model, x[b : b + 1, :n], mask[b : b + 1, :n], roles[b : b + 1, :n])
        for sb, sa in zip(batch.layers, alone.layers):
            torch.testing.assert_close(sb.sink_scores[b, :, :n], sa.sink_scores[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(sb.cos_to_bos[b, :n], sa.cos_to_bos[0], atol=1e-5, rtol=1e-5)
            assert {t.token for t in sb.sink_tokens if t.batch == b} == {t.token for t in sa.sink_tokens}
            assert {(e.token, e.feature) for e in sb.massive_entries if e.batch == b} == {
                (e.token, e.feature) for e in sa.massive_entries
            }
    # trailing all-padding columns are trimmed, so padding never reaches the statistics
    wide_x = torch.cat([x, torch.zeros(2, 5, D)], 1)
    wide = monitor().run(model, wide_x, torch.cat([mask, torch.zeros(2, 5, dtype=mask.dtype)], 1), None)
    assert wide.layers[2].sink_scores.shape[-1] == 20


def _hook_counts(model):
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


def test_state_restored_after_run_and_after_exception():
    model = tiny_llama()
    model.train()
    model.model.layers[0].mlp.eval()  # a frozen part in eval must stay in eval
    flags = [m.training for m in model.modules()]
    hooks = _hook_counts(model)
    x, mask, roles = make_inputs([10, 8], [2, 3])

    monitor().run(model, x, mask, roles)
    assert model.config._attn_implementation == "sdpa"
    assert [m.training for m in model.modules()] == flags and _hook_counts(model) == hooks

    def boom(cap):
        assert model.config._attn_implementation == "eager" and not model.training  # probe state
        if cap.layer == 2:
            raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        with capture_layers(model, boom) as dec:
            probe_forward(dec, x, mask)
    assert model.config._attn_implementation == "sdpa"
    assert [m.training for m in model.modules()] == flags and _hook_counts(model) == hooks
    # a normal training forward still runs the fast path and returns no maps
    out = model(inputs_embeds=x, attention_mask=mask)
    assert out.logits.shape[:2] == x.shape[:2]


def test_probe_between_checkpointed_training_steps():
    """With activation checkpointing on, a probe between two training steps finds the same sinks as
    without it, leaves no hook behind, and nothing it installs fires in the backward's recompute."""
    plain, ckpt = tiny_llama(), tiny_llama()
    for m in (plain, ckpt):
        plant_sink(m)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.train()
    hooks = _hook_counts(ckpt)
    x, mask, roles = make_inputs([10, 8], [2, 3])
    calls = []

    def train_step():
        ckpt.zero_grad()
        out = ckpt(inputs_embeds=x.clone().requires_grad_(), attention_mask=mask)
        out.logits.float().square().mean().backward()
        return [p.grad.clone() for p in ckpt.parameters() if p.grad is not None]

    before = train_step()
    with capture_layers(ckpt, lambda cap: calls.append(cap.layer)) as dec:
        probe_forward(dec, x, mask)
    assert calls == list(range(LAYERS))
    after = train_step()                     # the hooks are gone: the recompute calls nothing
    assert calls == list(range(LAYERS)) and _hook_counts(ckpt) == hooks and ckpt.training
    for a, b in zip(before, after):          # and training is untouched by the probe
        torch.testing.assert_close(a, b)
    got, want = monitor().run(ckpt, x, mask, roles), monitor().run(plain, x, mask, roles)
    for lg, lw in zip(got.layers, want.layers):
        assert lg.sink_tokens == lw.sink_tokens and lg.massive_features == lw.massive_features
        torch.testing.assert_close(lg.sink_scores, lw.sink_scores)


def test_peft_wrapped_model_and_layer_subset():
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    plant_sink(model)
    x, mask, roles = make_inputs([16], [4])
    plain = monitor(layers=(1, -1)).run(model, x, mask, roles)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    wrapped = monitor(layers=(1, -1)).run(lora, x, mask, roles)
    assert [s.layer for s in wrapped.layers] == [1, 3]
    for a, b in zip(plain.layers, wrapped.layers):  # LoRA B starts at 0: same model function
        torch.testing.assert_close(a.sink_scores, b.sink_scores)
        assert a.massive_features == b.massive_features == [J]


def test_figures_are_png(tmp_path):
    model = tiny_llama()
    plant_sink(model)
    x, mask, roles = make_inputs([18, 12], [3, 4])
    rep = monitor(figure_layers=(2, 9)).run(model, x, mask, roles, step=7, out_dir=tmp_path)
    names = sorted(p.name for p in rep.files)
    assert names == sorted(
        ["report.json", "attention_L02.png", "activations_L02.png", "cos_to_bos.png", "bos_sink_heads.png"]
    )
    for p in rep.files:
        assert p.parent == tmp_path / "step_0000007" and p.stat().st_size > 1000
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rep.maps == {}  # maps released once drawn


def test_background_figures_match_the_inline_ones(tmp_path):
    from trainer.monitor.monitor import FigureQueue
    model = tiny_llama()
    plant_sink(model)
    x, mask, roles = make_inputs([18, 12], [3, 4])
    queue = FigureQueue()
    rep = monitor(figure_layers=(2,)).run(model, x, mask, roles, step=7, out_dir=tmp_path / "bg",
                                          figure_queue=queue)
    assert [p.name for p in rep.files] == ["report.json"] and rep.maps == {}
    rep2 = monitor(figure_layers=(2,)).run(model, x, mask, roles, step=8, out_dir=tmp_path / "bg",
                                           figure_queue=queue)
    done = dict(queue.close())
    assert sorted(done) == [7, 8] and queue.finished() == []
    inline = monitor(figure_layers=(2,)).run(model, x, mask, roles, step=7, out_dir=tmp_path / "inline")
    assert sorted(p.name for p in done[7]) == sorted(p.name for p in inline.files if p.suffix == ".png")
    for p in done[7]:
        assert p.parent == tmp_path / "bg" / "step_0000007" and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rep2.step == 8


def test_config_and_schedule():
    assert not SinkMonitor(MonitorConfig(every=0)).should_run(0)
    mon = SinkMonitor(MonitorConfig(every=5))
    assert [s for s in range(12) if mon.should_run(s)] == [0, 5, 10]
    for bad in ({"every": -1}, {"sink_epsilon": 1.5}, {"massive_ratio": 0.5}, {"top_k": 0}, {"layers": []}):
        with pytest.raises(ValueError):
            MonitorConfig(**bad)
    assert MonitorConfig(layers=[0, 2]).layers == (0, 2)
    x, mask, _ = make_inputs([6], [2])
    mask[0, 0] = 0  # left padding: BOS would not be at 0
    with pytest.raises(ValueError, match="right-padded"):
        SinkAnalyzer(MonitorConfig(), mask)


def test_layer_and_head_axes_have_whole_number_ticks(tmp_path, monkeypatch):
    from trainer.monitor import figures

    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig) or path)
    model = tiny_llama()
    x, mask, roles = make_inputs([18, 12], [3, 4])
    rep = monitor(layers=(1, 2, 3), figures=False).run(model, x, mask, roles, step=1, out_dir=tmp_path)
    figures.cosine_figure(rep, tmp_path / "c.png")
    figures.bos_heads_figure(rep, tmp_path / "b.png")
    for fig in drawn:              # 3 layers / few heads: matplotlib alone would put ticks at 1.5, 2.5, ...
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_figure_pool_survives_stop_signals_and_a_stop_abandons_only_what_is_late(tmp_path):
    """SLURM signals every process of a job: the pool's process and multiprocessing's resource tracker
    get SIGTERM/SIGUSR1 too (here right after they are started). The figures are still drawn; after
    a stop, close(timeout) returns within its budget and ends the pool although it ignores SIGTERM."""
    import os
    import signal
    import time

    import psutil

    from trainer.monitor.monitor import FigureQueue
    model = tiny_llama()
    plant_sink(model)
    x, mask, roles = make_inputs([18, 12], [3, 4])
    queue = FigureQueue()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    monitor(figure_layers=(2,)).run(model, x, mask, roles, step=7, out_dir=tmp_path, figure_queue=queue)
    helpers = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert helpers                       # the pool process (and the resource tracker unless already up)
    for p in helpers:
        p.send_signal(signal.SIGUSR1)
        p.send_signal(signal.SIGTERM)
    done = dict(queue.close())
    assert sorted(done) == [7] and all(p.suffix in (".png", ".json") for p in done[7])
    assert all(p.is_file() for p in done[7])

    queue = FigureQueue()                # a stop with figures still being drawn
    for step in (1, 2, 3):
        monitor(figure_layers=(2,)).run(model, x, mask, roles, step=step, out_dir=tmp_path, figure_queue=queue)
    pool = [p for p in psutil.Process().children() if p.pid not in before and "resource_tracker" not in
            " ".join(p.cmdline())]
    t0 = time.time()
    queue.close(timeout=0.5)
    assert time.time() - t0 < 15
    gone, alive = psutil.wait_procs(pool, timeout=10)
    assert not alive and os.getpid()

# --------------------------------------------------------------------------- what a reader is given
def _handmade_report(labels=None):
    """Two layers analysed from hand-made maps (T=40, 4 heads): layer 0's only intermediate sink is
    token 5, layer 1's is token 9; each sink's hidden state is a copy of BOS's in its own layer
    only; two tokens carry a massive feature 3 in layer 1 (more entries than top_k)."""
    from trainer.monitor.capture import LayerCapture

    B, H, T, Dm = 1, 4, 40, 16
    torch.manual_seed(0)
    roles = torch.full((B, T), int(TokenRole.AUDIO))
    roles[0, 0], roles[0, 5], roles[0, 9] = int(TokenRole.BOS), int(TokenRole.DELIMITER), int(TokenRole.DELIMITER)
    analyzer = SinkAnalyzer(MonitorConfig(top_k=1), torch.ones(B, T, dtype=torch.long), roles, figure_layers={0, 1})
    for layer, sink in ((0, 5), (1, 9)):
        p = torch.zeros(B, H, T, T)
        for i in range(T):
            p[0, :, i, 0] += 0.5
            if i >= sink:
                p[0, :2, i, sink] += 0.4                     # heads 0 and 1: token `sink` is a sink
                p[0, :2, i, : i + 1] += 0.1 / (i + 1)
                p[0, 2:, i, : i + 1] += 0.5 / (i + 1)
            else:
                p[0, :, i, : i + 1] += 0.5 / (i + 1)
        h = torch.randn(B, T, Dm)
        h[0, sink] = 2.0 * h[0, 0]
        if layer == 1:
            h[0, 0, 3], h[0, 9, 3] = 900.0, 1800.0
        analyzer(LayerCapture(layer, p, torch.zeros(B, T, Dm), torch.zeros(B, T, Dm), h))
    return analyzer.report(step=3, token_labels=labels)


def test_report_json_lists_all_massive_entries_and_their_tokens():
    rep = _handmade_report(labels=[[f"w{i}" for i in range(40)]])
    layer = rep.to_json()["layers"][1]
    assert len(layer["top_k"]) == 1 and layer["massive_count"] == 2
    assert [(e["token"], e["feature"], e["value"]) for e in layer["massive_entries"]] == [(0, 3, 900.0), (9, 3, 1800.0)]
    assert layer["massive_entries_truncated"] is False
    assert [(m["token"], m["role"], m["label"], m["features"], m["is_sink"]) for m in layer["massive_tokens"]] == [
        (9, "delimiter", "w9", [3], True), (0, "bos", "w0", [3], True)]     # largest first
    assert [(t["token"], t["label"]) for t in layer["sink_tokens"]] == [(0, "w0"), (9, "w9")]
    assert rep.to_json()["token_labels"][0][9] == "w9"
    # without labels a token is named by its role and position
    assert _handmade_report().label(0, 9) == "delimiter@9"


def test_cosine_figure_compares_each_layers_own_sinks():
    from trainer.monitor.figures import draw_cosine

    rep = _handmade_report()
    assert [[t.token for t in s.sink_tokens] for s in rep.layers] == [[0, 5], [0, 9]]
    fig = draw_cosine(rep)
    ax = fig.axes[0]
    red, blue = ax.lines[0].get_ydata(), ax.lines[1].get_ydata()
    for i, s in enumerate(rep.layers):   # the curve is the per-layer summary
        assert red[i] == pytest.approx(s.cos_to_bos_sink) and blue[i] == pytest.approx(s.cos_to_bos_nonsink)
        assert red[i] == pytest.approx(1.0, abs=1e-5)       # only that layer's sink is a copy of BOS
    # the old curve (tokens that are a sink in any layer) would have mixed in the other layer's sink
    ever = [float(s.cos_to_bos[0, [5, 9]].mean()) for s in rep.layers]
    assert all(e < 0.9 for e in ever)
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel() and ax.get_legend() is not None


def test_attention_figure_names_the_tokens_and_compares_like_with_like():
    from trainer.monitor.figures import draw_attention

    labels = [["<s>"] + [f"t{i}" for i in range(1, 40)]]
    rep = _handmade_report(labels)
    for layer, sink in ((0, 5), (1, 9)):
        s = rep.layer(layer)
        fig = draw_attention(rep, layer, rep.maps[layer], head=None)
        ax, bx = fig.axes[0], fig.axes[1]
        # the keys of the text-like stretch are named by their labels, the audio stretches by role
        names = [t.get_text() for t in bx.get_xticklabels()]
        assert names[0] == "<s>" and "t5" in names and "t9" in names and any(n.startswith("audio") for n in names)
        assert [t.get_text() for t in ax.get_yticklabels()] == names
        # bars: a head's score (the largest over heads) against the per-head threshold epsilon
        bars = bx.patches[:40]
        torch.testing.assert_close(torch.tensor([b.get_height() for b in bars], dtype=torch.float32),
                                   s.sink_scores[0].max(0).values, atol=1e-6, rtol=0)
        assert bx.lines[0].get_ydata()[0] == rep.sink_epsilon
        red = [i for i, b in enumerate(bars) if b.get_facecolor()[:3] == (0.8392156862745098, 0.15294117647058825,
                                                                          0.1568627450980392)]
        assert red == [t.token for t in s.sink_tokens] == [0, sink]
        # a head mean would have left the sink under the line: the old bars said "no sink" here
        assert float(s.sink_scores[0, :, sink].mean()) < rep.sink_epsilon < float(s.sink_scores[0, :, sink].max())
        assert ax.get_title() and ax.get_ylabel() and bx.get_xlabel() and bx.get_ylabel()
        assert bx.get_legend() is not None
    one_head = draw_attention(rep, 1, rep.maps[1], head=2)
    torch.testing.assert_close(torch.tensor([b.get_height() for b in one_head.axes[1].patches[:40]], dtype=torch.float32),
                               rep.layer(1).sink_scores[0, 2], atol=1e-6, rtol=0)


def test_every_figure_is_titled_and_labelled():
    from trainer.monitor.figures import draw_activations, draw_bos_heads

    rep = _handmade_report()
    act = draw_activations(rep, 1, rep.maps[1]).axes[0]
    assert "massive features [3]" in act.get_title() and act.get_legend() is not None
    assert act.get_xlabel() and act.get_ylabel() and act.get_zlabel()
    assert [t.get_text() for t in act.get_xticklabels()] == ["bos@0", "delimiter@9"]   # the carriers
    heads = draw_bos_heads(rep)
    assert heads.axes[0].get_title() and heads.axes[0].get_xlabel() and heads.axes[0].get_ylabel()
    assert heads.axes[1].get_ylabel()           # the colour bar says what the colour is


def test_crowded_axes_keep_bos_delimiters_and_feature_runs(monkeypatch):
    from trainer.monitor import figures

    rep = _handmade_report([["<s>"] + [f"t{i}" for i in range(1, 40)]])
    rep.token_roles[0, 10:] = int(TokenRole.TRANSCRIPT)            # 30 text tokens after the audio runs
    monkeypatch.setattr(figures, "_MAX_TICKS", 12)
    ticks, names = figures._token_ticks(rep, 40)
    assert names[:5] == ["<s>", "audio \u00d74", "t5", "audio \u00d73", "t9"]   # always named
    assert 8 <= len(names) - 5 <= 12 and names[5] == "t10" and ticks == sorted(ticks)
