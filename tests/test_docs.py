"""The commands README.md, CONFIG.md and transfer/README.md show are accepted by the programs they call:
every flag exists and takes the value written (placeholders such as ``[your imagenet-folder]`` become a
folder name). Recipes run nothing here; tests/test_cifar_tools.py runs the CIFAR ones shrunk."""
import os
import re
import shlex

import pytest

import convert_to_deit
import main_lincls
import main_moco
from helpers import ROOT
from transfer import finetune

PROGRAMS = {'main_moco.py': main_moco, 'main_lincls.py': main_lincls, 'convert_to_deit.py': convert_to_deit,
            'transfer.finetune': finetune}
PLACEHOLDER = {'-a': 'resnet50', '--lr': '0.1', '--rank': '0'}   # a value for ``-a [arch]`` and the like
DOCS = ('README.md', 'CONFIG.md', os.path.join('transfer', 'README.md'))


def documented_commands():
    """(document, command words after the program, program) of every command line in a fenced block."""
    found = []
    for doc in DOCS:
        text = open(os.path.join(ROOT, doc)).read()
        for block in re.findall(r'```[^\n]*\n(.*?)```', text, flags=re.S):
            for line in block.replace('\\\n', ' ').splitlines():
                line = line.split(' # ')[0].strip()
                if '$' in line or ' ... ' in line or '[flags]' in line or '[the same flags' in line:
                    continue   # shell variables or an elided command: nothing definite to check
                if not any(name in line for name in PROGRAMS):
                    continue
                line = re.sub(r'\[(\w+)\|[^\]]*\]', r'\1', line)       # [mocov3|byol|m2t] -> mocov3
                line = re.sub(r'(-a|--lr|--rank) \[[^\]]*\]', lambda m: f'{m[1]} {PLACEHOLDER[m[1]]}', line)
                line = re.sub(r'\[[^\]]*\]', 'DIR', line)              # [your folder ...] -> DIR
                words = shlex.split(line)
                for k, word in enumerate(words):
                    name = word if word in PROGRAMS else (words[k + 1] if word == '-m' and k + 1 < len(words)
                                                          else None)
                    if name in PROGRAMS:
                        rest = words[k + (2 if word == '-m' else 1):]
                        found.append(pytest.param(doc, PROGRAMS[name], rest, id=f'{doc}: {name} {" ".join(rest)[:60]}'))
                        break
    return found


COMMANDS = documented_commands()


def test_the_documents_hold_commands_of_every_program():
    assert {id(p.values[1]) for p in COMMANDS} == {id(m) for m in PROGRAMS.values()}


@pytest.mark.parametrize('doc, program, argv', COMMANDS)
def test_every_documented_command_parses(doc, program, argv, capsys):
    try:
        program.get_args_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f'{" ".join(argv)}: {capsys.readouterr().err.strip()}')
    if doc == 'CONFIG.md':   # its promise: every command runs with or without a GPU (--gpu fails on a CPU)
        assert not any(a.startswith('--gpu') for a in argv), ' '.join(argv)


def test_readme_says_how_to_reach_the_environment_it_creates():
    """`make` installs into .venv; README's commands (python main_moco.py ...) need it on the PATH."""
    start = open(os.path.join(ROOT, 'README.md')).read().split('## ', 2)[1]
    assert 'make demo' in start and 'make test' in start and 'source .venv/bin/activate' in start
