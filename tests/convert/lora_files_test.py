"""Tests of convert/lora_files.py: our LoRA files round-trip, the published formats (PEFT,
diffusers' own and its attention-processor keys, PEFT folders, kohya with per-module alphas)
read to the same adapters, bad files are named; and with the [torch] extra, diffusers'
`load_lora_weights` reads ours to the same U-Net and text-encoder outputs, and ours reads
LoRAs PEFT made inside diffusers to theirs, to 1e-5."""

import json

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from diffusion_jax import generate as generate_cli
from diffusion_jax.convert import lora_files
from diffusion_jax.models import conditional_unet, lora, text
from tests import tiny_pipeline
from tests.clip_vocabulary import clip_vocabulary

TOLERANCE = 1e-5
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out_0", "proj_in", "conv1")


@pytest.fixture(scope="module")
def params():
    vocab, _ = clip_vocabulary()
    clip = tiny_pipeline.text_config(vocab, sd2=False)
    return {
        "unet": tiny_pipeline.random_params(
            conditional_unet.init_params, tiny_pipeline.UNET_SD1, 0
        ),
        "text_encoder": tiny_pipeline.random_params(text.init_params, clip, 2),
    }


def random_lora(params, targets, *, rank, alpha, seed, convolutions=True) -> lora.LoRA:
    """A LoRA with both factors random (a fresh one's up is zero)."""
    fresh = lora.init_lora(jax.random.key(seed), params, targets=targets, rank=rank,
                           alpha=alpha, convolutions=convolutions)  # fmt: skip
    rng = np.random.default_rng(seed)
    weights = jax.tree.map(lambda x: 0.2 * rng.standard_normal(x.shape).astype(np.float32),
                           fresh.weights)  # fmt: skip
    return lora.LoRA(weights, fresh.alpha, fresh.rank)


@pytest.fixture(scope="module")
def loras(params):
    return {
        "unet": random_lora(params["unet"], UNET_TARGETS, rank=4, alpha=8.0, seed=3),
        "text_encoder": random_lora(
            params["text_encoder"],
            lora.TEXT_ATTENTION,
            rank=2,
            alpha=1.0,
            seed=4,
            convolutions=False,
        ),  # fmt: skip
    }


def assert_same_merge(params, expected: dict, loaded: dict):
    assert sorted(expected) == sorted(loaded)
    for component in expected:
        ours = lora.merge(params[component], expected[component])
        theirs = lora.merge(params[component], loaded[component])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), ours, theirs)


def test_saved_loras_read_back_with_their_configs(tmp_path, params, loras):
    path = lora_files.save_lora(tmp_path, loras)
    assert path.name == lora_files.LORA_FILE
    loaded = lora_files.load_lora(path, params)
    for component, expected in loras.items():
        assert (loaded[component].alpha, loaded[component].rank) == (expected.alpha, expected.rank)
        jax.tree.map(np.testing.assert_array_equal, loaded[component].weights, expected.weights)
    _, metadata = lora_files._read_safetensors(path)
    config = json.loads(metadata[lora_files.METADATA_KEY])
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 8.0
    assert (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
        in (config["unet.target_modules"])
    )


def test_mixed_ranks_keep_each_modules_scale(tmp_path, params):
    a = random_lora(params["unet"], ("to_q",), rank=4, alpha=2.0, seed=5)
    b = random_lora(params["unet"], ("to_k",), rank=2, alpha=2.0, seed=6)  # scale 1 != 0.5
    flat = {**traverse_util.flatten_dict(a.weights)}
    for path, value in traverse_util.flatten_dict(b.weights).items():  # fold b's scale into a's
        flat[path] = value * 2.0 if path[-1] == "up" else value
    mixed = lora.LoRA(traverse_util.unflatten_dict(flat), a.alpha, a.rank)
    loaded = lora_files.load_lora(lora_files.save_lora(tmp_path, {"unet": mixed}), params)
    merged = lora.merge(params["unet"], [a, b])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6),
                 lora.merge(params["unet"], loaded["unet"]), merged)  # fmt: skip


def _torch_tensors(lora_: lora.LoRA):
    """{PyTorch module name: (A, B)} of a LoRA, in PyTorch's layout."""
    state = lora_files.lora_state_dict(lora_, "x")
    names = {key.removeprefix("x.").rsplit(".lora_", 1)[0] for key in state}
    return {n: (state[f"x.{n}.lora_A.weight"], state[f"x.{n}.lora_B.weight"]) for n in names}


def _kohya_file(path, loras, alphas):
    tensors = {}
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        for i, (name, (down, up)) in enumerate(sorted(_torch_tensors(loras[component]).items())):
            key = prefix + name.replace(".", "_")
            alpha = alphas[i % len(alphas)]
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": np.asarray(alpha, np.float32)})  # fmt: skip
    save_file(tensors, str(path))
    return path


def _kohya_expected(loras, alphas):
    """The LoRAs a kohya file of per-module `alphas` means: each module's up times
    (alpha_m / r) / scale."""
    expected = {}
    for component, lora_ in loras.items():
        flat = dict(traverse_util.flatten_dict(lora_.weights))
        for i, path in enumerate(lora_.modules()):
            module_scale = alphas[i % len(alphas)] / lora_.rank
            flat[(*path, "up")] = flat[(*path, "up")] * module_scale / lora_.scale
        expected[component] = lora.LoRA(traverse_util.unflatten_dict(flat), lora_.alpha,
                                        lora_.rank)  # fmt: skip
    return expected


KOHYA_ALPHAS = (4.0, 1.0, 8.0)


def test_kohya_files_with_per_module_alphas(tmp_path, params, loras):
    path = _kohya_file(tmp_path / "kohya.safetensors", loras, KOHYA_ALPHAS)
    expected = _kohya_expected(loras, KOHYA_ALPHAS)
    assert_same_merge(params, expected, lora_files.load_lora(path, params))


def test_diffusers_and_processor_key_formats(tmp_path, params, loras):
    unet, text_encoder = _torch_tensors(loras["unet"]), _torch_tensors(loras["text_encoder"])
    new, processor = {}, {}
    for name, (down, up) in unet.items():
        new.update({f"unet.{name}.lora.down.weight": down, f"unet.{name}.lora.up.weight": up,
                    f"unet.{name}.alpha": np.asarray(8.0, np.float32)})  # fmt: skip
    for name, (down, up) in text_encoder.items():
        new[f"text_encoder.{name}.lora_linear_layer.down.weight"] = down
        new[f"text_encoder.{name}.lora_linear_layer.up.weight"] = up
        new[f"text_encoder.{name}.alpha"] = np.asarray(1.0, np.float32)
        parent, projection = name.rsplit(".", 1)
        old = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}
        for role, value in (("down", down), ("up", up)):
            processor[f"text_encoder.{parent}.{old[projection]}_lora.{role}.weight"] = value
    save_file(new, str(tmp_path / "new.safetensors"))
    assert_same_merge(params, loras, lora_files.load_lora(tmp_path / "new.safetensors", params))
    for name, (down, up) in unet.items():
        parent, projection = name.rsplit(".", 1)
        if projection in ("to_q", "to_k", "to_v") or name.endswith("to_out.0"):
            key = f"unet.{parent.removesuffix('.to_out')}.processor."
            key += "to_out" if name.endswith("to_out.0") else projection
            processor.update({f"{key}_lora.down.weight": down, f"{key}_lora.up.weight": up})
    save_file(processor, str(tmp_path / "processor.safetensors"))
    loaded = lora_files.load_lora(tmp_path / "processor.safetensors", params)
    # no alphas in the file: scale 1; the attention projections only
    assert {path[-1] for path in loaded["unet"].modules()} == set(lora.UNET_ATTENTION)
    assert loaded["unet"].scale == loaded["text_encoder"].scale == 1.0
    for component in ("unet", "text_encoder"):
        flat = traverse_util.flatten_dict(loras[component].weights)
        for path, value in traverse_util.flatten_dict(loaded[component].weights).items():
            np.testing.assert_array_equal(value, flat[path])


def test_a_peft_folder_with_its_adapter_config(tmp_path, params, loras):
    tensors = lora_files.lora_state_dict(loras["unet"], "base_model.model")
    save_file(tensors, str(tmp_path / lora_files.PEFT_FILE))
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["to_q"], "peft_type": "LORA"}
    (tmp_path / lora_files.PEFT_CONFIG).write_text(json.dumps(config))
    loaded = lora_files.load_lora(tmp_path, {"unet": params["unet"]})
    assert_same_merge(params, {"unet": loras["unet"]}, loaded)


def test_bad_files_are_named(tmp_path, params, loras):
    path = lora_files.save_lora(tmp_path / "ok.safetensors", {"unet": loras["unet"]})
    with pytest.raises(ValueError, match="adapts the unet, which was not given"):
        lora_files.load_lora(path, {"text_encoder": params["text_encoder"]})
    save_file({"unet.x.lora_magnitude_vector": np.zeros(3, np.float32)},
              str(tmp_path / "dora.safetensors"))  # fmt: skip
    with pytest.raises(ValueError, match=r"'unet.x.lora_magnitude_vector' is of no format"):
        lora_files.load_lora(tmp_path / "dora.safetensors", params)
    bad = {
        "unet.down_blocks.9.attn1.to_q.lora_A.weight": np.zeros((2, 32), np.float32),
        "unet.down_blocks.9.attn1.to_q.lora_B.weight": np.zeros((32, 2), np.float32),
    }
    save_file(bad, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"down_blocks.9.attn1.to_q is not a layer of the model"):
        lora_files.load_lora(tmp_path / "missing.safetensors", params)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    shapes = {f"unet.{name}.lora_A.weight": np.zeros((2, 31), np.float32),
              f"unet.{name}.lora_B.weight": np.zeros((32, 2), np.float32)}  # fmt: skip
    save_file(shapes, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=r"down \(2, 31\) / up \(32, 2\) do not fit its kernel"):
        lora_files.load_lora(tmp_path / "shape.safetensors", params)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="junk.safetensors is not a safetensors file"):
        lora_files.load_lora(tmp_path / "junk.safetensors", params)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no pytorch_lora_weights.safetensors"):
        lora_files.load_lora(tmp_path / "empty", params)
    with pytest.raises(FileNotFoundError, match="LoRA file .*absent.safetensors does not exist"):
        lora_files.load_lora(tmp_path / "absent.safetensors", params)


# --- Parity with diffusers and PEFT (the [torch] extra) --------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_pipeline.write_tiny_pipeline(tmp_path_factory.mktemp("sd1"))


def _diffusers_pipeline(folder):
    diffusers = pytest.importorskip("diffusers", reason="parity with diffusers needs [torch]")
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft ([torch] extra)")
    return diffusers.StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    text_states = rng.standard_normal((2, 5, tiny_pipeline.TEXT_WIDTH)).astype(np.float32)
    ids = rng.integers(3, 40, (2, 77)).astype(np.int32)
    return sample, np.array([17.0, 503.0], np.float32), text_states, ids


def _ours(weights, loras_with_weights):
    """Our U-Net's and text encoder's outputs with the LoRAs merged."""
    sample, t, states, ids = _inputs()
    merged = {
        component: lora.merge(
            weights.params[component],
            [(ls[component], w) for ls, w in loras_with_weights if component in ls],
        )  # fmt: skip
        for component in ("unet", "text_encoder")
    }
    unet_params, text_params = merged["unet"], merged["text_encoder"]
    unet = conditional_unet.UNet2DConditionModel(weights.unet_config)
    eps = jax.jit(unet.apply)({"params": unet_params}, sample, t, states)
    text_model = text.CLIPTextModel(weights.text_config)
    hidden = jax.jit(text_model.apply)({"params": text_params}, ids).last_hidden_state
    return np.asarray(eps), np.asarray(hidden)


def _theirs(pipe):
    import torch

    sample, t, states, ids = _inputs()
    with torch.no_grad():
        eps = pipe.unet(torch.from_numpy(sample.transpose(0, 3, 1, 2).copy()),
                        torch.from_numpy(t), torch.from_numpy(states)).sample  # fmt: skip
        hidden = pipe.text_encoder(torch.from_numpy(ids).long()).last_hidden_state
    return eps.numpy().transpose(0, 2, 3, 1), hidden.numpy()


def _assert_close(ours, theirs):
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=TOLERANCE * max(1.0, float(np.abs(b).max())))


@pytest.fixture(scope="module")
def pipeline_weights(folder):
    from diffusion_jax.convert import diffusers_pipeline

    return diffusers_pipeline.load_pipeline(folder)


def test_diffusers_load_lora_weights_reads_ours(tmp_path, folder, pipeline_weights):
    """Two of our LoRAs saved, loaded by diffusers as named adapters and combined with
    set_adapters weights: the U-Net's and the text encoder's outputs are ours to 1e-5."""
    pipe = _diffusers_pipeline(folder)
    params = pipeline_weights.params
    first = {"unet": random_lora(params["unet"], UNET_TARGETS, rank=4, alpha=8.0, seed=3),
             "text_encoder": random_lora(params["text_encoder"], lora.TEXT_ATTENTION, rank=2,
                                         alpha=1.0, seed=4, convolutions=False)}  # fmt: skip
    second = {"unet": random_lora(params["unet"], ("to_k", "ff.net_2"), rank=3, alpha=3.0,
                                  seed=8, convolutions=False)}  # fmt: skip
    pipe.load_lora_weights(str(lora_files.save_lora(tmp_path / "a", first)), adapter_name="a")
    pipe.load_lora_weights(str(lora_files.save_lora(tmp_path / "b", second)), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.6, -1.2])
    _assert_close(_ours(pipeline_weights, [(first, 0.6), (second, -1.2)]), _theirs(pipe))


def test_ours_reads_loras_peft_made_in_diffusers(tmp_path, folder, pipeline_weights):
    """diffusers' U-Net and text encoder with PEFT adapters (random A and B, alpha != r, one
    module of another rank), saved by StableDiffusionPipeline.save_lora_weights with their
    metadata: ours loads the file to the same outputs."""
    pipe = _diffusers_pipeline(folder)
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    other_rank = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": 2}
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]
    unet_config = LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, rank_pattern=other_rank,
                             target_modules=targets)  # fmt: skip
    text_config = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                             target_modules=["q_proj", "v_proj"])  # fmt: skip
    pipe.unet.add_adapter(unet_config)
    # transformers' own add_adapter wants a peft newer than the registry has: PEFT directly
    pipe.text_encoder = inject_adapter_in_model(text_config, pipe.text_encoder)
    pipe.text_encoder.peft_config = {"default": text_config}
    pipe.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )  # fmt: skip
    params = pipeline_weights.params
    loaded = lora_files.load_lora(tmp_path, {"unet": params["unet"],
                                             "text_encoder": params["text_encoder"]})  # fmt: skip
    _assert_close(_ours(pipeline_weights, [(loaded, 1.0)]), _theirs(pipe))


def test_kohya_files_mean_what_diffusers_reads_them_as(tmp_path, folder, pipeline_weights):
    """One alpha for every module (U-Net scale 0.5, text encoder 1): diffusers 0.42 with
    transformers 5 reads a file whose modules have different alphas otherwise than kohya's
    alpha_m / r_m, which `test_kohya_files_with_per_module_alphas` checks on its own."""
    pipe = _diffusers_pipeline(folder)
    params = pipeline_weights.params
    unet = random_lora(params["unet"], ("to_q", "to_v", "proj_in"), rank=4, alpha=4.0, seed=11)
    text_lora = random_lora(params["text_encoder"], ("q_proj", "out_proj"), rank=2, alpha=2.0,
                            seed=12, convolutions=False)  # fmt: skip
    loras_ = {"unet": unet, "text_encoder": text_lora}
    path = _kohya_file(tmp_path / "kohya.safetensors", loras_, (2.0,))
    pipe.load_lora_weights(str(path))
    ours = lora_files.load_lora(path, {"unet": params["unet"],
                                       "text_encoder": params["text_encoder"]})  # fmt: skip
    _assert_close(_ours(pipeline_weights, [(ours, 1.0)]), _theirs(pipe))


def test_with_loras_merges_each_file_at_its_weight(tmp_path, pipeline_weights):
    """What `generate --lora A:0.5 --lora B` runs: both files merged at their weights, the
    autoencoder untouched, the files named in the source."""
    params = pipeline_weights.params
    a = {"unet": random_lora(params["unet"], ("to_q",), rank=2, alpha=2.0, seed=20),
         "text_encoder": random_lora(params["text_encoder"], ("v_proj",), rank=2, alpha=4.0,
                                     seed=21, convolutions=False)}  # fmt: skip
    b = {"unet": random_lora(params["unet"], ("to_q", "conv1"), rank=3, alpha=1.0, seed=22)}
    files = [(lora_files.save_lora(tmp_path / "a", a), 0.5),
             (lora_files.save_lora(tmp_path / "b", b), 1.0)]  # fmt: skip
    merged = lora_files.with_loras(pipeline_weights, files)
    expected_unet = lora.merge(params["unet"], [(a["unet"], 0.5), b["unet"]])
    expected_text = lora.merge(params["text_encoder"], [(a["text_encoder"], 0.5)])
    close = lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6)  # noqa: E731
    jax.tree.map(close, merged.params["unet"], expected_unet)
    jax.tree.map(close, merged.params["text_encoder"], expected_text)
    assert merged.params["vae"] is params["vae"]
    assert str(files[0][0]) in merged.source and "x 0.5" in merged.source
    assert generate_cli.lora_flag(f"{files[0][0]}:0.5") == (str(files[0][0]), 0.5)
    assert generate_cli.lora_flag("gs://bucket/lora") == ("gs://bucket/lora", 1.0)
