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


def require_output_folder(path):
    """--output-dir must be a folder or not exist yet (a file of that name is a mistake)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f'--output-dir {path} is a file, not a folder; choose another --output-dir')


def warn_short_schedule(epochs, warmup_epochs):
    if epochs < warmup_epochs:
        print(f'warning: --epochs {epochs} is shorter than --warmup-epochs {warmup_epochs}: the lr never '
              f'reaches the printed value (it stops at {epochs / warmup_epochs:.0%} of it); lower --warmup-epochs')
