"""The budget and epoch arithmetic, pure functions (tests/test_gpu_check.py): how long a part may run, how
many CIFAR-10 epochs fit in the time left, and the times a calibration run gives."""
from .settings import FIT_MARGIN, RESERVE, SHARE, TAIL


def part_timeout(part, budget_s, elapsed_s, parts, override=None):
    """Seconds ``part`` may run when it starts ``elapsed_s`` into the budget: its share of the budget
    (``override`` instead, if given), but never into the reserves of the parts after it in ``parts``
    nor the tail kept for the summary; 0 when nothing is left."""
    left = budget_s * (1 - TAIL) - elapsed_s
    later = parts[parts.index(part) + 1:] if part in parts else ()
    left -= sum(RESERVE.get(p, 0) * budget_s for p in later)
    cap = override if override is not None else (SHARE[part] * budget_s if part in SHARE else None)
    return max(0.0, left if cap is None else min(cap, left))


def knn_evaluations(epochs, knn_freq):
    """kNN evaluations main_moco.py makes after epochs (every knn_freq epochs and after the last one;
    the one before training is part of its start-up)."""
    if knn_freq <= 0 or epochs <= 0:
        return 0
    return epochs // knn_freq + (1 if epochs % knn_freq else 0)


def run_seconds(epochs, cal, knn_freq):
    """Projected wall time of a run of ``epochs`` from a calibration (see ``calibrate``)."""
    return (cal['startup_s'] + cal['first_epoch_extra_s'] + epochs * cal['epoch_s']
            + knn_evaluations(epochs, knn_freq) * cal['knn_s'] + cal['exit_s'])


def fit_epochs(available_s, cal, knn_freq, target, margin=FIT_MARGIN):
    """The most epochs (<= target) whose projected wall time fits in (1 - margin) x available_s; 0 if none."""
    limit = available_s * (1 - margin)
    epochs = target
    while epochs > 0 and run_seconds(epochs, cal, knn_freq) > limit:
        epochs -= 1
    return epochs


def calibrate(t_launch, line_times, t_exit):
    """Times of a calibration run of E >= 3 epochs with the kNN monitor at start and after epoch E only,
    from when its log.txt lines appeared: line_times[0] the kNN before training, line_times[k] the end
    of epoch k (the last one with its kNN). Epochs 2..E-1 are the steady epoch time; the first epoch's
    excess over it is warm-up (cuDNN autotuning, first allocations); the last epoch's is the kNN."""
    if len(line_times) < 4:
        raise ValueError(f'a calibration needs the kNN line and >= 3 epochs, got {len(line_times)} lines')
    durations = [b - a for a, b in zip(line_times[:-1], line_times[1:])]   # epochs 1..E
    steady = durations[1:-1]
    epoch_s = sum(steady) / len(steady)
    return {'startup_s': line_times[0] - t_launch, 'epoch_s': epoch_s,
            'first_epoch_extra_s': max(0.0, durations[0] - epoch_s), 'knn_s': max(0.0, durations[-1] - epoch_s),
            'exit_s': max(0.0, t_exit - line_times[-1])}


def median_plain_epoch_s(line_times, records):
    """The median time of the epochs without a kNN evaluation, the first (warm-up) left out; None when fewer
    than two such epochs were logged."""
    plain = [b - a for a, b, r in zip(line_times[:-1], line_times[1:], records[1:]) if 'knn_top1' not in r]
    if len(plain) <= 1:
        return None
    plain = sorted(plain[1:])
    return plain[len(plain) // 2]
