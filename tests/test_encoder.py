"""The open_clip encoder: tiny seeded model, normalised fp16 vectors, clear weight errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ROOT

from memescale.config import load_config
from memescale.embed.encoder import ImageTextEncoder, WeightsUnavailableError, check_weights, model_image_size


@pytest.fixture(scope="module")
def tiny():
    return ImageTextEncoder(load_config(ROOT / "configs" / "tiny.toml").model)


def test_tiny_model_is_deterministic_and_normalised(tiny):
    x = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    v = tiny.encode_images(x)
    assert v.dtype == np.float16 and v.shape == (5, tiny.dim) == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(v.astype(np.float32), axis=1), 1, atol=2e-3)
    again = ImageTextEncoder(load_config(ROOT / "configs" / "tiny.toml").model).encode_images(x)
    assert np.array_equal(v, again)
    assert not np.allclose(v[0], v[1])
    t = tiny.encode_texts(["a cat", "success kid", "x" * 5000])
    assert t.shape == (3, 64) and np.isfinite(t.astype(np.float32)).all()
    assert tiny.model_tag == "memescale-tiny-vit/random-seed0"
    with pytest.raises(ValueError, match="expected"):
        tiny.encode_images(x[:, :32])


def test_image_size_without_building_the_model():
    assert model_image_size(load_config(ROOT / "configs" / "tiny.toml").model) == 64
    assert model_image_size(load_config(ROOT / "configs" / "gpu.toml").model) == 384


def test_missing_weights_say_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = load_config(ROOT / "configs" / "gpu.toml").model
    with pytest.raises(WeightsUnavailableError, match="model.pretrained"):
        check_weights(cfg)
    cfg.pretrained = str(tmp_path / "missing.safetensors")
    with pytest.raises(WeightsUnavailableError, match="missing.safetensors"):
        ImageTextEncoder(cfg)
    cfg.pretrained = ""
    with pytest.raises(WeightsUnavailableError, match="is empty"):
        check_weights(cfg)


def test_device_and_precision_resolution(caplog):
    from memescale.embed.encoder import resolve_device

    assert resolve_device("auto", "fp16", True, 1) == ("cuda", "fp16")
    assert resolve_device("cuda:1", "fp16", True, 2) == ("cuda:1", "fp16")
    with caplog.at_level("WARNING", logger="memescale.embed.encoder"):
        assert resolve_device("auto", "fp16", False, 0) == ("cpu", "fp32")
    assert "fp16 asked for, but the encoder runs on cpu (no CUDA device visible)" in caplog.text
    assert resolve_device("cpu", "fp32", True, 1) == ("cpu", "fp32")
    with pytest.raises(ValueError, match="model.device=cuda:2 but this machine has 2 CUDA"):
        resolve_device("cuda:2", "fp16", True, 2)
    with pytest.raises(ValueError, match="has no CUDA"):
        resolve_device("cuda", "fp32", False, 0)


def test_the_fp16_path_on_a_mocked_device(monkeypatch, tiny):
    """What a GPU runs: fp16 weights, pixels normalised in fp16 on the device. The device is
    mocked (the CPU reports itself as the resolved device, precision kept at fp16): the
    vectors stay unit-length fp16 and close to the fp32 model's."""
    import memescale.embed.encoder as enc

    monkeypatch.setattr(enc, "resolve_device", lambda device, precision, cuda, n: ("cpu", "fp16"))
    half = ImageTextEncoder(load_config(ROOT / "configs" / "tiny.toml", ["model.precision=\"fp16\""]).model)
    assert str(half._dtype()) == "torch.float16" and half._mean.dtype == half._dtype()
    x = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    a, b = half.encode_images(x).astype(np.float32), tiny.encode_images(x).astype(np.float32)
    assert a.shape == b.shape and np.isfinite(a).all()
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=3e-3)
    assert float(np.min(np.sum(a * b, axis=1))) > 0.99
    t = half.encode_texts(["a cat", "success kid"]).astype(np.float32)
    assert float(np.min(np.sum(t * tiny.encode_texts(["a cat", "success kid"]).astype(np.float32), axis=1))) > 0.99


def test_tokenize_once_matches_the_tokenizer_and_refuses_overflow(tiny):
    from memescale.embed.encoder import TextTooLong, token_count

    for text in ("a cat", "success kid when the code compiles", ""):
        assert np.array_equal(tiny.tokenize(text), tiny.tokenizer([text])[0].numpy())
    ctx = tiny.context_length
    fits = " ".join(["cat"] * (ctx - 2))  # exactly the context: start + ctx-2 words + end
    assert token_count(tiny.tokenizer, fits) == ctx and tiny.tokenize(fits).shape == (ctx,)
    with pytest.raises(TextTooLong, match=f"{ctx + 1} tokens long"):
        tiny.tokenize(fits + " cat")
    a = tiny.encode_tokens(np.stack([tiny.tokenize("a cat"), tiny.tokenize("a dog")]))
    assert np.array_equal(a, tiny.encode_texts(["a cat", "a dog"]))


def test_text_only_and_int8_text_towers(tiny):
    cfg = load_config(ROOT / "configs" / "tiny.toml").model
    texts = [f"{w} meme number {i}" for i, w in enumerate(["cat", "dog", "boss", "coffee", "bug", "pizza"])]
    ref = tiny.encode_texts(texts).astype(np.float32)
    text = ImageTextEncoder(cfg, text_only=True)
    assert not hasattr(text.model, "visual") and text.dim == tiny.dim
    assert np.array_equal(text.encode_texts(texts), tiny.encode_texts(texts))
    with pytest.raises(RuntimeError, match="text-only"):
        text.encode_images(np.zeros((1, 64, 64, 3), np.uint8))
    q = ImageTextEncoder(cfg, text_only=True, text_int8=True)
    assert q.text_int8
    got = q.encode_texts(texts).astype(np.float32)
    assert float(np.min(np.sum(got * ref, axis=1))) > 0.99
    # the attention's projections are quantised too, not left in fp32 inside MultiheadAttention
    import torch

    tower = q.model.text if hasattr(q.model, "text") else q.model.transformer
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in tower.modules())
    dyn = torch.ao.nn.quantized.dynamic.Linear
    blocks = _blocks(tower)
    assert blocks and sum(isinstance(m, dyn) for m in tower.modules()) >= 4 * len(blocks)


def _blocks(tower):
    import torch

    return [m for m in tower.modules() if any(isinstance(c, torch.nn.LayerNorm) for c in m.children())
            and hasattr(m, "mlp")]


def test_split_attention_matches_multihead_attention():
    """The quantisable self-attention gives MultiheadAttention's outputs, batch-first or not,
    with and without an additive mask."""
    import torch

    from memescale.embed.encoder import _split_attention_projections

    torch.manual_seed(0)
    for batch_first in (True, False):
        mha = torch.nn.MultiheadAttention(48, 4, batch_first=batch_first).eval()
        holder = torch.nn.Sequential(mha)
        x = torch.randn(3, 7, 48) if batch_first else torch.randn(7, 3, 48)
        masks = [None, torch.triu(torch.full((7, 7), float("-inf")), 1),  # additive, causal
                 torch.triu(torch.ones(7, 7, dtype=torch.bool), 1),  # boolean, True = masked
                 torch.randn(3 * 4, 7, 7)]  # per batch and head, as open_clip's pad masks
        want = [mha(x, x, x, need_weights=False, attn_mask=m)[0] for m in masks]
        assert _split_attention_projections(torch, holder) == 1
        got = [holder[0](x, x, x, need_weights=False, attn_mask=m)[0] for m in masks]
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_an_int8_text_tower_that_drifts_from_fp32_is_refused(monkeypatch, tiny, caplog):
    import memescale.embed.encoder as enc

    monkeypatch.setattr(enc, "INT8_MIN_COSINE", 1.01)  # nothing quantised can keep this
    cfg = load_config(ROOT / "configs" / "tiny.toml").model
    with caplog.at_level("WARNING", logger="memescale.embed.encoder"):
        q = ImageTextEncoder(cfg, text_only=True, text_int8=True)
    assert not q.text_int8 and "int8 text tower refused" in caplog.text
    assert np.array_equal(q.encode_texts(["a cat"]), tiny.encode_texts(["a cat"]))


def test_random_weights_get_stand_in_tokens_where_the_tokenizer_cannot_load(monkeypatch):
    """SigLIP's tokenizer needs `transformers` and the hub: a random-weight (timing) model gets
    stand-in tokens of its context length and vocabulary; a real one gets the instructions."""
    import open_clip

    from memescale.embed.encoder import StandInTokenizer, load_tokenizer, token_count

    real = open_clip.get_tokenizer

    def unavailable(name, *a, **kw):
        if "SigLIP" in name:
            raise OSError("no tokenizer files here")
        return real(name, *a, **kw)

    monkeypatch.setattr(open_clip, "get_tokenizer", unavailable)
    cfg = load_config(ROOT / "configs" / "cpu.toml", ["model.random_weights=true", 'model.pretrained=""']).model
    tok = load_tokenizer(cfg)
    assert isinstance(tok, StandInTokenizer) and tok.context_length == 64
    ids = tok(["a cat meme", "when the code compiles"])
    assert tuple(ids.shape) == (2, 64) and int(ids.max()) < tok.vocab_size
    assert token_count(tok, "a cat meme") == 5
    with pytest.raises(WeightsUnavailableError, match="no tokenizer files here"):
        load_tokenizer(load_config(ROOT / "configs" / "cpu.toml").model)
