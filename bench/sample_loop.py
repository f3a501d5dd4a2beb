"""A faithful copy of the Azure ML sample's training loop (pytorch_train.py), for comparison.

Same data path (torchvision ImageFolder, PIL decode + RandomResizedCrop(224) + flip every epoch,
DataLoader batch 4, shuffle, 4 workers), same model (torchvision ResNet18, new 2-class head, all
layers trained), SGD lr 0.001 momentum 0.9, StepLR(7, 0.1), fp32. Its one ordering bug
(``scheduler.step()`` before the optimizer) is kept: it only shifts the schedule by an epoch and
does not change the speed. ImageNet weights can't be downloaded here, so both loops start from
random weights: the compute per image is the same.
"""

from __future__ import annotations

import time

import torch
from torch import nn, optim
from torch.optim import lr_scheduler
from torchvision import datasets, models, transforms


def load_data(data_dir: str):
    data_transforms = {
        "train": transforms.Compose([
            transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]),
        "val": transforms.Compose([
            transforms.Resize(256), transforms.CenterCrop(224),
            transforms.ToTensor(), transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]),
    }
    image_datasets = {x: datasets.ImageFolder(f"{data_dir}/{x}", data_transforms[x]) for x in ["train", "val"]}
    loaders = {x: torch.utils.data.DataLoader(image_datasets[x], batch_size=4, shuffle=True, num_workers=4)
               for x in ["train", "val"]}
    return loaders, {x: len(image_datasets[x]) for x in ["train", "val"]}


def train_epochs(data_dir: str, num_epochs: int) -> list[dict]:
    """Run the sample's loop; per epoch: train images/s, val images/s, val acc, seconds."""
    loaders, sizes = load_data(data_dir)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    model = models.resnet18(weights=None)
    model.fc = nn.Linear(model.fc.in_features, 2)
    model = model.to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    scheduler = lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    results = []
    for _ in range(num_epochs):
        row = {}
        epoch_start = time.perf_counter()
        for phase in ["train", "val"]:
            if phase == "train":
                scheduler.step()  # the sample's order
                model.train()
            else:
                model.eval()
            corrects, start = 0, time.perf_counter()
            for inputs, labels in loaders[phase]:
                inputs, labels = inputs.to(device), labels.to(device)
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    _, preds = torch.max(outputs, 1)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                corrects += torch.sum(preds == labels.data).item()
            row[f"{phase}_images_per_sec"] = sizes[phase] / (time.perf_counter() - start)
            row[f"{phase}_acc"] = corrects / sizes[phase]
        row["epoch_seconds"] = time.perf_counter() - epoch_start
        results.append(row)
    return results
