"""What the command lines share beyond their flags: ``--help`` that shows every default, one-line
errors for a mistyped command line, an architecture flag that suggests the name meant (and whose help
names every family), and the checks of numbers and folders made before a run creates anything."""
import argparse
import difflib
import os
import re

from moco.errors import UserError


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` with each flag's default, unless its help already states it (or there is none)."""

    def _get_help_string(self, action):
        text = action.help or ''
        if '(default' in text or action.default in (None, False, argparse.SUPPRESS, '') \
                or action.option_strings == [] or isinstance(action.default, bool):
            return text
        return f'{text} (default: %(default)s)'


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line on stderr, ``error: <what is wrong> (<how to see the
    flags>)``, exit 2, without the usage block argparse prints first (20 lines before the one that helps)."""

    def error(self, message):
        self.exit(2, f'error: {message} ({help_command(self.prog)} lists the flags)\n')


def help_command(prog):
    """How to get the --help of ``prog`` as typed: ``python main_moco.py --help``."""
    if prog.endswith('.py') and not prog.startswith('python'):
        prog = f'python {prog}'
    return f'{prog} --help'


def parser(description, prog=None):
    return ArgumentParser(description=description, prog=prog, formatter_class=HelpFormatter)


def choice_type(names, what='architecture'):
    """An argparse ``type`` accepting one of ``names``; a wrong one is answered with the closest ones
    (or, when none is close, with all of them, by family: ``compact_names``)."""
    names = list(names)

    def check(value):
        if value in names:
            return value
        close = difflib.get_close_matches(value, names, n=3, cutoff=0.6)
        hint = (f'; did you mean {", ".join(close[:-1]) + " or " if close[1:] else ""}{close[-1]}?' if close
                else f'; one of: {compact_names(names)}')
        raise argparse.ArgumentTypeError(f'unknown {what} {value!r}{hint}')
    check.__name__ = what
    return check


# Name families that ``compact_names`` writes in brace form (``resnet{18,34,50}``): a pattern whose group
# ``v`` varies within the family, and the label of the section the family belongs to.
_FAMILIES = (
    ('ViTs', r'vit_(?P<v>[a-z]+)'), ('ViTs', r'vit_conv_(?P<v>[a-z]+)'),
    ('32 px', r'vit_(?P<v>[a-z]+)_patch4'), ('32 px', r'resnet(?P<v>\d+)_cifar'), ('32 px', r'resnet10_w(?P<v>\d+)'),
    ('torchvision', r'resnet(?P<v>\d+)'), ('torchvision', r'resnext(?P<v>\d+_\w+)'),
    ('torchvision', r'wide_resnet(?P<v>\d+_\d+)'), ('torchvision', r'regnet_x_(?P<v>\w+)'),
    ('torchvision', r'regnet_y_(?P<v>\w+)'),
)
_SIZES = ('mini', 'tiny', 'small', 'base', 'large', 'huge')


def _size_key(v):
    """Order of the varying part of a family: ViT sizes small to large, numbers (1_6gf: 1.6 GFLOPs) ascending."""
    if v in _SIZES:
        return 0, _SIZES.index(v), v
    m = re.match(r'(\d+)(?:_(\d+))?([a-z]*)', v)
    if not m:
        return 2, 0, v
    number = float(m[1] + ('.' + m[2] if m[2] and m[3] in ('mf', 'gf') else ''))
    return 1, number * (1000 if m[3] == 'gf' else 1), v


def compact_names(names):
    """``names`` (architectures) in a short form that still names every one: by section (ViTs, 32 px,
    torchvision), a family in brace form, e.g. ``ViTs: vit_{tiny,small,base} | torchvision: resnet{18,50}``;
    a name of no known family is written as it is."""
    families, others = {}, []   # (family's index in _FAMILIES, prefix, suffix): its varying parts
    for name in names:
        for index, (_, pattern) in enumerate(_FAMILIES):
            m = re.fullmatch(pattern, name)
            if m:
                families.setdefault((index, name[:m.start('v')], name[m.end('v'):]), []).append(m['v'])
                break
        else:
            others.append(name)
    sections = {}
    for (index, prefix, suffix), variants in sorted(families.items()):
        variants = sorted(variants, key=_size_key)
        middle = variants[0] if len(variants) == 1 else '{' + ','.join(variants) + '}'
        sections.setdefault(_FAMILIES[index][0], []).append(prefix + middle + suffix)
    if others:
        sections['other'] = others
    return ' | '.join(f'{section}: {", ".join(written)}' for section, written in sections.items())


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
