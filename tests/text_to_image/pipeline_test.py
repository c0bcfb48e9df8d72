"""Tests of text_to_image/ and convert/diffusers_pipeline.py on tiny Stable Diffusion folders
(tests/tiny_pipeline.py, random weights): given the same initial latents, our pipeline makes
diffusers' StableDiffusionPipeline's image (the parity tests need the [torch] extra); the
guidance scale does not recompile; a converted folder generates the same images; bad folders,
configs and sizes are named before any compute."""

import json
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from diffusion_jax import generate as generate_cli
from diffusion_jax import samplers
from diffusion_jax.convert import diffusers_pipeline
from diffusion_jax.runtime import storage
from diffusion_jax.text_to_image import pipeline, scheduling
from tests import tiny_pipeline

pytestmark = pytest.mark.slow  # end to end: each test compiles a whole generation

PROMPTS = ["a photo of a cat", "an oil painting of an astronaut riding a horse"]
NEGATIVE = ["blurry", ""]
PIPELINE_TOLERANCE = 1e-3
SIZE = 32  # pixels: 16 x 16 latents


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return tiny_pipeline.write_tiny_pipeline(path, sd2=request.param == "sd2")


@pytest.fixture(scope="module")
def weights(folder):
    return diffusers_pipeline.load_pipeline(folder)


def _latents(weights, seed=5):
    shape = pipeline.latent_shape(weights, pipeline.GenerationOptions(height=SIZE, width=SIZE))
    return np.random.default_rng(seed).standard_normal((len(PROMPTS), *shape), np.float32)


def _ours(weights, sampler, latents, num_steps=20, guidance_scale=7.5):
    return pipeline.generate(
        weights, PROMPTS, negative_prompts=NEGATIVE, guidance_scale=guidance_scale,
        init_latents=latents, sampler=sampler, num_steps=num_steps, height=SIZE, width=SIZE,
    )  # fmt: skip


SCHEDULER_CLASSES = {"ddim": "DDIMScheduler", "dpm_solver++": "DPMSolverMultistepScheduler"}


@pytest.mark.parametrize("sampler", sorted(SCHEDULER_CLASSES))
def test_the_pipeline_makes_diffusers_image_from_the_same_latents(folder, weights, sampler):
    """DDIM and DPM-Solver++ 2M, 20 steps, guidance 7.5 with negative prompts: our images
    equal StableDiffusionPipeline's (the scheduler made `from_config` of the folder's PNDM
    config, as diffusers users switch schedulers) to 1e-3; SD1-shaped (epsilon) and
    SD2-shaped (v-prediction, linear projections, "!" padding)."""
    pytest.importorskip("diffusers", reason="parity with diffusers needs the [torch] extra")
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.scheduler = getattr(diffusers, SCHEDULER_CLASSES[sampler]).from_config(
        pipe.scheduler.config
    )
    pipe.set_progress_bar_config(disable=True)
    latents = _latents(weights)
    with torch.no_grad():
        theirs = pipe(
            prompt=PROMPTS, negative_prompt=NEGATIVE, height=SIZE, width=SIZE,
            num_inference_steps=20, guidance_scale=7.5, output_type="np",
            latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
        ).images  # fmt: skip
    ours = _ours(weights, sampler, latents)
    assert ours.shape == theirs.shape == (2, SIZE, SIZE, 3)
    assert np.std(theirs) > 0.01  # an image, not a constant
    np.testing.assert_allclose(ours, theirs, atol=PIPELINE_TOLERANCE, rtol=0)


def test_the_guidance_scale_is_an_argument_of_one_program(weights):
    """Two guidance scales, one compilation; scale 1 of the guided program is the
    conditional model alone (the unguided program), to float32 rounding."""
    latents = _latents(weights)
    options = pipeline.GenerationOptions(height=SIZE, width=SIZE, num_steps=3, sampler="ddim")
    program = pipeline.compiled_program(weights, options, guided=True)
    first = _ours(weights, "ddim", latents, num_steps=3, guidance_scale=3.0)
    second = _ours(weights, "ddim", latents, num_steps=3, guidance_scale=9.0)
    assert program.generate._cache_size() == 1
    assert np.abs(first - second).max() > 1e-3
    ids = weights.tokenizer(PROMPTS)
    noise = scheduling.noise_from_latents(latents, program.sample, program.name, program.options)
    at_one = program.generate(program.params, ids, weights.tokenizer(NEGATIVE), noise,
                              jax.random.key(0), np.float32(1.0))  # fmt: skip
    unguided = _ours(weights, "ddim", latents, num_steps=3, guidance_scale=1.0)
    np.testing.assert_allclose(np.asarray(at_one), unguided, atol=1e-5)


def test_a_converted_folder_generates_the_same_images(weights, tmp_path):
    out = diffusers_pipeline.main(["--pretrained", weights.source, "--out", str(tmp_path)])
    converted = diffusers_pipeline.load_pipeline(out)
    assert diffusers_pipeline.is_converted(out)
    assert converted.scheduler_config == weights.scheduler_config
    latents = _latents(weights)
    np.testing.assert_array_equal(
        _ours(converted, "dpm_solver++", latents, num_steps=4),
        _ours(weights, "dpm_solver++", latents, num_steps=4),
    )


def test_the_k_diffusion_start_is_diffusers(weights):
    """Euler on "leading" spacing starts at latents * sqrt(sigma_0^2 + 1) as diffusers does,
    so the network's first input is the latents; with "linspace", latents * sigma_0."""
    for spacing, first_input_of_unit_latents in (("leading", 1.0), ("linspace", None)):
        config = {**weights.scheduler_config, "timestep_spacing": spacing, "steps_offset": 0}
        sample, name, options = scheduling.make_pipeline_sampler(config, "euler", num_steps=10)
        noise = scheduling.noise_from_latents(np.ones((1, 1)), sample, name, options)
        scale = scheduling.first_input_scale(sample) * float(noise[0, 0])
        if first_input_of_unit_latents is None:  # sigma_0 / sqrt(sigma_0^2 + 1)
            sigma_0 = float(np.sqrt(1 / (1 - scale**2) - 1))
            assert 10 < sigma_0 < 20  # SD's scaled-linear sigma_max is 14.6
            assert float(noise[0, 0]) == 1.0
        else:
            np.testing.assert_allclose(scale, first_input_of_unit_latents, rtol=1e-6)


def test_the_command_writes_images_and_settings(folder, tmp_path):
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)  # NCHW, as PyTorch saves them
    argv = ["--pretrained", str(folder), "--prompt", PROMPTS[0], "--num_steps", "3",
            "--sampler", "euler_ancestral", "--init_noise", str(tmp_path / "latents.npy"),
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert generate_cli.main(argv) == 0
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert settings["sampler_name"] == "euler_ancestral" and settings["height"] == SIZE
    from PIL import Image

    image = np.asarray(Image.open(tmp_path / "out" / "image_0.png"))
    assert image.shape == (SIZE, SIZE, 3) and image.std() > 1


def test_a_size_that_does_not_divide_is_named_before_any_compute(folder, tmp_path, capsys):
    argv = ["--pretrained", str(folder), "--prompt", "x", "--height", "34", "--out",
            str(tmp_path)]  # fmt: skip
    assert generate_cli.main(argv) == 1
    assert "--height=34 is not a positive multiple of 4" in capsys.readouterr().err
    assert not (tmp_path / "settings.json").exists()


def test_a_folder_missing_a_part_names_it(folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match=r"missing \['vae/'\]; it holds \[.*'unet'"):
        diffusers_pipeline.load_pipeline(broken)


def test_a_text_encoder_of_another_width_is_named(folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    config_path = broken / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["cross_attention_dim"] = 48
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"cross_attention_dim=48 does not fit the text "
                       r"encoder's hidden_size=32"):  # fmt: skip
        diffusers_pipeline.load_pipeline(broken)


def test_a_folder_in_a_bucket_loads_and_converts_there(folder, weights, gcs_emulator):
    """The same folder in a bucket (the GCS emulator; tokenizer files copied locally, weights
    read whole) holds the same weights; converted into the bucket, it loads back."""
    bucket = storage.as_path(gcs_emulator.new_bucket())
    for path in folder.rglob("*"):
        if path.is_file():
            (bucket / "sd" / path.relative_to(folder)).write_bytes(path.read_bytes())
    remote = diffusers_pipeline.load_pipeline(f"{bucket}/sd")
    assert remote.scheduler_config == weights.scheduler_config
    np.testing.assert_array_equal(remote.tokenizer(PROMPTS), weights.tokenizer(PROMPTS))
    for a, b in zip(jax.tree.leaves(remote.params), jax.tree.leaves(weights.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    out = diffusers_pipeline.save_converted(f"{bucket}/converted", remote)
    converted = diffusers_pipeline.load_pipeline(out)
    assert diffusers_pipeline.is_converted(out) and converted.unet_config == weights.unet_config
    for a, b in zip(jax.tree.leaves(converted.params), jax.tree.leaves(weights.params),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_batch_of_prompts_sharded_over_the_devices_makes_the_same_images(weights):
    """8 prompts over the 8 test devices (the batch split, the weights replicated): each
    image is the one the same prompt and latents give in a replicated batch of 2."""
    prompts = (PROMPTS * 4)[:8]
    assert jax.device_count() == 8
    assert pipeline.batch_sharding(8).spec == PartitionSpec("batch")
    assert pipeline.batch_sharding(2).spec == PartitionSpec()
    latents = np.random.default_rng(1).standard_normal((8, 16, 16, 4), np.float32)
    options = dict(sampler="ddim", num_steps=3, height=SIZE, width=SIZE)
    sharded = pipeline.generate(weights, prompts, init_latents=latents, **options)
    pair = pipeline.generate(weights, prompts[5:7], init_latents=latents[5:7], **options)
    # float32 rounding differs between the two batch shapes' programs: 1.1e-5 measured
    np.testing.assert_allclose(sharded[5:7], pair, atol=1e-4)


def test_every_sampler_of_the_registry_can_be_chosen():
    """Each registered sampler builds on SD's scheduler config (PNDM's, steps_offset 1), and
    starts, with diffusers' latents, at a network input of the latents' scale."""
    for name in samplers.SAMPLERS:
        sample, chosen, options = scheduling.make_pipeline_sampler(
            tiny_pipeline.SCHEDULER, name, num_steps=4
        )
        assert chosen == name
        noise = scheduling.noise_from_latents(np.ones((1, 1)), sample, name, options)
        first_input = scheduling.first_input_scale(sample) * float(noise[0, 0])
        assert 0.95 < first_input < 1.0 + 1e-6, (name, first_input)


def test_bfloat16_weights_make_nearly_the_float32_images(weights):
    latents = _latents(weights)
    options = dict(sampler="ddim", num_steps=3, height=SIZE, width=SIZE)
    full = pipeline.generate(weights, PROMPTS, init_latents=latents, **options)
    half = pipeline.generate(weights, PROMPTS, init_latents=latents, dtype="bfloat16", **options)
    # bfloat16 keeps 8 bits of mantissa; measured mean differences 0.015 (SD2-shaped), against
    # images of standard deviation ~0.1 (a broken cast gives noise or NaN)
    difference = np.abs(half - full)
    assert 0 < difference.mean() < 0.03, difference.mean()
