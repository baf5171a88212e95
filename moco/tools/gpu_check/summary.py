"""summary.md from results.json (and the bench rows of bench.json): a table of the parts, then the bench,
the reference pipeline and the CIFAR-10 runs, each where it exists."""
import shlex

from .settings import PEAK_TFLOPS
from .targets import target_note


def render_summary(results, parts, bench_rows, elapsed_s):
    """The markdown text; ``parts`` the parts selected (in order), ``bench_rows`` {'bench': rows,
    'bench_compiled': rows}, ``elapsed_s`` the seconds since the check started."""
    lines = header(results, elapsed_s) + parts_table(results['parts'], parts)
    lines += bench_table([row for k in ('bench', 'bench_compiled') for row in bench_rows.get(k, [])])
    lines += pipeline_table(results['parts'].get('pipeline', {}))
    for name in ('cifar', 'cifar_ref'):
        lines += cifar_lines(name, results['parts'].get(name, {}))
    lines += fast_vs_original(results['parts'].get('cifar', {}), results['parts'].get('cifar_ref', {}))
    return '\n'.join(lines) + '\n'


def header(r, elapsed_s):
    return [f"# GPU check ({'dry run on CPU' if r['dry_run'] else r.get('device', '?')})", '',
            f"Started {r['started']}; {r.get('device', '?')}; torch {r.get('torch', '?')}; budget "
            f"{r['budget_s'] / 60:.1f} min; {elapsed_s:.0f} s so far. Command: `{shlex.join(r['command'])}`"]


def parts_table(records, parts):
    lines = ['', '| part | status | seconds (limit) | result |', '|---|---|---|---|']
    for name in parts:
        p = records.get(name)
        if p is None:
            lines.append(f'| {name} | not reached | | |')
            continue
        lines.append(f"| {name} | {p.get('status', 'running')} | {p.get('seconds', '')} ({p.get('timeout_s', '')}) "
                     f"| {p.get('result', '')} |")
    return lines


def bench_table(rows):
    if not rows:
        return []
    ref = {(x['model'], x['batch'], x['input']): x['images_per_s'] for x in rows if x['config'] == 'reference'}
    lines = ['', f'Bench (python -m moco.tools.bench; TFLOP/s of the model step; peak {PEAK_TFLOPS} TFLOP/s):', '',
             '| model | batch | input | config | precision | img/s | TFLOP/s | of peak | peak GiB | vs ref '
             '| target |', '|---|---|---|---|---|---|---|---|---|---|---|']
    for x in rows:
        key = (x['model'], x['batch'], x['input'])
        vs = x['images_per_s'] / ref[key] if key in ref else None
        inp = x['input'] + (f"/{x['pipeline']}" if x.get('pipeline') else '')
        lines.append(f"| {x['model']} | {x['batch']} | {inp} | {x['config']} | {x['precision']} | "
                     f"{x['images_per_s']:.0f} | {x['model_tflops']:.1f} | {x['fraction_of_peak']:.1%} | "
                     f"{'-' if x['peak_gib'] is None else round(x['peak_gib'], 1)} | "
                     f"{'' if vs is None else f'{vs:.2f}x'} | {target_note(x)} |")
    return lines


def pipeline_table(p):
    if not p.get('rows'):
        return []
    lines = ['', f"Reference pipeline (python -m moco.tools.bench --pipeline; {p.get('cpu')}; "
                 f"views identical to the original's: {p.get('identical_views')}):", '',
             '| row | config | img/s | of the original / of the transform alone |', '|---|---|---|---|']
    for x in p['rows']:
        if x['kind'] == 'transform':
            lines.append(f"| transform, 1 core | {x['config']} | {x['images_per_s_per_core']:.1f} | "
                         f"{x['vs_original']:.2f}x |")
        elif x['kind'] == 'loader':
            lines.append(f"| loader, -j {x['workers']} | {x['config']} | {x['images_per_s']:.1f} | "
                         f"{x['of_transform_alone']:.0%} |")
        else:
            lines.append(f"| {x['kind']} on {x.get('device')} | {x['config']} | {x['images_per_s']:.1f} | |")
    return lines


def cifar_lines(name, p):
    if 'calibration' not in p:
        return []
    c = p['calibration']
    lines = ['', f"CIFAR-10 {name} ({p.get('numerics')}; precision {p.get('precision')}; {p.get('pipeline_line')}):",
             f"calibration ({p.get('calibration_s')} s): start-up {c['startup_s']} s (with the first kNN), "
             f"{c['epoch_s']} s/epoch, first epoch +{c['first_epoch_extra_s']} s, kNN {c['knn_s']} s; "
             f"projected {p.get('projected_full_epochs')} epochs: {p.get('projected_full_s', 0) / 60:.1f} min; "
             f"{p.get('epochs')} of {p.get('target_epochs')} epochs fit in {p.get('available_s')} s "
             f"(projected {p.get('projected_s')} s)."]
    if 'epochs_done' in p:
        measured = 'too few epochs to measure the epoch time again' if 'measured_epoch_s' not in p else \
            (f"measured {p['measured_epoch_s']} s/epoch, projected {p.get('projected_full_epochs')} epochs "
             f"from it: {p['projected_full_s_measured'] / 60:.1f} min")
        lines.append(f"run: {p['epochs_done']} epochs in {p['wall_s']} s; {measured}; final loss "
                     f"{p.get('final_loss')}; kNN top-1 by epoch: " + ', '.join(f'{e}: {v:.2f}' for e, v in p['knn']))
        lines.append(f"command: `{p.get('command')}`")
    return lines


def fast_vs_original(fast, ref):
    """kNN of the fast run at the last epoch the original-numerics run reached, against that run's."""
    if not (ref.get('knn') and fast.get('knn')):
        return []
    e_ref, k_ref = ref['knn'][-1]
    at = [(e, v) for e, v in fast['knn'] if e <= e_ref]
    if not at:
        return []
    e_fast, k_fast = at[-1]
    return ['', f"fast vs original numerics: kNN {k_fast:.2f} (fast, epoch {e_fast} of "
                f"{fast.get('epochs')}) vs {k_ref:.2f} (original, epoch {e_ref} of {ref.get('epochs')}); "
                'equal schedules only when both runs have the same --epochs']
