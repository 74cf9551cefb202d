"""The paper's MNIST models: LeNet-300-100 and LeNet-5 (Caffe's 20-50-500 version).

Layer names (fc1, conv1, ...) are what per-layer configs and reports refer to.
"""

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LeNet300100", "LeNet5"]


class LeNet300100(nn.Module):
    """Fully connected 784-300-100-10 with ReLU: 266,200 weights (Han et al. 2015, Table 2)."""

    def __init__(self, num_classes: int = 10, in_features: int = 784):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """Caffe's LeNet: conv 5x5 20, maxpool 2, conv 5x5 50, maxpool 2, fc 800->500, ReLU,
    fc 500->10 (no nonlinearity after the convolutions, as in Caffe's lenet.prototxt):
    430,500 weights for 28x28 inputs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)
