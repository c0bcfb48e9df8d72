"""The text-conditional model at the edge (`model.name = "text_unet"`, Rombach et al. 2022,
Sec. 3.3): its tokenizer, the captions' token ids as the network's condition, the null
condition of classifier-free guidance, the prompts it samples, and the optimizer that leaves
a frozen text encoder out.

    tokenizer = make_tokenizer(config)               # handed to data.make_dataset
    loss_fn = captions_as_condition(loss_fn)         # batch["input_ids"] -> the condition
    tx = without_frozen_text_encoder(config, tx)     # model.text_encoder.trainable=False

The tokenizer is a folder's (`model.text_encoder.tokenizer_path`) or, without one, a CLIP BPE
vocabulary learned from every caption `data.caption_templates` makes of the data set's class
names (`models.text.vocabulary`): a pure function of the config, so training, sampling and
evaluation tokenize alike. The unconditional branch of guidance (Ho & Salimans 2022) is the
empty caption "", which caption dropout (`data.caption_dropout`) trains, as Stable Diffusion.
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np
import optax

from diffusion_jax import data
from diffusion_jax.convert import transformers_clip
from diffusion_jax.data.caption_templates import class_names_or_numbers
from diffusion_jax.models.text import CLIPTokenizer, vocabulary

NULL_CAPTION = ""
TEXT_MODEL = "text_unet"  # the `model.name` of a text-conditional model
TEXT_ENCODER = "text_encoder"  # its parameters' key in the model's tree


def uses_text(config: ml_collections.ConfigDict) -> bool:
    return config.model.name == TEXT_MODEL


def class_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The class names of `data.train_split` ("0", "1", ... where it names none)."""
    source = data.build_source(config.data, split=config.data.train_split)
    return class_names_or_numbers(source.class_names, source.num_classes)


def template_captions(config: ml_collections.ConfigDict) -> list[str]:
    """Every caption `data.caption_templates` makes of the data set's classes."""
    names = class_names(config)
    return [template.format(name=name, label=label)
            for template in config.data.caption_templates
            for label, name in enumerate(names)]  # fmt: skip


@functools.lru_cache(maxsize=4)
def _corpus_tokenizer(captions: tuple[str, ...], max_length: int) -> CLIPTokenizer:
    return vocabulary.corpus_tokenizer(captions, max_length=max_length)


def make_tokenizer(config: ml_collections.ConfigDict) -> CLIPTokenizer:
    """The tokenizer of `model.text_encoder` (module docstring), checked against the encoder:
    its ids below `vocab_size`, its sequences no longer than `max_position_embeddings`."""
    text = config.model.text_encoder
    if text.tokenizer_path:
        tokenizer = CLIPTokenizer.from_folder(text.tokenizer_path)
    elif config.data.caption_templates:
        captions = tuple(template_captions(config))
        tokenizer = _corpus_tokenizer(captions, text.max_position_embeddings)
        _check_captions_fit(captions, tokenizer, "model.text_encoder.max_position_embeddings")
    else:
        raise ValueError(
            "model.text_encoder.tokenizer_path is empty and data.caption_templates=(): no "
            "vocabulary to learn; allowed: a tokenizer folder, or caption templates"
        )
    size = tokenizer.tokenizer.get_vocab_size(with_added_tokens=True)
    if size > text.vocab_size:
        raise ValueError(
            f"model.text_encoder.vocab_size={text.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({size} tokens); allowed: >= {size}"
        )
    if tokenizer.max_length > text.max_position_embeddings:
        raise ValueError(
            f"model.text_encoder.max_position_embeddings={text.max_position_embeddings} is "
            f"shorter than the tokenizer's sequences ({tokenizer.max_length} tokens); "
            f"allowed: >= {tokenizer.max_length}"
        )
    return tokenizer


def _check_captions_fit(captions, tokenizer: CLIPTokenizer, option: str) -> None:
    """Every caption's tokens, bos and eos included, within the tokenizer's length."""
    longest = max(len(tokenizer.tokenizer.encode(caption).ids) for caption in captions)
    if longest > tokenizer.max_length:
        raise ValueError(
            f"{option}={tokenizer.max_length} is shorter than the longest caption of "
            f"data.caption_templates ({longest} tokens with bos and eos); allowed: >= {longest}"
        )


def null_ids(tokenizer: CLIPTokenizer) -> np.ndarray:
    """[L] token ids of the empty caption: the null condition of classifier-free guidance."""
    return tokenizer([NULL_CAPTION])[0]


def prompt_ids(config: ml_collections.ConfigDict, prompts) -> np.ndarray:
    """[P, L] token ids of `prompts` (a list of strings)."""
    return make_tokenizer(config)(list(prompts))


def captions_as_condition(loss_fn):
    """`loss_fn` with the batch's caption token ids ("input_ids" [B, L]) as the network's
    condition (the losses hand `batch["label"]` to the network)."""

    def text_loss_fn(params, batch, rng, loss_history=None, **kwargs):
        conditioned = {key: value for key, value in batch.items() if key != "input_ids"}
        conditioned["label"] = batch["input_ids"]
        return loss_fn(params, conditioned, rng, loss_history, **kwargs)

    return text_loss_fn


def frozen_labels(params) -> dict:
    """The optimizer's label of each leaf: "frozen" in the text encoder, else "trained"."""
    return {key: jax.tree.map(lambda _, k=key: "frozen" if k == TEXT_ENCODER else "trained",
                              value) for key, value in params.items()}  # fmt: skip


def without_frozen_text_encoder(
    config: ml_collections.ConfigDict, tx: optax.GradientTransformation
) -> optax.GradientTransformation:
    """`tx` on the U-Net alone when `model.text_encoder.trainable` is False: the encoder's
    updates are zero and the optimizer holds no state for it (optax.multi_transform)."""
    if not uses_text(config) or config.model.text_encoder.trainable:
        return tx
    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, frozen_labels)


def with_pretrained_text_encoder(config: ml_collections.ConfigDict, params):
    """`params` with the text encoder of `model.text_encoder.pretrained` (a transformers
    CLIPTextModel folder), when set; its architecture must be the config's."""
    folder = config.model.text_encoder.pretrained if uses_text(config) else ""
    if not folder:
        return params
    _, loaded = transformers_clip.load_text_encoder(folder)
    expected = jax.tree.map(np.shape, params[TEXT_ENCODER])
    if jax.tree.map(np.shape, loaded) != expected:
        raise ValueError(
            f"model.text_encoder.pretrained={folder!r} holds another architecture than "
            "model.text_encoder (vocab_size, hidden_size, intermediate_size, "
            "num_hidden_layers, max_position_embeddings); allowed: the folder's config.json"
        )
    return {**params, TEXT_ENCODER: jax.tree.map(np.asarray, loaded)}
