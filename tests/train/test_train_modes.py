import torch
from torch import nn

from mm.train.stage import train_mode_where_trained


def test_frozen_batchnorm_keeps_its_statistics_and_trained_dropout_stays_on():
    tower = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    head = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    model = nn.ModuleDict({"tower": tower, "head": head})
    tower.requires_grad_(False)
    model.eval()
    train_mode_where_trained(model)
    assert model.training and head.training and head[1].training
    assert not tower.training and not tower[1].training and not tower[2].training
    before = tower[1].running_mean.clone()
    features = tower(torch.randn(2, 3, 8, 8)).mean(dim=(2, 3))
    head(features).sum().backward()
    assert torch.equal(tower[1].running_mean, before)
