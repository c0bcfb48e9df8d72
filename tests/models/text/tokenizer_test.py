"""Tests of models/text/tokenizer.py on a tiny CLIP vocabulary written by the test (CLIP's
layout: 256 byte symbols, the same with "</w>", merges learned here by Sennrich et al.'s
Algorithm 1, then <|startoftext|> and <|endoftext|>): the ids equal those of a reference
BPE encoder written from the algorithm (needs `regex`), of transformers' CLIPTokenizerFast
and, in transformers 4, of its slow CLIPTokenizer (needs the [torch] extra), with either pad
convention; truncation warns and keeps bos and eos."""

import warnings

import numpy as np
import pytest

from diffusion_jax.models.text.tokenizer import CLIPTokenizer
from diffusion_jax.models.text.vocabulary import merge_pair, word_symbols
from tests.clip_vocabulary import clip_vocabulary, write_tokenizer_folder

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


@pytest.fixture(scope="module")
def vocabulary():
    """(vocab, merges) in CLIP's layout; "!" is id 0, as OpenCLIP's pad token is."""
    return clip_vocabulary()


_write_folder = write_tokenizer_folder


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
        symbols = tuple(word_symbols(piece))
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, len(ranks)))
            if pair not in ranks:
                break
            symbols = merge_pair(symbols, pair)
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
