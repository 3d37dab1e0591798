"""The seed's networks (AlexNet, one-weird-trick AlexNet with and without batch norm, OverFeat fast)
and any torchvision classification model, behind one constructor.

Usage:
    from tools.imagenet.models import build_model, param_count
    model = build_model("alexnetowtbn", num_classes=1000, init="kaiming")
    print(param_count(model))

Every seed model has `.features` (conv trunk), `.avgpool` (adaptive pooling to the feature map
size the paper's 224-px input gives, so a 224 crop passes it unchanged and 64-px CPU test crops
still work) and `.classifier` (nn.Sequential ending in Linear(..., num_classes)). `alexnetowt` has
exactly torchvision's AlexNet layout and state_dict keys, so torchvision's weights load into it.
"""
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

SEED_ARCHS = ("alexnet", "alexnetowt", "alexnetowtbn", "overfeat")
INITS = ("default", "kaiming", "xavier")


def _torchvision_classifiers():
    try:
        return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))
    except Exception:  # very old torchvision without list_models: only the seed's archs
        return ()


TORCHVISION_ARCHS = _torchvision_classifiers()
ARCHS = SEED_ARCHS + tuple(a for a in TORCHVISION_ARCHS if a not in SEED_ARCHS)


class SeedNet(nn.Module):
    """features -> adaptive pool -> flatten -> classifier (torchvision AlexNet's forward)."""

    def __init__(self, features, pool_size, classifier):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d(pool_size)
        self.classifier = classifier

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class MaxPool2dAtLeastOne(nn.MaxPool2d):
    """MaxPool2d that still gives one output when the input is smaller than the kernel.

    OverFeat's last 2x2 pool meets a 1x1 map at 64-px test crops; at 224 (11x11) it is the
    plain floor-mode pool, so the paper's network is unchanged there.
    """

    def forward(self, x):
        small = x.shape[-1] < self.kernel_size or x.shape[-2] < self.kernel_size
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode or small)


def _fc_head(in_features, hidden, num_classes, batchnorm=False, bn_eps=1e-3):
    """Dropout-Linear(-BN1d)-ReLU twice, then the last Linear (the seed's classifiers)."""
    layers = []
    for width in hidden:
        layers += [nn.Dropout(0.5), nn.Linear(in_features, width)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(width, eps=bn_eps))
        layers.append(nn.ReLU(inplace=True))
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


def _lrn():
    # The paper: b = a / (k + alpha * sum a^2)^beta, alpha=1e-4 over n=5 channels, k=2.
    # PyTorch divides alpha by n, so pass n * 1e-4 to get the paper's normalization.
    return nn.LocalResponseNorm(size=5, alpha=5 * 1e-4, beta=0.75, k=2.0)


def alexnet(num_classes):
    """Krizhevsky et al. 2012: the two GPU columns as groups=2 on conv2, conv4 and conv5."""
    features = nn.Sequential(
        nn.Conv2d(3, 96, 11, stride=4, padding=2), nn.ReLU(inplace=True), _lrn(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(96, 256, 5, padding=2, groups=2), nn.ReLU(inplace=True), _lrn(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 384, 3, padding=1, groups=2), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1, groups=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2),
    )
    return SeedNet(features, (6, 6), _fc_head(256 * 6 * 6, (4096, 4096), num_classes))


def alexnetowt(num_classes, batchnorm=False):
    """Krizhevsky 2014 "one weird trick" single column (cuda-convnet2 layers-imagenet-1gpu.cfg)."""
    widths = [(3, 64, 11, 4, 2), (64, 192, 5, 1, 2), (192, 384, 3, 1, 1), (384, 256, 3, 1, 1),
              (256, 256, 3, 1, 1)]
    pool_after = {0, 1, 4}
    layers = []
    for i, (cin, cout, k, s, p) in enumerate(widths):
        layers.append(nn.Conv2d(cin, cout, k, stride=s, padding=p))
        if batchnorm:
            layers.append(nn.BatchNorm2d(cout, eps=1e-3))  # the seed's eps
        layers.append(nn.ReLU(inplace=True))
        if i in pool_after:
            layers.append(nn.MaxPool2d(3, 2))
    head = _fc_head(256 * 6 * 6, (4096, 4096), num_classes, batchnorm=batchnorm)
    return SeedNet(nn.Sequential(*layers), (6, 6), head)


def overfeat(num_classes):
    """OverFeat "fast" (Sermanet et al. 2013) as the seed trains it on 224 crops: 1024x5x5 features."""
    features = nn.Sequential(
        nn.Conv2d(3, 96, 11, stride=4), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
        nn.Conv2d(96, 256, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
        nn.Conv2d(256, 512, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(512, 1024, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(1024, 1024, 3, padding=1), nn.ReLU(inplace=True),
        MaxPool2dAtLeastOne(2, 2),
    )
    return SeedNet(features, (5, 5), _fc_head(1024 * 5 * 5, (3072, 4096), num_classes))


def init_weights(model, init="default"):
    """Re-initialise conv and linear weights ('kaiming' or 'xavier'; biases zero). 'default' keeps
    PyTorch's own initialisation. Uses the global torch RNG, so torch.manual_seed fixes it."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}: choose one of {', '.join(INITS)}")
    if init == "default":
        return model
    for m in model.modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        if init == "kaiming":
            # fan_out for convs (as torchvision's ResNets), fan_in for linears: keeps the
            # forward activations' scale through the ReLUs of the classifier.
            mode = "fan_out" if isinstance(m, nn.Conv2d) else "fan_in"
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
        else:
            nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    return model


def build_model(arch, num_classes, init="default"):
    """The network called `arch` with `num_classes` outputs, untrained."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}: choose one of {', '.join(INITS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if arch == "alexnet":
        model = alexnet(num_classes)
    elif arch == "alexnetowt":
        model = alexnetowt(num_classes)
    elif arch == "alexnetowtbn":
        model = alexnetowt(num_classes, batchnorm=True)
    elif arch == "overfeat":
        model = overfeat(num_classes)
    elif arch in TORCHVISION_ARCHS:
        kwargs = {}
        if arch in ("googlenet", "inception_v3"):
            kwargs["aux_logits"] = False  # one logits tensor, like every other arch
            kwargs["init_weights"] = True
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    else:
        raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(SEED_ARCHS)} "
                         f"or a torchvision classification model name")
    return init_weights(model, init)


def param_count(model):
    """Number of trainable scalars (what the papers quote)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
