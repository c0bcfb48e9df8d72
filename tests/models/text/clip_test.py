"""Tests of models/text/clip.py that need no PyTorch (parity with transformers is in
tests/convert/transformers_clip_test.py): the attention is causal, the pooled output is the
final state at the end-of-text token by either of transformers' rules, clip_skip is a final
LayerNorm of an earlier hidden state, bfloat16 compute stays close to float32."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import text
from diffusion_jax.models.text import CLIPTextConfig, CLIPTextModel, eos_positions

VOCAB, LENGTH = 500, 12
CONFIG = CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=16,
                        bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=0)  # fmt: skip


@pytest.fixture(scope="module")
def params():
    return text.init_params(CONFIG, jax.random.key(0))


def _ids(seed: int = 0) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(1, VOCAB - 2, (3, LENGTH)).astype(np.int32)
    ids[:, 0] = VOCAB - 2
    ids[0, 4:] = VOCAB - 1  # eos at 4, padded with eos (CLIP-L)
    ids[1, 7], ids[1, 8:] = VOCAB - 1, 0  # eos at 7, padded with 0 ("!", OpenCLIP)
    ids[2, -1] = VOCAB - 1  # eos last
    return ids


def test_a_token_changes_no_state_before_it(params):
    """Causal attention: changing token j leaves every hidden state at positions < j
    unchanged (exactly: masked keys get weight 0) and changes the one at j."""
    model, ids = CLIPTextModel(CONFIG), _ids()
    before = model.apply({"params": params}, ids)
    for j in (1, 5, LENGTH - 1):
        changed = ids.copy()
        changed[:, j] = (changed[:, j] + 17) % (VOCAB - 2)
        after = model.apply({"params": params}, changed)
        for state_before, state_after in zip(before.hidden_states, after.hidden_states):
            np.testing.assert_array_equal(state_before[:, :j], state_after[:, :j])
            assert np.abs(state_before[:, j] - state_after[:, j]).min() > 0


def test_eos_positions_by_both_rules():
    ids = jnp.asarray(_ids())
    np.testing.assert_array_equal(eos_positions(ids, VOCAB - 1), [4, 7, LENGTH - 1])
    # legacy configs (eos_token_id 2): the argmax, i.e. the first largest id
    np.testing.assert_array_equal(eos_positions(ids, 2), [4, 7, LENGTH - 1])


@pytest.mark.parametrize("eos_token_id", [VOCAB - 1, 2])
def test_the_pooled_output_is_the_last_state_at_the_eos_token(eos_token_id):
    config = CLIPTextConfig(**{**CONFIG.__dict__, "eos_token_id": eos_token_id})
    out = CLIPTextModel(config).apply({"params": text.init_params(config, jax.random.key(1))},
                                      _ids())  # fmt: skip
    np.testing.assert_array_equal(out.pooled_output, out.last_hidden_state[[0, 1, 2], [4, 7, 11]])
    assert out.text_embeds is None


def test_text_embeds_are_the_pooled_output_times_the_projection():
    config = CLIPTextConfig(**{**CONFIG.__dict__, "projection_dim": 8, "with_projection": True})
    params = text.init_params(config, jax.random.key(2))
    out = CLIPTextModel(config).apply({"params": params}, _ids())
    kernel = params["text_projection"]["kernel"]  # [C, projection_dim], no bias
    assert set(params["text_projection"]) == {"kernel"}
    np.testing.assert_allclose(out.text_embeds, out.pooled_output @ kernel, atol=1e-6)


def _final_layer_norm(x, norm_params, eps=CONFIG.layer_norm_eps):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + eps) * norm_params["scale"] + norm_params["bias"]


def test_clip_skip_is_the_final_layer_norm_of_an_earlier_hidden_state(params):
    """hidden_layer(clip_skip=k) = final_layer_norm(hidden_states[-(k + 1)]) for every k,
    clip_skip=0 being last_hidden_state; more skips than layers are refused."""
    model, ids = CLIPTextModel(CONFIG), _ids()
    out = model.apply({"params": params}, ids)
    assert len(out.hidden_states) == CONFIG.num_hidden_layers + 1
    hidden_layer = lambda k: model.apply({"params": params}, ids, clip_skip=k,
                                         method=model.hidden_layer)  # fmt: skip
    np.testing.assert_array_equal(hidden_layer(0), out.last_hidden_state)
    norm = params["text_model"]["final_layer_norm"]
    for k in range(CONFIG.num_hidden_layers + 1):
        expected = _final_layer_norm(np.asarray(out.hidden_states[-(k + 1)]), norm)
        np.testing.assert_allclose(hidden_layer(k), expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"clip_skip=4 must be in \[0, num_hidden_layers=3\]"):
        hidden_layer(4)


def test_bfloat16_compute_is_close_to_float32_and_returns_float32(params):
    ids = _ids()
    full = CLIPTextModel(CONFIG).apply({"params": params}, ids)
    half = CLIPTextModel(CONFIG, dtype=jnp.bfloat16).apply({"params": params}, ids)
    assert half.last_hidden_state.dtype == jnp.float32
    error = np.abs(half.last_hidden_state - full.last_hidden_state).max()
    assert 0 < error < 0.1 * np.abs(full.last_hidden_state).max()


def test_one_compilation_serves_every_batch_of_a_shape(params):
    model = CLIPTextModel(CONFIG)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def encode(params, ids):
        return model.apply({"params": params}, ids, clip_skip=1, method=model.hidden_layer)

    for seed in range(3):
        assert encode(params, _ids(seed)).shape == (3, LENGTH, 32)


def test_more_tokens_than_positions_are_refused(params):
    ids = np.zeros((1, 17), np.int32)
    with pytest.raises(ValueError, match="17 tokens; the model has max_position_embeddings=16"):
        CLIPTextModel(CONFIG).apply({"params": params}, ids)


def test_the_sd1_preset_has_clip_l_text_towers_123m_parameters():
    """123,060,480: transformers' count for openai/clip-vit-large-patch14's text model
    (tests/convert/transformers_clip_test.py checks every shape against transformers)."""
    from diffusion_jax.models import count_params

    assert count_params(text.param_shapes(text.PRESETS["sd1"])) == 123_060_480
