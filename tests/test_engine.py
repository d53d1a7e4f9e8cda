"""Plain decoding through the public API."""

from __future__ import annotations

import pytest

import tokenswift
from tokenswift.config import PAPER_SAMPLING


def test_seeded_run_continues_exactly_from_its_own_prefix(smollm, cdne_ids):
    """Position-keyed sampling: 200 tokens == 100 tokens, then 100 more from prompt + those 100."""
    prompt = cdne_ids[1000:1256]
    kw = dict(seed=1234, ignore_eos=True, **PAPER_SAMPLING)
    full = smollm.generate(prompt, 200, **kw).tokens
    first = smollm.generate(prompt, 100, **kw).tokens
    rest = smollm.generate(prompt + first, 100, **kw).tokens
    assert first + rest == full
    # a different seed gives a different text (the seed is really used)
    assert smollm.generate(prompt, 100, **{**kw, "seed": 99}).tokens != first


def test_stream_joins_to_generate_text_and_stats(smollm, cdne_ids):
    kw = dict(seed=5, ignore_eos=True, temperature=0.8, top_p=0.95)
    res = smollm.generate("The hacker ethic says", 80, **kw)
    pieces = list(smollm.stream("The hacker ethic says", 80, **kw))
    assert "".join(pieces) == res.text
    assert len(pieces) > 10  # it really streamed
    assert res.text == smollm.decode(res.tokens)
    s = res.stats
    assert s["new_tokens"] == len(res.tokens) == 80
    assert s["finish_reason"] == "length"
    assert 0 < s["prefill_seconds"] < s["seconds"]
    assert s["tokens_per_s"] == pytest.approx(80 / s["seconds"])
    assert s["method"] == "tokenswift"  # the default


def test_stream_never_emits_replacement_characters(smollm):
    # Non-Latin text makes byte-level BPE split characters across tokens.
    res = smollm.generate("Écris un poème en français sur l'été, avec des émojis 🌞:", 60, seed=2, temperature=1.0,
                          ignore_eos=True)
    pieces = list(smollm.stream("Écris un poème en français sur l'été, avec des émojis 🌞:", 60, seed=2,
                                temperature=1.0, ignore_eos=True))
    assert "".join(pieces) == res.text
    assert not any("\ufffd" in p for p in pieces[:-1])


def test_eos_stops_unless_ignored(tiny_dir):
    _, d = tiny_dir("llama")
    lm = tokenswift.load(str(d))
    prompt = [5, 6, 7, 8]
    free = lm.generate(prompt, 30, temperature=0, ignore_eos=True).tokens
    stop_tok = free[10]
    first = free.index(stop_tok)
    lm.eos_token_ids = (stop_tok,)
    res = lm.generate(prompt, 30, temperature=0)
    assert res.tokens == free[: first + 1]
    assert res.stats["finish_reason"] == "eos"
    assert lm.generate(prompt, 30, temperature=0, ignore_eos=True).tokens == free


def test_chat_template_wraps_prompt(smollm):
    ids = smollm.encode("Hello there", chat=True)
    text = smollm.tokenizer.decode(ids)
    assert "<|im_start|>user\nHello there<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "kw,fragment",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
        ({"max_new_tokens": 8000}, "exceeds the model's context of 8192 tokens"),
        ({"method": "beam"}, "method must be one of tokenswift, ar, ngram, got 'beam'"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"temperature": -1.0}, "temperature must be 0 (greedy) or in [0.0001, 100], got -1.0"),
    ],
)
def test_bad_generate_arguments(smollm, cdne_ids, kw, fragment):
    kw = {"max_new_tokens": 10, **kw}
    with pytest.raises(ValueError) as e:
        smollm.generate(cdne_ids[:500], **kw)
    assert fragment in str(e.value)


def test_prompt_longer_than_context_and_empty_prompt(smollm, cdne_ids):
    with pytest.raises(ValueError, match="prompt \\(9000 tokens\\) is longer than the model's context of 8192"):
        smollm.generate(cdne_ids[:9000], 4)
    with pytest.raises(ValueError, match="the prompt is empty"):
        smollm.generate("", 4)
    with pytest.raises(ValueError, match="the prompt is empty"):
        smollm.generate([], 4)
