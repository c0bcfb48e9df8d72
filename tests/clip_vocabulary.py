"""A tiny CLIP BPE vocabulary in CLIP's layout, written by the tests that need a tokenizer
folder: 256 byte symbols, the same with "</w>", merges learned by Algorithm 1 of Sennrich et
al. 2016 on a small corpus, then <|startoftext|> and <|endoftext|>
(`diffusion_jax.models.text.vocabulary`)."""

import json

from diffusion_jax.models.text import vocabulary

CORPUS = (
    "a photo of a cat sitting on the mat, a painting of an astronaut riding a horse on the "
    "moon. the lowest and the newest and the widest photograph of the cat's hat isn't it "
    "photographs of dogs and cats don't sit on mats; an oil painting, trending on artstation"
)


def clip_vocabulary(num_merges: int = 120) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) in CLIP's layout; "!" is id 0, as OpenCLIP's pad token is."""
    words = CORPUS.replace(",", " ").replace(".", " ").replace(";", " ").split()
    merges = vocabulary.learn_merges(words, num_merges)
    vocab = vocabulary.vocabulary_of(merges)
    assert min(vocab, key=vocab.get) == "!"
    return vocab, merges


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
