"""`spm.SpmTokenizer`, the project's own tokenizer for SentencePiece GGUF vocabularies without a
space prefix (Gemma), against the tokenizer transformers converts from the same vocabulary: the
same ids and text, on the embedded `gemma3-270m` (its tests skip without the package) and on
small made-up vocabularies built both ways (these always run)."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
from conftest import DATA

from tokenswift import spm as spm_mod
from tokenswift.spm import SpmTokenizer, Unsupported

SPACE = "\u2581"
CORPORA = ("cdne.txt", "kjv.txt", "jargon.txt")
SLICE = 200_000  # characters of each corpus compared in the default run (the slow test: all)


@pytest.fixture(scope="module")
def gemma_path():
    from tokenswift.loading import embedded_path

    try:
        return embedded_path("gemma3-270m")
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def ours(gemma_path):
    from tokenswift.loading import gguf_tokenizer

    tok = gguf_tokenizer(gemma_path)
    assert isinstance(tok, SpmTokenizer)
    return tok


@pytest.fixture(scope="module")
def hf(gemma_path):
    """transformers' tokenizer converted from the same file (cached), as loading built it before."""
    from tokenswift.loading import hf_gguf_tokenizer

    return hf_gguf_tokenizer(gemma_path)


def corpus(name: str) -> str:
    path = DATA / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: the tests read ../shared/data (or set TOKENSWIFT_DATA)")
    return path.read_text(encoding="utf-8")


EDGE_CASES = {
    "empty": "",
    "one space": " ",
    "spaces": " " * 40,
    "leading and trailing spaces": "  hello world   ",
    "space runs between words": "a  b   c    d" + " " * 33 + "e",
    "newlines and tabs": "line one\nline two\n\n\tindented\t\ttwice\r\nwindows\r",
    "newlines only": "\n\n\n",
    "many newlines": "x" + "\n" * 45 + "y",
    "tabs and spaces": "\t \t  \t\t\t   x",
    "cjk": "漢字仮名交じり文 한국어 中文没有空格的很长的一句话用来测试长片段",
    "emoji and 4-byte characters": "🤖👍🏽 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈 🇫🇷 \U0001F9EC\U000E0001",
    "combining characters": "e\u0301 a\u0308\u0323 n\u0303o Z\u0351\u0352\u0353\u0354algo",
    "byte fallback": "\x00\x01\x7f \ue000\uf8ff \U0010fffd \U000f0000 \u0378",
    "control tokens": "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "bos text": "<bos>",
    "bos inside words": "a<bos>b <eos> <pad><unk><mask>",
    "nearly control tokens": "<start_of_turn <end_of_turn> <start_of_turn>> <<bos>> <unused12> <unused99999>",
    "user-defined tokens": "[multimodal] <start_of_image> <table><tr><td>x</td></tr></table> <h1>T</h1>",
    "the mark itself": f"{SPACE}a{SPACE}{SPACE}b {SPACE} c{SPACE}",
    "> </ contexts": "a> </b> x>▁</y >▁</ > </ >  </ <b>x</b> </ >",
    "digits": "0 1 12 123 1234 12345 3.14159 1,000,000 2024-01-02 007",
    "html": '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"></head><body><p>Hi &amp; bye</p></body></html>',
    "code": 'def f(x):\n    return {"a": [1, 2], \'b\': x ** 2}  # comment\n\nif __name__ == "__main__":\n\tf(3)\n',
    "punctuation": "Hello, world! ... ?!? «quoted» — dash – “curly” ‘single’ (paren) [bracket] {brace}",
    "long run without a cut": "x" * 300 + "┌" + "─" * 200 + "┐",
    "long spaces-only run": " " * 500,
    "long cjk run": "的" * 120 + "一二三四五六七八九十" * 20,
    "mixed scripts": "Ελληνικά русский עברית العربية हिन्दी ไทย",
    "repeated letters": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab",
}


# -- the embedded Gemma 3 vocabulary -------------------------------------------------------------


@pytest.mark.parametrize("name", CORPORA)
def test_corpus_ids_and_text_equal_transformers(ours, hf, name):
    text = corpus(name)[:SLICE]
    ids = ours(text).input_ids
    assert ids == hf(text).input_ids
    assert ids[0] == ours.bos_token_id == 2
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True) == text
    assert ours.decode(ids) == hf.decode(ids)


@pytest.mark.slow
@pytest.mark.parametrize("name", CORPORA)
def test_whole_corpus_ids_equal_transformers(ours, hf, name):
    text = corpus(name)
    ids = ours(text, add_special_tokens=False).input_ids
    assert ids == hf(text, add_special_tokens=False).input_ids
    assert ours.decode(ids) == text


@pytest.mark.parametrize("case", EDGE_CASES)
def test_edge_case_ids_equal_transformers(ours, hf, case):
    text = EDGE_CASES[case]
    for split in (False, True):
        for special in (False, True):
            want = hf(text, add_special_tokens=special, split_special_tokens=split).input_ids
            assert ours(text, add_special_tokens=special, split_special_tokens=split).input_ids == want, \
                (split, special)
            for skip in (False, True):
                assert ours.decode(want, skip_special_tokens=skip) == hf.decode(want, skip_special_tokens=skip)


def test_bos_comes_first_with_special_tokens(ours, hf):
    for text in ("", "Hello", "<bos>x", "<start_of_turn>user"):
        plain = ours(text, add_special_tokens=False).input_ids
        assert ours(text).input_ids == [2, *plain] == hf(text).input_ids
        assert ours(text, add_special_tokens=True, split_special_tokens=True).input_ids == \
            hf(text, add_special_tokens=True, split_special_tokens=True).input_ids


def test_control_tokens_are_text_with_split_special_tokens(ours):
    assert ours("<start_of_turn>user\n", add_special_tokens=False).input_ids == [105, 2364, 107]
    split = ours("<start_of_turn>user\n", add_special_tokens=False, split_special_tokens=True).input_ids
    assert 105 not in split and split[-2:] == [2364, 107]  # "\n" (not special) is still one token
    assert ours("<bos>", add_special_tokens=False).input_ids == [2]
    assert 2 not in ours("<bos>", add_special_tokens=False, split_special_tokens=True).input_ids


def test_random_texts_equal_transformers(ours, hf):
    """Strings drawn from pieces that meet at every kind of cut: spaces, the mark, '>', control
    and user-defined tokens, characters outside the vocabulary, newlines."""
    parts = [" ", "  ", SPACE, ">", "<", "/", "</", "> </", ">▁</", "\n", "\t", "a", "the", "The", "ing", "é",
             "e\u0301", "漢", "🤖", "\ue000", "\x00", "<bos>", "<start_of_turn>", "<table>", "[multimodal]",
             "<unused3>", "1", "23", "-", "_", "http://x.y/z?a=b", "\r\n", "      "]
    rng = random.Random(7)
    texts = ["".join(rng.choice(parts) for _ in range(rng.randint(1, 40))) for _ in range(400)]
    for split in (False, True):
        got = [ours(t, add_special_tokens=False, split_special_tokens=split).input_ids for t in texts]
        want = [hf(t, add_special_tokens=False, split_special_tokens=split).input_ids for t in texts]
        for t, a, b in zip(texts, got, want):
            assert a == b, (t, split)


def test_random_id_sequences_decode_as_transformers(ours, hf):
    """Byte tokens alone and in runs (invalid UTF-8 among them), control and user-defined tokens,
    the spaces-only tokens, ordinary ones, ids past the vocabulary."""
    rng = random.Random(3)
    pools = [range(238, 494), range(238), range(494, 262144), range(255968, 256001), range(138, 168),
             [262144, 262145, 10**6]]
    for _ in range(500):
        ids = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 24))]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (ids, skip)
    utf8 = list("€".encode()) + list("🤖".encode())
    for ids in ([238 + b for b in utf8], [238 + 0xE2, 238 + 0x82], [238 + 0xE2, 2, 238 + 0x82, 238 + 0xAC],
                [238 + 0xFF], [238 + 0xE2, 238 + 0x96, 238 + 0x81], [238 + 0x41, 236743, 238 + 0xC3]):
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids
    assert ours.decode(238 + 0x41) == hf.decode(238 + 0x41) == "A"
    assert ours.decode([]) == ""


def test_the_interface_tokenswift_uses_matches_transformers(ours, hf):
    assert (ours.eos_token_id, ours.bos_token_id, ours.pad_token_id, ours.unk_token_id) == \
        (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 0, 3)
    assert len(ours) == len(hf) == ours.vocab_size == hf.vocab_size == 262144
    assert ours.chat_template is None and hf.chat_template is None
    ours_added = {i: (t.content, t.special) for i, t in ours.added_tokens_decoder.items()}
    assert ours_added == {i: (t.content, t.special) for i, t in hf.added_tokens_decoder.items()}
    assert sum(t.special for t in ours.added_tokens_decoder.values()) == 6249
    for token in ("<bos>", "<start_of_turn>", SPACE * 2, "  ", "▁the", "\n", "not a token", "<0x41>"):
        assert ours.convert_tokens_to_ids(token) == hf.convert_tokens_to_ids(token), token
    sample = [0, 2, 105, 138, 238, 1000, 236743, 255999, 262143]
    assert ours.convert_ids_to_tokens(sample) == hf.convert_ids_to_tokens(sample)
    assert ours.convert_ids_to_tokens(138) == hf.convert_ids_to_tokens(138) == SPACE * 2
    batch = ["one text", "", "two  texts\n\n", "<start_of_turn>x"]
    assert ours(batch, add_special_tokens=False).input_ids == hf(batch, add_special_tokens=False).input_ids
    enc = ours("Hello")
    assert enc["input_ids"] == enc.input_ids and enc.attention_mask == [1] * len(enc.input_ids)
    assert ours.decode(enc.input_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) == "Hello"
    assert ours.special_tokens_map == {k: v for k, v in hf.special_tokens_map.items() if k != "mask_token"}


def test_a_chat_template_renders_as_transformers_renders_it(ours, hf):
    """The file has no template; one given to both renders the same (trim_blocks, lstrip_blocks,
    loop controls, tojson, raise_exception, the special tokens as variables)."""
    template = (
        "{{ bos_token }}{% for m in messages %}\n"
        "    {% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}\n"
        "    {% if loop.index0 > 5 %}{% break %}{% endif %}\n"
        "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ m['content'] | trim }}<end_of_turn>\n"
        "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
        "{{ {'k': 'é<>&'} | tojson }}{{ eos_token }}"
    )
    messages = [{"role": "system", "content": " be brief "}, {"role": "user", "content": "Hi <b>there</b>\n"}]
    for gen in (True, False):
        want = hf.apply_chat_template(messages, chat_template=template, add_generation_prompt=gen, tokenize=False)
        got = ours.apply_chat_template(messages, chat_template=template, add_generation_prompt=gen, tokenize=False)
        assert got == want
        assert ours.apply_chat_template(messages, chat_template=template, add_generation_prompt=gen) == \
            ours(want, add_special_tokens=False).input_ids
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}], chat_template=template, tokenize=False)
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template(messages, tokenize=False)


def test_the_text_stream_gives_transformers_pieces(ours, hf):
    from tokenswift.api import TextStream

    ids = ours("Grüße 🤖 漢字, <b>code</b>\n\tend").input_ids + [238 + 0xE2, 238 + 0x82] + [1]
    pieces = {}
    for name, tok in (("ours", ours), ("hf", hf)):
        stream = TextStream(tok)
        pieces[name] = [stream.push([i]) for i in ids] + [stream.flush()]
    assert pieces["ours"] == pieces["hf"]


def test_heap_and_scan_merges_agree(ours, hf, monkeypatch):
    """Pieces merge by scans below HEAP_FROM symbols and through a heap from there; every piece
    of a corpus slice and the edge cases through the heap alone, and through scans alone."""
    texts = [corpus("jargon.txt")[:30000], *EDGE_CASES.values()]
    want = [hf(t, add_special_tokens=False).input_ids for t in texts]
    for heap_from in (2, 10**9):
        monkeypatch.setattr(spm_mod, "HEAP_FROM", heap_from)
        ours._cached_bpe.cache_clear()
        assert [ours(t, add_special_tokens=False).input_ids for t in texts] == want, heap_from
    ours._cached_bpe.cache_clear()


def test_other_gguf_vocabularies_keep_transformers():
    from tokenswift.loading import embedded_path, gguf_tokenizer

    try:
        path = embedded_path("smollm2-135m")  # byte-level BPE ("gpt2")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    with pytest.raises(Unsupported):
        SpmTokenizer.from_gguf(path)
    assert not isinstance(gguf_tokenizer(path), SpmTokenizer)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_the_tokenizer_grows_rss_by_at_most_45_mib(gemma_path):
    """Built in a fresh process (tokenswift.loading already imported, as loading a model has it):
    +33 MiB RSS measured, against +136 MiB for transformers' tokenizer of the same file."""
    code = (
        "import gc, os\n"
        "from tokenswift.loading import embedded_path, gguf_tokenizer\n"
        "def rss(): return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
        "path = embedded_path('gemma3-270m')\n"
        "r0 = rss()\n"
        "tok = gguf_tokenizer(path); gc.collect()\n"
        "print(type(tok).__name__, (rss() - r0) / 2**20)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    kind, grown = r.stdout.split()[-2:]
    print(f"gemma3-270m's tokenizer: RSS grows {float(grown):.1f} MiB")
    assert kind == "SpmTokenizer" and float(grown) <= 45


# -- made-up vocabularies, converted by transformers too -----------------------------------------


def _bytes() -> list[str]:
    return [f"<0x{b:02X}>" for b in range(256)]


def _both(tokens: list[str], types: list[int]):
    """(ours, transformers' tokenizers.Tokenizer) for one vocabulary, as a Gemma 3 GGUF holds it."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        convert_gguf_tokenizer,
    )

    theirs, _ = convert_gguf_tokenizer("gemma3", {"tokenizer_type": "llama", "tokens": tokens,
                                                  "scores": [0.0] * len(tokens), "token_type": types})
    return SpmTokenizer(tokens, types, bos_token_id=2, eos_token_id=1, unk_token_id=3, pad_token_id=0), theirs


def _check(ours: SpmTokenizer, theirs, texts, split: bool = False) -> None:
    theirs.encode_special_tokens = split
    for t in texts:
        want = theirs.encode(t, add_special_tokens=False).ids
        assert ours(t, add_special_tokens=False, split_special_tokens=split).input_ids == want, t
        for skip in (False, True):
            assert ours.decode(want, skip_special_tokens=skip) == theirs.decode(want, skip_special_tokens=skip), t


SMALL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<x<b>>", "\n", "\n\n", "  ", "   ", "<b>", *_bytes(),
         SPACE, "a", "b", "ab", "ba", f"{SPACE}a", "aa", f"{SPACE}b", ">", "<", "/", f">{SPACE}</", f"{SPACE}</",
         "</", "aaa", "abab", "bab", "<s", "tart"]
SMALL_TYPES = [3, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, *[6] * 256, *[1] * (len(SMALL) - 267)]


@pytest.mark.parametrize("split", [False, True])
def test_a_small_vocabulary_equals_transformers(split):
    """Merge order (the merged token's place in the file, leftmost first), byte fallback,
    spaces-only tokens (respelled, not added), '>▁</' across a cut, a special token that hides
    a non-special one inside it when split."""
    ours, theirs = _both(SMALL, SMALL_TYPES)
    assert ours.convert_tokens_to_ids(SPACE * 2) == 8  # "  " respelled
    assert 8 not in ours.added_tokens_decoder and ours.added_tokens_decoder[10].special is False  # "<b>"
    texts = ["a b", "aaaa", "aaaaa", "ab ba", "abab bab", "x>  </y", "a> </b", "<start_of_turn>\n  a", "é",
             "<b>ab</b>", "\n\n\n", "   ", "<start_of_turn", "<bos>x<eos>", "", " ", "bbbb aaab", "ba" * 30,
             "<x<b>>", "a<x<b>>b<b>", "<x<b>"]
    _check(ours, theirs, texts, split)


def test_random_small_vocabularies_equal_transformers():
    """Vocabularies of random strings over a few characters (the mark among them, so that some
    tokens have it inside and the cuts must allow for them), in random order, on random texts."""
    rng = random.Random(11)
    alphabet = ["a", "b", "c", SPACE, ">", "é", "漢"]
    for _ in range(12):
        words = {"".join(rng.choice(alphabet) for _ in range(rng.randint(2, 6))) for _ in range(400)}
        words |= set(rng.sample(alphabet, 5))
        normal = sorted(words - set(_bytes()))
        rng.shuffle(normal)
        tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<t>", "\n", *_bytes(), *normal]
        types = [3, 3, 3, 3, 3, 4, *[6] * 256, *[1] * len(normal)]
        ours, theirs = _both(tokens, types)
        texts = ["".join(rng.choice(alphabet + [" ", "  ", "<t>", "\n", "d"]) for _ in range(rng.randint(0, 80)))
                 for _ in range(60)]
        _check(ours, theirs, texts)
        ours._cached_bpe.cache_clear()
        old = spm_mod.HEAP_FROM
        try:
            spm_mod.HEAP_FROM = 2
            _check(ours, theirs, texts)
        finally:
            spm_mod.HEAP_FROM = old


def test_a_vocabulary_it_cannot_reproduce_is_refused():
    with pytest.raises(Unsupported, match="repeats"):
        SpmTokenizer(["<pad>", "a", "a", *_bytes()], [3, 1, 1, *[6] * 256])
    with pytest.raises(Unsupported, match="byte tokens"):
        SpmTokenizer(["<pad>", "a"], [3, 1])
    with pytest.raises(Unsupported, match="UTF-8"):
        SpmTokenizer([b"<pad>", b"\xff", *[t.encode() for t in _bytes()]], [3, 1, *[6] * 256])
