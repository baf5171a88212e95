"""Checkpoints: the original MoCo v3 file format, written safely.

Pretraining files hold ``{'epoch': next_epoch, 'arch', 'state_dict', 'optimizer', 'scaler'}`` (plus a
few plain extras) with ``module.``-prefixed keys in every launch mode, so released MoCo v3 checkpoints
and ours are interchangeable. Only tensors and plain types are saved, and every load uses
``weights_only=True``: a checkpoint cannot run code. Every file is checked before it is loaded
(``moco.file_check``: the CRC-32 of every entry and the zip structure), so a damaged file is refused,
or, by ``--resume auto``, moved aside for the newest intact one; a new numbered checkpoint is checked
after it is written, before any older one is removed.
"""
import os
import re
from typing import NamedTuple, Optional

import torch

from moco import dist, run_record
from moco.builder import METHODS
from moco.errors import UserError, first_line
from moco.file_check import damage

DDP_PREFIX = 'module.'


def ddp_state_dict(model):
    """state_dict of the bare model with the keys a DDP-wrapped model has: ``module.*``."""
    return {DDP_PREFIX + k: v for k, v in dist.unwrap(model).state_dict().items()}


def strip_prefix(state_dict, prefix):
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _exception_chain(e):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _temporary_name(path):
    return os.path.join(os.path.dirname(os.path.abspath(path)), f'.{os.path.basename(path)}.tmp.{os.getpid()}')


def save_checkpoint(state, path):
    """Atomic save: write a temporary file in the same folder, flush and fsync, then rename.

    An interrupted save (kill -9, disk full) leaves the previous file at ``path`` untouched; a failed
    one is a UserError.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot create the folder of {path}: {e.strerror or e}') from None
    tmp = _temporary_name(path)
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch's zip writer turns a full disk into "RuntimeError: unexpected pos ..." raised while
        # handling the OSError: report the OSError, which says what happened
        cause = next((x for x in _exception_chain(e) if isinstance(x, OSError)), None)
        if cause is None:
            raise
        raise UserError(f'cannot write checkpoint {path}: {cause.strerror or cause}; the previous checkpoints are '
                        'intact') from None
    finally:
        remove_file(tmp)
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def remove_stale_temporaries(folder):
    """Delete the partial files of saves that were killed (``.NAME.tmp.PID`` of a dead process)."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        m = re.match(r'^\..+\.pth\.tar\.tmp\.(\d+)$', name)
        if m and not _process_alive(int(m.group(1))):
            remove_file(os.path.join(folder, name))


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DamagedCheckpoint(UserError):
    """A checkpoint whose bytes are not what was written (moco.file_check)."""

    def __init__(self, path, problem):
        self.what = f'damaged checkpoint {path}: {problem}'
        super().__init__(f'{self.what}; it was not loaded')


def check_intact(path):
    """A DamagedCheckpoint naming the file and what is wrong with it, unless it is intact."""
    problem = damage(path)
    if problem:
        raise DamagedCheckpoint(path, problem)


def load_checkpoint(path):
    """torch.load on CPU with weights_only=True, after checking the file is intact; a missing, damaged,
    truncated or foreign file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f'checkpoint not found: {path}')
    check_intact(path)
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated zip, pickle with code, not a torch file at all, ...
        raise UserError(f'cannot read checkpoint {path}: {first_line(e)}') from None
    if not isinstance(ckpt, dict):
        raise UserError(f'{path} is not a checkpoint (a {type(ckpt).__name__}, not a dict)')
    return ckpt


LAST_CHECKPOINT = 'checkpoint_last.pth.tar'  # the rolling mid-epoch file of --save-every-iters
_NUMBERED = re.compile(r'^checkpoint_(\d+)\.pth\.tar$')


def pretrain_checkpoint_name(epoch):
    return f'checkpoint_{epoch:04d}.pth.tar'


def is_pretrain_checkpoint_name(name):
    return bool(_NUMBERED.match(name)) or name == LAST_CHECKPOINT


def remove_file(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def set_aside(path):
    """Rename a damaged file to ``path.corrupt`` (``.corrupt.1``, ... if taken): kept, never deleted, and
    no longer a checkpoint name. Returns the new name."""
    target, k = path + '.corrupt', 0
    while os.path.exists(target):
        k += 1
        target = f'{path}.corrupt.{k}'
    os.replace(path, target)
    return target


def _read_pretraining(path):
    """(progress, checkpoint) of a readable pretraining checkpoint, progress being (epoch, iter); None,
    with a warning, for a file that cannot be read or is not one. A damaged file is moved aside (by
    rank 0; every process finds it damaged and passes it over)."""
    try:
        ckpt = load_checkpoint(path)
    except DamagedCheckpoint as e:
        moved = ''
        if dist.is_main_process():
            try:
                moved = f'; moved to {set_aside(path)}'
            except OSError as err:
                moved = f'; could not move it aside ({err.strerror})'
        print(f'warning: --resume auto passes over {e.what}{moved}', flush=True)
        return None
    except UserError as e:
        print(f'warning: skipping {e}')
        return None
    if 'state_dict' not in ckpt or 'epoch' not in ckpt:
        print(f'warning: skipping {path}: not a pretraining checkpoint')
        return None
    return (ckpt['epoch'], ckpt.get('iter', 0)), ckpt


def latest_checkpoint(folder):
    """``(path, checkpoint)`` of the readable pretraining checkpoint of ``folder`` that is furthest in
    training (by its (epoch, iter) fields: a mid-epoch checkpoint_last.pth.tar beats the end of the
    previous epoch), or ``(None, None)``. Unreadable files are skipped with a warning.

    checkpoint_last is weighed against the newest readable numbered file only, so a long run costs two
    reads, and the winner is returned loaded (it is not read again).
    """
    found = []
    last = os.path.join(folder, LAST_CHECKPOINT)
    if os.path.exists(last) and (read := _read_pretraining(last)):
        found.append((read[0], last, read[1]))
    numbered = sorted((int(m.group(1)), name) for name in os.listdir(folder) if (m := _NUMBERED.match(name)))
    for _, name in reversed(numbered):
        path = os.path.join(folder, name)
        if read := _read_pretraining(path):
            found.append((read[0], path, read[1]))
            break
    if not found:
        return None, None
    _, path, ckpt = max(found, key=lambda f: f[0])  # on a tie, checkpoint_last (listed first)
    return path, ckpt


def resolve_resume(resume, output_dir, has_run, find_latest, kind, allow_existing=False):
    """What a script resumes from, the same rule for pretraining, probing and fine-tuning:
    ``(path, loaded checkpoint)``, or ``(None, None)`` to start from scratch.

    resume: the --resume flag. 'auto' takes ``find_latest()`` (a (path, checkpoint or None) pair, or
    (None, None)) when ``has_run`` (output_dir holds files of a run); a path is loaded as it is. Without
    --resume, an output_dir that holds a run is refused (a UserError) unless ``allow_existing``: a new
    run never overwrites another's checkpoints.
    """
    if resume == 'auto':
        path, ckpt = find_latest() if has_run else (None, None)
        if path is None:
            print(f'--resume auto: no {kind} checkpoint in {output_dir}, starting from scratch')
            return None, None
        return path, ckpt if ckpt is not None else load_checkpoint(path)
    if resume:
        return resume, load_checkpoint(resume)
    if has_run and not allow_existing:
        raise UserError(f'{output_dir} already holds a {kind} run: pass --resume auto to continue it, or choose '
                        'another --output-dir')
    return None, None


def pretraining_resume(resume, output_dir, allow_existing=False):
    """``resolve_resume`` for pretraining: a run in ``output_dir`` is any checkpoint_NNNN or
    checkpoint_last file, 'auto' takes the furthest readable one; the partial files of killed saves are
    removed (rank 0)."""
    has_run = os.path.isdir(output_dir) and any(map(is_pretrain_checkpoint_name, os.listdir(output_dir)))
    found = resolve_resume(resume, output_dir, has_run, lambda: latest_checkpoint(output_dir), 'pretraining',
                           allow_existing)
    if dist.is_main_process():
        remove_stale_temporaries(output_dir)
    return found


def resume_pretraining(args, settings, model, optimizer, amp, shape_flags):
    """``--resume`` of a pretraining run in one call: find the file (``pretraining_resume``), check that
    it is one, that its recorded settings agree with ``settings`` (``run_record.check_resume``: a flag of
    ``shape_flags`` must be the same, another change of the mathematics needs ``--accept-changes``) and
    that -a and --method are its own, then restore model, optimizer and scaler. Returns (path,
    checkpoint), or (None, None) for a new run."""
    path, ckpt = pretraining_resume(args.resume, args.output_dir, allow_existing=args.start_epoch > 0)
    if path is None:
        return None, None
    require_keys(ckpt, ['state_dict', 'epoch', 'optimizer'], path)
    run_record.check_resume(run_record.recorded_settings(ckpt, args.output_dir), settings, path, args.accept_changes,
                            shape_flags)
    check_recorded(ckpt, path, '-a', args.arch)
    check_recorded(ckpt, path, '--method', args.method, default='mocov3')
    restore(ckpt, path, model, optimizer, amp, optimizer_flag=args.optimizer)
    print(f"=> resumed from '{path}': {ckpt['epoch']} epoch(s) done"
          + (f", continuing epoch {ckpt['epoch'] + 1} at step {ckpt['iter'] + 1}" if ckpt.get('iter') else ""))
    return path, ckpt


def single_file_resume(resume, output_dir, name, kind, needs, hint, allow_existing=False):
    """``resolve_resume`` for the probe and fine-tuning, whose run is the one file ``output_dir/name``;
    a file without the keys ``needs`` is a one-line error that ends with ``hint``."""
    path = os.path.join(output_dir, name)
    resume, ckpt = resolve_resume(resume, output_dir, os.path.isfile(path), lambda: (path, None), kind,
                                  allow_existing)
    if resume and not set(needs) <= set(ckpt):
        raise UserError(f'{resume} is not a {kind} checkpoint (it needs {", ".join(needs[:-1])} and {needs[-1]}); '
                        f'{hint}')
    return resume, ckpt


def require_keys(ckpt, keys, path):
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise UserError(f'{path} is not a MoCo pretraining checkpoint: no {", ".join(missing)} '
                        f'(found keys: {", ".join(sorted(map(str, ckpt))[:6])})')


def load_model_state(model, state_dict, path):
    """Load a (possibly ``module.``-prefixed) state_dict strictly into the bare model; a mismatch is a
    one-line UserError naming the first problem."""
    state = strip_prefix(state_dict, DDP_PREFIX) if any(k.startswith(DDP_PREFIX) for k in state_dict) else state_dict
    try:
        dist.unwrap(model).load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f'{path} does not match this model: {str(e).splitlines()[1].strip()[:200]}') from None


def restore(ckpt, path, model, optimizer, amp=None, model_key='state_dict', optimizer_flag=None):
    """Load a training checkpoint's model, optimizer and (with ``amp``) GradScaler state: what every
    script resumes. An optimizer state that does not fit (another --optimizer) is a one-line error."""
    load_model_state(model, ckpt[model_key], path)
    try:
        optimizer.load_state_dict(ckpt['optimizer'])
    except (KeyError, ValueError, RuntimeError) as e:
        which = f'--optimizer {optimizer_flag}' if optimizer_flag else 'this optimizer'
        raise UserError(f'{path}: its optimizer state does not fit {which} ({type(e).__name__}: '
                        f'{first_line(e, 80)}); resume with the optimizer the run was started with') from None
    if amp is not None:
        amp.load_state_dict(ckpt.get('scaler'))


def check_recorded(ckpt, path, flag, value, default=None, what='was trained with'):
    """A one-line error when the checkpoint records another value of ``flag`` (e.g. ``-a``) than
    ``value``; files that do not record it (``default`` None) pass."""
    key = flag.lstrip('-').replace('-', '_')
    if key == 'a':
        key = 'arch'
    recorded = ckpt.get(key, default)
    if recorded is not None and recorded != value:
        raise UserError(f'{path} {what} {flag} {recorded}, not {flag} {value}')


def save_last_and_best(state, output_dir, last, best, is_best):
    """The probe's and fine-tuning's files: ``last`` after every epoch and ``best`` when the epoch is the
    best so far; rank 0 writes them."""
    if dist.is_main_process():
        save_checkpoint(state, os.path.join(output_dir, last))
        if is_best:
            save_checkpoint(state, os.path.join(output_dir, best))


def save_pretraining(state, output_dir, epochs_done, iters_done=0, keep=0):
    """Pretraining's files (the original's naming): at an epoch's end ``checkpoint_NNNN.pth.tar``
    (NNNN = epochs done - 1), which makes a rolling mid-epoch ``checkpoint_last.pth.tar`` obsolete, and
    only the ``keep`` newest numbered files kept (0: all); inside an epoch (``iters_done`` > 0) the
    rolling file. Rank 0 writes them."""
    if not dist.is_main_process():
        return
    if iters_done:
        save_checkpoint({**state, 'iter': iters_done}, os.path.join(output_dir, LAST_CHECKPOINT))
        return
    path = os.path.join(output_dir, pretrain_checkpoint_name(epochs_done - 1))
    save_checkpoint(state, path)
    problem = damage(path)   # read back before anything older goes: the disk may not have kept it
    if problem:
        print(f'warning: the checkpoint just written is damaged ({problem}); the older ones are kept', flush=True)
        return
    remove_file(os.path.join(output_dir, LAST_CHECKPOINT))  # older than the file just written
    thin_checkpoints(output_dir, keep, protect=path)


def thin_checkpoints(folder, keep, protect=None):
    """Delete all but the ``keep`` newest checkpoint_NNNN.pth.tar of folder (keep <= 0: keep all), and
    never ``protect`` (the intact file just written, whatever numbers other files carry)."""
    if keep <= 0:
        return
    names = sorted((int(m.group(1)), name) for name in os.listdir(folder) if (m := _NUMBERED.match(name)))
    for _, name in names[:-keep]:
        if protect is None or os.path.join(folder, name) != protect:
            remove_file(os.path.join(folder, name))


# ---- backbone weights of a pretraining checkpoint (linear probe, DeiT conversion, fine-tuning) ----


def evaluated_encoder(method):
    """The encoder of a pretraining checkpoint that is evaluated, as its method's class declares it
    (``eval_encoder``: for Momentum² Teacher the teacher, with its momentum-BN statistics), for files
    that do not record it (older ones); files without a method (the original release's) are MoCo v3's."""
    return METHODS.get(method, METHODS['mocov3'])[0].eval_encoder


CLASSIFIERS = ('fc', 'head')   # the classifier the projector replaced: ResNets' fc, ViTs' head


class Backbone(NamedTuple):
    """The backbone weights of a checkpoint (prefix stripped, no projector), with what the file records."""
    state: dict
    arch: Optional[str]
    settings: Optional[dict]   # the pretraining's recorded flags (args.json's), None in the original's files


def read_backbone(path, allow_deit=False):
    """The one way to read a backbone (the probe, fine-tuning, conversion, the demo): from a MoCo
    pretraining checkpoint (``{'state_dict': {'module.<encoder>.*': ...}}``, ours or the original
    release's) the evaluated encoder's weights without the projector that replaced its classifier; the
    other encoder and the predictor are dropped. With ``allow_deit``, also a converted file
    ``{'model': state_dict}`` (convert_to_deit.py), its classifier dropped."""
    ckpt = load_checkpoint(path)
    arch = ckpt.get('arch')
    settings = ckpt.get('args') if isinstance(ckpt.get('args'), dict) else None
    if allow_deit and 'model' in ckpt and 'state_dict' not in ckpt:
        return Backbone(_without_classifier(ckpt['model']), arch, settings)
    require_keys(ckpt, ['state_dict'], path)
    encoder = ckpt.get('eval_encoder') or evaluated_encoder(ckpt.get('method'))
    if encoder != 'base_encoder':
        print(f'=> {path} is a {ckpt.get("method", "")} checkpoint: using its {encoder}')
    prefix = f'{DDP_PREFIX}{encoder}.'
    weights = _without_classifier({k[len(prefix):]: v for k, v in ckpt['state_dict'].items() if k.startswith(prefix)})
    if not weights:
        sample = ', '.join(sorted(map(str, ckpt['state_dict']))[:3]) or 'none'
        raise UserError(f'{path} holds no {prefix}* weights, so it is not a MoCo pretraining '
                        f'checkpoint (first keys: {sample})')
    return Backbone(weights, arch, settings)


def _without_classifier(state):
    return {k: v for k, v in state.items() if k.split('.', 1)[0] not in CLASSIFIERS}


def load_backbone(model, state, head, path='checkpoint'):
    """Load backbone weights (``read_backbone``) into a fresh model whose classifier is ``head``, saying
    so; anything but exactly the classifier's weight and bias missing is a one-line UserError. Returns
    the weights (for the probe's sanity check)."""
    try:
        msg = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape mismatch fails even with strict=False
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise UserError(f'{path} does not fit this model: {detail[:200]}') from None
    expected = {f'{head}.weight', f'{head}.bias'}
    missing = sorted(set(msg.missing_keys) - expected)
    if missing or msg.unexpected_keys or not expected <= set(msg.missing_keys):
        problems = []
        if missing:
            problems.append(f'missing {len(missing)} weight(s), e.g. {missing[0]}')
        if msg.unexpected_keys:
            problems.append(f'{len(msg.unexpected_keys)} unexpected, e.g. {sorted(msg.unexpected_keys)[0]}')
        if not expected <= set(msg.missing_keys):
            problems.append(f'it holds a classifier {head}.*')
        raise UserError(f'{path} does not fit this model: {"; ".join(problems)}')
    print(f"=> loaded the pretrained backbone of '{path}' ({len(state)} tensors)")
    return state
