"""The seed notebook's training loop with l2fast's fused L2 penalty, on the bundled MNIST sample.

    python examples/plain_loop.py [--epochs N]

After `loss.backward()`, one fused pass adds 2·λ·p into every parameter's .grad and returns the
penalty's value λ·Σ‖p‖²: the same training as adding the notebook's `torch.cat` L2 term to the loss.
"""
import argparse

import torch
from torch import nn

import l2fast
from l2fast.data import load_dataset
from l2fast.model import MLP

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=2)
epochs = parser.parse_args().epochs
torch.set_num_threads(1)                          # this MLP's ops are too small to gain from more threads

data = load_dataset("sample")                     # 8,000 train / 2,000 test real MNIST digits, bundled
images = torch.from_numpy(data.train_images).float() / 255
labels = torch.from_numpy(data.train_labels)

torch.manual_seed(42)
model = MLP()                                     # the notebook's MLP: 784-64-32-10 with ReLU
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
penalty = l2fast.L2Penalty(model.parameters(), weight=1e-4)   # coupled L2 over all parameters, built once

for epoch in range(epochs):
    for batch in torch.randperm(len(images)).split(64):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        loss.backward()
        l2 = penalty.add_grad_()                  # p.grad += 2·1e-4·p for every p; returns 1e-4·Σ‖p‖²
        optimizer.step()
    with torch.no_grad():
        predicted = model(torch.from_numpy(data.test_images).float() / 255).argmax(1).numpy()
    accuracy = (predicted == data.test_labels).mean()
    print(f"epoch {epoch + 1}: loss {loss.item():.4f} + l2 {l2.item():.4f}, test accuracy {accuracy:.2%}")
