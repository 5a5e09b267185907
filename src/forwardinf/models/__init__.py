"""Model builders: MLP, the paper's small CNN, CIFAR-style ResNet."""
from forwardinf.models.vision import MLP, MODELS, FlatCNN, BasicBlock, ResNet, SmallCNN, build_model

__all__ = ["MLP", "SmallCNN", "FlatCNN", "ResNet", "BasicBlock", "build_model", "MODELS"]
