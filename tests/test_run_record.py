"""moco/run_record.py: which settings a resume may change without --accept-changes."""
import main_lincls
import main_moco
from moco import run_record
from transfer import finetune


def _dests(parser):
    return {action.dest for action in parser._actions}


def test_every_operational_setting_is_a_flag_of_a_program():
    """A name in OPERATIONAL that no parser has (a typo) would make changing that flag demand --accept-changes."""
    flags = set().union(*(_dests(m.get_args_parser()) for m in (main_moco, main_lincls, finetune)))
    assert run_record.OPERATIONAL <= flags, sorted(run_record.OPERATIONAL - flags)


def test_changing_stop_signals_or_workers_on_resume_needs_no_accept_changes(capsys):
    recorded = {'stop_signals': 'SIGUSR1', 'workers': 8, 'lr': 0.6}
    now = {'stop_signals': 'SIGTERM,SIGUSR1', 'workers': 4, 'lr': 0.6}
    assert run_record.check_resume(recorded, now, 'ckpt', accept_changes=False) == []
    try:
        run_record.check_resume(recorded, {**now, 'lr': 0.3}, 'ckpt', accept_changes=False)
    except Exception as e:   # the mathematics changed: refused, naming the flag
        assert '1 setting(s) differ' in str(e) and '--lr' in capsys.readouterr().out
    else:
        raise AssertionError('a changed --lr must need --accept-changes')
