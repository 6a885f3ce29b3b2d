"""open_clip image and text towers: pixels or texts -> L2-normalised float16 vectors.

Weights come from a pretrained tag (`model.pretrained = "webli"`, fetched by open_clip from
the Hugging Face hub or found in its cache), a local checkpoint file, or -- for the project's
tiny test architecture only -- seeded random initialisation. When weights cannot be had the
constructor raises `WeightsUnavailableError` whose message says how to provide them.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import numpy as np

from memescale.config import ModelConfig
from memescale.embed.torchvision_shim import ensure_torchvision

log = logging.getLogger(__name__)


INT8_MIN_COSINE = 0.995  # an int8 text tower must keep this cosine with fp32 on every probe text
PROBE_TEXTS = ("cat", "when the code finally compiles", "success kid", "distracted boyfriend meme",
               "a dog wearing sunglasses at the beach", "monday morning coffee", "this is fine",
               "one does not simply walk into mordor")


class WeightsUnavailableError(RuntimeError):
    """The configured model weights (or tokenizer files) could not be loaded."""


def _how_to_provide(cfg: ModelConfig, cause: BaseException) -> str:
    return (
        f"cannot load weights for model {cfg.name!r} (pretrained={cfg.pretrained!r}): "
        f"{type(cause).__name__}: {str(cause)[:300]}\n"
        "Provide them in one of these ways:\n"
        f"  1. on a machine with internet access run `python -c \"import open_clip; "
        f"open_clip.create_model('{cfg.name}', pretrained='{cfg.pretrained}')\"` and copy its "
        "Hugging Face cache (~/.cache/huggingface) to this machine (or set HF_HOME to it);\n"
        "  2. download the checkpoint file (open_clip_model.safetensors or "
        "open_clip_pytorch_model.bin) and set `model.pretrained` to its local path, e.g. "
        "`--set model.pretrained=\"/models/siglip/open_clip_model.safetensors\"`;\n"
        "  3. for plumbing tests only, use configs/tiny.toml (random weights)."
    )


def resolve_device(device: str, precision: str, cuda: bool, n_cuda: int) -> tuple[str, str]:
    """(torch device, precision) for `model.device` and `model.precision` on a machine where
    CUDA is available or not (`cuda`) with `n_cuda` devices. "auto" takes cuda when there is
    one. fp16 on a CPU is not supported by every op and slower than fp32 there: it becomes
    fp32 with a warning naming the device. ValueError for a CUDA device the machine lacks."""
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    if device.startswith("cuda"):
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if not cuda or index >= n_cuda:
            raise ValueError(f"model.device={device} but this machine has {n_cuda if cuda else 'no'} CUDA device(s): "
                             "use model.device=\"auto\" or \"cpu\"")
        return device, precision
    if precision == "fp16":
        log.warning("model.precision=fp16 asked for, but the encoder runs on %s%s: using fp32", device,
                    "" if cuda else " (no CUDA device visible)")
    return device, "fp32"


class TextTooLong(ValueError):
    """A text over the model's context (`tokens` counts the start and end tokens)."""

    def __init__(self, tokens: int, context: int):
        super().__init__(f"text is {tokens} tokens long (start and end included); the model reads at most {context}")
        self.tokens = tokens


class ImageTextEncoder:
    """A loaded open_clip model on one device.

    Attributes: `image_size` (square input side in pixels), `dim` (embedding width),
    `model_tag` ("name/pretrained" recorded next to every vector).
    `text_only`: the image tower is dropped after loading (its memory freed; encode_images
    raises). `text_int8`: the text tower's linear layers run int8 dynamic quantisation (CPU
    only: the fast path for text queries on a CPU server; ignored with a warning on CUDA).
    """

    def __init__(self, cfg: ModelConfig, text_only: bool = False, text_int8: bool = False):
        ensure_torchvision()
        import open_clip
        import torch

        self.cfg = cfg
        if cfg.config_file:
            open_clip.add_model_config(cfg.config_file)
        self.device, precision = resolve_device(cfg.device, cfg.precision, torch.cuda.is_available(),
                                                torch.cuda.device_count())
        self._torch = torch
        self.model = self._create(open_clip, torch, precision)
        self.model.eval()
        self._tokenizer = None
        self._pad: int | None = None
        visual = self.model.visual
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        pre = getattr(visual, "preprocess_cfg", {}) or {}
        mean = pre.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = pre.get("std", open_clip.OPENAI_DATASET_STD)
        dtype = self._dtype()
        self._mean = torch.tensor(mean, dtype=dtype, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(std, dtype=dtype, device=self.device).view(1, 3, 1, 1) * 255
        with torch.no_grad():
            probe = torch.zeros(1, 3, self.image_size, self.image_size, dtype=dtype, device=self.device)
            self.dim = int(self.model.encode_image(probe).shape[-1])
        self.text_only = text_only
        if text_only:
            del self.model.visual  # text queries only: the image tower's memory goes back
        self.text_int8 = False
        if text_int8:
            if self.device.startswith("cuda"):
                log.warning("text_int8 asked for on %s: int8 dynamic quantisation runs on CPUs only; ignored",
                            self.device)
            else:
                self.text_int8 = self._quantize_text_tower()
        self.model_tag = f"{cfg.name}/{cfg.pretrained or f'random-seed{cfg.seed}'}"
        log.info("encoder %s on %s (%s%s%s), %d px -> %d-d", self.model_tag, self.device, precision,
                 ", text only" if text_only else "", ", text int8" if self.text_int8 else "", self.image_size, self.dim)

    def _quantize_text_tower(self) -> bool:
        """int8 dynamic quantisation of the text tower's linear layers (open_clip's CLIP keeps
        it in `transformer`, CustomTextCLIP such as SigLIP in `text`), the self-attention's
        input and output projections included (`_split_attention_projections`: torch's
        MultiheadAttention keeps them out of reach of dynamic quantisation, about a third of
        the tower's weights); the image tower stays.
        Checked on load: unless every probe text's int8 embedding keeps a cosine of at least
        INT8_MIN_COSINE with the fp32 one, the fp32 tower stays (a warning says so) and this
        returns False."""
        torch = self._torch
        name = "text" if hasattr(self.model, "text") else "transformer"
        original = getattr(self.model, name)
        probe = self._probe_tokens()
        before = self.encode_tokens(probe).astype(np.float32)
        tower = copy.deepcopy(original)
        _split_attention_projections(torch, tower)  # so the attention's projections quantise too
        tower = torch.ao.quantization.quantize_dynamic(tower, {torch.nn.Linear}, dtype=torch.qint8)
        for m in tower.modules():
            if isinstance(m, torch.ao.nn.quantized.dynamic.Linear):
                m.int8_original_dtype = torch.float32  # what open_clip asks a quantised layer for
        projection = getattr(original, "text_projection", None)
        if isinstance(projection, torch.nn.Linear):  # open_clip calls it only as an nn.Linear (SigLIP's)
            tower.text_projection = projection
        setattr(self.model, name, tower)
        cosine = float(np.min(np.sum(self.encode_tokens(probe).astype(np.float32) * before, axis=1)))
        if cosine < INT8_MIN_COSINE:
            setattr(self.model, name, original)
            log.warning("int8 text tower refused: cosine %.4f with fp32 on the probe texts (< %.3f); fp32 it is",
                        cosine, INT8_MIN_COSINE)
            return False
        log.info("int8 text tower: cosine %.4f with fp32 on the probe texts", cosine)
        return True

    def _probe_tokens(self) -> np.ndarray:
        """Token rows to compare text towers on: PROBE_TEXTS through the model's tokenizer, or
        (a tokenizer that cannot be loaded here) seeded ids across its vocabulary."""
        try:
            return self.tokenizer(list(PROBE_TEXTS)).numpy().astype(np.int64)
        except WeightsUnavailableError:
            ctx = int(getattr(getattr(self.model, "text", self.model), "context_length", 77))
            vocab = int(getattr(getattr(self.model, "text", self.model), "vocab_size", 32000))
            rng = np.random.default_rng(0)
            rows = np.zeros((len(PROBE_TEXTS), ctx), np.int64)
            for i in range(len(PROBE_TEXTS)):
                n = int(rng.integers(3, min(ctx, 16)))
                rows[i, :n] = rng.integers(1, vocab, n)
            return rows

    def _create(self, open_clip, torch, precision: str):
        cfg = self.cfg
        if not cfg.pretrained:
            if not cfg.random_weights:
                raise WeightsUnavailableError(_how_to_provide(cfg, ValueError("model.pretrained is empty")))
            torch.manual_seed(cfg.seed)
            return open_clip.create_model(cfg.name, pretrained=None, precision=precision, device=self.device)
        if _is_path(cfg.pretrained) and not Path(cfg.pretrained).is_file():
            raise WeightsUnavailableError(_how_to_provide(cfg, FileNotFoundError(cfg.pretrained)))
        try:
            return open_clip.create_model(
                cfg.name, pretrained=cfg.pretrained, precision=precision, device=self.device,
                require_pretrained=True,
            )
        except Exception as e:  # hub/network/format errors all mean "no usable weights"
            raise WeightsUnavailableError(_how_to_provide(cfg, e)) from e

    def _dtype(self):
        """The dtype the image tower takes: its first convolution's or linear layer's weights
        (open_clip's fp16 keeps some parameters, e.g. embeddings and norms, in fp32)."""
        torch = self._torch
        for m in getattr(self.model, "visual", self.model).modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                return m.weight.dtype
        return next(self.model.parameters()).dtype

    @property
    def tokenizer(self):
        """The model's tokenizer, loaded on first use (SigLIP's needs the Hugging Face cache)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.cfg)
        return self._tokenizer

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", 77))

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) uint8 RGB at S = image_size -> (B, dim) float16, L2-normalised.

        Normalisation (mean/std) happens on the device; cost is one forward pass.
        """
        torch = self._torch
        if self.text_only:
            raise RuntimeError("this encoder was loaded text-only: it encodes no images")
        if pixels.ndim != 4 or pixels.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected (B, {self.image_size}, {self.image_size}, 3) uint8, got {pixels.shape}")
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
            x = x.permute(0, 3, 1, 2).to(self._dtype())
            x = (x - self._mean) / self._std
            v = self.model.encode_image(x).float()
            v = torch.nn.functional.normalize(v, dim=-1)
        return v.cpu().numpy().astype(np.float16)

    def tokenize(self, text: str) -> np.ndarray:
        """One text's model input: (context_length,) int64 tokens. TextTooLong when the text
        does not fit. The text is tokenized once; only a text that fills the whole context is
        counted again without truncation, to tell a fit from an overflow."""
        if self._pad is None:
            self._pad = int(self.tokenizer([""])[0][-1])  # what fills the unused positions
        row = self.tokenizer([text])[0].numpy().astype(np.int64)
        if row[-1] != self._pad:  # every position taken: exactly full, or cut
            n = token_count(self.tokenizer, text)
            if n is not None and n > row.shape[0]:
                raise TextTooLong(n, row.shape[0])
        return row

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """(B, context_length) int64 tokens (`tokenize`) -> (B, dim) float16, L2-normalised."""
        torch = self._torch
        with torch.inference_mode():
            v = self.model.encode_text(torch.from_numpy(np.ascontiguousarray(tokens)).to(self.device)).float()
            v = torch.nn.functional.normalize(v, dim=-1)
        return v.cpu().numpy().astype(np.float16)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> (B, dim) float16, L2-normalised (tokens past the context length are cut)."""
        return self.encode_tokens(self.tokenizer(list(texts)).numpy())


def load_tokenizer(cfg: ModelConfig):
    """The configured model's open_clip tokenizer (without building the model). Where it cannot
    be loaded: WeightsUnavailableError, except for random weights (timing runs, whose outputs
    mean nothing anyway), which get a `StandInTokenizer` and a warning."""
    ensure_torchvision()
    import open_clip

    if cfg.config_file:
        open_clip.add_model_config(cfg.config_file)
    try:
        return open_clip.get_tokenizer(cfg.name)
    except Exception as e:
        if not cfg.random_weights:
            raise WeightsUnavailableError(_how_to_provide(cfg, e)) from e
        log.warning("the tokenizer of %s cannot be loaded (%s); random weights, so stand-in tokens: "
                    "open_clip's built-in BPE at the model's context length, ids folded into its vocabulary",
                    cfg.name, e)
        return StandInTokenizer(open_clip, cfg.name)


class StandInTokenizer:
    """Tokens of the right shape for a model whose own tokenizer cannot be loaded (SigLIP's
    needs the Hugging Face hub), for random-weight timing runs only: open_clip's built-in CLIP
    BPE at the model's context length, ids folded into its vocabulary. Callable like an
    open_clip tokenizer: list of texts -> (n, context_length) int64 tensor."""

    def __init__(self, open_clip, name: str):
        text_cfg = (open_clip.get_model_config(name) or {}).get("text_cfg", {})
        self.context_length = int(text_cfg.get("context_length", 77))
        self.vocab_size = int(text_cfg.get("vocab_size", 49408))
        self._bpe = open_clip.get_tokenizer("ViT-B-32", context_length=self.context_length)
        self.sot_token_id = self._bpe.sot_token_id

    def __call__(self, texts, context_length: int | None = None):
        return self._bpe(texts, context_length=context_length or self.context_length) % self.vocab_size

    def encode(self, text: str) -> list[int]:
        return self._bpe.encode(text)


def token_count(tokenizer, text: str) -> int | None:
    """Tokens `text` takes in the model's context, start/end tokens included; None if unknown."""
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id"):
        return len(tokenizer.encode(text)) + 2
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is not None:
        clean = getattr(tokenizer, "clean_fn", lambda t: t)
        return len(hf(clean(text), truncation=False)["input_ids"])
    return None


def model_image_size(cfg: ModelConfig) -> int:
    """The model's square input side, read from its open_clip config without building it."""
    ensure_torchvision()
    import open_clip

    if cfg.config_file:
        open_clip.add_model_config(cfg.config_file)
    model_cfg = open_clip.get_model_config(cfg.name)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model {cfg.name!r}")
    size = model_cfg["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def check_weights(cfg: ModelConfig) -> None:
    """Fail fast, before a pipeline starts, when the configured weights cannot be had.

    Random weights: fine. A local path: must be a file. A pretrained tag: open_clip's download
    (a no-op when cached) must succeed; this fills the cache that local workers then read.
    """
    if not cfg.pretrained:
        if not cfg.random_weights:
            raise WeightsUnavailableError(_how_to_provide(cfg, ValueError("model.pretrained is empty")))
        return
    if _is_path(cfg.pretrained):
        if not Path(cfg.pretrained).is_file():
            raise WeightsUnavailableError(_how_to_provide(cfg, FileNotFoundError(cfg.pretrained)))
        return
    ensure_torchvision()
    import open_clip

    pcfg = open_clip.get_pretrained_cfg(cfg.name, cfg.pretrained)
    if not pcfg:
        raise WeightsUnavailableError(_how_to_provide(cfg, KeyError(f"no pretrained tag {cfg.pretrained!r}")))
    try:
        open_clip.download_pretrained(pcfg)
    except Exception as e:
        raise WeightsUnavailableError(_how_to_provide(cfg, e)) from e


def _is_path(pretrained: str) -> bool:
    return os.sep in pretrained or Path(pretrained).suffix in {".bin", ".pt", ".pth", ".safetensors"}


def _split_attention_projections(torch, module) -> int:
    """Replace every self-attention `torch.nn.MultiheadAttention` under `module` (batch-first
    or not, q/k/v of one width, as open_clip's text towers use it) by `_SelfAttention`: the
    same weights as plain `nn.Linear` layers around `scaled_dot_product_attention`, so that
    dynamic quantisation reaches them. Same outputs up to float rounding; returns how many
    were replaced."""
    n = 0
    for name, child in list(module.named_children()):
        if (isinstance(child, torch.nn.MultiheadAttention) and child._qkv_same_embed_dim
                and child.bias_k is None and child.bias_v is None and not child.add_zero_attn):
            setattr(module, name, _SelfAttention.from_mha(torch, child))
            n += 1
        else:
            n += _split_attention_projections(torch, child)
    return n


class _SelfAttention:
    """Built by `from_mha` as a torch.nn.Module subclass (torch is imported lazily here)."""

    @staticmethod
    def from_mha(torch, mha):
        F = torch.nn.functional

        class SelfAttention(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                d = mha.embed_dim
                self.heads, self.batch_first = mha.num_heads, mha.batch_first
                self.in_proj = torch.nn.Linear(d, 3 * d, bias=mha.in_proj_bias is not None)
                self.in_proj.weight = torch.nn.Parameter(mha.in_proj_weight.detach().clone())
                if mha.in_proj_bias is not None:
                    self.in_proj.bias = torch.nn.Parameter(mha.in_proj_bias.detach().clone())
                self.out_proj = torch.nn.Linear(d, d, bias=mha.out_proj.bias is not None)
                self.out_proj.load_state_dict(mha.out_proj.state_dict())

            def forward(self, q, k=None, v=None, key_padding_mask=None, need_weights=False, attn_mask=None,
                        average_attn_weights=True, is_causal=False):
                if not (k is None or k is q) or not (v is None or v is q):
                    raise ValueError("SelfAttention takes self-attention only (q is k is v)")
                if key_padding_mask is not None or is_causal:
                    raise ValueError("SelfAttention takes the mask as attn_mask only")
                x = q if self.batch_first else q.transpose(0, 1)
                B, L, D = x.shape
                qkv = self.in_proj(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
                if attn_mask is not None:
                    if attn_mask.dtype == torch.bool:  # MultiheadAttention: True = masked out
                        attn_mask = torch.zeros(attn_mask.shape, dtype=x.dtype).masked_fill(attn_mask, float("-inf"))
                    if attn_mask.dim() == 3:  # (B * heads, L, L), as MultiheadAttention takes it
                        attn_mask = attn_mask.view(B, self.heads, L, L)
                out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
                out = self.out_proj(out.transpose(1, 2).reshape(B, L, D))
                return (out if self.batch_first else out.transpose(0, 1)), None

        return SelfAttention()
