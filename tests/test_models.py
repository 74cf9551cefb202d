import torch

from dcx.models import LeNet5, LeNet300100


def weights(model):
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))


def test_lenet_300_100():
    model = LeNet300100()
    assert weights(model) == 784 * 300 + 300 * 100 + 100 * 10 == 266_200
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_lenet5_caffe():
    model = LeNet5()
    assert [tuple(p.shape) for n, p in model.named_parameters() if n.endswith("weight")] == [
        (20, 1, 5, 5), (50, 20, 5, 5), (500, 800), (10, 500)]
    assert weights(model) == 430_500  # the paper's 431K
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
