"""Tokenizer over Hugging Face `tokenizers` (Rust): byte-level BPE or char-level, special tokens,
tokenizer.json save/load, chat templates (jinja2)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from .errors import LMStackError

EOT = "<|endoftext|>"
DEFAULT_SPECIALS = [EOT]
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|eom_id|>")
MASK = "[MASK]"
MASK_TOKENS = (MASK, "<mask>")  # masked-LM mask tokens (BERT, RoBERTa) recognised in any vocabulary


class Tokenizer:
    """Thin wrapper: encode/decode, special-token ids, byte lengths per token, chat template."""

    def __init__(self, hf: HFTokenizer, eos_token: str | None = EOT, bos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None, model_max_length: int | None = None):
        self.hf = hf
        self.eos_token = eos_token if eos_token and hf.token_to_id(eos_token) is not None else None
        self.bos_token = bos_token if bos_token and hf.token_to_id(bos_token) is not None else None
        self.pad_token = pad_token if pad_token and hf.token_to_id(pad_token) is not None else None
        self.chat_template = chat_template
        self.model_max_length = model_max_length  # longest input the model was trained on (encoders truncate to it)
        self._bytes_table: list[bytes] | None = None

    # ---- basic API ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.hf.token_to_id(token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def pad_id(self) -> int | None:
        return self.token_id(self.pad_token)

    @property
    def mask_token(self) -> str | None:
        """The masked-LM mask token ([MASK] or <mask>) when the vocabulary has one (masked-LM training, fill-mask)."""
        return next((t for t in MASK_TOKENS if self.hf.token_to_id(t) is not None), None)

    @property
    def mask_id(self) -> int | None:
        return self.token_id(self.mask_token)

    @property
    def start_id(self) -> int | None:
        """The token a generation starts from when the prompt is empty: BOS, else EOS (the GPT-2 convention)."""
        return self.bos_id if self.bos_id is not None else self.eos_id

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a generation / scoring prompt; an empty prompt becomes [start_id]."""
        ids = self.encode(text)
        if not ids:
            if self.start_id is None:
                raise LMStackError("the prompt is empty and the tokenizer has no BOS/EOS token to start from; "
                                   "give a non-empty prompt")
            ids = [self.start_id]
        return ids

    @property
    def end_of_turn_ids(self) -> set[int]:
        """EOS plus the end-of-turn tokens chat models use (<|im_end|>, <|eot_id|>, ...) that this vocabulary has."""
        ids = {self.token_id(t) for t in END_OF_TURN} | {self.eos_id}
        return {i for i in ids if i is not None and (i == self.eos_id or i in self.special_ids)}

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        """Add special tokens (e.g. chat markers) and return their ids; cached tables are rebuilt on next use."""
        self.hf.add_special_tokens(list(tokens))
        self.__dict__.pop("_special_ids", None)
        self._bytes_table = None
        return [self.hf.token_to_id(t) for t in tokens]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (b"" for special tokens); used for streaming and bits-per-byte."""
        if self._bytes_table is None:
            specials = self.special_ids
            self._bytes_table = [b"" if i in specials or (t := self.hf.id_to_token(i)) is None
                                 else _token_to_bytes(self.hf, t) for i in range(self.vocab_size)]
        return self._bytes_table[token_id] if 0 <= token_id < len(self._bytes_table) else b""

    @property
    def special_ids(self) -> set[int]:
        if not hasattr(self, "_special_ids"):
            self._special_ids = {i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
        return self._special_ids

    def byte_lengths(self) -> list[int]:
        """UTF-8 byte length of every token id (0 for special tokens): turns nats/token into bits/byte."""
        self.token_bytes(0)
        return [len(b) for b in self._bytes_table]

    # ---- persistence -------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(d / "tokenizer.json"))
        meta = {"eos_token": self.eos_token, "bos_token": self.bos_token, "pad_token": self.pad_token,
                "tokenizer_class": "PreTrainedTokenizerFast"}
        if self.chat_template:
            meta["chat_template"] = self.chat_template
        if self.model_max_length:
            meta["model_max_length"] = self.model_max_length
        (d / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.exists():
            raise LMStackError(f"no tokenizer at {file}; train one with `lmstack tokenizer train` or pass a directory "
                               "holding tokenizer.json")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise LMStackError(f"cannot read tokenizer {file}: {e}") from e
        meta_file = file.parent / "tokenizer_config.json"
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        smap_file = file.parent / "special_tokens_map.json"  # older HF directories keep special tokens here
        if smap_file.exists():
            meta = {**json.loads(smap_file.read_text()), **meta}

        def tok(key: str, default: str | None = None) -> str | None:
            v = meta.get(key, default)
            return v.get("content") if isinstance(v, dict) else v
        return cls(hf, eos_token=tok("eos_token", EOT), bos_token=tok("bos_token"), pad_token=tok("pad_token"),
                   chat_template=meta.get("chat_template"),
                   model_max_length=meta["model_max_length"] if isinstance(meta.get("model_max_length"), int)
                   and meta["model_max_length"] < 1e12 else None)

    # ---- chat --------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **template_vars) -> str:
        """The prompt text of `messages` (template_vars: more template variables, e.g. `tools`)."""
        if not self.chat_template:
            # plain fallback: "role: content" lines
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + ("assistant:" if add_generation_prompt else "")
        import jinja2
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg):
            raise LMStackError(f"chat template error: {msg}")
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **template_vars)


def _token_to_bytes(hf: HFTokenizer, tok: str) -> bytes:
    """Bytes of a vocabulary entry under byte-level BPE (GPT-2 byte alphabet) or char/byte-fallback vocabularies."""
    if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
        return bytes([int(tok[3:5], 16)])
    if isinstance(hf.pre_tokenizer, pre_tokenizers.ByteLevel) or _is_bytelevel_decoder(hf):
        table = _bytelevel_decode_table()
        try:
            return bytes(table[c] for c in tok)
        except KeyError:
            return tok.encode("utf-8")
    return tok.replace("▁", " ").encode("utf-8") if _is_metaspace(hf) else tok.encode("utf-8")


def _is_bytelevel_decoder(hf: HFTokenizer) -> bool:
    return "ByteLevel" in type(hf.decoder).__name__ if hf.decoder is not None else False


def _is_metaspace(hf: HFTokenizer) -> bool:
    return hf.decoder is not None and "Metaspace" in hf.decoder.__getstate__().decode()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE vocabularies are spelled in it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BL_TABLE: dict[str, int] | None = None


def _bytelevel_decode_table() -> dict[str, int]:
    global _BL_TABLE
    if _BL_TABLE is None:
        _BL_TABLE = {c: b for b, c in bytes_to_unicode().items()}
    return _BL_TABLE


# ---- training ---------------------------------------------------------------------------------
def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str] | None = None,
              min_frequency: int = 2, show_progress: bool = False, bos_token: str | None = None,
              pad_token: str | None = None) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE tokenizer. Every string round-trips: decode(encode(s)) == s."""
    specials = _specials(special_tokens, bos_token, pad_token)
    if vocab_size < 256 + len(specials):
        raise LMStackError(f"a byte-level BPE vocabulary needs at least {256 + len(specials)} entries "
                           f"(256 bytes + special tokens), got vocab_size={vocab_size}")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    hf.train_from_iterator(_batched(texts), trainer=trainer)
    return Tokenizer(hf, eos_token=specials[0], bos_token=bos_token, pad_token=pad_token)


def train_char(texts: Iterable[str], special_tokens: list[str] | None = None, byte_fallback: bool = True,
               bos_token: str | None = None, pad_token: str | None = None) -> Tokenizer:
    """Char-level vocabulary of every character seen (sorted), plus special tokens; with byte_fallback, characters
    never seen are encoded as their UTF-8 bytes (<0xNN> tokens), so any string still round-trips."""
    specials = _specials(special_tokens, bos_token, pad_token)
    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(t)
    vocab: dict[str, int] = {}
    for ch in sorted(counts):
        vocab[ch] = len(vocab)
    for s in specials:
        vocab.setdefault(s, len(vocab))
    if byte_fallback:
        for b in range(256):
            vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=byte_fallback, unk_token=None))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens(specials)
    return Tokenizer(hf, eos_token=specials[0], bos_token=bos_token, pad_token=pad_token)


def _specials(special_tokens: list[str] | None, *extra: str | None) -> list[str]:
    """Special tokens in order, the first being EOS; bos/pad tokens are added if not already listed."""
    specials = list(special_tokens or DEFAULT_SPECIALS)
    specials += [t for t in extra if t and t not in specials]
    return specials


def _batched(texts: Iterable[str], max_chars: int = 1 << 20) -> Iterator[str]:
    """Feed the BPE trainer in pieces of at most ~1 MB so huge documents don't become one giant string."""
    for t in texts:
        for i in range(0, len(t), max_chars):
            yield t[i:i + max_chars]
