"""What MoCo v3's study of training instability looked at (the paper, section 4), measured in every run.

* Gradient magnitude per layer, as the paper measures it: the largest absolute gradient over a layer's
  parameters (after unscaling under fp16), for the first layer (a ViT's patch projection, a ResNet's
  first convolution), the first and the last block (ResNet: stage), the projector and the predictor,
  and the model's total l2 norm (``GradientMonitor``). Taken at the logged steps only (``--print-freq``):
  one reduction on the device, read back with the progress line.
* Spikes (``SpikeDetector``): a logged step whose first-layer magnitude exceeds K times its running
  median, and the later layers that exceed K times theirs in the steps after it, with the lag; the
  paper's spikes reach the last layers "tens of iterations" after the first. kNN dips (``dips``).
* Label-free monitors of the backbone features (eval mode): RankMe (Garrido et al., ICML 2023; the
  exponential of the entropy of the normalised singular values) and the std of the L2-normalised
  features (0 at collapse, about 1/sqrt(d) when the features spread), and a collapse tripwire
  (``CollapseTripwire``): MoCo's loss stuck at its value for identical features, 4 T ln(B), or
  RankMe near 1.
* ``SpikeGuard`` (``--skip-spikes``, off by default): a step whose loss or gradient norm exceeds the
  mean + 6 sigma of the recent steps is skipped on every process (OLMo-core's SkipStepOptimizer rule;
  non-finite values never enter the window).
"""
import math
from collections import deque

import torch

from moco import dist
from moco.models import encoder_layout

LAYERS = ('first_layer', 'first_block', 'last_block', 'projector', 'predictor')
SPIKE_FACTOR = 5.0       # a spike: this many times the running median. The paper's spikes are ~10x; in the
                         # CPU study's runs (README) the first layer never exceeded 2.5x its median (window 50)
SPIKE_WINDOW = 50        # logged steps of the running median
SPIKE_HORIZON = 200      # iterations after a first-layer spike within which later layers' spikes join it
DIP_POINTS = 1.0         # a kNN dip: this many points below the previous evaluation
RANKME_IMAGES = 25_000   # RankMe reads the features of at most this many training images
COLLAPSED_RANKME = 1.5   # RankMe under this: the features have collapsed to (about) one direction


def layer_parameters(model):
    """{layer name: [parameters]} of a MoCo/BYOL/M2T model (not wrapped): the groups of ``LAYERS``, found
    in the online encoder by ``models.encoder_layout`` for every supported family."""
    layout = encoder_layout(model.base_encoder)
    groups = {'first_layer': layout.first_layer, 'first_block': layout.first_block, 'last_block': layout.last_block,
              'projector': layout.head, 'predictor': model.predictor}
    return {name: list(module.parameters()) for name, module in groups.items()}


class GradientMonitor:
    """``measure()`` after the backward: a device tensor of max |g| per layer group (NaN for a group
    without gradients, e.g. a frozen patch projection) and the total l2 norm of all gradients, in the
    order of ``names``."""

    def __init__(self, model):
        self.groups = layer_parameters(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.names = list(self.groups) + ['total_norm']

    @torch.no_grad()
    def measure(self):
        values = []
        for params in self.groups.values():
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                values.append(torch.stack(torch._foreach_norm(grads, math.inf)).max().float())
            else:
                values.append(None)
        grads = [p.grad for p in self.params if p.grad is not None]
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float()) if grads else None
        values.append(total)
        device = next((v.device for v in values if v is not None), torch.device('cpu'))
        nan = torch.tensor(float('nan'), device=device)
        return torch.stack([nan if v is None else v for v in values])


def total_grad_norm(params):
    """The l2 norm of all gradients of ``params`` (a device scalar)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())


class RunningMedian:
    def __init__(self, window):
        self.values = deque(maxlen=window)

    def add(self, value):
        if math.isfinite(value):
            self.values.append(value)

    def get(self):
        if not self.values:
            return None
        ordered = sorted(self.values)
        return ordered[len(ordered) // 2]


class SpikeDetector:
    """Spikes of the first layer's gradient magnitude and their arrival in later layers.

    ``update(iteration, values)`` with the logged step's {layer: max |g|}: a first-layer value above
    ``factor`` x its running median (of the last ``window`` logged steps, once ``min_history`` are in)
    opens an event; a later layer above ``factor`` x its own median within ``horizon`` iterations
    joins it with its lag. ``events``: [{'iteration', 'ratio', 'later': {layer: lag}}]."""

    def __init__(self, factor=SPIKE_FACTOR, window=SPIKE_WINDOW, horizon=SPIKE_HORIZON, min_history=10,
                 first='first_layer', later=('last_block', 'projector', 'predictor')):
        self.factor, self.horizon, self.min_history = factor, horizon, min_history
        self.first, self.later = first, later
        self.medians = {name: RunningMedian(window) for name in (first, *later)}
        self.events = []

    def _spiking(self, name, value):
        median = self.medians[name]
        ref = median.get()
        spiking = (ref is not None and len(median.values) >= self.min_history and math.isfinite(value)
                   and value > self.factor * ref)
        return spiking, (value / ref if ref else None)

    def update(self, iteration, values):
        new = []
        first = values.get(self.first)
        if first is not None:
            spiking, ratio = self._spiking(self.first, first)
            if spiking:
                event = {'iteration': iteration, 'ratio': round(ratio, 1), 'later': {}}
                self.events.append(event)
                new.append(event)
        for name in self.later:
            value = values.get(name)
            if value is None:
                continue
            spiking, _ = self._spiking(name, value)
            if spiking:
                for event in self.events:
                    lag = iteration - event['iteration']
                    if 0 <= lag <= self.horizon and name not in event['later']:
                        event['later'][name] = lag
        for name, value in values.items():   # the medians learn after the step is judged
            if name in self.medians and value is not None:
                self.medians[name].add(value)
        return new

    def state_dict(self):
        return {'events': self.events, 'medians': {k: list(m.values) for k, m in self.medians.items()}}

    def load_state_dict(self, state):
        self.events = list(state.get('events', []))
        for k, values in state.get('medians', {}).items():
            if k in self.medians:
                self.medians[k].values.extend(values)


def dips(evaluations, points=DIP_POINTS):
    """[(epoch, drop)] of the evaluations [(epoch, value)] that fell by more than ``points`` from the
    one before."""
    return [(e, round(prev - v, 2)) for (_, prev), (e, v) in zip(evaluations, evaluations[1:]) if prev - v > points]


@torch.no_grad()
def rankme(features, eps=1e-7):
    """RankMe (Garrido et al. 2023): exp of the entropy of the singular values of ``features`` (N, d)
    normalised to sum 1 (plus ``eps``, the paper's): between 1 (one direction) and min(N, d). Wide
    matrices go through the d x d Gram matrix, whose eigenvalues are the squared singular values."""
    f = features.double()
    if min(f.shape) <= 1024:
        s = torch.linalg.svdvals(f)
    else:
        s = torch.linalg.eigvalsh(f.T @ f if f.shape[0] >= f.shape[1] else f @ f.T).clamp_(min=0).sqrt_()
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def rankme_indices(n, limit=RANKME_IMAGES):
    """The fixed images RankMe reads: all ``n`` up to ``limit``, else ``limit`` of them drawn once (seed 0)."""
    if n <= limit:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(0))[:limit].tolist())


@torch.no_grad()
def feature_std(features):
    """The std over images of the L2-normalised features, averaged over dimensions: 0 when every image
    has the same feature, about 1/sqrt(d) when the features spread over the sphere."""
    f = torch.nn.functional.normalize(features.double(), dim=1)
    return float(f.std(dim=0).mean())


def collapsed_moco_loss(T, global_batch):
    """MoCo v3's symmetrised loss when every query is equally similar to every key: 2 x 2T x ln(B)."""
    return 4 * T * math.log(global_batch)


class CollapseTripwire:
    """One warning, the first time the run looks collapsed: the loss within ``rel`` of its collapsed
    value at every logged step of an epoch after the first (``collapsed_loss`` None: not checked, e.g.
    BYOL, whose collapsed loss is 0 but whose healthy loss also falls toward 0), or RankMe under
    ``COLLAPSED_RANKME``."""

    def __init__(self, collapsed_loss=None, rel=1e-3):
        self.collapsed_loss, self.rel = collapsed_loss, rel
        self.warned = False
        self.epoch_stuck = None

    def _warn(self, what):
        if not self.warned:
            self.warned = True
            print(f'warning: {what}. The features have probably collapsed (every image maps to about the same '
                  'point); try a lower --lr, more --warmup-epochs, --stop-grad-conv1 for a ViT, or check that the '
                  'two views differ (augmentations)', flush=True)
        return what

    def loss_step(self, loss):
        """A logged step's loss (a number)."""
        if self.collapsed_loss is None or self.epoch_stuck is None:
            return
        self.epoch_stuck = self.epoch_stuck and abs(loss - self.collapsed_loss) <= self.rel * self.collapsed_loss

    def start_epoch(self, epoch):
        self.epoch_stuck = epoch >= 1   # the first epoch starts near the collapsed value from random weights

    def end_epoch(self, epoch):
        if self.epoch_stuck and self.collapsed_loss is not None:
            return self._warn(f'the loss stayed at {self.collapsed_loss:.4f} = 4 T ln(batch), its value for '
                              f'identical features, through epoch {epoch + 1}')
        return None

    def rankme(self, value):
        if value < COLLAPSED_RANKME:
            return self._warn(f'RankMe of the backbone features is {value:.2f}: they span about one direction')
        return None


class SpikeGuard:
    """``--skip-spikes``: whether to take a step, from its loss and gradient norm (the same on every
    process: the loss averaged over processes, the norm of DDP's averaged gradients). A step is skipped
    when either exceeds the mean + ``sigmas`` x std of the last ``window`` steps (once ``min_history``
    are in), or is not finite. As OLMo-core's SkipStepOptimizer, every finite value enters the window
    once judged, a skipped step's too: a lasting rise is absorbed after a few skips (4 for a 15% rise of
    a gradient norm with 1% noise) instead of skipping every later step; non-finite values never enter.
    ``skipped``: the run's skipped steps; ``epoch_skipped``: those of the epoch ``start_epoch`` began."""

    def __init__(self, window=128, sigmas=6.0, min_history=20):
        self.sigmas, self.min_history = sigmas, min_history
        self.history = {'loss': deque(maxlen=window), 'grad_norm': deque(maxlen=window)}
        self.skipped = 0
        self.epoch, self.skipped_before_epoch = None, 0

    def _outlier(self, name, value):
        values = self.history[name]
        if len(values) < self.min_history:
            return False
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        return value > mean + self.sigmas * std

    def judge(self, loss, grad_norm):
        """True: take the step. ``loss`` and ``grad_norm``: python numbers, the same on every process."""
        values = {'loss': loss, 'grad_norm': grad_norm}
        take = all(math.isfinite(v) and not self._outlier(k, v) for k, v in values.items())
        for k, v in values.items():
            if math.isfinite(v):
                self.history[k].append(v)
        if not take:
            self.skipped += 1
        return take

    def decide(self, loss, grad_norm):
        """``judge`` of device tensors: one all-reduce of (loss, norm) when there are several processes,
        and a host read (the training loop folds them into the step's one read instead)."""
        loss_value, norm_value = dist.sum_to_host(torch.stack([loss.detach().float(), grad_norm.float()]))
        return self.judge(loss_value / dist.world_size(), norm_value / dist.world_size())

    def start_epoch(self, epoch):
        """Count ``epoch_skipped`` from here, unless this epoch was begun already (a mid-epoch resume)."""
        if epoch != self.epoch:
            self.epoch, self.skipped_before_epoch = epoch, self.skipped

    @property
    def epoch_skipped(self):
        return self.skipped - self.skipped_before_epoch

    def state_dict(self):
        return {k: list(v) for k, v in self.history.items()} | {
            'skipped': self.skipped, 'epoch': self.epoch, 'skipped_before_epoch': self.skipped_before_epoch}

    def load_state_dict(self, state):
        for k in self.history:
            self.history[k].extend(state.get(k, []))
        self.skipped = state.get('skipped', 0)
        self.epoch = state.get('epoch')
        self.skipped_before_epoch = state.get('skipped_before_epoch', self.skipped)


class _StepInspection:
    """What ``TrainingMonitors.after_backward`` gives ``Amp.backward_step``: ``share()`` measures the
    gradient magnitudes (a logged step) and, with the guard, returns (loss, gradient norm) to be averaged
    over processes in the step's one read; ``decide`` is the guard's decision from the averages. The
    pretraining loop calls the same methods of ``TrainingMonitors`` itself."""

    def __init__(self, monitors, logged, loss):
        self.monitors, self.logged, self.loss = monitors, logged, loss

    def share(self):
        m = self.monitors
        measured = m.measure() if self.logged else None
        m._measured = measured
        return m.guard_values(self.loss, measured)

    def decide(self, finite, shared, overflow=None):
        return self.monitors.take_step(finite, overflow, shared)


class TrainingMonitors:
    """What the pretraining loop measures besides the loss, in one place: the gradient magnitudes of the
    logged steps (``GradientMonitor``, ``SpikeDetector``), the collapse tripwire and, with
    ``--skip-spikes``, the ``SpikeGuard``. After the backward (gradients unscaled), the loop calls
    ``measure()`` at a logged step, ``guard_values`` for the step's one read and ``take_step`` with what
    it read; after the step, at a logged step, ``log_step``. ``epoch_record`` gives log.txt's per-epoch
    fields; ``state_dict`` goes into the checkpoint, so that a resumed run keeps its windows."""

    def __init__(self, model, collapsed_loss=None, skip_spikes=False):
        self.gradients = GradientMonitor(model)
        self.spikes = SpikeDetector()
        self.tripwire = CollapseTripwire(collapsed_loss)
        self.guard = SpikeGuard() if skip_spikes else None
        self._params = self.gradients.params
        self._measured = None
        self._epoch_values = []
        self._epoch_spikes = []
        self.evaluations = []   # (epochs done, {knn_top1, rankme, feature_std}) of the feature monitors

    def measure(self):
        """The gradient magnitudes of a logged step, on the device (no sync), kept for ``log_step``."""
        self._measured = self.gradients.measure()
        return self._measured

    def guard_values(self, loss, measured=None):
        """With --skip-spikes: (loss, total gradient norm), a device tensor the step's one read averages
        over processes (the norm: ``measured``'s at a logged step); else None."""
        if self.guard is None:
            return None
        norm = measured[-1] if measured is not None else total_grad_norm(self._params)
        return torch.stack([loss.detach().float(), norm.float()])

    def take_step(self, finite, overflow, shared):
        """The spike guard's decision (True without it) from the step's read: a non-finite loss is
        counted as such, not as a spike; an fp16 overflow is the GradScaler's to skip, not a spike."""
        if self.guard is None:
            return True
        if not finite:
            return False
        if overflow:
            return True
        return self.guard.judge(*shared)

    def after_backward(self, logged, loss):
        """The ``after_backward`` of ``Amp.backward_step`` for this step (a ``_StepInspection``), or None."""
        if not logged and self.guard is None:
            return None
        return _StepInspection(self, logged, loss)

    def log_step(self, iteration, run_log, loss=None):
        """At a logged step, after the step: read the measured values back (one transfer), log them to
        TensorBoard (grad/<layer>) and feed the spike detector and the tripwire. Returns {layer: value}."""
        if self._measured is None:
            return {}
        values = dict(zip(self.gradients.names, self._measured.tolist()))
        self._measured = None
        run_log.scalars(iteration, 'grad', **{k: v for k, v in values.items() if math.isfinite(v)})
        self._epoch_values.append(values)
        self._epoch_spikes += self.spikes.update(iteration, values)
        if loss is not None:
            self.tripwire.loss_step(loss)
        return values

    def start_epoch(self, epoch):
        self._epoch_values, self._epoch_spikes = [], []
        self.tripwire.start_epoch(epoch)
        if self.guard is not None:
            self.guard.start_epoch(epoch)

    def epoch_record(self, epoch):
        """{'grad_max': {...}, 'grad_median': {...}, 'grad_spikes': [...], 'skipped_spike_steps': n} of the
        epoch (what it has), and the tripwire's warning if the epoch looked collapsed."""
        record = {}
        for name in self.gradients.names:
            series = sorted(v[name] for v in self._epoch_values if math.isfinite(v[name]))
            if series:
                record.setdefault('grad_max', {})[name] = series[-1]
                record.setdefault('grad_median', {})[name] = series[len(series) // 2]
        if self._epoch_spikes:
            record['grad_spikes'] = self._epoch_spikes
        if self.guard is not None:
            record['skipped_spike_steps'] = self.guard.epoch_skipped   # the run's: guard.skipped
        warning = self.tripwire.end_epoch(epoch)
        if warning:
            record['collapse_warning'] = warning
        return record

    def state_dict(self):
        return {'spikes': self.spikes.state_dict(), 'guard': self.guard.state_dict() if self.guard else None,
                'tripwire_warned': self.tripwire.warned, 'evaluations': self.evaluations}

    def load_state_dict(self, state):
        if not state:
            return
        self.spikes.load_state_dict(state.get('spikes') or {})
        if self.guard is not None and state.get('guard'):
            self.guard.load_state_dict(state['guard'])
        self.tripwire.warned = state.get('tripwire_warned', False)
        self.evaluations = [tuple(e) for e in state.get('evaluations', [])]
