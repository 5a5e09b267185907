"""Model builders: MLP, the paper's small CNN, CIFAR-style ResNet."""
from forwardinf.models.vision import MLP, MODELS, BasicBlock, ResNet, SmallCNN, build_model

__all__ = ["MLP", "SmallCNN", "ResNet", "BasicBlock", "build_model", "MODELS"]
