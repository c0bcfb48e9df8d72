"""A tiny CLIP BPE vocabulary in CLIP's layout, written by the tests that need a tokenizer
folder: 256 byte symbols, the same with "</w>", merges learned here by Algorithm 1 of
Sennrich et al. 2016 on a small corpus, then <|startoftext|> and <|endoftext|>."""

import collections
import json

CORPUS = (
    "a photo of a cat sitting on the mat, a painting of an astronaut riding a horse on the "
    "moon. the lowest and the newest and the widest photograph of the cat's hat isn't it "
    "photographs of dogs and cats don't sit on mats; an oil painting, trending on artstation"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's / CLIP's map of the 256 bytes to printable characters: the printable Latin-1
    bytes stand for themselves, the others for the characters from U+0100 on, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    others = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
    return dict(sorted(mapping.items(), key=lambda item: (item[0] not in printable, item[0])))


def word_symbols(word: str) -> list[str]:
    chars = [bytes_to_unicode()[b] for b in word.encode("utf-8")]
    return chars[:-1] + [chars[-1] + "</w>"]


def learn_merges(words: list[str], count: int) -> list[tuple[str, str]]:
    """The `count` most frequent pair merges (Algorithm 1 of Sennrich et al. 2016)."""
    vocab = collections.Counter(tuple(word_symbols(word)) for word in words)
    merges = []
    for _ in range(count):
        pairs = collections.Counter()
        for symbols, freq in vocab.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab = collections.Counter({merge_pair(symbols, best): f for symbols, f in vocab.items()})
    return merges


def merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if symbols[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def clip_vocabulary(num_merges: int = 120) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) in CLIP's layout; "!" is id 0, as OpenCLIP's pad token is."""
    words = CORPUS.replace(",", " ").replace(".", " ").replace(";", " ").split()
    merges = learn_merges(words, num_merges)
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert tokens[0] == "!" and len(set(tokens)) == len(tokens)
    return {token: i for i, token in enumerate(tokens)}, merges


def write_tokenizer_folder(folder, vocabulary, *, pad_token: str):
    vocab, merges = vocabulary
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {"bos_token": {"content": "<|startoftext|>", "lstrip": False},
               "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}  # fmt: skip
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "pad_token": pad_token}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
