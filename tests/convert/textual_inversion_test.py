"""Tests of convert/textual_inversion.py: embeddings read back, new tokens get the next ids
and exactly their vectors (every other row and every prompt without them unchanged),
multi-vector tokens stand for all their vectors, bad files are named; with the [torch]
extra, diffusers' `load_textual_inversion` of the same file gives the same ids and the same
text-encoder states to 1e-5."""

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from diffusion_jax import generate as generate_cli
from diffusion_jax.convert import diffusers_pipeline, textual_inversion
from diffusion_jax.models import text
from tests import tiny_pipeline

WIDTH = tiny_pipeline.TEXT_WIDTH
PROMPTS = ["a photo of <cat-toy> on a table", "an oil painting of a <shiny> cat", "a cat"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_pipeline.write_tiny_pipeline(tmp_path_factory.mktemp("sd1"))


@pytest.fixture(scope="module")
def weights(folder):
    return diffusers_pipeline.load_pipeline(folder)


def _vectors(n, seed):
    return np.random.default_rng(seed).standard_normal((n, WIDTH)).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A one-vector file in diffusers' format ([D]) and a three-vector A1111-style file."""
    root = tmp_path_factory.mktemp("embeddings")
    textual_inversion.save_embeddings(root / "cat", {"<cat-toy>": _vectors(1, 0)[0]})
    save_file({"emb_params": _vectors(3, 1)}, str(root / "shiny.safetensors"))
    return [(root / "cat", None), (root / "shiny.safetensors", "<shiny>")]


def _encode(config, params, ids):
    model = text.CLIPTextModel(config)
    return np.asarray(jax.jit(model.apply)({"params": params}, ids).last_hidden_state)


def test_embeddings_read_back(files):
    cat = textual_inversion.read_embeddings(files[0][0])
    assert list(cat) == ["<cat-toy>"] and cat["<cat-toy>"].shape == (1, WIDTH)
    np.testing.assert_array_equal(cat["<cat-toy>"][0], _vectors(1, 0)[0])
    shiny = textual_inversion.read_embeddings(files[1][0], token="<shiny>")
    np.testing.assert_array_equal(shiny["<shiny>"], _vectors(3, 1))
    assert list(textual_inversion.read_embeddings(files[1][0])) == ["emb_params"]


def test_new_tokens_get_the_next_ids_and_exactly_their_vectors(weights, files):
    vocab = weights.tokenizer.vocab_size()
    added = textual_inversion.with_textual_inversions(weights, files)
    assert added.tokenizer.vocab_size() == vocab + 4 and added.text_config.vocab_size == vocab + 4
    ids = added.tokenizer(PROMPTS)
    assert (ids[0] == vocab).sum() == 1  # <cat-toy>
    shiny = np.flatnonzero(ids[1] >= vocab + 1)
    np.testing.assert_array_equal(ids[1][shiny], [vocab + 1, vocab + 2, vocab + 3])  # in a row
    assert np.all(np.diff(shiny) == 1)
    table = added.params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]
    old = weights.params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]
    np.testing.assert_array_equal(table["embedding"][:vocab], old["embedding"])
    np.testing.assert_array_equal(table["embedding"][vocab], _vectors(1, 0)[0])
    np.testing.assert_array_equal(table["embedding"][vocab + 1 :], _vectors(3, 1))
    # a prompt without the new tokens: the same ids and the same text states
    np.testing.assert_array_equal(ids[2], weights.tokenizer(PROMPTS[2:])[0])
    before = _encode(weights.text_config, weights.params["text_encoder"], ids[2:])
    after = _encode(added.text_config, added.params["text_encoder"], ids[2:])
    np.testing.assert_array_equal(before, after)
    assert weights.tokenizer.vocab_size() == vocab  # the input is left as it was
    assert "Textual Inversion" in added.source


def test_bad_input_is_named(tmp_path, weights, files):
    (tmp_path / "emb.pt").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match=r"emb.pt: only safetensors embeddings are read"):
        textual_inversion.read_embeddings(tmp_path / "emb.pt")
    save_file(
        {"clip_l": _vectors(1, 2), "clip_g": _vectors(1, 3)}, str(tmp_path / "xl.safetensors")
    )
    with pytest.raises(ValueError, match=r"holds \['clip_g', 'clip_l'\]; a Textual Inversion"):
        textual_inversion.read_embeddings(tmp_path / "xl.safetensors")
    wide = {"<wide>": np.zeros((1, WIDTH + 1), np.float32)}
    params, config = weights.params["text_encoder"], weights.text_config
    with pytest.raises(ValueError, match=r"'<wide>' has width 33; the text encoder's is 32"):
        textual_inversion.add_embeddings(weights.tokenizer, config, params, wide)
    with pytest.raises(ValueError, match=r"the tokens \['cat</w>'\] are in the vocabulary"):
        textual_inversion.add_embeddings(weights.tokenizer, config, params,
                                         {"cat</w>": _vectors(1, 4)})  # fmt: skip
    with pytest.raises(FileNotFoundError, match="does not exist"):
        textual_inversion.read_embeddings(tmp_path / "absent.safetensors")
    assert generate_cli.textual_inversion_flag("a/b.safetensors:<t>") == ("a/b.safetensors", "<t>")
    assert generate_cli.textual_inversion_flag("gs://bucket/emb") == ("gs://bucket/emb", None)


def test_diffusers_load_textual_inversion_gives_the_same_states(folder, weights, files):
    diffusers = pytest.importorskip("diffusers", reason="parity with diffusers needs [torch]")
    import torch

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.load_textual_inversion(str(files[0][0]))
    pipe.load_textual_inversion(str(files[1][0]), token="<shiny>")
    prompts = pipe.maybe_convert_prompt(PROMPTS, pipe.tokenizer)
    theirs_ids = pipe.tokenizer(prompts, padding="max_length", max_length=77,
                                return_tensors="np").input_ids  # fmt: skip
    added = textual_inversion.with_textual_inversions(weights, files)
    ours_ids = added.tokenizer(PROMPTS)
    np.testing.assert_array_equal(ours_ids, theirs_ids)
    with torch.no_grad():
        theirs = pipe.text_encoder(torch.from_numpy(theirs_ids).long()).last_hidden_state.numpy()
    ours = _encode(added.text_config, added.params["text_encoder"], ours_ids)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
