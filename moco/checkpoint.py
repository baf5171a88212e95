"""Checkpoints: the original MoCo v3 file format, written safely.

Pretraining files hold ``{'epoch': next_epoch, 'arch', 'state_dict', 'optimizer', 'scaler'}`` (plus a
few plain extras) with ``module.``-prefixed keys in every launch mode, so released MoCo v3 checkpoints
and ours are interchangeable. Only tensors and plain types are saved, and every load uses
``weights_only=True``: a checkpoint cannot run code. Every file is checked before it is loaded
(``moco.file_check``: the CRC-32 of every entry and the zip structure), so a damaged file is refused,
or, by ``--resume auto``, moved aside for the newest intact one; a new numbered checkpoint is checked
after it is written, before any older one is removed. Every pretraining checkpoint records its line of
training (``Line``), so that ``--resume auto`` and ``--keep-checkpoints`` act on the run's own files only.
"""
import os
import pickle
import re
import uuid
import zipfile
from typing import NamedTuple, Optional

import torch

from moco import dist, run_record
from moco.errors import UserError, first_line
from moco.file_check import damage, is_zip

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
        raise UserError(why_unreadable(path, e)) from None
    if not isinstance(ckpt, dict):
        raise UserError(f'{path} is not a checkpoint (a {type(ckpt).__name__}, not a dict)')
    return ckpt


def why_unreadable(path, error):
    """One line for a file ``torch.load(weights_only=True)`` refused: not a torch file at all, or one holding
    objects that could run code when loaded (never the advice to load it unsafely), or torch's own reason."""
    with open(path, 'rb') as f:
        head = f.read(2)
    if not is_zip(path) and head != b'\x80\x02':   # torch.save's zip archive, or its legacy pickle
        return f'{path} is not a PyTorch checkpoint (neither the zip archive torch.save writes nor its older format)'
    if 'Weights only load failed' in str(error):   # torch's message advises unsafe loading: not repeated
        found = re.search(r'GLOBAL (\S+)', str(error))
        return (f'{path} holds objects other than tensors and plain values' + (f' ({found.group(1)})' if found else '')
                + ', which could run code when loaded: refused')
    return f'cannot read checkpoint {path}: {first_line(error)}'


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


class Line(NamedTuple):
    """A line of training (README "Runs you can follow"): the checkpoints of one run and of the restarts
    that continue it. A run started from scratch begins a line; a resume from a file that is not the
    furthest of its line (``--resume`` of an older checkpoint, say after a divergence) branches a new one,
    whose history is its own files and its parent's up to the file it started from. Each checkpoint
    records its line (``'line'``), args.json the line of the latest start, so that ``--resume auto`` and
    ``--keep-checkpoints`` act on that line only, although branches overwrite each other's file names."""
    id: str
    parent: Optional[str] = None          # the line it branched from; None: files that record no line
    branched_at: Optional[tuple] = None   # (epoch, iter) of the file it started from; None: from scratch

    @staticmethod
    def new(parent=None, branched_at=None):
        return Line(uuid.uuid4().hex, parent, tuple(branched_at) if branched_at is not None else None)

    @staticmethod
    def of(record):
        """The Line of a checkpoint's or args.json's ``record``; None where none is recorded."""
        if not isinstance(record, dict) or not isinstance(record.get('id'), str):
            return None
        at = record.get('branched_at')
        return Line(record['id'], record.get('parent'), tuple(at) if at is not None else None)

    def record(self):
        return {'id': self.id, 'parent': self.parent,
                'branched_at': list(self.branched_at) if self.branched_at is not None else None}

    def holds(self, record, progress):
        """Whether a checkpoint that records line ``record`` and ``progress`` (epoch, iter) is of this
        line's history: its own, or its parent's up to the branch point."""
        other = record.get('id') if isinstance(record, dict) else None
        return other == self.id or (self.branched_at is not None and other == self.parent
                                    and tuple(progress) <= self.branched_at)

    def describe(self):
        if self.branched_at is None:
            return 'began from scratch'
        epoch, it = self.branched_at
        return f'began from the checkpoint of epoch {epoch}' + (f' step {it}' if it else '')


class _Stub:
    """What ``_Skeleton`` makes of every object that is not a plain value (tensors, OrderedDicts): nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setitem__(self, key, value):
        pass

    def __setstate__(self, state):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _Skeleton(pickle.Unpickler):
    """Unpickles the plain values of a checkpoint: every class is a _Stub and no tensor is read, so that
    nothing in the file runs and a file of any size is read in milliseconds."""

    def find_class(self, module, name):
        return _Stub

    def persistent_load(self, pid):
        return None


def _peek(path):
    """(line record, (epoch, iter)) of a pretraining checkpoint, from its pickle alone (the tensors are
    neither read nor checked: ``load_checkpoint`` does that before a file is used); None for a file that
    cannot be read so."""
    try:
        with zipfile.ZipFile(path) as z:
            with z.open(next(n for n in z.namelist() if n.endswith('/data.pkl'))) as f:
                ckpt = _Skeleton(f).load()
        return ckpt.get('line'), (int(ckpt['epoch']), int(ckpt.get('iter', 0)))
    except Exception:
        return None


def _pretrain_files(folder):
    """The paths of the checkpoint_NNNN files of ``folder`` (by number), then checkpoint_last's if any."""
    names = sorted((int(m.group(1)), name) for name in os.listdir(folder) if (m := _NUMBERED.match(name)))
    paths = [os.path.join(folder, name) for _, name in names]
    last = os.path.join(folder, LAST_CHECKPOINT)
    return paths + [last] if os.path.exists(last) else paths


def _held(path, line):
    """Whether ``path`` is of ``line``'s history, or may be (no line given, or none can be read)."""
    peek = _peek(path) if line is not None else None
    return peek is None or line.holds(*peek)


def _read_pretraining(path, line=None):
    """(progress, checkpoint) of a readable pretraining checkpoint of ``line``'s history (any with None),
    progress being (epoch, iter); None, with a warning, for a file that cannot be read or is not one, and
    silently for a file of another line. A damaged file is moved aside (by rank 0; every process finds it
    damaged and passes it over)."""
    if not _held(path, line):
        return None
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
    progress = (ckpt['epoch'], ckpt.get('iter', 0))
    if line is not None and not line.holds(ckpt.get('line'), progress):
        return None
    return progress, ckpt


def latest_checkpoint(folder, line=None):
    """``(path, checkpoint)`` of the readable pretraining checkpoint of ``folder`` that is furthest in
    training (by its (epoch, iter) fields: a mid-epoch checkpoint_last.pth.tar beats the end of the
    previous epoch), or ``(None, None)``; with ``line``, among the files of its history only (``Line``).
    Unreadable files are skipped with a warning.

    checkpoint_last is weighed against the newest readable numbered file only, so a long run costs two
    full reads (other lines' files are told apart by their pickle alone), and the winner is returned
    loaded (it is not read again).
    """
    found = []
    last = os.path.join(folder, LAST_CHECKPOINT)
    if os.path.exists(last) and (read := _read_pretraining(last, line)):
        found.append((read[0], last, read[1]))
    numbered = sorted((int(m.group(1)), name) for name in os.listdir(folder) if (m := _NUMBERED.match(name)))
    for _, name in reversed(numbered):
        path = os.path.join(folder, name)
        if read := _read_pretraining(path, line):
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


def _names(paths):
    names = [os.path.basename(p) for p in paths]
    return ', '.join(names) if len(names) <= 3 else f'{names[0]}, {names[1]}, ..., {names[-1]} ({len(names)} files)'


def _latest_of_line(output_dir, line):
    """``latest_checkpoint`` of ``line`` (None: of the folder); a one-line refusal when the line has no
    readable file while the folder holds another line's: then --resume auto cannot tell which to continue."""
    path, ckpt = latest_checkpoint(output_dir, line)
    if path is None and line is not None:
        other, _ = latest_checkpoint(output_dir)
        if other is not None:
            raise UserError(f'--resume auto cannot tell which run of {output_dir} to continue: the latest start '
                            f'(args.json) {line.describe()} and left no readable checkpoint, and {other} is of another '
                            f'line of training; pass --resume {other} to continue that line, or start afresh with '
                            '--overwrite instead of --resume')
    return path, ckpt


def _line_of_start(path, ckpt, output_dir):
    """The line a resume from ``path`` continues: the file's own, unless a file of that line in
    ``output_dir`` is further in training; then (an older checkpoint given to --resume) a new line that
    branches from it."""
    own, progress = Line.of(ckpt.get('line')), (ckpt['epoch'], ckpt.get('iter', 0))
    own_id = own.id if own else None
    for other in _pretrain_files(output_dir) if os.path.isdir(output_dir) else []:
        peek = None if os.path.abspath(other) == os.path.abspath(path) else _peek(other)
        if peek and (peek[0].get('id') if isinstance(peek[0], dict) else None) == own_id and peek[1] > progress:
            print(f'=> {path} is not the furthest checkpoint of its line of training ({other} is further): this run '
                  'branches a new line from it, which --resume auto will continue')
            return Line.new(own_id, progress)
    return own or Line.new(None, progress)   # a file that records no line: its older files are the history


def _start_epoch_refusal(output_dir, start_epoch, epochs):
    files = _pretrain_files(output_dir)
    numbers = [(p, int(m.group(1))) for p in files if (m := _NUMBERED.match(os.path.basename(p)))]
    reached = [p for p, n in numbers if start_epoch <= n < epochs]   # the run writes start_epoch ... epochs - 1
    what = f'overwrite {_names(reached)}' if reached else f'write its checkpoints among {_names(files)}'
    return (f'--start-epoch {start_epoch} begins a new run in {output_dir}, which holds checkpoints: it would {what}; '
            'pass --overwrite to allow it, or --resume auto to continue the run there')


def pretraining_resume(resume, output_dir, overwrite=False, start_epoch=0, epochs=None):
    """``resolve_resume`` for pretraining, with the line of training the run continues or begins (``Line``):
    ``(path, checkpoint, line)``, path and checkpoint None for a new run.

    A run in ``output_dir`` is any checkpoint_NNNN or checkpoint_last file; 'auto' takes the furthest
    readable one of the line args.json records (in folders that record none: of all files), and refuses
    when that line has none while the folder holds others; the file found must have a pretraining
    checkpoint's keys. A new run on a folder with checkpoints needs
    ``overwrite`` (README "When things go wrong"), with ``start_epoch`` too. The partial files of killed
    saves are removed (rank 0)."""
    has_run = os.path.isdir(output_dir) and any(map(is_pretrain_checkpoint_name, os.listdir(output_dir)))
    if has_run and not resume and start_epoch > 0 and not overwrite:
        raise UserError(_start_epoch_refusal(output_dir, start_epoch, epochs if epochs is not None else float('inf')))
    current = Line.of(run_record.recorded_line(output_dir))
    path, ckpt = resolve_resume(resume, output_dir, has_run, lambda: _latest_of_line(output_dir, current),
                                'pretraining', overwrite)
    if path is not None:
        require_keys(ckpt, ['state_dict', 'epoch', 'optimizer'], path)
    if path is None:
        line = Line.new()
    elif resume == 'auto' and current is not None:
        line = current   # the file is the furthest of its line
    else:
        line = _line_of_start(path, ckpt, output_dir)
    if dist.is_main_process():
        remove_stale_temporaries(output_dir)
    return path, ckpt, line


def _note_other_lines(output_dir, line):
    """Say which files of the run folder are of another line of training: this run leaves them alone."""
    others = [p for p in _pretrain_files(output_dir) if (peek := _peek(p)) and not line.holds(*peek)]
    if others:
        print(f'note: {len(others)} checkpoint(s) in {output_dir} are of another line of training ({_names(others)}): '
              '--resume auto passes over them and --keep-checkpoints keeps them; this run overwrites those whose '
              'names it writes')


def resume_pretraining(args, settings, model, optimizer, amp, shape_flags):
    """``--resume`` of a pretraining run in one call: find the file (``pretraining_resume``), check that
    it is one, that its recorded settings agree with ``settings`` (``run_record.check_resume``: a flag of
    ``shape_flags`` must be the same, another change of the mathematics needs ``--accept-changes``) and
    that -a and --method are its own, then restore model, optimizer and scaler. Returns (path,
    checkpoint, line): path and checkpoint None for a new run; the ``Line`` its checkpoints record."""
    path, ckpt, line = pretraining_resume(args.resume, args.output_dir, args.overwrite, args.start_epoch, args.epochs)
    if dist.world_size() > 1:
        dist.any_true(False)   # a barrier: every process has read args.json's line before rank 0 rewrites it
    if dist.is_main_process() and os.path.isdir(args.output_dir):
        _note_other_lines(args.output_dir, line)
    if path is None:
        return None, None, line
    run_record.check_resume(run_record.recorded_settings(ckpt, args.output_dir), settings, path, args.accept_changes,
                            shape_flags)
    check_recorded(ckpt, path, '-a', args.arch)
    check_recorded(ckpt, path, '--method', args.method, default='mocov3')
    restore(ckpt, path, model, optimizer, amp, optimizer_flag=args.optimizer)
    print(f"=> resumed from '{path}': {ckpt['epoch']} epoch(s) done"
          + (f", continuing epoch {ckpt['epoch'] + 1} at step {ckpt['iter'] + 1}" if ckpt.get('iter') else ""))
    return path, ckpt, line


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


def save_pretraining(state, output_dir, epochs_done, iters_done=0, keep=0, every=0):
    """Pretraining's files (the original's naming): at an epoch's end ``checkpoint_NNNN.pth.tar``
    (NNNN = epochs done - 1), which makes a rolling mid-epoch ``checkpoint_last.pth.tar`` of its line
    obsolete, and of the numbered files of its line only the ``keep`` newest and those of every
    ``every``-th epoch kept (``thin_checkpoints``; the line is the one ``state`` records, ``Line``); inside
    an epoch (``iters_done`` > 0) the rolling file. Rank 0 writes them."""
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
    line = Line.of(state.get('line'))
    last = os.path.join(output_dir, LAST_CHECKPOINT)
    if _held(last, line):
        remove_file(last)  # older than the file just written
    thin_checkpoints(output_dir, keep, protect=path, line=line, every=every)


def is_kept(epochs_done, keep_every):
    """Whether the checkpoint after ``epochs_done`` epochs is one of the periodic ones (``--keep-every``)."""
    return keep_every > 0 and epochs_done % keep_every == 0


def thin_checkpoints(folder, keep, protect=None, line=None, every=0):
    """Delete the checkpoint_NNNN.pth.tar of folder but the ``keep`` newest (keep <= 0: keep all) and those
    after every ``every``-th epoch (``is_kept``), and never ``protect`` (the intact file just written,
    whatever numbers other files carry). With ``line``, only the files of its history count and go:
    another line's, and files whose line cannot be read, stay."""
    if keep <= 0:
        return
    names = sorted((int(m.group(1)), name) for name in os.listdir(folder) if (m := _NUMBERED.match(name)))
    if line is not None:
        names = [(n, name) for n, name in names if (peek := _peek(os.path.join(folder, name))) and line.holds(*peek)]
    for n, name in names[:-keep]:
        if not is_kept(n + 1, every) and (protect is None or os.path.join(folder, name) != protect):
            remove_file(os.path.join(folder, name))


OPTIMIZER_SLOTS = {'lars': 1, 'sgd': 1, 'adamw': 2}   # tensors of state per trainable parameter


def checkpoint_bytes(model, optimizer_name):
    """About how many bytes a pretraining checkpoint of ``model`` takes: its state_dict and the optimizer's
    state (momentum buffers; AdamW's two moments), which only exists after the first step."""
    tensors = sum(t.numel() * t.element_size() for t in dist.unwrap(model).state_dict().values())
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)   # fp32 state
    return tensors + OPTIMIZER_SLOTS.get(optimizer_name, 1) * trainable


def kept_checkpoints(epochs, keep, every):
    """The numbered checkpoints (by epochs done) a run of ``epochs`` epochs keeps at its end."""
    if keep <= 0:
        return list(range(1, epochs + 1))
    return sorted({e for e in range(1, epochs + 1) if is_kept(e, every)} | set(range(max(1, epochs - keep + 1),
                                                                                   epochs + 1)))


def describe_keeping(model, optimizer_name, epochs, keep, every):
    """The start-up line: what a checkpoint weighs and what the run keeps of them."""
    size = checkpoint_bytes(model, optimizer_name)
    kept = kept_checkpoints(epochs, keep, every)
    rule = ('every epoch\'s (--keep-checkpoints 0, as the original)' if keep <= 0 else
            f'the newest {keep}' + (f' and every {every}th epoch\'s' if every > 0 else '')
            + ' (--keep-checkpoints 0 keeps all, as the original)')
    return (f'checkpoints: about {_in_units(size)} each; keeping {rule}: {len(kept)} file(s), about '
            f'{_in_units(len(kept) * size)} after {epochs} epochs')


def _in_units(size):
    return f'{size / 2 ** 30:,.1f} GiB' if size >= 2 ** 30 else f'{max(1, round(size / 2 ** 20)):,} MiB'


# ---- backbone weights of a pretraining checkpoint (linear probe, DeiT conversion, fine-tuning) ----


# The evaluated encoder of files that do not record ``eval_encoder`` (older ones), by their method: a
# fact of those files (newer ones record it), the same as each method's class declares (moco/builder.py,
# tested); unlisted methods, and files without a method (the original release's), evaluate base_encoder.
LEGACY_EVAL_ENCODERS = {'m2t': 'momentum_encoder'}   # Momentum² Teacher: the teacher, with its momentum-BN statistics


def evaluated_encoder(method):
    """The encoder of a pretraining checkpoint that is evaluated, for files that do not record it."""
    return LEGACY_EVAL_ENCODERS.get(method, 'base_encoder')


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
