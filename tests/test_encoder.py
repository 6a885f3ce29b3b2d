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
