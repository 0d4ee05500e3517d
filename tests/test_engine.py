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


def reference_grads(model, images, labels, idx):
    """float64: cross entropy + WEIGHT * sum p^2 over every parameter, differentiated by autograd."""
    m = copy.deepcopy(model).double()
    x = images[idx].double() / 255
    data_loss = nn.functional.cross_entropy(m(x), labels[idx])
    l2 = WEIGHT * sum(p.square().sum() for p in m.parameters())
    (data_loss + l2).backward()
    return data_loss.item(), l2.item(), [p.grad for p in m.parameters()]


@pytest.mark.parametrize("kind", engine.PENALTIES)
def test_step_matches_float64_reference(batch, kind):
    images, labels, idx = batch
    torch.manual_seed(0)
    model = MLP()
    data_loss, l2, grads = reference_grads(model, images, labels, idx)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = engine.make_optimizer(model, lr=1e-3)
    step = engine.TrainStep(model, optimizer, images, labels, engine.PenaltyStrategy(kind, WEIGHT, model.parameters()))
    loss, got_data, got_l2 = step(idx).tolist()
    assert got_data == pytest.approx(data_loss, rel=1e-5) and got_l2 == pytest.approx(l2, rel=1e-5)
    assert loss == pytest.approx(data_loss + l2, rel=1e-5)
    for p, g, p0 in zip(model.parameters(), grads, before):
        torch.testing.assert_close(p.grad.double(), g, rtol=1e-4, atol=1e-7)
        assert not torch.equal(p.detach(), p0)  # AdamW stepped


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
])
def test_bad_values_raise_usage_errors(call, message):
    with pytest.raises(UsageError, match=message):
        call()


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
        step = engine.TrainStep(m, _NoStep(m.parameters(), lr=0.0), images, labels,
                                engine.PenaltyStrategy(kind, WEIGHT, m.parameters()), shard=shard)
        losses = step(idx)
        return losses, [p.grad.clone() for p in m.parameters()]

    one_losses, one_grads = run((0, 1))
    ranks = [run((r, world)) for r in range(world)]
    torch.testing.assert_close(sum(r[0] for r in ranks) / world, one_losses, rtol=1e-5, atol=1e-7)
    for i, g in enumerate(one_grads):
        # DDP averages the data grads; the penalty's 2wp is the same on every rank, so averaging keeps it
        torch.testing.assert_close(sum(r[1][i] for r in ranks) / world, g, rtol=1e-4, atol=1e-7)
