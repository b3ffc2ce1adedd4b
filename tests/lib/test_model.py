import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from letstalk import PRESETS, LetsTalkConfig, LetsTalkTransformer, count_parameters
from letstalk.transformer import LetsTalkBlock

FUSIONS = [(p, a) for p in ("symbiotic", "direct", "siamese") for a in ("direct", "siamese", "symbiotic")]


def inputs(cfg: LetsTalkConfig, b: int = 2, f: int | None = None, m: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    f = cfg.num_frames if f is None else f
    m = cfg.num_motion_frames if m is None else m
    s, c = cfg.input_size, cfg.in_channels
    return dict(
        x=torch.randn(b, f, c, s, s, generator=g),
        t=torch.randint(0, 1000, (b,), generator=g),
        portrait=torch.randn(b, c, s, s, generator=g),
        audio=torch.randn(b, f, cfg.audio_window, cfg.audio_layers, cfg.audio_feature_dim, generator=g),
        motion=torch.randn(b, m, c, s, s, generator=g),
    )


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give the zero-initialised layers weights too, so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_presets_and_parameter_counts():
    assert list(PRESETS) == ["tiny", "demo", "avatar", "avatar-revoice", "S", "B", "L"]
    counts = {}
    for name in ("B", "L"):
        with torch.device("meta"):
            counts[name] = count_parameters(LetsTalkTransformer.from_preset(name))
    assert abs(counts["B"]["backbone"] / 193e6 - 1) < 0.01
    assert abs(counts["L"]["backbone"] / 663e6 - 1) < 0.02
    assert abs(counts["B"]["audio_projection"] / 36.5e6 - 1) < 0.01
    assert LetsTalkConfig.from_name("L").depth == 24 and LetsTalkConfig.from_name("B").hidden_size == 768
    with pytest.raises(ValueError, match="unknown preset"):
        LetsTalkConfig.from_name("XXL")
    with pytest.raises(ValueError, match="portrait_fusion"):
        LetsTalkConfig.from_name("tiny", portrait_fusion="glue")


@pytest.mark.parametrize("portrait_fusion,audio_fusion", FUSIONS)
def test_shapes_for_every_fusion_scheme(portrait_fusion, audio_fusion):
    model = randomize(LetsTalkTransformer.from_preset("tiny", portrait_fusion=portrait_fusion, audio_fusion=audio_fusion))
    cfg = model.cfg
    kw = inputs(cfg)
    out = model(**kw)
    assert out.shape == (2, cfg.num_frames, 2 * cfg.in_channels, cfg.input_size, cfg.input_size)
    assert torch.isfinite(out).all()
    # unconditional (no audio), no motion frames, a shorter clip
    short = inputs(cfg, f=3, m=0)
    out = model(short["x"], short["t"], short["portrait"])
    assert out.shape[:2] == (2, 3)
    # audio changes the output (the audio path is wired in every scheme)
    other = dict(kw, audio=torch.randn_like(kw["audio"]))
    assert not torch.allclose(model(**kw), model(**other))


def test_untrained_block_is_identity():
    cfg = LetsTalkConfig.from_name("tiny", audio_fusion="symbiotic")
    model = LetsTalkTransformer(**cfg.to_dict())
    block = model.blocks[0]
    d, p = cfg.hidden_size, cfg.tokens_per_frame
    x = torch.randn(2, cfg.num_frames, p, d)
    motion = torch.randn(2, 2, p, d)
    side = torch.randn(2, cfg.num_frames, p + 4, d)
    c = torch.randn(2, d)
    x2, motion2, side2 = block(x, c, motion, side)
    assert torch.equal(x2, x) and torch.equal(motion2, motion) and torch.equal(side2, side)
    # ...and it is not the identity once the zero-initialised layers have weights
    randomize(block)
    assert not torch.allclose(block(x, c, motion, side)[0], x)


def test_audio_projection_is_trained():
    from letstalk.diffusion import GaussianDiffusion

    model = LetsTalkTransformer.from_preset("tiny")
    names = {n for n, _ in model.named_parameters()}
    assert any(n.startswith("audio_proj.") for n in names)
    before = {n: p.detach().clone() for n, p in model.audio_proj.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    diffusion = GaussianDiffusion()
    kw = inputs(model.cfg)
    for _ in range(3):  # the zero-initialised output layers open up after the first step
        loss = diffusion.training_losses(
            lambda xt, t: model(xt, t, kw["portrait"], kw["audio"], kw["motion"]), kw["x"], kw["t"])["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    grads = [p.grad for p in model.audio_proj.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(not torch.equal(before[n], p) for n, p in model.audio_proj.named_parameters())


def test_portrait_tokens_never_enter_temporal_or_cross_attention():
    model = randomize(LetsTalkTransformer.from_preset("tiny"))
    cfg = model.cfg
    kw = inputs(cfg)
    seen = {"temporal": [], "cross": []}
    hooks = []
    for block in model.blocks:
        hooks.append(block.temporal_attn.register_forward_hook(lambda m, a, o: seen["temporal"].append(a[0].shape)))
        hooks.append(block.cross_attn.register_forward_hook(lambda m, a, o: seen["cross"].append(a[0].shape)))
    model(**kw)
    p, m, f = cfg.tokens_per_frame, cfg.num_motion_frames, cfg.num_frames
    # temporal attention: one sequence per (batch, video token) of length M+F: P, not 2P
    assert all(s == (2 * p, m + f, cfg.hidden_size) for s in seen["temporal"])
    # cross-attention queries: the P video tokens of each frame, never the portrait tokens
    assert all(s == (2 * f, p, cfg.hidden_size) for s in seen["cross"])
    for h in hooks:
        h.remove()
    # the first block's temporal attention input does not depend on the portrait at all
    first = []
    h = model.blocks[0].temporal_attn.register_forward_hook(lambda m, a, o: first.append(a[0].clone()))
    model(**kw)
    model(**dict(kw, portrait=torch.randn_like(kw["portrait"])))
    h.remove()
    assert torch.equal(first[0], first[1])


def test_motion_frames_act_only_through_temporal_attention():
    model = randomize(LetsTalkTransformer.from_preset("tiny"))
    kw = inputs(model.cfg)
    other = dict(kw, motion=torch.randn_like(kw["motion"]))
    assert not torch.allclose(model(**kw), model(**other))
    with torch.no_grad():
        for block in model.blocks:  # cut the temporal-attention residual
            block.temporal_fc.weight.zero_()
            block.temporal_fc.bias.zero_()
    assert torch.equal(model(**kw), model(**other))


@pytest.mark.parametrize("field,value,message", [
    ("x", torch.randn(2, 8, 4, 16, 16), r"x must have shape \(batch, 1..8, 4, 8, 8\)"),
    ("x", torch.randn(2, 9, 4, 8, 8), r"x must have shape \(batch, 1..8, 4, 8, 8\)"),
    ("x", torch.randn(8, 4, 8, 8), r"x must have shape"),
    ("audio", torch.randn(2, 8, 5, 4, 31), r"audio must have shape \(2, 8, 5, 4, 32\)"),
    ("audio", torch.randn(2, 7, 5, 4, 32), r"audio must have shape \(2, 8, 5, 4, 32\)"),
    ("portrait", torch.randn(2, 3, 8, 8), r"portrait must have shape \(2, 4, 8, 8\)"),
    ("motion", torch.randn(2, 3, 4, 8, 8), r"motion must have shape \(2, 0..2, 4, 8, 8\)"),
    ("x", torch.zeros(2, 8, 4, 8, 8, dtype=torch.int64), r"x must be a floating-point tensor"),
    ("audio", torch.zeros(2, 8, 5, 4, 32, dtype=torch.int32), r"audio must be a floating-point tensor"),
])
def test_bad_inputs_name_the_expected_shape(field, value, message):
    model = LetsTalkTransformer.from_preset("tiny")
    kw = inputs(model.cfg)
    kw[field] = value
    with pytest.raises(ValueError, match=message):
        model(**kw)


def test_save_load_round_trip_is_bit_identical(tmp_path):
    model = randomize(LetsTalkTransformer.from_preset("tiny", portrait_fusion="siamese", audio_fusion="symbiotic"))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["portrait_fusion"] == "siamese" and saved["hidden_size"] == 64
    loaded = LetsTalkTransformer.from_pretrained(tmp_path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kw = inputs(model.cfg)
    assert torch.equal(model(**kw), loaded(**kw))


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomize(LetsTalkTransformer.from_preset("tiny"))
    kw = inputs(model.cfg)

    def grads():
        model.zero_grad()
        model(**kw).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    ckpt = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, ckpt))


def test_classifier_free_guidance():
    model = randomize(LetsTalkTransformer.from_preset("tiny"))
    kw = inputs(model.cfg)
    plain = model(**kw)
    assert torch.equal(model.forward_with_guidance(**kw, guidance=1.0), plain)
    uncond = model(**dict(kw, audio=torch.zeros_like(kw["audio"])))
    guided = model.forward_with_guidance(**kw, guidance=3.0)
    c = model.cfg.in_channels
    torch.testing.assert_close(guided[:, :, :c], uncond[:, :, :c] + 3.0 * (plain[:, :, :c] - uncond[:, :, :c]),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided[:, :, c:], plain[:, :, c:], atol=1e-5, rtol=1e-5)
    # unconditional mode is the same as all-zero audio features
    torch.testing.assert_close(model(kw["x"], kw["t"], kw["portrait"], None, kw["motion"]), uncond)


def test_block_count_matches_depth():
    model = LetsTalkTransformer.from_preset("tiny")
    assert len(model.blocks) == model.cfg.depth
    assert all(isinstance(b, LetsTalkBlock) for b in model.blocks)


def test_model_library_never_imports_the_platform_runtime():
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        for name in ("ray", "deepspeed", "mlflow"):
            sys.modules[name] = None  # any import of them raises ImportError
        import letstalk
        names = [m.name for m in pkgutil.walk_packages(letstalk.__path__, "letstalk.")]
        for name in names:
            importlib.import_module(name)
        print(len(names))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 3
