"""Penalise the weight matrices only: `l2fast.decay_groups` splits the parameters the usual way, and
the same param groups feed both the optimizer and the penalty.

    python examples/decay_groups.py [--epochs N]
"""
import argparse

import torch
from torch import nn

import l2fast
from l2fast.data import load_dataset

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=2)
epochs = parser.parse_args().epochs
torch.set_num_threads(1)                          # this model's ops are too small to gain from more threads

data = load_dataset("sample")                     # 8,000 train / 2,000 test real MNIST digits, bundled
images = torch.from_numpy(data.train_images).float() / 255
labels = torch.from_numpy(data.train_labels)

torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 10))
groups = l2fast.decay_groups(model, 1e-4)         # >= 2-D weights: 1e-4; biases and LayerNorm: 0
names = {id(p): name for name, p in model.named_parameters()}
for group in groups:
    print(f"weight {group['weight']:g}: {', '.join(names[id(p)] for p in group['params'])}")

optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0)   # AdamW ignores the "weight" key
penalty = l2fast.L2Penalty(groups)                # ignores AdamW's keys; one fused pass for both groups

for epoch in range(epochs):
    for batch in torch.randperm(len(images)).split(64):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        loss.backward()
        l2 = penalty.add_grad_()                  # 2·1e-4·p into the matrices' grads; the others untouched
        optimizer.step()
    with torch.no_grad():
        predicted = model(torch.from_numpy(data.test_images).float() / 255).argmax(1).numpy()
    accuracy = (predicted == data.test_labels).mean()
    print(f"epoch {epoch + 1}: loss {loss.item():.4f} + l2 {l2.item():.4f}, test accuracy {accuracy:.2%}")
