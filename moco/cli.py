"""What the command lines share beyond their flags: ``--help`` that shows every default, an
architecture flag that suggests the name meant, and the checks of numbers and folders made before a
run creates anything."""
import argparse
import difflib
import os

from moco.errors import UserError


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` with each flag's default, unless its help already states it (or there is none)."""

    def _get_help_string(self, action):
        text = action.help or ''
        if '(default' in text or action.default in (None, False, argparse.SUPPRESS, '') \
                or action.option_strings == [] or isinstance(action.default, bool):
            return text
        return f'{text} (default: %(default)s)'


def parser(description, prog=None):
    return argparse.ArgumentParser(description=description, prog=prog, formatter_class=HelpFormatter)


def choice_type(names, what='architecture'):
    """An argparse ``type`` accepting one of ``names``; a wrong one is answered with the closest ones."""
    names = list(names)

    def check(value):
        if value in names:
            return value
        close = difflib.get_close_matches(value, names, n=3, cutoff=0.6)
        hint = f'; did you mean {" or ".join(close)}?' if close else f' (one of: {", ".join(names[:8])}, ...)'
        raise argparse.ArgumentTypeError(f'unknown {what} {value!r}{hint}')
    check.__name__ = what
    return check


def require_positive(args, *names):
    for name in names:
        if getattr(args, name) <= 0:
            raise UserError(f'--{name.replace("_", "-")} must be positive (got {getattr(args, name)})')


def require_not_negative(args, *names):
    for name in names:
        if getattr(args, name) < 0:
            raise UserError(f'--{name.replace("_", "-")} must not be negative (got {getattr(args, name)})')


def path(value):
    """An argparse ``type`` for paths: ``~`` expanded (the shell leaves ``--output-dir=~/runs`` alone)."""
    return os.path.expanduser(value)


def require_output_folder(path, flag='--output-dir'):
    """--output-dir must be a folder or not exist yet (a file of that name is a mistake), and be a place
    where a folder can be made (not under a file, a read-only place, /proc or /sys)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f'{flag} {path} is a file, not a folder; choose another {flag}')
    ancestor = os.path.abspath(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise UserError(f'cannot create {flag} {path}: {ancestor} is a file')
    if not os.access(ancestor, os.W_OK | os.X_OK) or ancestor.startswith(('/proc', '/sys')):
        raise UserError(f'cannot create {flag} {path}: {ancestor} is not writable')


def make_parent_folder(path, flag):
    """The folder of an output file, made if needed; a one-line error when it cannot be."""
    folder = os.path.dirname(os.path.abspath(path))
    require_output_folder(folder, f'the folder of {flag}')
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot create the folder of {flag} {path}: {e.strerror}') from None
    return folder


def warn_short_schedule(epochs, warmup_epochs):
    if epochs < warmup_epochs:
        print(f'warning: --epochs {epochs} is shorter than --warmup-epochs {warmup_epochs}: the lr never '
              f'reaches the printed value (it stops at {epochs / warmup_epochs:.0%} of it); lower --warmup-epochs')
