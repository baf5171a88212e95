"""moco/cli.py: a mistyped command line of our programs is one line on stderr and exit 2 (no usage block),
a mistyped -a gets the names meant, and the architectures are named compactly, every family."""
import re
import subprocess
import sys

import pytest

import main_lincls
import main_moco
from helpers import ROOT, cli_env
from moco import cli
from moco.models import arch_names


def parse_error(parser, argv, capsys):
    """The stderr lines of ``parser.parse_args(argv)``, which must exit 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv)
    captured = capsys.readouterr()
    assert e.value.code == 2 and captured.out == ''
    return captured.err.splitlines()


@pytest.mark.parametrize('script', [main_moco, main_lincls])
def test_a_mistyped_arch_is_one_line_with_the_names_meant(script, capsys):
    lines = parse_error(script.get_args_parser(), ['-a', 'resnt50', 'DIR'], capsys)
    assert len(lines) == 1 and lines[0].startswith('error: argument -a/--arch: unknown architecture'), lines
    assert "'resnt50'; did you mean resnet50" in lines[0] and '--help' in lines[0] and 'usage' not in lines[0]
    lines = parse_error(script.get_args_parser(), ['-a', 'mobilenet', 'DIR'], capsys)   # nothing close: every name
    assert len(lines) == 1 and 'resnet{18,34,50,101,152}' in lines[0] and 'regnet_x_{' in lines[0], lines


@pytest.mark.parametrize('script, argv', [
    (main_moco, []),                                    # no DIR
    (main_moco, ['--epochs', 'ten', 'DIR']),            # not a number
    (main_moco, ['--method', 'byl', 'DIR']),            # argparse's choices
    (main_moco, ['--no-such-flag', 'DIR']),
    (main_lincls, ['--lr', 'x', 'DIR']),
])
def test_every_command_line_mistake_is_one_line(script, argv, capsys):
    lines = parse_error(script.get_args_parser(), argv, capsys)
    assert len(lines) == 1 and lines[0].startswith('error: ') and '--help lists the flags' in lines[0], lines


def test_the_scripts_own_command_line_names_its_help():
    """As a user meets it: the whole of stderr is one line, which says how to see the flags."""
    run = subprocess.run([sys.executable, 'main_moco.py', '-a', 'vit_smal', 'DIR'], cwd=ROOT, env=cli_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stdout == ''
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("error: argument -a/--arch: unknown architecture 'vit_smal'; did you mean vit_small,")
    assert lines[0].endswith('? (python main_moco.py --help lists the flags)'), lines


def expand(written):
    """The names of compact_names's form: 'a: x{1,2}y, z | b: w' -> [x1y, x2y, z, w]."""
    names = []
    for section in written.split(' | '):
        items = section.split(': ', 1)[1]
        for item in re.findall(r'[^,{}\s]*(?:\{[^}]*\})?[^,{}\s]*', items):
            m = re.fullmatch(r'(.*)\{(.*)\}(.*)', item)
            names += [m[1] + v + m[3] for v in m[2].split(',')] if m else [item] if item else []
    return names


def test_the_architectures_are_named_by_family_every_one():
    written = cli.compact_names(arch_names())
    assert sorted(expand(written)) == sorted(arch_names())     # nothing left out
    assert [s.split(':')[0] for s in written.split(' | ')] == ['ViTs', '32 px', 'torchvision']
    assert 'resnet{18,34,50,101,152}' in written and 'regnet_y_{400mf,800mf,1_6gf,3_2gf,8gf,16gf,32gf,128gf}' in written
    assert len(written) < len(', '.join(arch_names())) * 0.7
    assert cli.compact_names(['resnet50', 'custom_net']) == 'torchvision: resnet50 | other: custom_net'
