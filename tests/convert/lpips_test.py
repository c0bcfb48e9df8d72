"""Parity of evaluation/lpips.py with the `lpips` package (Zhang et al. 2018's own code),
through convert/lpips.py: an `lpips.LPIPS(net="vgg")` with a random VGG16 backbone (so
nothing is downloaded) and the v0.1 lin weights the package ships, converted by the
command from state dicts written with torch.save, gives the distances and gradients of
the package on digits and random images."""

import os

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

lpips_package = pytest.importorskip("lpips")
torch = pytest.importorskip("torch")

from diffusion_jax.convert import lpips as convert  # noqa: E402
from diffusion_jax.evaluation import lpips, lpips_weights  # noqa: E402

RTOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(the lpips package's network, the folder of its state dicts, our converted file)."""
    torch.manual_seed(0)
    network = lpips_package.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    root = tmp_path_factory.mktemp("lpips")
    torch.save(network.state_dict(), root / "lpips_full.pth")
    out = convert.main(["--out", str(root / "ours.npz"), "--lin", str(root / "lpips_full.pth")])
    return network.eval(), root, out


def _theirs(network, x0, x1):
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        return network(nchw(x0), nchw(x1)).numpy().reshape(-1)


def _digit_pairs(size=32):
    """Four pairs of sklearn's digits [4, size, size, 1] in [-1, 1], upsampled by repetition."""
    digits = load_digits().images[:8] / 8.0 - 1.0  # [8, 8, 8], 0..16 -> [-1, 1]
    repeat = size // 8
    grey = digits.repeat(repeat, axis=1).repeat(repeat, axis=2)[..., None].astype(np.float32)
    return grey[:4], grey[4:]


def _random_pairs(size, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1, 1, (3, size, size, channels)).astype(np.float32)
    x1 = np.clip(x0 + 0.4 * rng.standard_normal(x0.shape), -1, 1).astype(np.float32)
    return x0, x1


@pytest.mark.parametrize(
    "pairs", [_digit_pairs(), _random_pairs(32), _random_pairs(48, seed=1)],
    ids=["digits32_grey", "random32_rgb", "random48_rgb"],
)  # fmt: skip
def test_distances_equal_the_lpips_package(reference, pairs):
    network, _, out = reference
    params = lpips_weights.load_lpips(out)
    x0, x1 = pairs
    ours = np.asarray(jax.jit(lpips.lpips_distance)(params, x0, x1))
    theirs = _theirs(network, x0, x1)
    assert np.all(theirs > 0)
    np.testing.assert_allclose(ours, theirs, rtol=RTOL)


def test_gradients_equal_the_lpips_package(reference):
    network, _, out = reference
    params = lpips_weights.load_lpips(out)
    # unclipped images: clipped pixels make equal patches, so max-pool ties, where the
    # gradient is not unique (PyTorch and XLA pick different maxima)
    rng = np.random.default_rng(2)
    x0 = rng.uniform(-0.6, 0.6, (3, 32, 32, 3)).astype(np.float32)
    x1 = (x0 + 0.3 * rng.uniform(-1, 1, x0.shape)).astype(np.float32)
    ours = jax.grad(lambda y: lpips.lpips_distance(params, x0, y).sum())(x1)
    target = torch.from_numpy(x1.transpose(0, 3, 1, 2).copy()).requires_grad_()
    network(torch.from_numpy(x0.transpose(0, 3, 1, 2).copy()), target).sum().backward()
    theirs = target.grad.numpy().transpose(0, 2, 3, 1)
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=1e-4 * scale)


def _torchvision_state_dict(network) -> dict:
    """The VGG16 convolutions under torchvision's names (`features.N`), as its .pth has them,
    with a classifier weight that the converter must ignore."""
    slices = {k: v for k, v in network.state_dict().items() if k.startswith("net.slice")}
    renamed = {"features." + k.split(".", 2)[2]: v for k, v in slices.items()}
    return {**renamed, "classifier.6.bias": torch.zeros(1000)}


def test_the_command_converts_torchvision_vgg16_with_the_shipped_lin_weights(reference):
    network, root, out = reference
    torch.save(_torchvision_state_dict(network), root / "vgg16.pth")
    lin_only = {k: v for k, v in network.state_dict().items() if k.startswith("lin")}
    torch.save(lin_only, root / "lin.pth")
    vgg, lin = str(root / "vgg16.pth"), str(root / "lin.pth")
    from_torchvision = convert.main(["--out", str(root / "tv.npz"), "--vgg", vgg])
    explicit = convert.main(["--out", str(root / "tv_lin.npz"), "--vgg", vgg, "--lin", lin])
    expected = lpips_weights.flatten(lpips_weights.load_lpips(out))
    for path in (from_torchvision, explicit):
        flat = lpips_weights.flatten(lpips_weights.load_lpips(path))
        assert flat.keys() == expected.keys()
        for name in expected:
            np.testing.assert_array_equal(flat[name], expected[name], err_msg=name)
    shipped = torch.load(convert.shipped_lin_weights(), map_location="cpu", weights_only=True)
    np.testing.assert_array_equal(
        expected["lin/relu3_3"], shipped["lin2.model.1.weight"].numpy().reshape(-1)
    )


def test_bad_state_dicts_are_named_by_their_pytorch_keys(reference):
    network, root, _ = reference
    lin_only = root / "lin_only.pth"
    torch.save({k: v for k, v in network.state_dict().items() if k.startswith("lin")}, lin_only)
    with pytest.raises(ValueError, match="holds only the lin layers: pass --vgg"):
        convert.convert_files(root / "x.npz", lin=lin_only)
    vgg = _torchvision_state_dict(network)
    del vgg["features.26.weight"]
    vgg["features.0.bias"] = torch.zeros(32)
    torch.save(vgg, root / "broken_vgg.pth")
    with pytest.raises(ValueError) as error:
        convert.convert_files(root / "x.npz", vgg=root / "broken_vgg.pth", lin=lin_only)
    message = str(error.value)
    assert "broken_vgg.pth" in message
    assert "features.0.bias has shape (32,), expected (64,)" in message
    assert "missing the weight of vgg/conv5_2/kernel (PyTorch shape (512, 512, 3, 3))" in message
    with pytest.raises(ValueError, match="holds no LPIPS lin layers"):
        convert.convert_files(root / "x.npz", vgg=lin_only, lin=root / "broken_vgg.pth")
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        convert.convert_files(root / "x.npz", vgg=root / "absent.pth")
    assert not os.path.exists(root / "x.npz")
