"""Tests of text-conditional training (configs/txt2img_digits.py, `runs.text_conditioning`):
the tokenizer learned from the captions, caption dropout reaching the network as "", guidance
scale 1 as the conditional model alone, bad options named, and tiny runs end to end (resumed
bitwise, a frozen text encoder left unchanged and out of the optimizer, sampled and
evaluated)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import txt2img_digits
from diffusion_jax import models, samplers
from diffusion_jax.models.text import vocabulary
from diffusion_jax.runs import (
    build,
    evaluate,
    generate,
    prompt_accuracy,
    restore,
    sample,
    text_conditioning,
    train,
    validate,
)
from diffusion_jax.training import train_state


def _tiny(**sections):
    config = txt2img_digits.get_config("tiny")
    with config.unlocked():
        config.training.progress_bar = False
        config.diffusion.num_timesteps = 50
        config.sampling.num_steps = 2
        for section, values in sections.items():
            for key, value in values.items():
                target = config[section]
                *path, last = key.split(".")
                for name in path:
                    target = target[name]
                target[last] = value
    return config


def _perturbed(params, scale=0.1):
    """Parameters off their zero-initialised output layer, so that the prediction depends on
    the caption (a fresh U-Net predicts 0 whatever it is given)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    noisy = [leaf + scale * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy)


def test_every_caption_word_is_one_token_and_any_text_still_tokenizes():
    config = _tiny()
    tokenizer = text_conditioning.make_tokenizer(config)
    vocab = tokenizer.tokenizer.get_vocab()
    for caption in text_conditioning.template_captions(config):
        words = vocabulary.corpus_words([caption])
        ids = tokenizer([caption])[0]
        expected = [vocab[word + "</w>"] for word in words]
        assert list(ids[1 : 1 + len(words)]) == expected, caption
        assert ids[0] == tokenizer.bos_token_id and ids[len(words) + 1] == tokenizer.eos_token_id
    assert len(text_conditioning.template_captions(config)) == 30  # 3 templates x 10 digits
    unknown = tokenizer(["a zebra"])[0]  # byte-level pieces, never an unknown token
    decoded = tokenizer.tokenizer.decode(unknown.tolist())
    assert decoded.replace("</w>", " ").strip() == "a zebra"
    # the same vocabulary each time: training and sampling tokenize alike
    again = vocabulary.learn_vocabulary(text_conditioning.template_captions(config))
    assert again[0] == vocab
    # 512 byte symbols, one merge per new symbol, bos and eos
    assert len(vocab) == 512 + len(again[1]) + 2 == 561 <= config.model.text_encoder.vocab_size


def _checked(config):
    validate.validate(config)
    model = models.build_model(config.model)
    text_conditioning.make_tokenizer(config)
    evaluate.check_options(config)
    return model


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"model": {"text_encoder.hidden_size": 24}},
            r"model.text_encoder.hidden_size=24.*"
            r"model.cross_attention_dim=16",
        ),  # fmt: skip
        ({"model": {"text_encoder.vocab_size": 500}}, r"vocab_size=500.*>= 561"),
        (
            {"model": {"text_encoder.max_position_embeddings": 4}},
            r"max_position_embeddings=4.*>= 6",
        ),
        ({"model": {"text_encoder.num_attention_heads": 3}}, r"model.text_encoder.num_attention"),
        ({"model": {"block_out_channels": (16, 20)}}, r"model.norm_num_groups"),
        ({"model": {"learn_sigma": True}}, r"model.learn_sigma=True"),
        ({"data": {"caption_templates": ()}}, r"data.caption_templates"),
        ({"sampling": {"prompts": ()}}, r"sampling.prompts=\(\)"),
        ({"training": {"eval_every": 10}}, r"training.eval_every=10"),
        ({"eval": {"prompt_classifier": "clip"}}, r"eval.prompt_classifier='clip'"),
        ({"eval": {"prompt_template": "the number {digit}"}}, r"eval.prompt_template"),
    ],
)
def test_bad_options_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        _checked(_tiny(**overrides))


def test_the_tiny_config_is_valid_and_prompts_need_a_text_model():
    _checked(_tiny())
    from configs import digits

    config = digits.get_config()
    with config.unlocked():
        config.sampling.prompts = ("the number 1",)
    with pytest.raises(ValueError, match="sampling.prompts=.*model.name='text_unet'"):
        validate.validate(config)


def test_caption_dropout_reaches_the_network_as_the_empty_caption():
    """With caption dropout 1 every batch holds the ids of "", and the loss hands exactly
    those to the network as its condition."""
    config = _tiny(data={"caption_dropout": 1.0})
    tokenizer = text_conditioning.make_tokenizer(config)
    batch = next(build.make_train_iterator(config))
    null = text_conditioning.null_ids(tokenizer)
    np.testing.assert_array_equal(batch["input_ids"], np.broadcast_to(null, (8, len(null))))
    seen = []

    class Recorder:
        def apply(self, variables, x, t, *, label, train, rngs):
            seen.append(np.asarray(label))
            return jnp.zeros_like(x)

    loss_fn = build.make_loss_fn(config, Recorder())
    loss_fn({}, {"x": jnp.asarray(batch["x"]), "input_ids": batch["input_ids"]}, jax.random.key(0))
    np.testing.assert_array_equal(seen[0], batch["input_ids"])
    kept = next(build.make_train_iterator(_tiny()))["input_ids"]
    assert not np.all(kept == null)  # without dropout the captions are the templates'


def test_guidance_scale_one_is_the_conditional_model_alone():
    config = _tiny()
    model = models.build_model(config.model)
    params = _perturbed(models.init_params(model, config.model, jax.random.key(0)))
    rng = jax.random.key(5)
    outputs = {}
    for scale in (1.0, 3.0):
        guided = _tiny(sampling={"guidance_scale": scale})
        outputs[scale] = np.asarray(jax.jit(generate.make_generate_fn(guided, model, count=4))(
            params, rng))  # fmt: skip
    # the same draw by hand: the sampler on the network given the prompts' ids, no guidance
    schedule, prediction = generate.sampling_schedule(config.diffusion)
    sample = samplers.make_sampler("ddim", schedule=schedule, num_steps=2, prediction=prediction,
                                   eta=0.0, clip_x0=True, spacing="linspace")  # fmt: skip
    ids = text_conditioning.prompt_ids(config, config.sampling.prompts)[:4]
    noise_rng, sample_rng = jax.random.split(rng)
    noise = jax.random.normal(noise_rng, (4, 8, 8, 1), jnp.float32)
    model_fn = lambda x, t, cond: model.apply({"params": params}, x, t, cond)
    by_hand, _ = jax.jit(lambda: sample(model_fn, noise, sample_rng, jnp.asarray(ids)))()
    np.testing.assert_allclose(outputs[1.0], np.asarray(by_hand), atol=1e-6)
    assert not np.allclose(outputs[1.0], outputs[3.0], atol=1e-3)  # guidance acts


def test_prompt_accuracy_counts_class_n_mod_k():
    accuracy, per_class = prompt_accuracy.accuracy_of(np.array([0, 1, 2, 0, 0, 2]), 3)
    assert accuracy == pytest.approx(5 / 6) and per_class == [1.0, 0.5, 1.0]
    assert prompt_accuracy.class_prompts(_tiny())[7] == "the number 7"


def test_a_frozen_text_encoder_is_absent_from_the_optimizer_state():
    config = _tiny(model={"text_encoder.trainable": False})
    model, tx, _ = restore.build_model_and_optimizer(config)
    state = build.make_create_fn(config, model, tx)(jax.random.key(0))
    opt_leaves = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
    unet = models.count_params(state.params["unet"])
    assert 2 * unet <= opt_leaves < 2 * unet + 4  # Adam's two moments of the U-Net, counts
    trained = build.make_create_fn(_tiny(), model, optax.adam(1e-3))(jax.random.key(0))
    assert sum(np.size(x) for x in jax.tree.leaves(trained.opt_state)) > opt_leaves


def _final_state(config, workdir):
    return restore.restore_for_inference(config, str(workdir))[1]


@pytest.mark.slow
def test_the_tiny_config_trains_and_resumes_bitwise(tmp_path):
    config = _tiny(training={"num_steps": 4, "checkpoint_every": 2, "log_every": 2})
    stopped = _tiny(training={"num_steps": 2, "checkpoint_every": 2, "log_every": 2})
    train.train_and_evaluate(config, str(tmp_path / "straight"))
    train.train_and_evaluate(stopped, str(tmp_path / "resumed"))
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
    straight = _final_state(config, tmp_path / "straight")
    resumed = _final_state(config, tmp_path / "resumed")
    assert int(straight.step) == int(resumed.step) == 4
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    # the text encoder trained with the U-Net
    initial = build.make_create_fn(config, *restore.build_model_and_optimizer(config)[:2])(
        jax.random.split(jax.random.key(config.training.seed), 3)[0]
    )
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), initial.params, straight.params)
    assert any(jax.tree.leaves(moved["text_encoder"])) and any(jax.tree.leaves(moved["unet"]))


@pytest.mark.slow
def test_a_frozen_text_encoder_stays_at_its_init_and_the_run_samples_and_evaluates(tmp_path):
    config = _tiny(
        model={"text_encoder.trainable": False},
        training={"num_steps": 3, "checkpoint_every": 3, "log_every": 3},
        eval={"num_samples": 16, "batch_size": 8, "num_steps": (2,), "guidance_scales": (1, 2)},
    )
    state = train.train_and_evaluate(config, str(tmp_path))
    model, tx, _ = restore.build_model_and_optimizer(config)
    init_rng = jax.random.split(jax.random.key(config.training.seed), 3)[0]
    initial = build.make_create_fn(config, model, tx)(init_rng)
    restored = _final_state(config, tmp_path)
    for params in (state.params, restored.params, train_state.ema_or_params(restored, 0)):
        for a, b in zip(jax.tree.leaves(initial.params["text_encoder"]),
                        jax.tree.leaves(params["text_encoder"]), strict=True):  # fmt: skip
            np.testing.assert_array_equal(a, b)
    unet_pairs = zip(
        jax.tree.leaves(initial.params["unet"]), jax.tree.leaves(restored.params["unet"])
    )
    assert any(np.any(a != b) for a, b in unet_pairs)
    path = sample.sample(config, str(tmp_path))
    assert path.exists()
    with np.load(tmp_path / "samples" / "sample_3.npz") as arrays:
        assert list(arrays["prompts"][:11]) == [f"the number {n % 10}" for n in range(11)]
        assert arrays["samples"].shape == (16, 8, 8, 1)
    report = evaluate.evaluate(config, str(tmp_path))
    scales = [entry["guidance_scale"] for entry in report["prompt_accuracy"]]
    assert scales == [1.0, 2.0]
    assert all(0.0 <= entry["accuracy"] <= 1.0 for entry in report["prompt_accuracy"])
    written = json.loads((tmp_path / "eval" / "step_3_ema_0.999.json").read_text())
    assert len(written["prompt_accuracy"][0]["per_class_accuracy"]) == 10


def _write_text_encoder(folder, config, seed: int):
    """A transformers CLIPTextModel folder of random parameters; returns them."""
    from safetensors.numpy import save_file

    from diffusion_jax.convert import torch_layout
    from diffusion_jax.models import text

    params = _perturbed(text.init_params(config, jax.random.key(seed)))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config.to_transformers()))
    save_file(torch_layout.state_dict_from_params(params), str(folder / "model.safetensors"))
    return params


def test_a_pretrained_text_encoder_and_a_tokenizer_folder_are_read(tmp_path):
    config = _tiny(model={"text_encoder.trainable": False})
    ours = models.text_encoder_config(config.model)
    loaded = _write_text_encoder(tmp_path / "text_encoder", ours, seed=1)
    with config.unlocked():
        config.model.text_encoder.pretrained = str(tmp_path / "text_encoder")
    model, tx, _ = restore.build_model_and_optimizer(config)
    state = build.make_create_fn(config, model, tx)(jax.random.key(0))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(state.params["text_encoder"])):
        np.testing.assert_array_equal(a, b)
    other = dataclasses.replace(ours, intermediate_size=48)
    _write_text_encoder(tmp_path / "other", other, seed=2)
    with config.unlocked():
        config.model.text_encoder.pretrained = str(tmp_path / "other")
    with pytest.raises(ValueError, match="model.text_encoder.pretrained=.*another architecture"):
        build.make_create_fn(config, model, tx)(jax.random.key(0))
    # a tokenizer folder: CLIP's 77 tokens need as many positions
    from tests import clip_vocabulary

    folder = clip_vocabulary.write_tokenizer_folder(
        tmp_path / "tokenizer", clip_vocabulary.clip_vocabulary(), pad_token="<|endoftext|>"
    )
    with config.unlocked():
        config.model.text_encoder.tokenizer_path = str(folder)
    with pytest.raises(ValueError, match=r"max_position_embeddings=16 is shorter.*>= 77"):
        text_conditioning.make_tokenizer(config)
    with config.unlocked():
        config.model.text_encoder.max_position_embeddings = 77
    tokenizer = text_conditioning.make_tokenizer(config)
    assert tokenizer(["a photo of a cat"]).shape == (1, 77)
