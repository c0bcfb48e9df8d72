"""CLIP's byte-level BPE tokenizer (Radford et al. 2021; byte pair encoding of Sennrich et al.
2016), built with HuggingFace's `tokenizers` as transformers' `CLIPTokenizer` builds it.

    tokenizer = CLIPTokenizer.from_folder("stable-diffusion-v1-5/tokenizer")
    input_ids = tokenizer(["a photo of a cat", ""])   # [2, 77] int32

A folder holds vocab.json + merges.txt (or tokenizer.json, read first when present) and
tokenizer_config.json / special_tokens_map.json naming the special tokens. Text is NFC
normalised, runs of whitespace become one space, letters are lower-cased; it is split into
the contractions 's 't 're 've 'm 'll 'd, runs of letters, single digits and runs of other
non-space characters; each piece is mapped to byte-level characters and merged by BPE, its
last symbol marked with the end-of-word suffix "</w>". Every sequence is <|startoftext|>
(49406 in CLIP's vocabulary) + tokens + <|endoftext|> (49407), padded to 77 with the pad
token: <|endoftext|> for openai/clip-vit-large-patch14 (SD 1.x), "!" (id 0) for OpenCLIP's
(SD 2.x, SDXL's tokenizer_2). Longer prompts keep their first 75 tokens, with a warning.

The ids are those of transformers' fast tokenizer (4.x's CLIPTokenizerFast, 5.x's only
CLIPTokenizer). transformers 4's slow Python CLIPTokenizer differs on some text: with ftfy
installed it unescapes HTML ("&amp;" is "&") and fixes text as OpenAI's tokenizer does
("ﬁ" is "fi"); without ftfy it splits CJK characters apart ("東京" is two pieces, here one).
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import warnings
from collections.abc import Sequence

import numpy as np
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.models import BPE

from diffusion_jax.runtime import storage

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_LENGTH = 77
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "tokenizer_config.json")  # fmt: skip
# CLIP's split: special tokens, contractions, letter runs, single digits, other runs
PIECES = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
    r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
_UNSET_LENGTH = 10**18  # transformers writes int(1e30) for "no limit"


def build_tokenizer(
    vocab: dict[str, int], merges: list[tuple[str, str]], *, unk_token: str = EOS_TOKEN
) -> Tokenizer:
    """CLIP's normaliser, pre-tokeniser, BPE model and decoder around `vocab` and `merges`
    (transformers' CLIPConverter; the post-processor is set by `CLIPTokenizer`)."""
    model = BPE(vocab, merges, unk_token=unk_token, continuing_subword_prefix="",
                end_of_word_suffix=END_OF_WORD, fuse_unk=False)  # fmt: skip
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PIECES), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _local_copy(folder) -> pathlib.Path:
    """The tokenizer files of a remote folder in a new local temporary folder."""
    local = pathlib.Path(tempfile.mkdtemp(prefix="tokenizer_"))
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            (local / name).write_bytes((folder / name).read_bytes())
    return local


def _read_special_tokens(folder: pathlib.Path) -> dict:
    """bos / eos / pad / unk tokens and model_max_length; special_tokens_map.json overrides
    tokenizer_config.json, as transformers reads them."""
    found = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            found.update(json.loads(path.read_text()))
    tokens = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN,
              "unk_token": EOS_TOKEN}  # fmt: skip
    tokens.update({key: _token_content(found[key]) for key in tokens if found.get(key)})
    length = found.get("model_max_length", MAX_LENGTH)
    tokens["max_length"] = MAX_LENGTH if length >= _UNSET_LENGTH else int(length)
    return tokens


class CLIPTokenizer:
    """Prompts to CLIP token ids (module docstring): ``tokenizer(prompts)`` is [N, max_length]
    int32, bos + tokens + eos + pads, truncated to max_length with a warning.

    `tokenizer` (a `build_tokenizer` or a tokenizer.json one) gets its special tokens and
    post-processor set here, in place; its own padding and truncation are turned off."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token: str = EOS_TOKEN,
        max_length: int = MAX_LENGTH,
        source: str = "tokenizer",
    ):
        ids = {}
        for role, token in [("bos", bos_token), ("eos", eos_token), ("pad", pad_token)]:
            ids[role] = tokenizer.token_to_id(token)
            if ids[role] is None:
                raise ValueError(f"{source}: the {role} token {token!r} is not in the vocabulary")
        if max_length < 2:
            raise ValueError(f"{source}: max_length={max_length} leaves no room for bos and eos")
        self.bos_token_id, self.eos_token_id, self.pad_token_id = ids["bos"], ids["eos"], ids["pad"]
        self.max_length = max_length
        # special tokens are never split, as in transformers (so a "!" pad stays one token)
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                      for t in (bos_token, eos_token, pad_token)])  # fmt: skip
        tokenizer.post_processor = processors.RobertaProcessing(
            (eos_token, self.eos_token_id), (bos_token, self.bos_token_id),
            trim_offsets=False, add_prefix_space=False,
        )  # fmt: skip
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.special_tokens = {"bos_token": bos_token, "eos_token": eos_token,
                               "pad_token": pad_token, "max_length": max_length}  # fmt: skip
        self.source = source
        self.multi_vector_tokens: dict[str, str] = {}  # "<t>" -> "<t> <t>_1 <t>_2"

    def vocab_size(self) -> int:
        """The number of ids, added tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def with_tokens(self, tokens: dict[str, int]) -> CLIPTokenizer:
        """A copy with new tokens, each {token: number of vectors}, as transformers'
        `add_tokens` adds them (not split, matched after normalisation); a token of n > 1
        vectors gets n ids, "t", "t_1", ... "t_{n-1}", and a prompt's "t" stands for all n
        (diffusers' `maybe_convert_prompt`). Their ids follow the vocabulary's in order."""
        copy = CLIPTokenizer(Tokenizer.from_str(self.tokenizer.to_str()), **self.special_tokens,
                             source=self.source)  # fmt: skip
        copy.multi_vector_tokens = dict(self.multi_vector_tokens)
        for token, count in tokens.items():
            names = [token] + [f"{token}_{i}" for i in range(1, count)]
            taken = [name for name in names if self.tokenizer.token_to_id(name) is not None]
            if taken:
                raise ValueError(f"{self.source}: the tokens {taken} are in the vocabulary already")
            for name in names:  # one at a time: ids in this order
                copy.tokenizer.add_tokens([AddedToken(name, normalized=True, special=False)])
            if count > 1:
                copy.multi_vector_tokens[token] = " ".join(names)
        return copy

    def expand_prompt(self, prompt: str) -> str:
        """`prompt` with each multi-vector token standing for its n tokens (`with_tokens`)."""
        for token, expansion in self.multi_vector_tokens.items():
            prompt = prompt.replace(token, expansion)
        return prompt

    @classmethod
    def from_folder(cls, folder: str | pathlib.Path) -> CLIPTokenizer:
        """The tokenizer of a transformers / diffusers tokenizer folder (module docstring),
        local or a URL (gs://; its files are copied to a temporary folder first)."""
        if storage.is_remote(folder):
            return cls.from_folder(_local_copy(storage.as_path(folder)))
        folder = pathlib.Path(folder)
        special = _read_special_tokens(folder)
        if (folder / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab, merges = BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
            tokenizer = build_tokenizer(vocab, merges, unk_token=special["unk_token"])
        else:
            present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "nothing"
            raise FileNotFoundError(
                f"{folder}: neither tokenizer.json nor vocab.json + merges.txt; it holds {present}"
            )
        special.pop("unk_token")
        return cls(tokenizer, **special, source=str(folder))

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        """[N, max_length] int32 token ids of `prompts` (a list of strings)."""
        if isinstance(prompts, str):
            raise TypeError("CLIPTokenizer takes a list of prompts, not one string")
        prompts = [self.expand_prompt(prompt) for prompt in prompts]
        encodings = self.tokenizer.encode_batch(prompts)
        out = np.full((len(encodings), self.max_length), self.pad_token_id, np.int32)
        for row, (prompt, encoding) in enumerate(zip(prompts, encodings)):
            ids = encoding.ids  # bos, tokens, eos
            if len(ids) > self.max_length:
                self._warn_truncated(prompt, encoding)
                ids = ids[: self.max_length - 1] + [self.eos_token_id]
            out[row, : len(ids)] = ids
        return out

    def _warn_truncated(self, prompt: str, encoding) -> None:
        start = encoding.offsets[self.max_length - 1][0]  # the first token that is dropped
        warnings.warn(
            f"prompt {prompt!r} has {len(encoding.ids)} tokens with bos and eos, more than "
            f"max_length={self.max_length}: dropped {prompt[start:]!r}",
            stacklevel=3,
        )
