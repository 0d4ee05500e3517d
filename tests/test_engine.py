"""l2fast.engine: one train step per penalty strategy against a float64 autograd reference."""
import copy

import pytest
import torch
from torch import nn

from l2fast import engine
from l2fast.data import load_dataset
from l2fast.errors import UsageError
from l2fast.model import MLP

WEIGHT = 1e-3


@pytest.fixture(scope="module")
def batch():
    data = load_dataset("sample")
    images, labels = torch.from_numpy(data.train_images[:512]), torch.from_numpy(data.train_labels[:512])
    idx = torch.arange(100, 164)[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    return images, labels, idx


def reference_grads(model, images, labels, idx, with_l2=True):
    """float64: cross entropy (+ WEIGHT * sum p^2 over every parameter), differentiated by autograd."""
    m = copy.deepcopy(model).double()
    x = images[idx].double() / 255
    data_loss = nn.functional.cross_entropy(m(x), labels[idx])
    l2 = WEIGHT * sum(p.square().sum() for p in m.parameters())
    (data_loss + l2 if with_l2 else data_loss).backward()
    return data_loss.item(), l2.item(), [p.grad for p in m.parameters()]


def adamw_first_step(p, grad, lr=1e-3, eps=1e-8, weight_decay=0.01):
    """float64: AdamW's first step from zero moments (m̂ = g, v̂ = g²)."""
    p = p.double()
    return p * (1 - lr * weight_decay) - lr * grad / (grad.abs() + eps)


@pytest.mark.parametrize("kind", engine.PENALTIES)
def test_step_matches_float64_reference(batch, kind):
    """The losses, the grads and AdamW's first step against float64. With the penalty in the optimizer
    (OPTIMIZER) the .grads hold the data loss's gradient and the step uses it plus 2·w·p."""
    images, labels, idx = batch
    torch.manual_seed(0)
    model = MLP()
    in_step = kind == "optimizer"
    data_loss, l2, grads = reference_grads(model, images, labels, idx)
    _, _, data_grads = reference_grads(model, images, labels, idx, with_l2=False)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer, strategy = engine.optimizer_and_penalty(model, kind, WEIGHT, lr=1e-3)
    step = engine.TrainStep(model, optimizer, images, labels, strategy)
    loss, got_data, got_l2 = step(idx).tolist()
    assert got_data == pytest.approx(data_loss, rel=1e-5) and got_l2 == pytest.approx(l2, rel=1e-5)
    assert loss == pytest.approx(data_loss + l2, rel=1e-5)
    for p, g, dg, p0 in zip(model.parameters(), grads, data_grads, before):
        torch.testing.assert_close(p.grad.double(), dg if in_step else g, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(p.detach().double(), adamw_first_step(p0, g), rtol=1e-5, atol=1e-6)


def test_first_non_finite():
    losses = torch.ones(5, 3)
    assert engine.first_non_finite(losses) is None
    losses[3, 2], losses[4, 0] = float("inf"), float("nan")
    assert engine.first_non_finite(losses) == 3


@pytest.mark.parametrize("call, message", [
    (lambda: engine.check_threads(engine.max_threads() + 1), "--threads"),
    (lambda: engine.check_seed(2 ** 64), "--seed"),
    (lambda: engine.resolve_device("meta"), "--device meta"),
    (lambda: engine.make_optimizer(MLP(), 1e-4, impl="turbo"), "turbo"),
    (lambda: engine.optimizer_and_penalty(MLP(), "optimizer", WEIGHT, 1e-4, impl="foreach"),
     "--adamw-impl foreach picks torch's AdamW; --penalty optimizer steps with l2fast.optim.AdamW"),
])
def test_bad_values_raise_usage_errors(call, message):
    with pytest.raises(UsageError, match=message):
        call()


def test_optimizer_strategy_steps_with_l2fast_adamw_over_every_parameter():
    from l2fast.optim import AdamW

    model = MLP()
    optimizer, strategy = engine.optimizer_and_penalty(model, "optimizer", WEIGHT, lr=1e-4)
    assert isinstance(optimizer, AdamW) and not strategy.in_loss
    held = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(held) == 6 and all(g["weight"] == WEIGHT for g in optimizer.param_groups)  # biases included
    with pytest.raises(ValueError, match="expected the step's l2fast.optim.AdamW with l2_weight"):
        engine.PenaltyStrategy("optimizer", WEIGHT, model.parameters(), torch.optim.AdamW(model.parameters()))


def test_fused_strategy_is_an_l2penalty_over_every_parameter_biases_included():
    import l2fast

    model = MLP()
    strategy = engine.PenaltyStrategy("fused", WEIGHT, model.parameters())
    assert isinstance(strategy.l2_penalty, l2fast.L2Penalty)
    held = [p for g in strategy.l2_penalty.param_groups for p in g["params"]]
    assert len(held) == 6 and all(a is b for a, b in zip(held, model.parameters()))  # 3 weights, 3 biases


class _NoStep(torch.optim.SGD):
    """Leaves the params alone, so the grads a step computed can be compared afterwards."""

    def step(self, closure=None):
        return None


@pytest.mark.parametrize("kind", engine.PENALTIES)
@pytest.mark.parametrize("total, world", [(62, 3), (64, 2), (5, 4), (2, 3)])
def test_sharded_steps_average_to_the_global_batch(batch, kind, total, world):
    """Data parallel as DDP/FSDP2 run it, simulated: each rank's step on its share; the ranks' grads
    and losses averaged (what DDP's all-reduce and l2fast.train's history reduction do) equal the one-
    process step on the whole global batch, also when the shares are unequal (62 over 3: 21, 21, 20)
    or some are empty (2 over 3)."""
    images, labels, idx = batch
    idx = torch.arange(total) * 7 % 512
    torch.manual_seed(0)
    model = MLP()

    def run(shard):
        m = copy.deepcopy(model)
        if kind == "optimizer":  # lr 0: the step leaves the params alone; .grad holds the data gradient
            from l2fast.optim import AdamW

            optimizer = AdamW(m.parameters(), lr=0.0, l2_weight=WEIGHT)
        else:
            optimizer = _NoStep(m.parameters(), lr=0.0)
        step = engine.TrainStep(m, optimizer, images, labels,
                                engine.PenaltyStrategy(kind, WEIGHT, m.parameters(), optimizer), shard=shard)
        losses = step(idx)
        return losses, [p.grad.clone() for p in m.parameters()]

    one_losses, one_grads = run((0, 1))
    ranks = [run((r, world)) for r in range(world)]
    torch.testing.assert_close(sum(r[0] for r in ranks) / world, one_losses, rtol=1e-5, atol=1e-7)
    for i, g in enumerate(one_grads):
        # DDP averages the data grads; the penalty's 2wp is the same on every rank, so averaging keeps it
        torch.testing.assert_close(sum(r[1][i] for r in ranks) / world, g, rtol=1e-4, atol=1e-7)
