"""Tests of the Flax FID InceptionV3: preprocessing, weight conversion, and parity with
pytorch-fid's network (which needs the [torch] extra; skipped with a reason without it)."""

import numpy as np
import pytest
from PIL import Image

from diffusion_jax.convert import inception as inception_convert
from diffusion_jax.evaluation import features, inception, inception_weights


def _random_flax_variables(seed: int) -> dict:
    """Random, well-scaled weights of every variable of the network (He-normal kernels)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in inception_weights.expected_variable_shapes().items():
        if name.endswith("kernel"):
            value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        elif name.endswith("scale"):
            value = rng.uniform(0.8, 1.2, size=shape)
        elif name.endswith("var"):
            value = rng.uniform(0.5, 1.5, size=shape)
        else:  # biases and running means
            value = 0.1 * rng.normal(size=shape)
        flat[name] = value.astype(np.float32)
    return flat


def _to_torch_names(flat: dict) -> dict:
    """Inverse of the converter, written independently: torch names and layouts."""
    state_dict = {}
    for name, value in flat.items():
        collection, *modules, leaf = name.split("/")
        prefix = ".".join(modules)
        if leaf == "kernel" and modules[-1] == "conv":
            state_dict[f"{prefix}.weight"] = value.transpose(3, 2, 0, 1)
        elif leaf == "kernel":
            state_dict[f"{prefix}.weight"] = value.T
        else:
            torch_leaf = {"scale": "weight", "bias": "bias", "mean": "running_mean"}
            torch_leaf["var"] = "running_var"
            state_dict[f"{prefix}.{torch_leaf[leaf]}"] = value
        if modules[-1] == "bn" and leaf == "scale":
            state_dict[f"{prefix}.num_batches_tracked"] = np.asarray(0)
    return state_dict


def test_bilinear_resize_matches_pil_upsampling_and_pair_averages():
    image = np.random.default_rng(0).random((8, 11)).astype(np.float32)
    # PIL's bilinear filter, with its edge renormalisation, equals PyTorch's clamping when
    # upsampling: an independent implementation of align_corners=False.
    pil = np.asarray(Image.fromarray(image, mode="F").resize((299, 299), Image.BILINEAR))
    ours = inception.resize_bilinear(image[None, :, :, None], size=299)[0, :, :, 0]
    np.testing.assert_allclose(ours, pil, atol=1e-6)
    # Exact 2x downsampling without antialiasing averages adjacent pairs.
    weights = inception.bilinear_resize_matrix(598, 299)
    np.testing.assert_array_equal(weights[5, 10:12], [0.5, 0.5])
    np.testing.assert_allclose(weights.sum(1), 1.0)


def test_quantize_to_uint8_rounds_like_save_image():
    floats = np.array([-1.5, -1.0, -1.0 + 1 / 255, 0.0, 0.999, 1.0, 2.0], np.float32)
    got = np.asarray(inception.quantize_to_uint8(floats))
    np.testing.assert_array_equal(got, [0, 0, 1, 128, 255, 255, 255])
    uint8 = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(inception.quantize_to_uint8(uint8)), uint8)
    with pytest.raises(ValueError, match="dtype int32"):
        inception.quantize_to_uint8(np.zeros(3, np.int32))


def test_preprocess_images_range_channels_and_bad_shapes():
    images = np.random.default_rng(1).integers(0, 256, size=(2, 8, 8, 1), dtype=np.uint8)
    out = np.asarray(inception.preprocess_images(images))
    assert out.shape == (2, 299, 299, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    assert -1.0 <= out.min() and out.max() <= 1.0
    with pytest.raises(ValueError, match="C in \\(1, 3\\)"):
        inception.preprocess_images(np.zeros((2, 8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="NHWC"):
        inception.preprocess_images(np.zeros((8, 8, 3), np.uint8))


def test_converter_inverts_torch_layout():
    flat = _random_flax_variables(seed=0)
    converted = inception_convert.convert_state_dict(_to_torch_names(flat))
    assert converted.keys() == flat.keys()
    for name, value in flat.items():
        np.testing.assert_array_equal(converted[name], value)
    with pytest.raises(ValueError, match="AuxLogits.conv0.weights"):
        inception_convert.torch_key_to_flax_name("AuxLogits.conv0.weights")
    state_dict = _to_torch_names(flat)
    del state_dict["Mixed_7c.branch_pool.conv.weight"]
    with pytest.raises(ValueError, match="missing.*Mixed_7c/branch_pool/conv/kernel"):
        inception_convert.convert_state_dict(state_dict)


def test_weights_file_round_trip_and_bad_files(tmp_path):
    flat = _random_flax_variables(seed=1)
    path = tmp_path / "inception.npz"
    saved = inception_weights.save_inception_variables(
        path, inception_weights.unflatten_variables(flat), source_sha256="ab" * 32
    )
    variables, info = inception_weights.load_inception_variables(path)
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], flat["params/fc/kernel"])
    assert info == saved and not info.is_standard_fid_weights
    with pytest.raises(ValueError, match="expected_digest"):
        inception_weights.load_inception_variables(path, expected_digest="0" * 64)
    with pytest.raises(FileNotFoundError, match="missing.npz.*convert.inception"):
        inception_weights.load_inception_variables(tmp_path / "missing.npz")
    with np.load(path) as archive:  # tamper with one weight, keep the recorded digest
        contents = dict(archive)
    contents["params/fc/bias"] = contents["params/fc/bias"] + 1.0
    np.savez(tmp_path / "tampered.npz", **contents)
    with pytest.raises(ValueError, match="tampered.npz: content digest"):
        inception_weights.load_inception_variables(tmp_path / "tampered.npz")
    contents["params/fc/bias"] = contents["params/fc/bias"][:10]
    np.savez(tmp_path / "shapes.npz", **contents)
    with pytest.raises(ValueError, match="shapes.npz.*wrong shapes.*params/fc/bias"):
        inception_weights.load_inception_variables(tmp_path / "shapes.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="junk.npz: not a readable"):
        inception_weights.load_inception_variables(tmp_path / "junk.npz")
    with pytest.raises(ValueError, match="not FID"):
        features.load_inception_extractor(path)
    extractor = features.load_inception_extractor(path, require_standard_weights=False)
    assert (extractor.name, extractor.frechet_name) == (
        "inception_v3_nonstandard",
        "fd_inception_nonstandard",
    )


def test_wrong_torch_weights_checksum_is_refused(tmp_path):
    fake = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    fake.write_bytes(b"these are not the FID weights")
    with pytest.raises(ValueError, match="does not start with '6726825d'"):
        inception_convert.convert_torch_file(fake, tmp_path / "out.npz")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        inception_convert.convert_torch_file(tmp_path / "nowhere.pth", tmp_path / "out.npz")


def _pytorch_fid_network_with_random_weights(monkeypatch, seed: int):
    """pytorch-fid's FID InceptionV3 whose weight 'download' returns seeded random weights."""
    torch = pytest.importorskip("torch")
    pfi = pytest.importorskip("pytorch_fid.inception")
    flat = _random_flax_variables(seed)
    state_dict = {k: torch.from_numpy(np.asarray(v)) for k, v in _to_torch_names(flat).items()}

    def no_download(url, *args, **kwargs):
        assert url == inception.FID_WEIGHTS_URL
        return state_dict

    monkeypatch.setattr(pfi, "load_state_dict_from_url", no_download)
    network = pfi.InceptionV3([pfi.InceptionV3.DEFAULT_BLOCK_INDEX]).eval()
    fc_weight = state_dict["fc.weight"].numpy()
    return torch, network, state_dict, fc_weight


@pytest.mark.torch
def test_parity_with_pytorch_fid(monkeypatch, tmp_path):
    """Same random weights through our converter: same pool3 and logits within 1e-4 relative."""
    pytest.importorskip("torch", reason="parity test needs the [torch] extra (torch, pytorch-fid)")
    torch, network, state_dict, fc_weight = _pytorch_fid_network_with_random_weights(
        monkeypatch, seed=2
    )
    torch.save(state_dict, tmp_path / "random.pth")
    out = tmp_path / "random.npz"
    inception_convert.main(
        ["--torch_weights", str(tmp_path / "random.pth"), "--out", str(out),
         "--allow_nonstandard_weights"]
    )  # fmt: skip
    extractor = features.load_inception_extractor(out, require_standard_weights=False, chunk_size=2)
    rng = np.random.default_rng(3)
    cases = {
        "uint8 32x32 (upsampled)": rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8),
        "uint8 320x320 (downsampled)": rng.integers(0, 256, (1, 320, 320, 3), dtype=np.uint8),
    }
    for label, images in cases.items():
        with torch.no_grad():
            unit = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
            reference = network(unit)[0][:, :, 0, 0].numpy()  # [B, 2048]
        pool3, logits = extractor.features_and_logits(images)
        reference_logits = reference @ fc_weight.T  # IS logits: no fc bias
        pool3_error = np.abs(pool3 - reference).max() / np.abs(reference).max()
        logits_error = np.abs(logits - reference_logits).max() / np.abs(reference_logits).max()
        print(f"{label}: pool3 max rel diff {pool3_error:.2e}, logits {logits_error:.2e}")
        assert pool3_error < 1e-4 and logits_error < 1e-4, label


def test_float_input_equals_its_uint8_quantization_and_compiles_once_per_dtype():
    flat = _random_flax_variables(seed=4)
    extractor = features.InceptionExtractor(
        inception_weights.unflatten_variables(flat), chunk_size=2
    )
    uint8 = np.random.default_rng(5).integers(0, 256, (2, 16, 16, 1), dtype=np.uint8)
    floats = uint8.astype(np.float32) / 127.5 - 1.0
    compiled_before = features._inception_apply._cache_size()
    np.testing.assert_array_equal(extractor(uint8), extractor(floats))
    assert features._inception_apply._cache_size() - compiled_before == 2  # uint8, float32


def test_every_product_runs_at_full_float32_precision():
    """No one-pass bfloat16 (TPU) or TF32 (GPU) convolution: each of the 94 convolutions and
    the logits' product asks for HIGHEST precision in the compiled program."""
    flat = _random_flax_variables(seed=6)
    variables = inception_weights.unflatten_variables(flat)
    images = np.zeros((1, 16, 16, 3), np.uint8)
    text = features._inception_apply.lower(variables, images).as_text()
    convolutions = text.count("stablehlo.convolution")
    assert convolutions == 94
    assert text.count("precision HIGHEST") >= 2 * convolutions
    assert "precision DEFAULT" not in text
