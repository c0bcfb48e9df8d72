"""Textual Inversion embeddings (Gal et al. 2022): new tokens whose input embeddings were
learned, the text encoder otherwise unchanged; read, added to a tokenizer and a CLIP text
encoder, and saved as diffusers' `load_textual_inversion` reads them.

    embeddings = read_embeddings("learned_embeds.safetensors")        # {"<cat-toy>": [n, D]}
    tokenizer, config, params = add_embeddings(tokenizer, config, params, embeddings)

Files are safetensors only (pickled .pt / .bin embeddings are refused: unpickling can run
code). diffusers' format is one tensor named after its token, [D] or [n, D]; a file of one
tensor under another name (A1111's ``emb_params``) takes the token given by the caller. A
token of n > 1 vectors becomes n tokens "t", "t_1", ... "t_{n-1}", and "t" in a prompt stands
for all of them, as diffusers does. The new rows are appended to the token embedding table
in that order, so the ids are diffusers' (vocabulary size, vocabulary size + 1, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load, save

from diffusion_jax.convert.diffusers_pipeline import PipelineWeights
from diffusion_jax.models.text import CLIPTextConfig, CLIPTokenizer
from diffusion_jax.runtime import storage

EMBEDDINGS_FILE = "learned_embeds.safetensors"
EMBEDDING_PATH = ("text_model", "embeddings", "token_embedding", "embedding")


def read_embeddings(path: storage.PathLike, *, token: str | None = None) -> dict[str, np.ndarray]:
    """{token: [n, D] float32} of a Textual Inversion file (module docstring); `token`
    renames its one tensor."""
    path = storage.as_path(path)
    if path.is_dir():
        path = path / EMBEDDINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"Textual Inversion file {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only safetensors embeddings are read (unpickling .pt or "
                         ".bin files can run code); save it as safetensors first")  # fmt: skip
    try:
        tensors = load(path.read_bytes())
    except Exception as error:  # a truncated or foreign file
        raise ValueError(f"{path} is not a safetensors file: {error}") from None
    if len(tensors) != 1:
        raise ValueError(
            f"{path} holds {sorted(tensors)}; a Textual Inversion file holds one tensor, named "
            "after its token (SDXL's clip_l / clip_g pairs are not supported)"
        )
    (name, vectors), = tensors.items()  # fmt: skip
    vectors = np.asarray(vectors, np.float32)
    vectors = vectors[None] if vectors.ndim == 1 else vectors
    if vectors.ndim != 2:
        raise ValueError(f"{path}: {name} has shape {vectors.shape}; expected [D] or [n, D]")
    return {token or name: vectors}


def add_embeddings(
    tokenizer: CLIPTokenizer,
    config: CLIPTextConfig,
    params: dict,
    embeddings: Mapping[str, np.ndarray],
) -> tuple[CLIPTokenizer, CLIPTextConfig, dict]:
    """(tokenizer, config, params) with the tokens of `embeddings` added (module docstring);
    the inputs are left as they were."""
    table = params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    for token, vectors in embeddings.items():
        if vectors.shape[-1] != table.shape[-1]:
            raise ValueError(f"the embedding of {token!r} has width {vectors.shape[-1]}; the "
                             f"text encoder's is {table.shape[-1]}")  # fmt: skip
    if table.shape[0] < tokenizer.vocab_size():
        raise ValueError(f"the text encoder has {table.shape[0]} token embeddings, fewer than "
                         f"the tokenizer's {tokenizer.vocab_size()} ids")  # fmt: skip
    new_tokenizer = tokenizer.with_tokens({t: len(v) for t, v in embeddings.items()})
    # as diffusers' resize_token_embeddings(len(tokenizer) + n): rows past the ids go
    kept = jnp.asarray(table)[: tokenizer.vocab_size()]
    rows = [jnp.asarray(v, table.dtype) for v in embeddings.values()]
    new_table = jnp.concatenate([kept, *rows])
    embedding = {"embedding": new_table}
    text_model = {**params["text_model"], "embeddings": {**params["text_model"]["embeddings"],
                                                         "token_embedding": embedding}}  # fmt: skip
    new_config = dataclasses.replace(config, vocab_size=int(new_table.shape[0]))
    return new_tokenizer, new_config, {**params, "text_model": text_model}


def save_embeddings(path: storage.PathLike, embeddings: Mapping[str, np.ndarray]) -> None:
    """Write one token's vectors as diffusers' learned_embeds.safetensors (a folder gets that
    name), which diffusers' `load_textual_inversion` and `read_embeddings` read."""
    if len(embeddings) != 1:
        raise ValueError(f"a Textual Inversion file holds one token; got {sorted(embeddings)}")
    path = storage.as_path(path)
    if path.suffix != ".safetensors":
        path = path / EMBEDDINGS_FILE
    tensors = {t: np.ascontiguousarray(v, np.float32) for t, v in embeddings.items()}
    storage.write_bytes(path, save(tensors))


def with_textual_inversions(
    weights: PipelineWeights, files: Sequence[tuple[storage.PathLike, str | None]]
) -> PipelineWeights:
    """The pipeline's weights with each (file, token or None) added to its tokenizer and
    text encoder (`generate --textual_inversion FILE[:TOKEN]`)."""
    tokenizer, config = weights.tokenizer, weights.text_config
    params = weights.params["text_encoder"]
    for path, token in files:
        embeddings = read_embeddings(path, token=token)
        tokenizer, config, params = add_embeddings(tokenizer, config, params, embeddings)
    sources = "".join(f" + Textual Inversion {path}" for path, _ in files)
    return dataclasses.replace(
        weights, tokenizer=tokenizer, text_config=config, source=weights.source + sources,
        params={**weights.params, "text_encoder": params},
    )  # fmt: skip
