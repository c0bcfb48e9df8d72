"""A CLIP-layout BPE vocabulary learned from a small corpus, so that a tokenizer for a fixed
set of captions (the templated captions of a labelled data set) needs no download.

    vocab, merges = learn_vocabulary(["a handwritten digit seven", "the number 7", ...])
    tokenizer = corpus_tokenizer(captions, max_length=16)

CLIP's layout (Radford et al. 2021): the 256 byte symbols of GPT-2's byte-to-unicode map,
the same with the end-of-word suffix "</w>", the merged symbols in the order they were
learned, then <|startoftext|> and <|endoftext|> (the last two ids). The merges are learned by
Algorithm 1 of Sennrich et al. 2016 (the most frequent adjacent pair, ties broken by the pair
itself, so the vocabulary is a pure function of the corpus) until every word of the corpus is
one symbol or `max_merges` are learned. Any text still tokenizes: unknown words fall back to
smaller pieces, down to single bytes.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence

from tokenizers import Regex, normalizers, pre_tokenizers

from diffusion_jax.models.text.tokenizer import (
    BOS_TOKEN,
    END_OF_WORD,
    EOS_TOKEN,
    MAX_LENGTH,
    PIECES,
    CLIPTokenizer,
    build_tokenizer,
)

Merge = tuple[str, str]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's / CLIP's map of the 256 bytes to printable characters: the printable Latin-1
    bytes stand for themselves, the others for the characters from U+0100 on, in order (the
    printable bytes first, as CLIP's vocab.json lists them)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    others = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
    return dict(sorted(mapping.items(), key=lambda item: (item[0] not in printable, item[0])))


def corpus_words(texts: Iterable[str]) -> list[str]:
    """The words of `texts` as CLIP's normaliser and pre-tokenizer split them (lower-cased;
    letter runs, single digits, runs of other non-space characters)."""
    normalize = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    split = pre_tokenizers.Split(Regex(PIECES), behavior="removed", invert=True)
    return [word for text in texts
            for word, _ in split.pre_tokenize_str(normalize.normalize_str(text))]  # fmt: skip


def word_symbols(word: str) -> tuple[str, ...]:
    """A word as byte-level symbols, the last marked with "</w>"."""
    table = bytes_to_unicode()
    chars = [table[b] for b in word.encode("utf-8")]
    return (*chars[:-1], chars[-1] + END_OF_WORD)


def merge_pair(symbols: tuple[str, ...], pair: Merge) -> tuple[str, ...]:
    """`symbols` with every occurrence of the adjacent `pair` joined into one symbol."""
    out, i = [], 0
    while i < len(symbols):
        if symbols[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def learn_merges(words: Sequence[str], max_merges: int) -> list[Merge]:
    """Up to `max_merges` merges, each the most frequent adjacent pair of the words' current
    symbols (Algorithm 1 of Sennrich et al. 2016); stops when every word is one symbol."""
    counts = collections.Counter(word_symbols(word) for word in words)
    merges = []
    for _ in range(max_merges):
        pairs = collections.Counter()
        for symbols, freq in counts.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        counts = collections.Counter({merge_pair(s, best): f for s, f in counts.items()})
    return merges


def vocabulary_of(merges: Sequence[Merge]) -> dict[str, int]:
    """CLIP's layout (module docstring): "!" is id 0, <|endoftext|> the last id."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    if len(set(tokens)) != len(tokens):
        raise ValueError("the merges make a symbol twice; merges must come from learn_merges")
    return {token: i for i, token in enumerate(tokens)}


def learn_vocabulary(
    texts: Iterable[str], *, max_merges: int = 10_000
) -> tuple[dict[str, int], list[Merge]]:
    """(vocab, merges) in CLIP's layout learned from the words of `texts`."""
    merges = learn_merges(corpus_words(texts), max_merges)
    return vocabulary_of(merges), merges


def corpus_tokenizer(texts: Iterable[str], *, max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """A CLIP tokenizer (padding with <|endoftext|>, as SD 1.x's) whose vocabulary is learned
    from `texts`: each of their words is one token."""
    vocab, merges = learn_vocabulary(texts)
    return CLIPTokenizer(build_tokenizer(vocab, merges), max_length=max_length, source="corpus")
