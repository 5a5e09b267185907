"""Image classifiers used by the experiments: an MLP, the paper's small CNN, a CIFAR-style ResNet.

All take ``input_shape = (C, H, W)`` and ``n_classes`` and map ``[B, C, H, W]`` -> logits
``[B, n_classes]``. Initialisation uses only torch's global RNG (PyTorch defaults), so the same
``torch.manual_seed`` gives the same weights; :func:`build_model` takes ``seed=`` to do that
without touching the caller's RNG state.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from forwardinf.core.seeding import seeded


def _check_shape(input_shape: Sequence[int], n_classes: int) -> tuple[int, int, int]:
    if len(input_shape) != 3 or any(int(s) <= 0 for s in input_shape):
        raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {tuple(input_shape)}")
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    return tuple(int(s) for s in input_shape)  # type: ignore[return-value]


class MLP(nn.Sequential):
    """Flatten -> [Linear -> ReLU] per hidden width -> Linear(n_classes)."""

    def __init__(self, input_shape: Sequence[int], n_classes: int, hidden: Sequence[int] = (128,)):
        c, h, w = _check_shape(input_shape, n_classes)
        layers: list[nn.Module] = [nn.Flatten()]
        d = c * h * w
        for width in hidden:
            layers += [nn.Linear(d, int(width)), nn.ReLU()]
            d = int(width)
        layers.append(nn.Linear(d, n_classes))
        super().__init__(*layers)


class SmallCNN(nn.Module):
    """The paper's CNN: conv(w,5)-ReLU-pool-conv(2w,5)-ReLU-pool-fc(4w)-ReLU-fc(n_classes).

    ``width=32`` gives conv(32,5)-conv(64,5)-fc128. ``padding=2`` keeps spatial size through each
    conv, so 8x8 digits work (8 -> 4 -> 2); ``padding=0`` is the classic 28x28 -> 4x4 layout.
    ``batchnorm`` adds BatchNorm2d after each conv (the paper's CNN has none).
    """

    def __init__(self, input_shape: Sequence[int], n_classes: int, width: int = 32,
                 batchnorm: bool = False, padding: int = 2):
        super().__init__()
        c, h, w = _check_shape(input_shape, n_classes)
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")

        def block(cin: int, cout: int) -> list[nn.Module]:
            mods: list[nn.Module] = [nn.Conv2d(cin, cout, 5, padding=padding)]
            if batchnorm:
                mods.append(nn.BatchNorm2d(cout))
            return mods + [nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(c, width), *block(width, 2 * width), nn.Flatten())
        # Spatial size after two (conv, pool) stages; computed arithmetically so init consumes
        # exactly the RNG draws of the layers (a dummy forward would not, but is avoidable).
        for _ in range(2):
            h, w = (h + 2 * padding - 4) // 2, (w + 2 * padding - 4) // 2
        if h < 1 or w < 1:
            raise ValueError(f"input {tuple(input_shape)} is too small for SmallCNN with padding={padding}")
        self.classifier = nn.Sequential(nn.Linear(2 * width * h * w, 4 * width), nn.ReLU(),
                                        nn.Linear(4 * width, n_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class FlatCNN(nn.Module):
    """SmallCNN's layers with a flat layout: top-level ``conv1, conv2, fc1, fc2`` and functional
    ReLU / max-pool / flatten in ``forward`` (as many user models are written).

    Same parameter shapes as :class:`SmallCNN` (``width``, ``padding=2``); no module groups the
    head, so a tail that should hold both linear layers must start at ``fc1`` (the layout of the
    independent LDS check in issue 26).
    """

    def __init__(self, input_shape: Sequence[int], n_classes: int, width: int = 32):
        super().__init__()
        c, h, w = _check_shape(input_shape, n_classes)
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.conv1 = nn.Conv2d(c, width, 5, padding=2)
        self.conv2 = nn.Conv2d(width, 2 * width, 5, padding=2)
        h, w = h // 4, w // 4  # two 2x2 pools; each conv keeps the size
        if h < 1 or w < 1:
            raise ValueError(f"input {tuple(input_shape)} is too small for FlatCNN")
        self.fc1 = nn.Linear(2 * width * h * w, 4 * width)
        self.fc2 = nn.Linear(4 * width, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


RESNET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem (no max-pool), 4 stages of BasicBlocks at widths
    ``width * (1, 2, 4, 8)`` with strides (1, 2, 2, 2), global average pool, linear head.

    ``depth`` 18 or 34; ``width=64`` is the standard ResNet-18 (11.2M parameters for CIFAR-10),
    ``width=16`` a narrow one (0.7M) that trains on a CPU.
    """

    def __init__(self, input_shape: Sequence[int], n_classes: int, depth: int = 18, width: int = 16):
        super().__init__()
        c, _, _ = _check_shape(input_shape, n_classes)
        if depth not in RESNET_BLOCKS:
            raise ValueError(f"depth must be one of {sorted(RESNET_BLOCKS)}, got {depth}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.stem = nn.Sequential(nn.Conv2d(c, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        stages: list[nn.Module] = []
        cin = width
        for i, n_blocks in enumerate(RESNET_BLOCKS[depth]):
            cout = width * 2 ** i
            blocks = [BasicBlock(cin, cout, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(cout, cout) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))))


MODELS = ("mlp", "cnn", "flatcnn", "resnet18", "resnet34")


def build_model(name: str, input_shape: Sequence[int], n_classes: int, seed: int | None = None,
                **kw) -> nn.Module:
    """Build a model by name: ``mlp`` (kw ``hidden``, or ``width``: one hidden layer of that width), ``cnn`` (``width``, ``batchnorm``,
    ``padding``), ``flatcnn`` (``width``), ``resnet18`` / ``resnet34`` (``width``).

    ``seed``: initialise under ``torch.manual_seed(seed)`` without changing the global RNG state.
    """
    key = name.lower().replace("-", "").replace("_", "")
    builders = {
        "mlp": lambda: MLP(input_shape, n_classes, **({"hidden": (kw.pop("width"),)} if "width" in kw else {}), **kw),
        "cnn": lambda: SmallCNN(input_shape, n_classes, **kw),
        "flatcnn": lambda: FlatCNN(input_shape, n_classes, **kw),
        "resnet18": lambda: ResNet(input_shape, n_classes, depth=18, **kw),
        "resnet34": lambda: ResNet(input_shape, n_classes, depth=34, **kw),
    }
    if key not in builders:
        raise ValueError(f"unknown model {name!r}; choose one of {list(MODELS)}")
    with seeded(seed):
        return builders[key]()
