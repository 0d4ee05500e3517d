"""The penalty inside the optimizer: `l2fast.optim.AdamW` applies the coupled L2 penalty in its step,
to the weight matrices of the seed notebook's MLP and not to its biases (`l2fast.decay_groups`).

    python examples/fused_adamw.py [--epochs N]

`optimizer.step()` is AdamW with each gradient g taken as g + 2·w·p (formed in registers, never
written to .grad), in one pass over memory; `optimizer.penalty` is then w·Σ‖p‖² of the parameters
as they were before that step. The same training, to float rounding, as `L2Penalty(groups).add_grad_()`
before torch's AdamW step.
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
groups = l2fast.decay_groups(model, 1e-4)         # the matrices: L2 weight 1e-4; the biases: 0
optimizer = l2fast.optim.AdamW(groups, lr=1e-3, weight_decay=0.0)   # each group's "weight": its coupled L2
names = {id(p): name for name, p in model.named_parameters()}
for group in groups:
    print(f"weight {group['weight']:g}: {', '.join(names[id(p)] for p in group['params'])}")

for epoch in range(epochs):
    for batch in torch.randperm(len(images)).split(64):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        loss.backward()
        optimizer.step()                          # AdamW on g + 2·1e-4·p (the matrices), one pass
    with torch.no_grad():
        predicted = model(torch.from_numpy(data.test_images).float() / 255).argmax(1).numpy()
    accuracy = (predicted == data.test_labels).mean()
    print(f"epoch {epoch + 1}: loss {loss.item():.4f} + l2 {optimizer.penalty.item():.4f}, test accuracy {accuracy:.2%}")
