"""The benchmark rows against README "Speed" targets: which models missed theirs (the profile part runs for
them) and the summary's met/missed note of a row."""
from .settings import FILES_VS_STEP, TARGETS


def missed_targets(rows, dry_run=False):
    """Models whose eager 'ours' row misses its README target (img/s, peak GiB; files >= 0.9 x synthetic),
    each with the reasons. The dry run's tiny models have no target: all are 'missed' (the profile runs)."""
    ours = {(r['model'], r['batch'], r['input']): r for r in rows if r['config'] == 'ours'}
    missed = {}
    for (model, batch, inp), r in ours.items():
        if inp != 'synthetic':
            continue
        reasons = _missed_reasons(r, TARGETS.get((model, batch)), ours.get((model, batch, 'files')), dry_run)
        if reasons:
            missed[f'{model}:{batch}'] = reasons
    return missed


def _missed_reasons(row, target, files, dry_run):
    """Why the synthetic row ``row`` (and its end-to-end row ``files``, if any) misses ``target``."""
    reasons = []
    if target is None:
        if dry_run:
            reasons.append('dry run (no target)')
    else:
        if row['images_per_s'] < target['images_per_s']:
            reasons.append(f"{row['images_per_s']:.0f} < {target['images_per_s']} img/s")
        if 'peak_gib' in target and row['peak_gib'] is not None and row['peak_gib'] > target['peak_gib']:
            reasons.append(f"{row['peak_gib']:.1f} > {target['peak_gib']} GiB")
    if files is not None and target is not None and files['images_per_s'] < FILES_VS_STEP * row['images_per_s']:
        reasons.append(f"files {files['images_per_s']:.0f} < {FILES_VS_STEP} x step")
    return reasons


def target_note(row):
    """'met (>= N)' or 'missed (>= N)' for a synthetic row of ours (eager or compiled) of a model with a
    target; '' otherwise."""
    target = TARGETS.get((row['model'], row['batch']))
    if not target or row['config'] == 'reference' or row['input'] != 'synthetic':
        return ''
    ok = row['images_per_s'] >= target['images_per_s'] and (
        'peak_gib' not in target or row['peak_gib'] is None or row['peak_gib'] <= target['peak_gib'])
    return f"{'met' if ok else 'missed'} (>= {target['images_per_s']})"
