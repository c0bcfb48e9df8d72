"""Tests of models/text/tokenizer.py on a tiny CLIP vocabulary written by the test (CLIP's
layout: 256 byte symbols, the same with "</w>", merges learned here by Sennrich et al.'s
Algorithm 1, then <|startoftext|> and <|endoftext|>): the ids equal those of a reference
BPE encoder written from the algorithm (needs `regex`), of transformers' CLIPTokenizerFast
and, in transformers 4, of its slow CLIPTokenizer (needs the [torch] extra), with either pad
convention; truncation warns and keeps bos and eos."""

import collections
import json
import warnings

import numpy as np
import pytest

from diffusion_jax.models.text.tokenizer import CLIPTokenizer

CORPUS = (
    "a photo of a cat sitting on the mat, a painting of an astronaut riding a horse on the "
    "moon. the lowest and the newest and the widest photograph of the cat's hat isn't it "
    "photographs of dogs and cats don't sit on mats; an oil painting, trending on artstation"
)
PROMPTS = [
    "a photo of a cat",
    "A PHOTO of a Cat's Hat, isn't it?",
    "  an   astronaut\triding\na horse   ",
    "photo 1234 of 2 cats!!! (masterpiece:1.2) -- 4k",
    "café naïve résumé Ångström, 東京 ünïcödé",
    "it's we're they've i'm you'll he'd don't",
    "",
    "<|endoftext|> inside the prompt",
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's / CLIP's map of the 256 bytes to printable characters: the printable Latin-1
    bytes stand for themselves, the others for the characters from U+0100 on, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    others = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
    return dict(sorted(mapping.items(), key=lambda item: (item[0] not in printable, item[0])))


def _word_symbols(word: str) -> list[str]:
    chars = [bytes_to_unicode()[b] for b in word.encode("utf-8")]
    return chars[:-1] + [chars[-1] + "</w>"]


def learn_merges(words: list[str], count: int) -> list[tuple[str, str]]:
    """The `count` most frequent pair merges (Algorithm 1 of Sennrich et al. 2016)."""
    vocab = collections.Counter(tuple(_word_symbols(word)) for word in words)
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
        vocab = collections.Counter({_merge(symbols, best): f for symbols, f in vocab.items()})
    return merges


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if symbols[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


@pytest.fixture(scope="module")
def vocabulary():
    """(vocab, merges) in CLIP's layout; "!" is id 0, as OpenCLIP's pad token is."""
    words = CORPUS.replace(",", " ").replace(".", " ").replace(";", " ").split()
    merges = learn_merges(words, 120)
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert tokens[0] == "!" and len(set(tokens)) == len(tokens)
    return {token: i for i, token in enumerate(tokens)}, merges


def _write_folder(folder, vocabulary, *, pad_token: str):
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


PADS = {"clip_l": "<|endoftext|>", "openclip": "!"}


@pytest.mark.parametrize("pad", sorted(PADS))
def test_the_ids_are_transformers_clip_tokenizers(pad, vocabulary, tmp_path):
    transformers = pytest.importorskip("transformers", reason="parity needs the [torch] extra")
    folder = _write_folder(tmp_path, vocabulary, pad_token=PADS[pad])
    theirs = transformers.CLIPTokenizerFast.from_pretrained(folder)
    expected = _transformers_ids(theirs, PROMPTS)
    ours = CLIPTokenizer.from_folder(folder)
    assert ours.pad_token_id == vocabulary[0][PADS[pad]]
    np.testing.assert_array_equal(ours(PROMPTS), expected)
    if transformers.CLIPTokenizer is not transformers.CLIPTokenizerFast:
        # transformers 4's slow Python tokenizer; without ftfy it splits CJK characters apart
        prompts = [p for p in PROMPTS if "東京" not in p]
        slow = transformers.CLIPTokenizer.from_pretrained(folder)
        np.testing.assert_array_equal(ours(prompts), _transformers_ids(slow, prompts))
    # the folder transformers saves holds tokenizer.json, which is read first
    theirs.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer.json").is_file()
    from_json = CLIPTokenizer.from_folder(tmp_path / "saved")
    np.testing.assert_array_equal(from_json(PROMPTS), expected)


def _transformers_ids(tokenizer, prompts: list[str]) -> np.ndarray:
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    return np.asarray(ids, np.int32)


def reference_ids(prompt: str, vocab: dict, merges: list, pad_id: int) -> list[int]:
    """CLIP's encoding from its definition: normalise, split, then per piece merge the
    adjacent pair of lowest merge rank until none is left (Sennrich et al. 2016, Sec. 3.2)."""
    import unicodedata

    import regex

    text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", prompt)).lower()
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    ids = [vocab["<|startoftext|>"]]
    for piece in regex.findall(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", text):
        symbols = tuple(_word_symbols(piece))
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, len(ranks)))
            if pair not in ranks:
                break
            symbols = _merge(symbols, pair)
        ids.extend(vocab[symbol] for symbol in symbols)
    ids = ids[:76] + [vocab["<|endoftext|>"]]
    return ids + [pad_id] * (77 - len(ids))


def test_the_ids_are_those_of_the_bpe_algorithm(vocabulary, tmp_path):
    """Against the reference encoder; its prompts hold no special-token text, which it does
    not know, nor a "!" when "!" is the pad token (never split, as transformers does)."""
    vocab, merges = vocabulary
    tokenizer = CLIPTokenizer.from_folder(_write_folder(tmp_path, vocabulary, pad_token="!"))
    prompts = [p.replace("!", ".") for p in PROMPTS if "<|" not in p]
    expected = [reference_ids(p, vocab, merges, pad_id=0) for p in prompts]
    np.testing.assert_array_equal(tokenizer(prompts), np.asarray(expected, np.int32))


def test_every_row_is_bos_tokens_eos_then_pads(vocabulary, tmp_path):
    vocab, _ = vocabulary
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    for pad, pad_token in PADS.items():
        tokenizer = CLIPTokenizer.from_folder(
            _write_folder(tmp_path / pad, vocabulary, pad_token=pad_token)
        )
        ids = tokenizer(["a photo of a cat", ""])
        assert ids.shape == (2, 77) and ids.dtype == np.int32
        np.testing.assert_array_equal(ids[1, :2], [bos, eos])
        assert (ids[1, 2:] == vocab[pad_token]).all()
        length = int(np.argmax(ids[0] == eos)) + 1
        assert ids[0, 0] == bos and (ids[0, 1 : length - 1] < bos).all()
        assert (ids[0, length:] == vocab[pad_token]).all()


def test_a_long_prompt_is_truncated_to_bos_75_tokens_eos_with_a_warning(vocabulary, tmp_path):
    vocab, _ = vocabulary
    tokenizer = CLIPTokenizer.from_folder(_write_folder(tmp_path, vocabulary, pad_token="!"))
    prompt = " ".join(f"cat {i}" for i in range(50))  # 100 words: 140 tokens (10 + 3 x 40)
    with pytest.warns(UserWarning) as record:
        ids = tokenizer([prompt, "a cat"])
    assert len(record) == 1
    message = str(record[0].message)
    assert repr(prompt) in message and "has 142 tokens" in message
    assert "max_length=77: dropped '28 cat 29 cat 30" in message  # bos + 75 tokens kept
    full = tokenizer.tokenizer.encode(prompt).ids
    np.testing.assert_array_equal(ids[0], full[:76] + [vocab["<|endoftext|>"]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenizer(["a cat"] * 3)


def test_a_pad_token_outside_the_vocabulary_is_refused_naming_the_folder(vocabulary, tmp_path):
    folder = _write_folder(tmp_path, vocabulary, pad_token="<pad>")
    with pytest.raises(ValueError, match=rf"{tmp_path}: the pad token '<pad>' is not in the"):
        CLIPTokenizer.from_folder(folder)


def test_a_folder_without_vocabulary_is_refused_naming_what_it_holds(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"neither tokenizer.json nor vocab.json \+ "
                       r"merges.txt; it holds \['tokenizer_config.json'\]"):  # fmt: skip
        CLIPTokenizer.from_folder(tmp_path)
