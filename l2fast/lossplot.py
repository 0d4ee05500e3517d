"""loss.png: a training run at a glance, readable without the command line that made it.

Top: the total loss, the data loss (cross entropy) and the L2 loss per step, log scale, and each
epoch's test loss; epoch boundaries marked. Middle: each epoch's test accuracy. Bottom: Σ‖p‖² over every
parameter, the quantity the L2 term penalises: per step as L2 loss / weight when the weight is > 0,
and as measured at each epoch's end (metrics.jsonl's `param_sq_norm`). A rising L2 loss then reads
as what it is, the weights growing while the model fits the data, held back by the penalty. The
title holds the run's settings and result. Matplotlib's object API (no pyplot, no display needed).
"""
import math

import numpy as np

from ._io import atomic_path

MAX_POINTS = 10_000  # longer runs are drawn as the means of blocks of steps


def _blocks(values, limit=MAX_POINTS):
    """(step numbers, values): every step, or the means of equal blocks of steps when there are more
    than `limit` (10M steps of three lines would take matplotlib minutes and gigabytes)."""
    values = np.asarray(values, dtype=np.float64)
    steps = np.arange(1, len(values) + 1, dtype=np.float64)
    size = math.ceil(len(values) / limit)
    if size <= 1:
        return steps, values, 1
    n = len(values) // size * size
    return steps[:n].reshape(-1, size).mean(1), values[:n].reshape(-1, size).mean(1), size


def _title(settings, epochs, steps):
    data = settings.get("dataset") or {}
    sizes = f" ({data['train_size']:,} train / {data['test_size']:,} test images)" if "train_size" in data else ""
    wd = settings.get("weight_decay")
    last = epochs[-1] if epochs else None
    result = (f"after epoch {last['epoch']}: test accuracy {100 * last['test_accuracy']:.2f}%, "
              f"test loss {last['test_loss']:.4f}" if last else "no epoch completed")
    return "\n".join([
        f"{data.get('name', '?')}{sizes}: {len(epochs)} epoch(s), {steps:,} steps of batch "
        f"{settings.get('batch_size', '?')}",
        f"L2 weight {settings.get('l2_weight', 0):g} (coupled: in the loss; --penalty {settings.get('penalty', '?')}) · "
        f"AdamW lr {settings.get('lr', 0):g}, weight decay {'?' if wd is None else f'{wd:g}'} (decoupled)",
        result])


def plot_losses(path, history, records=(), settings=None, steps_per_epoch=None):
    """Write loss.png (atomically) for a run; the arguments are figure()'s."""
    fig = figure(history, records, settings, steps_per_epoch)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def figure(history, records=(), settings=None, steps_per_epoch=None):
    """The matplotlib Figure of a run: `history` [[loss, data_loss, l2_loss] per step], `records` the
    run's metrics.jsonl records (the epoch ones give the test loss, accuracy and Σ‖p‖²), `settings`
    its summary's settings (dataset, l2_weight, weight_decay, lr, penalty, batch_size),
    `steps_per_epoch` where the epochs end. With only a history, the losses alone."""
    from matplotlib.figure import Figure

    settings = settings or {}
    weight = float(settings.get("l2_weight") or 0.0)
    epochs = [r for r in records if "test_accuracy" in r]
    n = len(history)
    ends = [min(r["epoch"] * steps_per_epoch, n) for r in epochs] if steps_per_epoch else []
    columns = np.asarray(history, dtype=np.float64).reshape(n, 3) if n else np.zeros((0, 3))

    fig = Figure(figsize=(11, 10), layout="constrained")
    top, middle, bottom = fig.subplots(3, 1, sharex=True, height_ratios=(3, 1.4, 2))
    fig.suptitle(_title(settings, epochs, n), fontsize=10)

    averaged = 1
    lines = [(0, "total loss (data + L2)", dict(color="black", linewidth=1.8)),
             (1, "data loss (cross entropy)", dict(color="tab:blue", linewidth=0.7))]
    if weight > 0:
        lines.append((2, f"L2 loss = {weight:g} × Σ‖p‖²", dict(color="tab:orange", linewidth=1.2)))
    for column, label, style in lines:
        x, y, averaged = _blocks(np.where(columns[:, column] > 0, columns[:, column], np.nan))
        top.plot(x, y, label=label, **style)
    if ends:
        top.plot(ends, [r["test_loss"] for r in epochs], "o", color="tab:red", label="test loss (each epoch's end)")
        epoch_axis = top.secondary_xaxis("top")
        epoch_axis.set_xticks(ends, [str(r["epoch"]) for r in epochs], fontsize=8, color="0.35")
        epoch_axis.set_xlabel("end of epoch", fontsize=8, color="0.35")
        epoch_axis.tick_params(length=0)
    top.set_yscale("log")
    top.set_ylabel("loss (log scale)")
    top.grid(True, which="both", alpha=0.3)
    per = "per step" if averaged == 1 else f"means of {averaged:,} steps"
    top.set_title(f"Training losses ({per}), and the test loss after each epoch", fontsize=10)
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)

    if ends:
        middle.plot(ends, [100 * r["test_accuracy"] for r in epochs], "s-", color="tab:green",
                    label="test accuracy")
        for x, r in zip(ends, epochs):
            middle.annotate(f"{100 * r['test_accuracy']:.2f}%", (x, 100 * r["test_accuracy"]), fontsize=8,
                            color="tab:green", textcoords="offset points", xytext=(-5, 5), ha="right")
    middle.set_ylim(0, 100)
    middle.set_ylabel("test accuracy (%)")
    middle.set_title("Test accuracy after each epoch", fontsize=10)
    middle.grid(True, alpha=0.3)

    measured = [(x, r["param_sq_norm"]) for x, r in zip(ends, epochs) if r.get("param_sq_norm") is not None]
    if weight > 0 and n:
        x, y, _ = _blocks(columns[:, 2] / weight)
        bottom.plot(x, y, color="tab:purple", linewidth=1.2, label="Σ‖p‖² = L2 loss / L2 weight, per step")
        first, last = columns[0, 2] / weight, columns[-1, 2] / weight
        span = f"from {first:.4g} at step 1 to {last:.4g} at step {n:,}"
    elif measured:
        first, last = measured[0][1], measured[-1][1]
        span = f"from {first:.4g} after epoch 1 to {last:.4g} after epoch {epochs[-1]['epoch']}"
    if measured:
        bottom.plot(*zip(*measured), "D" if weight > 0 else "D:", color="tab:purple", markerfacecolor="white",
                    label="Σ‖p‖² measured at each epoch's end")
    if weight > 0 or measured:
        grew = last > first
        if abs(last - first) <= 1e-3 * abs(first):
            why = f"Σ‖p‖² changed little: {span}."
        elif weight > 0 and grew:
            why = (f"Σ‖p‖² grew {span}: fitting the data grows the weights, and the L2 loss ({weight:g} × Σ‖p‖²) "
                   f"grows with them.\nThe penalty's gradient, 2 × {weight:g} × p, pulls every weight toward 0 and "
                   f"holds that growth back; AdamW's decoupled weight decay shrinks them too.")
        elif weight > 0:
            why = (f"Σ‖p‖² fell {span}: the penalty's gradient, 2 × {weight:g} × p, pulls every weight toward 0 "
                   f"harder than fitting the data pushes them out\n(with AdamW's decoupled weight decay besides), "
                   f"and the L2 loss ({weight:g} × Σ‖p‖²) falls with it.")
        else:
            wd = settings.get("weight_decay")
            why = (f"--l2-weight 0: no L2 term in the loss. Σ‖p‖² {'grew' if grew else 'fell'} {span} "
                   f"(measured at each epoch's end);\nthe only pull toward 0 is AdamW's decoupled weight decay"
                   f"{'' if wd is None else f' ({wd:g})'}.")
        fig.supxlabel(why, fontsize=8.5, color="0.2")
    bottom.set_ylabel("Σ‖p‖²")
    bottom.set_title("What the L2 term penalises: Σ‖p‖², the sum of squares of every parameter (biases included)",
                     fontsize=10)
    bottom.grid(True, alpha=0.3)
    if bottom.get_legend_handles_labels()[0]:
        bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    bottom.set_xlabel("step")
    bottom.set_xlim(0, max(n, 1))
    for ax in (top, middle, bottom):
        for x in ends:
            ax.axvline(x, color="0.5", linestyle=":", linewidth=0.8)
    return fig
