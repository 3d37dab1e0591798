"""The seed's networks: shapes at 224 and 64 px, parameter counts from the layer shapes, init options."""
import pytest
import torch
import torchvision
from torch import nn

from tools.imagenet.models import ARCHS, SEED_ARCHS, build_model, param_count


def conv(cin, cout, k, groups=1):
    return cout * (cin // groups) * k * k + cout


def fc(i, o):
    return i * o + o


def expected_params(arch, n):
    """Counts written out from the papers' layer shapes, independent of models.py."""
    if arch == "alexnet":
        trunk = conv(3, 96, 11) + conv(96, 256, 5, 2) + conv(256, 384, 3) + conv(384, 384, 3, 2) \
            + conv(384, 256, 3, 2)
        return trunk + fc(9216, 4096) + fc(4096, 4096) + fc(4096, n)
    if arch in ("alexnetowt", "alexnetowtbn"):
        chans = [3, 64, 192, 384, 256, 256]
        ks = [11, 5, 3, 3, 3]
        trunk = sum(conv(chans[i], chans[i + 1], ks[i]) for i in range(5))
        head = fc(9216, 4096) + fc(4096, 4096) + fc(4096, n)
        if arch == "alexnetowtbn":
            trunk += 2 * sum(chans[1:])
            head += 2 * (4096 + 4096)
        return trunk + head
    if arch == "overfeat":
        trunk = conv(3, 96, 11) + conv(96, 256, 5) + conv(256, 512, 3) + conv(512, 1024, 3) \
            + conv(1024, 1024, 3)
        return trunk + fc(1024 * 25, 3072) + fc(3072, 4096) + fc(4096, n)
    raise AssertionError(arch)


@pytest.mark.parametrize("arch", SEED_ARCHS)
def test_param_counts_match_layer_shapes(arch):
    assert param_count(build_model(arch, 1000)) == expected_params(arch, 1000)
    assert param_count(build_model(arch, 7)) == expected_params(arch, 7)


def test_alexnetowt_is_torchvision_alexnet():
    ours = build_model("alexnetowt", 1000)
    theirs = torchvision.models.alexnet(weights=None)
    assert param_count(ours) == 61_100_840 == param_count(theirs)
    # Same keys and shapes: torchvision's pretrained AlexNet loads into alexnetowt.
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 3, 224, 224)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("arch", SEED_ARCHS)
@pytest.mark.parametrize("size", [224, 64])
def test_output_shape(arch, size):
    torch.manual_seed(0)
    model = build_model(arch, 10)
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    assert isinstance(model.classifier, nn.Sequential)
    assert isinstance(model.classifier[-1], nn.Linear) and model.classifier[-1].out_features == 10
    assert isinstance(model.features, nn.Sequential)


def test_feature_map_at_224_is_the_papers():
    # The adaptive pool must be a no-op at 224: the trunk alone already gives the paper's map.
    sizes = {"alexnet": (256, 6, 6), "alexnetowt": (256, 6, 6), "alexnetowtbn": (256, 6, 6),
             "overfeat": (1024, 5, 5)}
    for arch, shape in sizes.items():
        model = build_model(arch, 10).eval()
        with torch.no_grad():
            assert model.features(torch.randn(1, 3, 224, 224)).shape[1:] == shape, arch


def test_seed_layers():
    m = build_model("alexnet", 10)
    groups = [c.groups for c in m.features if isinstance(c, nn.Conv2d)]
    assert groups == [1, 2, 1, 2, 2]
    assert sum(isinstance(c, nn.LocalResponseNorm) for c in m.features) == 2
    bn = build_model("alexnetowtbn", 10)
    assert sum(isinstance(c, nn.BatchNorm2d) for c in bn.features) == 5
    assert sum(isinstance(c, nn.BatchNorm1d) for c in bn.classifier) == 2


def test_torchvision_by_name():
    assert "resnet18" in ARCHS
    model = build_model("resnet18", 5)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    with pytest.raises(ValueError, match="unknown arch"):
        build_model("no_such_net", 5)


@pytest.mark.parametrize("init", ["kaiming", "xavier"])
def test_init_is_deterministic_and_changes_weights(init):
    def weights(init_name, seed):
        torch.manual_seed(seed)
        return build_model("alexnetowt", 10, init=init_name).state_dict()

    a, b, c = weights(init, 0), weights(init, 0), weights("default", 0)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    conv_w = "features.0.weight"
    assert not torch.equal(a[conv_w], c[conv_w])
    assert torch.count_nonzero(a["features.0.bias"]) == 0
    assert torch.count_nonzero(a["classifier.6.bias"]) == 0
    assert not torch.equal(a[conv_w], weights(init, 1)[conv_w])
    if init == "kaiming":  # std = sqrt(2 / fan_out), fan_out = 64 * 11 * 11
        std = float(a[conv_w].std())
        assert abs(std - (2 / (64 * 121)) ** 0.5) < 0.1 * std
    with pytest.raises(ValueError, match="unknown init"):
        build_model("alexnetowt", 10, init="bogus")
