"""moco/tools/plot.py: the command a pretraining run prints at its end draws the training curves (loss,
and kNN top-1 or RankMe where the run evaluated them), leaves out panels without data, and neither
figure warns; ``--kind gradients`` is the paper's figure of one run."""
import json
import warnings

import matplotlib
import pytest

from moco.metrics import RunLog
from moco.tools import plot

pytest.importorskip('tensorboard')
matplotlib.use('Agg')


def make_run(folder, evaluated=None):
    """A run folder as main_moco.py writes it (RunLog: log.txt and tensorboard/): 3 epochs of 4 steps,
    the loss and gradient magnitudes per step; ``evaluated``: 'knn' (--knn-freq with labels), 'rankme'
    (--knn-freq, images without class folders) or None (no --knn-freq)."""
    log = RunLog(str(folder), enabled=True)

    def evaluation(epoch):
        values = {'rankme': 10.0 + epoch, 'feature_std': 0.02}
        if evaluated == 'knn':
            values['knn_top1'] = 20.0 + 5 * epoch
        log.scalars(epoch * 4, 'val', **values)
        return values

    if evaluated:
        log.epoch({'epoch': 0, **evaluation(0)})
    for epoch in range(3):
        for i in range(4):
            step = epoch * 4 + i
            log.scalars(step, loss=5.0 - 0.1 * step, lr=0.1)
            log.scalars(step, 'grad', first_layer=1e-3 * (step + 1), last_block=1e-4 * (step + 1))
        record = {'epoch': epoch + 1, 'train_loss': 5.0 - epoch, 'train_lr': 0.1, 'train_skipped_images': 0}
        log.epoch({**record, **(evaluation(epoch + 1) if evaluated else {})})
    log.close()
    return str(folder)


@pytest.fixture
def drawn(monkeypatch):
    """The figures plot.main saved: [(panel y labels, [number of points of each line of each panel])], with
    every warning (matplotlib's 'No artists with labels found to put in legend.') an error."""
    from matplotlib.figure import Figure
    figures, savefig = [], Figure.savefig

    def record(fig, *args, **kwargs):
        axes = [ax for ax in fig.axes if ax.get_visible()]
        figures.append(([ax.get_ylabel() for ax in axes], [[len(line.get_xdata()) for line in ax.get_lines()
                                                             if line.get_label()[0] != '_'] for ax in axes]))
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, 'savefig', record)
    from tensorboard.backend.event_processing import event_accumulator  # noqa: F401 (imported before the filter)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        yield figures


@pytest.mark.parametrize('evaluated, monitor', [(None, None), ('knn', 'kNN top-1 (%)'),
                                                ('rankme', 'RankMe of the features')])
def test_the_printed_command_draws_the_loss_and_only_panels_with_data(tmp_path, drawn, capsys, evaluated, monitor):
    run = make_run(tmp_path / 'run', evaluated)
    out = tmp_path / 'run' / 'curves.png'
    plot.main([run, '--out', str(out)])          # what main_moco.py prints at the end of a run
    assert out.read_bytes()[:4] == b'\x89PNG' and capsys.readouterr().out.strip() == f'wrote {out}'
    plot.main([run, '--kind', 'curves', '--out', str(out)])
    expected = ['training loss'] + ([monitor] if monitor else [])
    assert drawn == [(expected, [[3]] + ([[4]] if monitor else []))] * 2   # 3 epochs; evaluated at 0, 1, 2, 3


def test_curves_of_several_runs_keep_a_panel_some_run_has(tmp_path, drawn):
    runs = [make_run(tmp_path / 'plain'), make_run(tmp_path / 'knn', 'knn')]
    plot.main(runs + ['--out', str(tmp_path / 'curves.png'), '--labels', 'no kNN', 'kNN'])
    assert drawn == [(['training loss', 'kNN top-1 (%)'], [[3, 3], [4]])]


@pytest.mark.parametrize('evaluated, panels', [(None, ['max |gradient| of the layer']),
                                               ('knn', ['kNN top-1 (%)', 'max |gradient| of the layer'])])
def test_the_gradient_figure_has_no_empty_panel(tmp_path, drawn, evaluated, panels):
    run = make_run(tmp_path / 'run', evaluated)
    plot.main([run, '--kind', 'gradients', '--out', str(tmp_path / 'grads.png')])
    assert [ylabels for ylabels, _ in drawn] == [panels]
    assert drawn[0][1][-1] == [12, 12]                 # first layer and last block, every step


def test_a_log_without_anything_to_draw_is_one_line(tmp_path):
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'log.txt').write_text(json.dumps({'epoch': 0}) + '\n')
    with pytest.raises(SystemExit, match='^error: nothing to draw') as e:
        plot.main([str(tmp_path / 'run'), '--out', str(tmp_path / 'c.png')])
    assert '\n' not in str(e.value)
