"""``timm_gsl.cli.flags``: the flags train.py and validate.py share are declared once and read the same in both."""
import argparse

import pytest

from timm_gsl.cli import flags
from timm_gsl.cli.train_args import get_args_parser as train_parser
from timm_gsl.cli.validate import get_args_parser as validate_parser

# Where timm's two scripts differ, ours do too (tests/data holds timm's flag lists, compared in test_train.py
# and test_validate.py): the default model and batch size; validate.py also names --model -m.
DIFFERENT_DEFAULTS = {'model': ('resnet50', 'dpn92'), 'batch_size': (128, 256)}


def _actions(parser):
    return {a.dest: a for a in parser._actions if a.dest != 'help'}


def _shared_dests():
    probe = argparse.ArgumentParser(add_help=False)
    flags.add_dataset_flags(probe)
    flags.add_model_flags(probe, model_default='m', batch_size_default=1)
    flags.add_device_flags(probe)
    flags.add_loader_flags(probe)
    flags.add_naflex_flags(probe, training=False)
    return set(_actions(probe))


SHARED = sorted(_shared_dests())


def test_the_shared_declarations_are_the_flags_both_commands_have():
    train, validate = _actions(train_parser()), _actions(validate_parser())
    assert set(SHARED) <= set(train) & set(validate)
    # Every flag both commands have comes from the shared declarations.
    assert set(train) & set(validate) == set(SHARED)


@pytest.mark.parametrize('dest', SHARED)
def test_a_shared_flag_has_one_help_text_and_one_default(dest):
    train, validate = _actions(train_parser())[dest], _actions(validate_parser())[dest]
    if dest in DIFFERENT_DEFAULTS:  # the help names the default
        assert train.help.replace(str(train.default), '?') == validate.help.replace(str(validate.default), '?')
    else:
        assert train.help == validate.help
    assert set(train.option_strings) <= set(validate.option_strings)
    if dest in DIFFERENT_DEFAULTS:
        assert (train.default, validate.default) == DIFFERENT_DEFAULTS[dest]
    else:
        assert train.default == validate.default
    assert (train.nargs, train.const, train.metavar) == (validate.nargs, validate.const, validate.metavar)


def test_class_subset_reads_a_count_or_a_file():
    assert flags.class_subset_value(' 7 ') == 7
    assert flags.class_subset_value('classes.txt') == 'classes.txt'
    with pytest.raises(argparse.ArgumentTypeError, match='number of classes K or a file'):
        flags.class_subset_value(' ')


def test_one_rule_for_the_dataset_root_and_the_input_channels():
    ns = argparse.Namespace
    assert flags.dataset_root(ns(data='a', data_dir=None)) == 'a'
    assert flags.dataset_root(ns(data=None, data_dir='b')) == 'b'
    assert flags.dataset_root(ns(data='b', data_dir='b')) == 'b'
    with pytest.raises(ValueError, match=r"DIR 'a' and --data-dir 'b' name two dataset roots"):
        flags.dataset_root(ns(data='a', data_dir='b'))
    assert flags.input_channels(ns(in_chans=None, input_size=None)) == 3
    assert flags.input_channels(ns(in_chans=None, input_size=[1, 28, 28])) == 1
    assert flags.input_channels(ns(in_chans=4, input_size=[1, 28, 28])) == 4  # --in-chans wins, as in timm

