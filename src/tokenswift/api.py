"""The Python API: `tokenswift.load(...)` -> `LM` with `generate`, `stream` and `steps`."""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch

from .config import RopeScaling, SamplingConfig, SpecConfig
from .cache import Q8KVCache, SparseKV, cache_bytes
from .drafters import resolve_draft_kv, sparse_scorer
from .engine import Step, generate_ar, generate_speculative, self_drafts
from .heads import DraftHeads, resolve_heads
from .seqdraft import SeqDraftModel, resolve_seq_drafter
from .loading import DEFAULT_MODEL, available_memory, load_model
from .model import Decoder
from .params import PARAMS as P
from .params import ParamError
from .parallel import mirrored

log = logging.getLogger("tokenswift")

CHAT_ROLES = ("system", "user", "assistant")
CONTEXT_HINT = "extend the context with RoPE scaling, e.g. yarn:4"
PIECE_CHARS = 1 << 16  # characters of a long prompt tokenized at a time while it is counted
PIECE_SLACK = 8  # tokens a cut between two pieces may add (a word tokenized in two parts)


@dataclass
class GenerationResult:
    tokens: list[int]  # new token ids (the prompt excluded)
    text: str | None  # decoded new text; None when the model has no tokenizer
    stats: dict[str, Any]


class TextStream:
    """Incremental detokenizer: emits text only once it is stable, so a multi-byte character
    split across tokens never comes out as U+FFFD, and the pieces join to the full decode."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the context decoded with each new token
        self.read = 0  # end of the text already emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(ids)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


def _check_text(text: str, what: str) -> None:
    """Refuses a string that is not Unicode text (a lone surrogate, as from bytes decoded with
    surrogateescape or an escaped JSON string), which no tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode text: lone surrogate {text[e.start]!r} at character "
                         f"{e.start}") from None


class LM:
    """A loaded model with its tokenizer. Create it with `tokenswift.load`."""

    def __init__(self, loaded: Any, heads: DraftHeads | None = None, seq: SeqDraftModel | None = None) -> None:
        self.model = loaded.model
        self.seq = seq  # the seq drafter (`seqdraft.py`), None when the model has none
        self._int4: Decoder | None = None
        self._int4_wanted = loaded.int4
        self._int4_lock = threading.Lock()
        self.heads = heads
        self.tokenizer = loaded.tokenizer
        self._controls: re.Pattern[str] | None = None  # `_control_pattern`
        self.config = loaded.model.full_cfg  # the whole model's, also on one rank of tensor parallelism
        # Under tensor parallelism (parallel.py): whether this rank leads the others through
        # every step generator (the CLI), rather than each rank calling generate alike (SPMD).
        self.lead = False
        self.name = loaded.name
        self.source = loaded.source
        eos = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        self.eos_token_ids = tuple(sorted(eos))

    @property
    def int4(self) -> Decoder | None:
        """The int4 copy of the model that the self-draft runs, built on first use (about a
        second for 135M parameters); None when the model was loaded with draft_weights "float",
        or "auto" where torch's int4 kernel does not exist."""
        with self._int4_lock:  # server threads: build it once
            if self._int4 is None and self._int4_wanted:
                self._int4 = self.model.int4_copy()
                log.info("built the int4 copy the self-draft runs")
            return self._int4

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token of context takes here (keys and values, every layer; this
        rank's KV heads under tensor parallelism)."""
        c = self.model.cfg
        return 2 * c.num_layers * c.num_kv_heads * c.head_dim * self.model.kv_dtype.itemsize

    # -- text <-> ids -------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int], chat: bool = False, max_tokens: int | None = None) -> list[int]:
        """A prompt as token ids. `chat=True` wraps a string in the model's chat template as one
        user message and adds the assistant turn's opening (the message is text: control tokens
        written in it stay text, see `encode_chat`). A text of more than `max_tokens` tokens
        (default: the model's context) is refused without being tokenized whole."""
        if isinstance(prompt, (bytes, bytearray, memoryview)):
            raise ValueError("the prompt must be a str or a list of token ids, got bytes: decode it (UTF-8) first")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"model {self.name!r} has no tokenizer files: give the prompt as a list of token ids")
            if not prompt:
                raise ValueError("the prompt is empty")
            _check_text(prompt, "the prompt")
            if chat:
                if not getattr(self.tokenizer, "chat_template", None):
                    raise ValueError(f"model {self.name!r} has no chat template; drop --chat / chat=True")
                return self._template_ids([{"role": "user", "content": prompt}], max_tokens)
            return self._text_ids(prompt, self._limit(max_tokens), control=True, bos=True)
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        if chat:
            raise ValueError("chat=True needs a string prompt, not token ids")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        return ids

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], max_tokens: int | None = None) -> list[int]:
        """A conversation as token ids: the model's chat template over all `messages` (each a dict
        with `role` system, user or assistant and a string `content`), plus the assistant turn's
        opening so that the model writes the reply. A message's content is text: a control token
        written in it (`<|im_end|>`, `<|endoftext|>`) is encoded as its characters, never as the
        control token, so no message can end its turn or forge another role's (OpenAI's API reads
        content the same way); the template's own markers are the control tokens. More than
        `max_tokens` tokens (default: the model's context) are refused as in `encode`."""
        if self.tokenizer is None:
            raise ValueError(f"model {self.name!r} has no tokenizer files, so no chat template")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"model {self.name!r} has no chat template; give a plain prompt instead")
        if not messages:
            raise ValueError("messages is empty: give at least one message")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise ValueError(f"messages[{i}] must be a dict with role and content, got {m!r}")
            if m.get("role") not in CHAT_ROLES:
                raise ValueError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {m.get('role')!r}")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}].content must be a string, got {m.get('content')!r}")
            _check_text(m["content"], f"messages[{i}].content")
        return self._template_ids([{"role": m["role"], "content": m["content"]} for m in messages], max_tokens)

    def _limit(self, max_tokens: int | None) -> int:
        return self.config.context_length if max_tokens is None else max_tokens

    def _too_long(self, tokens: str, limit: int) -> ValueError:
        ctx = self.config.context_length
        if limit != ctx:
            return ValueError(f"prompt ({tokens} tokens) is longer than max_tokens {limit}")
        return ValueError(f"prompt ({tokens} tokens) is longer than the model's context of {ctx} tokens; shorten it "
                          f"or {CONTEXT_HINT}")

    def _text_ids(self, text: str, limit: int, control: bool, bos: bool, before: int = 0) -> list[int]:
        """`text`'s token ids, refused once `before` (tokens of the prompt before this text) and
        they are more than `limit`. `control`: control tokens written in the text are recognized
        (a raw prompt); else they are text. `bos`: the tokenizer adds what it adds to a whole
        prompt (a BOS token). A text longer than one piece is counted a piece at a time first:
        tokenizing 4 MB at once takes ~600 MB, and a text of far more tokens than the context is
        refused after its first piece."""
        split = {} if control else {"split_special_tokens": True}
        # no character makes more than 4 tokens (one a UTF-8 byte), so a text that short fits
        if len(text) > PIECE_CHARS and before + 4 * len(text) + PIECE_SLACK > limit:
            n = before
            for k, a in enumerate(range(0, len(text), PIECE_CHARS), 1):
                n += len(self.tokenizer(text[a : a + PIECE_CHARS], add_special_tokens=False, **split).input_ids)
                if n - PIECE_SLACK * k > limit:
                    raise self._too_long(f"more than {n - PIECE_SLACK * k}", limit)
        ids = [int(t) for t in self.tokenizer(text, add_special_tokens=bos, **split).input_ids]
        if before + len(ids) > limit:
            raise self._too_long(str(before + len(ids)), limit)
        return ids

    def _template_ids(self, messages: list[dict[str, str]], max_tokens: int | None) -> list[int]:
        limit = self._limit(max_tokens)
        markers = self._control_pattern()
        if not any(markers.search(m["content"]) for m in messages):
            # the usual case: the template's text tokenized as transformers' apply_chat_template does
            return self._text_ids(self._render(messages), limit, control=True, bos=False)
        # Control tokens written in the messages: each becomes a placeholder (mark, its number,
        # mark) that the template cannot mistake for its own markers, and a mark already in the
        # text becomes (mark, e, mark), so that every mark in the rendered text begins one of
        # these. The rendered text is cut at the template's markers, which alone become control
        # tokens, and the text between them, placeholders back as the characters they hid, is
        # tokenized as text.
        template = str(self.tokenizer.chat_template)
        mark = next(chr(c) for c in range(0xE000, 0xF900) if chr(c) not in template)  # a private-use character
        hidden: list[str] = []

        def hide(m: re.Match[str]) -> str:
            hidden.append(m.group(0))
            return f"{mark}{len(hidden) - 1}{mark}"

        rendered = self._render([{**m, "content": markers.sub(hide, m["content"].replace(mark, f"{mark}e{mark}"))}
                                 for m in messages])
        back = re.compile(f"{mark}(\\d+|e){mark}")
        ids: list[int] = []
        at = 0
        for m in [*markers.finditer(rendered), None]:
            text = back.sub(lambda h: mark if h.group(1) == "e" else hidden[int(h.group(1))],
                            rendered[at : None if m is None else m.start()])
            if text:
                ids += self._text_ids(text, limit, control=False, bos=False, before=len(ids))
            if m is not None:
                ids.append(int(self.tokenizer.convert_tokens_to_ids(m.group(0))))
                at = m.end()
        if len(ids) > limit:
            raise self._too_long(str(len(ids)), limit)
        return ids

    def _render(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _control_pattern(self) -> re.Pattern[str]:
        """A regex of the tokenizer's control tokens (its special added tokens), longest first."""
        if self._controls is None:
            words = sorted({t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special},
                           key=len, reverse=True)
            self._controls = re.compile("|".join(map(re.escape, words)) or "(?!)")
        return self._controls

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise ValueError(f"model {self.name!r} has no tokenizer to decode with")
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # -- generation ---------------------------------------------------------------------------

    def steps(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = P["max_new_tokens"].default,
        method: str = P["method"].default,
        seed: int = P["seed"].default,
        temperature: float = P["temperature"].default,
        top_k: int = P["top_k"].default,
        top_p: float = P["top_p"].default,
        min_p: float = P["min_p"].default,
        eta: float = P["eta"].default,
        penalty: float = P["penalty"].default,
        penalty_window: int = P["penalty_window"].default,
        ignore_eos: bool = P["ignore_eos"].default,
        min_keep: int = P["min_keep"].default,
        chat: bool = False,
        gamma: int = P["gamma"].default,
        tree: str | Sequence = P["tree"].default,
        ngram_topk: int = P["ngram_topk"].default,
        ngram_n: int = P["ngram_n"].default,
        draft_budget: int = P["draft_budget"].default,
        sinks: int = P["sinks"].default,
        use_ngrams: bool = P["use_ngrams"].default,
        use_heads: bool = P["use_heads"].default,
        draft_kv: str = P["draft_kv"].default,
        draft_vocab: int = P["draft_vocab"].default,
        max_nodes: int | None = P["max_nodes"].default,
        draft_weights: str = P["draft_weights"].default,
        drafter: str = P["drafter"].default,
    ) -> Iterator[Step]:
        """The low-level stream: one `Step` (committed token ids + running stats) per iteration.

        `method`: "tokenswift" (the default: the model's int4 copy drafts chains over a partial KV
        cache, n-grams extend them, the model verifies), "ar" (plain decoding) or "ngram" (n-gram
        drafts only). Every method writes the same tokens for the same seed; the speculation
        options (gamma, tree, ngram_topk, ngram_n, draft_budget, sinks, use_ngrams, use_heads,
        draft_kv, draft_vocab, max_nodes, draft_weights, drafter; ranges in params.py) change only the speed. `tree` "auto" (default) plans each
        iteration by measured cost; a static shape such as "1,3,3,3" drafts the paper's way
        (one draft pass + the draft heads)."""
        call = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        tp = self.model.tp
        if tp is not None and self.lead and tp.rank == 0:
            return mirrored(tp, call, self._steps(**call))
        return self._steps(**call)

    def _steps(self, prompt: str | Sequence[int], max_new_tokens: int, method: str, seed: int, temperature: float,
               top_k: int, top_p: float, min_p: float, eta: float, penalty: float, penalty_window: int,
               ignore_eos: bool, min_keep: int, chat: bool, gamma: int, tree: str | Sequence, ngram_topk: int,
               ngram_n: int, draft_budget: int, sinks: int, use_ngrams: bool, use_heads: bool,
               draft_kv: str, draft_vocab: int, max_nodes: int | None, draft_weights: str,
               drafter: str) -> Iterator[Step]:
        sampling = SamplingConfig(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, min_keep=min_keep, eta=eta,
            penalty=penalty, penalty_window=penalty_window, seed=seed,
        )
        P["max_new_tokens"].check(max_new_tokens)
        P["method"].check(method)
        P["ignore_eos"].check(ignore_eos)
        ids = self.encode(prompt, chat=chat)
        ctx = self.config.context_length
        if len(ids) >= ctx:
            raise self._too_long(str(len(ids)), ctx)
        if len(ids) + max_new_tokens > ctx:
            raise ParamError("max_new_tokens", f"prompt ({len(ids)} tokens) + ",
                             f" ({max_new_tokens}) exceeds the model's context of {ctx} tokens; lower ",
                             f" to {ctx - len(ids)} or {CONTEXT_HINT}")
        total, cfg, kv = len(ids) + max_new_tokens, self.model.cfg, None
        if method == "tokenswift" and total > draft_budget:
            P["draft_kv"].check(draft_kv)
            kv = resolve_draft_kv(draft_kv, self.model) if draft_kv == "auto" else draft_kv
        ring = self.model.kv_ring(total, kv)
        need = cache_bytes(cfg, total, self.model.kv_dtype.itemsize, ring)
        copy = 0  # the draft's int8 copy of the cache
        if kv is not None:
            per_token = {"int8": Q8KVCache.bytes_per_token(cfg),
                         "sparse": SparseKV.bytes_per_token(cfg, sparse_scorer(cfg.head_dim))}.get(kv, 0)
            if ring:  # the copy covers the whole-context layers only
                per_token = per_token * sum(1 for w in cfg.layer_windows if not w) // cfg.num_layers
            copy = total * per_token
        have = available_memory(self.model.device)
        if have is not None and need + copy > have:
            plus = f" and its int8 copy for the draft {copy / 2**30:.1f} GiB" if copy else ""
            raise ParamError("max_new_tokens", f"prompt ({len(ids)} tokens) + ",
                             f" ({max_new_tokens}) needs a KV cache of {need / 2**30:.1f} GiB{plus}, more than "
                             f"the {have / 2**30:.1f} GiB of memory available; lower ")
        if method == "ar":
            return generate_ar(self.model, ids, max_new_tokens, sampling, self.eos_token_ids, ignore_eos)
        spec = SpecConfig(gamma=gamma, tree=tree if isinstance(tree, str) else tuple(tree), ngram_topk=ngram_topk,
                          ngram_n=ngram_n, draft_budget=draft_budget, sinks=sinks, use_ngrams=use_ngrams,
                          use_heads=use_heads, draft_kv=draft_kv, draft_vocab=draft_vocab, max_nodes=max_nodes,
                          draft_weights=draft_weights, drafter=drafter)
        # the int4 copy is built only for a run that drafts with it
        int4 = self.int4 if spec.draft_weights != "float" and self_drafts(method, spec, max_new_tokens) else None
        return generate_speculative(self.model, self.heads, ids, max_new_tokens, sampling, spec,
                                    self.eos_token_ids, ignore_eos, method=method, int4=int4, seq=self.seq)

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 256, **kw: Any) -> GenerationResult:
        """Generates up to `max_new_tokens` tokens; see `steps` for the options."""
        tokens: list[int] = []
        stats: dict[str, Any] = {}
        stream = TextStream(self.tokenizer) if self.tokenizer is not None else None
        pieces: list[str] = []
        for step in self.steps(prompt, max_new_tokens, **kw):
            tokens.extend(step.tokens)
            stats = step.stats
            if stream is not None:
                pieces.append(stream.push(step.tokens))
        if stream is not None:
            pieces.append(stream.flush())
        return GenerationResult(tokens=tokens, text="".join(pieces) if stream is not None else None, stats=stats)

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 256, **kw: Any) -> Iterator[str]:
        """Yields text pieces as tokens are committed; they join to `generate(...).text`."""
        if self.tokenizer is None:
            raise ValueError(f"model {self.name!r} has no tokenizer; use steps() for token ids")
        stream = TextStream(self.tokenizer)
        for step in self.steps(prompt, max_new_tokens, **kw):
            piece = stream.push(step.tokens)
            if piece:
                yield piece
        tail = stream.flush()
        if tail:
            yield tail


def load(
    model: str | os.PathLike[str] = DEFAULT_MODEL,
    heads: str = "auto",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    rope_scaling: str | dict | RopeScaling | None = None,
    draft_weights: str = "auto",
    drafter: str = "auto",
    compile: bool = False,
    kv_dtype: str = "auto",
    weights: str = "auto",
    activations: str = "float",
    attention_dtype: str = "float32",
) -> LM:
    """Loads a model: the embedded default `"smollm2-135m"`, a `.gguf` file, or a Hugging Face
    directory (config.json + safetensors). `rope_scaling` such as `"yarn:4"` extends the context.

    `heads`: "auto" (the heads shipped for a known model, else none), "none", or a heads file.
    `draft_weights`: "auto" lets the self-draft run an int4 copy of the model where torch's int4
    kernel exists (built by the first run that drafts: `LM.int4`), "int4" always, "float" never
    (the draft then runs the model's own weights).
    `drafter`: the seq drafter: "auto" (the one shipped for a known model, else none), "none", or a
    drafter file (`tokenswift train-drafter`).
    `kv_dtype`: the KV cache's element type, "auto" (the weights'), "float32", "bfloat16" or "float16",
    for every method alike.
    `weights`: "auto" keeps a GGUF's Q4_0/Q4_1/Q8_0 blocks (multiplied as they are by the native
    CPU kernel: the numbers of their float32 dequantization, a fraction of the memory), "float"
    dequantizes them, "q8_0"/"q4_0" quantize a float checkpoint at load (a different model).
    `activations`: "float" (default) or "int8": the GGUF weight blocks multiply int8-rounded
    activations in integers, llama.cpp's arithmetic (faster, a different model).
    `attention_dtype`: "float32" (default), "bfloat16" or "bfloat16-amx": attention over the cache rounds its
    queries and probabilities to bfloat16 and sums their products in float32 (the AVX-512 BF16
    instruction where the CPU has it; faster, a different model; the cache bfloat16); "bfloat16-amx"
    the same roundings with the products summed in the order of AMX's bfloat16 tiles (on the tiles
    where the CPU has them, else in AVX-512 vectors; another model again).
    `compile`: torch.compile the decode, draft and verify passes at static shapes (CUDA graphs on
    GPUs); each pass size compiles on first use, the tokens are the same.
    Under `torchrun --nproc-per-node N` the model is split across the N processes (parallel.py).
    """
    loaded = load_model(model, device=device, dtype=dtype, rope_scaling=rope_scaling, draft_weights=draft_weights,
                        compile=compile, kv_dtype=kv_dtype, weights=weights, activations=activations,
                        attention_dtype=attention_dtype)
    return LM(loaded, heads=resolve_heads(heads, loaded.model, loaded.name),
              seq=resolve_seq_drafter(drafter, loaded.model, loaded.name))
