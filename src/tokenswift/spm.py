"""A small SentencePiece-BPE tokenizer over a GGUF file's vocabulary (the Gemma family).

It gives the ids and text of the tokenizer transformers builds from the same file (its
`GemmaTokenizer` over a `tokenizers` BPE, see `loading.hf_gguf_tokenizer`) at a fraction of its
memory: one dict of the 262,144 token strings (about 35 MiB for Gemma 3) against the Rust BPE's
514,906 merges and transformers' import.

What transformers does with such a file, and so what this does:

- Tokens made of spaces only are spelled with "▁" (U+2581) as the text will be, and the control
  tokens (special) and the user-defined ones still in that vocabulary (not special) are added
  tokens: found in the raw text first, leftmost and longest first. With `split_special_tokens`
  the special ones are not taken (their text is tokenized as text) but still hide the
  non-special ones inside them.
- The text between added tokens has " " replaced by "▁" and is one BPE word: from its characters
  (a character outside the vocabulary as its UTF-8 bytes' `<0xXX>` tokens), the adjacent pair
  whose concatenation is a token merges first where that token comes earliest in the file (the
  merges transformers derives for Gemma are ordered by the merged token's position, not by the
  file's scores), a longer left part first between two splits of one token, the leftmost first
  between equal pairs.
- Decoding: each token's "▁" becomes " ", runs of byte tokens become their bytes read as UTF-8
  (a run that is not valid UTF-8 becomes one U+FFFD per byte), special tokens dropped with
  `skip_special_tokens`, ids past the vocabulary skipped.

A BPE word is cut where no token can span the cut (before a "▁" after a character that no token
has before a "▁"), and the pieces' ids are kept in a bounded cache.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SPACE = "\u2581"  # SentencePiece's word boundary mark
CONTROL, USER_DEFINED = 3, 4  # GGUF token types (llama.cpp's llama_token_type)
CACHE_SIZE = 1 << 15  # BPE pieces whose ids are kept (least recently used out first)
CACHE_CHARS = 64  # longer pieces are not kept
HEAP_FROM = 48  # symbols from which a piece merges through a heap (O(n log n)) rather than by scans
_BYTE_TOKEN = re.compile(rb"<0x([0-9A-Fa-f]{2}|\+[0-9A-Fa-f])>")  # what tokenizers' ByteFallback reads
_BYTE_GLUE = re.compile(rb"<0x[0-9A-Fa-f]{2}>\xe2\x96\x81")
_MARK = SPACE.encode("utf-8")
_UTF8_CHARS = re.compile(rb"[\x00-\x7f]|[\xc0-\xff][\x80-\xbf]*")  # valid UTF-8 cut into characters


class Unsupported(ValueError):
    """A GGUF vocabulary this tokenizer does not reproduce transformers' tokenizer for."""


class AddedToken:
    """An added token as `added_tokens_decoder` lists it (transformers' fields)."""

    __slots__ = ("content", "special")
    single_word = lstrip = rstrip = normalized = False

    def __init__(self, content: str, special: bool) -> None:
        self.content, self.special = content, special

    def __repr__(self) -> str:
        return f"AddedToken({self.content!r}, special={self.special})"

    def __str__(self) -> str:
        return self.content

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AddedToken) and (self.content, self.special) == (other.content, other.special)

    def __hash__(self) -> int:
        return hash(self.content)


class Encoding(dict):
    """What calling the tokenizer returns: `.input_ids` (and `["input_ids"]`), as transformers'
    BatchEncoding; `attention_mask` on request."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __missing__(self, key: str) -> Any:
        if key == "attention_mask":
            ids = self["input_ids"]
            mask = [[1] * len(row) for row in ids] if ids and isinstance(ids[0], list) else [1] * len(ids)
            self[key] = mask
            return mask
        raise KeyError(key)


class SpmTokenizer:
    """The tokenizer of a SentencePiece-BPE GGUF vocabulary without a space prefix (Gemma);
    called and decoded as a transformers tokenizer is (the calls tokenswift makes).

    The vocabulary is held as UTF-8 bytes (a bytes object takes half the memory of a str with a
    "▁" in it): `tokens` are the file's strings, as bytes or str."""

    def __init__(self, tokens: Sequence[bytes | str], token_types: Sequence[int], *, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, unk_token_id: int | None = None, pad_token_id: int | None = None,
                 add_bos_token: bool = True, add_eos_token: bool = False, chat_template: str | None = None) -> None:
        types = np.asarray(token_types)
        if len(tokens) != len(types):
            raise Unsupported(f"{len(tokens)} tokens but {len(types)} token types")
        pieces = [t if type(t) is bytes else t.encode("utf-8") if isinstance(t, str) else bytes(t) for t in tokens]
        try:  # each token valid UTF-8 (a NUL after each: no two halves make one character)
            b"\0".join(pieces).decode("utf-8")
        except UnicodeDecodeError:
            raise Unsupported("a token is not valid UTF-8") from None
        self._byte_of: dict[int, int] = {}  # the byte of each byte token (what ByteFallback reads)
        glue: set[str] = set()  # characters some token has before a "▁" (not a "▁")
        byte_glue = False  # whether a token has "<0xXX>▁" in it
        for i, t in enumerate(pieces):
            if b" " in t and not (u := t.decode("utf-8")).strip():
                # whitespace with a space in it, spelled as the normalized text spells it (as
                # transformers' Gemma conversion does)
                pieces[i] = (SPACE * len(u)).encode("utf-8")
            elif t.startswith(b"<0x") and (m := _BYTE_TOKEN.fullmatch(t)):
                self._byte_of[i] = int(m.group(1), 16)
            if t.find(_MARK, 1) > 0:
                u = t.decode("utf-8")
                glue.update(a for a, b in itertools.pairwise(u) if b == SPACE and a != SPACE)
                byte_glue = byte_glue or _BYTE_GLUE.search(t) is not None
        vocab = {t: i for i, t in enumerate(pieces)}
        if len(vocab) != len(pieces):
            raise Unsupported("the vocabulary repeats a token")
        self._pieces = pieces
        self._vocab = vocab
        # a merge's rank: the merged token's id * k - the left part's length (in bytes, which
        # orders two splits of one token as characters do)
        self._k = max(map(len, pieces)) + 1
        self._never = len(pieces) * self._k + 1  # the rank of a pair that does not merge
        # added tokens: control ones special, user-defined ones (left in the vocabulary) not
        added: dict[int, AddedToken] = {}
        for i in np.flatnonzero((types == CONTROL) | (types == USER_DEFINED)).tolist():
            t = tokens[i] if isinstance(tokens[i], str) else bytes(tokens[i]).decode("utf-8")
            b = t.encode("utf-8")
            if types[i] == USER_DEFINED and b not in vocab:
                continue  # a spaces-only token, respelled: not added (as in transformers)
            if vocab.get(b) != i:
                raise Unsupported(f"added token {t!r} is not its own vocabulary entry")
            added[i] = AddedToken(t, bool(types[i] == CONTROL))
        self.added_tokens_decoder = added
        self._added = {a.content: (i, a.special) for i, a in added.items()}
        self._special_ids = frozenset(i for i, a in added.items() if a.special)
        lengths: dict[str, set[int]] = {}
        for t in self._added:
            if t:
                lengths.setdefault(t[0], set()).add(len(t))
        self._added_lengths = {c: sorted(v, reverse=True) for c, v in lengths.items()}
        self._added_start = (re.compile("[" + "".join(re.escape(c) for c in sorted(lengths)) + "]")
                              if lengths else None)
        self._byte_piece = [f"<0x{b:02X}>".encode("ascii") for b in range(256)]  # byte fallback
        if any(t not in vocab for t in self._byte_piece):
            raise Unsupported("the vocabulary lacks some <0xXX> byte tokens")
        # Cuts no token spans: before a "▁" after a character that no token has before a "▁"
        # (for Gemma 3 all but ">", for its token ">▁</"). A byte token ends in ">" too, so a
        # token with "<0xXX>▁" in it would need the cut to know the byte: no cuts then.
        self._cut = None if byte_glue else re.compile(
            "(?<=[^" + re.escape(SPACE) + "".join(re.escape(c) for c in sorted(glue)) + "])(?=" + SPACE + ")")
        # the ids of the last CACHE_SIZE pieces of up to CACHE_CHARS characters
        self._cached_bpe = functools.lru_cache(maxsize=CACHE_SIZE)(self._bpe)
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.unk_token_id, self.pad_token_id = unk_token_id, pad_token_id
        self.add_bos_token, self.add_eos_token = bool(add_bos_token), bool(add_eos_token)
        self.chat_template = chat_template

    # -- construction from a GGUF file ----------------------------------------------------------

    @classmethod
    def supports(cls, meta: dict[str, Any]) -> bool:
        """Whether a GGUF file's metadata (`GGUFHeader.meta`) describes a vocabulary this class
        reproduces transformers' tokenizer for: SentencePiece ("llama") for Gemma, no merges, no
        space prefix, no pre-tokenizer split."""
        return (meta.get("tokenizer.ggml.model") == "llama"
                and meta.get("general.architecture") in ("gemma", "gemma2", "gemma3")
                and meta.get("tokenizer.ggml.add_space_prefix") is False
                and meta.get("tokenizer.ggml.pre", "default") == "default"
                and "tokenizer.ggml.merges.count" not in meta and "tokenizer.ggml.merges" not in meta
                and "tokenizer.ggml.token_type.count" in meta)

    @classmethod
    def from_gguf(cls, path: str | Path) -> SpmTokenizer:
        """Reads the vocabulary straight from the file's header (`GGUFHeader`): its strings once,
        as bytes, the dict's keys; the token types only to find the added tokens."""
        from .loading import GGUFHeader

        header = GGUFHeader(Path(path), tensors=False)
        try:
            meta = header.meta
            if not cls.supports(meta):
                raise Unsupported(f"{Path(path).name}: not a SentencePiece vocabulary without a space prefix")
            try:
                tokens = header.array("tokenizer.ggml.tokens")
                types = header.array("tokenizer.ggml.token_type")
            except ValueError as e:
                raise Unsupported(str(e)) from None
            if not isinstance(tokens, list):
                raise Unsupported(f"the token array holds {tokens.dtype} numbers, not strings")
            if isinstance(types, list) or types.dtype not in (np.dtype("<u4"), np.dtype("<i4")):
                raise Unsupported("the token types are not 32-bit integers")
            types = types.astype(np.int32)
        finally:
            del header  # the file's pages go with the map
        bos = meta.get("tokenizer.ggml.bos_token_id")
        return cls(tokens, types, bos_token_id=bos, eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
                   unk_token_id=meta.get("tokenizer.ggml.unknown_token_id"),
                   pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
                   add_bos_token=meta.get("tokenizer.ggml.add_bos_token", True),  # as transformers reads it
                   add_eos_token=meta.get("tokenizer.ggml.add_eos_token", False),
                   chat_template=meta.get("tokenizer.chat_template"))

    # -- the transformers-like surface ----------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def __len__(self) -> int:
        return len(self._pieces)

    def _token(self, i: int | None) -> str | None:
        return None if i is None or not 0 <= i < len(self._pieces) else self._pieces[i].decode("utf-8")

    bos_token = property(lambda self: self._token(self.bos_token_id))
    eos_token = property(lambda self: self._token(self.eos_token_id))
    unk_token = property(lambda self: self._token(self.unk_token_id))
    pad_token = property(lambda self: self._token(self.pad_token_id))

    @property
    def special_tokens_map(self) -> dict[str, str]:
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        return {n: t for n in names if (t := getattr(self, n)) is not None}

    @property
    def all_special_ids(self) -> list[int]:
        ids = (self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id)
        return list(dict.fromkeys(i for i in ids if i is not None))

    def get_vocab(self) -> dict[str, int]:
        return {t.decode("utf-8"): i for t, i in self._vocab.items()}

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        if isinstance(tokens, str):
            try:
                i = self._vocab.get(tokens.encode("utf-8"))
            except UnicodeEncodeError:
                i = None
            return self.unk_token_id if i is None else i
        return [self.convert_tokens_to_ids(t) for t in tokens]  # type: ignore[misc]

    def convert_ids_to_tokens(self, ids: int | Iterable[int], skip_special_tokens: bool = False):
        if hasattr(ids, "tolist"):
            ids = ids.tolist()  # type: ignore[union-attr]
        if isinstance(ids, int):
            return self._token(ids)
        return [self._token(i) for i in map(int, ids) if not (skip_special_tokens and i in self._special_ids)]

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True,
                 split_special_tokens: bool = False, **kwargs: Any) -> Encoding:
        if kwargs:
            raise TypeError(f"unsupported tokenizer arguments: {', '.join(sorted(kwargs))}")
        if isinstance(text, str):
            return Encoding(input_ids=self.encode(text, add_special_tokens, split_special_tokens))
        return Encoding(input_ids=[self.encode(t, add_special_tokens, split_special_tokens) for t in text])

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        for piece, added in self._split_added(text, split_special_tokens):
            if added is None:
                self._encode_text(piece, ids)
            else:
                ids.append(added)
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                ids.insert(0, self.bos_token_id)
            if self.add_eos_token and self.eos_token_id is not None:
                ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None, **kwargs: Any) -> str:
        """transformers' decode; `clean_up_tokenization_spaces` is accepted and has no effect (as
        in transformers, which skips that clean-up for a BPE model)."""
        if hasattr(ids, "tolist"):  # numpy arrays and integers, torch tensors
            ids = ids.tolist()  # type: ignore[union-attr]
        if isinstance(ids, int):
            ids = [ids]
        pieces, byte_of, special = self._pieces, self._byte_of, self._special_ids
        n = len(pieces)
        out: list[str] = []
        text: list[bytes] = []
        raw = bytearray()
        for i in ids:
            i = int(i)
            if i < 0:
                raise OverflowError(f"token id {i} is negative")
            if i >= n or (skip_special_tokens and i in special):
                continue
            b = byte_of.get(i)
            if b is None:
                if raw:
                    out.append(_bytes_text(raw))
                    raw.clear()
                text.append(pieces[i])
            else:
                if text:
                    out.append(_pieces_text(text))
                    text.clear()
                raw.append(b)
        if raw:
            out.append(_bytes_text(raw))
        if text:
            out.append(_pieces_text(text))
        return "".join(out)

    def batch_decode(self, sequences: Iterable[Iterable[int]], **kwargs: Any) -> list[str]:
        return [self.decode(s, **kwargs) for s in sequences]

    def apply_chat_template(self, conversation: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = True, chat_template: str | None = None, **kwargs: Any):
        """The conversation rendered by the chat template (jinja2, as transformers renders it:
        sandboxed, trim_blocks and lstrip_blocks, loop controls, `raise_exception`, a `tojson`
        that leaves non-ASCII and HTML characters, the special tokens as variables); its ids
        (no BOS added: the template writes its own) with `tokenize`."""
        template = chat_template or self.chat_template
        if not template:
            raise ValueError("this tokenizer has no chat template")
        compiled = _compile_template(template)
        variables = {"tools": None, "documents": None, **self.special_tokens_map, **kwargs}
        text = compiled.render(variables, messages=[dict(m) for m in conversation],
                               add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # -- encoding -------------------------------------------------------------------------------

    def _split_added(self, text: str, split_special: bool) -> Iterator[tuple[str, int | None]]:
        """The text cut at its added tokens (leftmost, then longest): (text, None) and ("", id)."""
        if self._added_start is None:
            if text:
                yield text, None
            return
        added, lengths = self._added, self._added_lengths
        at = 0  # end of the last token taken
        seen = 0  # end of the last token found
        for m in self._added_start.finditer(text):
            i = m.start()
            if i < seen:
                continue
            for n in lengths[text[i]]:
                hit = added.get(text[i : i + n])
                if hit is not None:
                    break
            else:
                continue
            seen = i + n
            if split_special and hit[1]:
                continue  # a special token's text stays text, hiding what is inside it
            if i > at:
                yield text[at:i], None
            yield "", hit[0]
            at = seen
        if at < len(text):
            yield text[at:], None

    def _encode_text(self, text: str, out: list[int]) -> None:
        s = text.replace(" ", SPACE)
        cached, bpe = self._cached_bpe, self._bpe
        for chunk in (self._cut.split(s) if self._cut is not None else (s,)):
            out.extend(cached(chunk) if len(chunk) <= CACHE_CHARS else bpe(chunk))

    def _symbols(self, s: str) -> list[bytes]:
        """A piece's characters as UTF-8, each one a token or its bytes' <0xXX> tokens."""
        vocab = self._vocab
        syms: list[bytes] = []
        try:
            b = s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text is not valid Unicode: lone surrogate {s[e.start]!r}") from None
        for ch in _UTF8_CHARS.findall(b):
            if ch in vocab:
                syms.append(ch)
            else:
                syms.extend([self._byte_piece[x] for x in ch])
        return syms

    def _bpe(self, s: str) -> list[int]:
        """One piece's ids: the pair of lowest rank merges first, the leftmost of equal ranks."""
        syms = self._symbols(s)
        if len(syms) >= HEAP_FROM:
            return self._bpe_heap(syms)
        vocab, k, never = self._vocab, self._k, self._never
        get = vocab.get
        ranks = []
        for a, b in itertools.pairwise(syms):
            t = get(a + b)
            ranks.append(never if t is None else t * k - len(a))
        while ranks:
            r = min(ranks)
            if r == never:
                break
            i = ranks.index(r)
            merged = syms[i] + syms[i + 1]
            syms[i] = merged
            del syms[i + 1], ranks[i]
            if i > 0:
                a = syms[i - 1]
                t = get(a + merged)
                ranks[i - 1] = never if t is None else t * k - len(a)
            if i < len(ranks):
                t = get(merged + syms[i + 1])
                ranks[i] = never if t is None else t * k - len(merged)
        return [vocab[t] for t in syms]

    def _bpe_heap(self, syms: list[bytes]) -> list[int]:
        """`_bpe` for long pieces: the candidate pairs in a heap, the symbols in a linked list."""
        vocab, k = self._vocab, self._k
        get = vocab.get
        n = len(syms)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        live: list[bytes | None] = list(syms)
        heap = []
        for i in range(n - 1):
            t = get(syms[i] + syms[i + 1])
            if t is not None:
                heap.append((t * k - len(syms[i]), i))
        heapq.heapify(heap)
        while heap:
            r, i = heapq.heappop(heap)
            a = live[i]
            j = nxt[i]
            if a is None or j >= n:
                continue
            b = live[j]
            t = get(a + b)  # type: ignore[operator]
            if t is None or t * k - len(a) != r:
                continue  # a pair that has changed since it was queued
            merged = a + b  # type: ignore[operator]
            live[i], live[j] = merged, None
            j = nxt[j]
            nxt[i] = j
            if j < n:
                prv[j] = i
                t = get(merged + live[j])  # type: ignore[operator]
                if t is not None:
                    heapq.heappush(heap, (t * k - len(merged), i))
            p = prv[i]
            if p >= 0:
                left = live[p]
                t = get(left + merged)  # type: ignore[operator]
                if t is not None:
                    heapq.heappush(heap, (t * k - len(left), p))  # type: ignore[arg-type]
        return [vocab[t] for t in live if t is not None]


def _pieces_text(pieces: list[bytes]) -> str:
    """Tokens' text, each "▁" a space (the bytes of U+2581 are no other character's in UTF-8)."""
    return b"".join(pieces).replace(_MARK, b" ").decode("utf-8")


def _bytes_text(raw: bytearray) -> str:
    """A run of byte tokens as tokenizers' ByteFallback decodes it."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(raw)


_TEMPLATES: dict[str, Any] = {}


def _compile_template(source: str) -> Any:
    if source in _TEMPLATES:
        return _TEMPLATES[source]
    import json
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    compiled = _TEMPLATES[source] = env.from_string(source)
    return compiled
