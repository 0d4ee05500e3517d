"""The seed notebook's MLP, layer for layer, so the same seed gives the same initial weights."""
from torch import nn

SEED_LAYER_SIZES = (784, 64, 32, 10)


class MLP(nn.Module):
    """Flatten, then Linear/ReLU pairs; the last Linear emits logits."""

    def __init__(self, layer_sizes=SEED_LAYER_SIZES):
        super().__init__()
        self.layer_sizes = tuple(int(s) for s in layer_sizes)
        layers = [nn.Flatten()]
        pairs = list(zip(self.layer_sizes[:-1], self.layer_sizes[1:]))
        for i, (fan_in, fan_out) in enumerate(pairs):
            layers.append(nn.Linear(fan_in, fan_out))
            if i < len(pairs) - 1:
                layers.append(nn.ReLU())
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)

    def config(self):
        """What `MLP(**config)` needs to rebuild this model; stored in checkpoints."""
        return {"layer_sizes": list(self.layer_sizes)}
