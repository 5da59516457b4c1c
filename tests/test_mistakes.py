"""Every user mistake gets one clear line, before any expensive work, and nothing is left behind (issue 12).

A table of mistakes across ``train.py``, ``validate.py`` and ``python -m timm_gsl push/export``: a model
timm does not have, files that are not checkpoints (text, random bytes, truncated, empty, a folder, the
weights of another model), missing files and folders, unknown flags and values, bad combinations. Each
must end with exit status 2 and, as the last lines of stderr, exactly one ``<prog>: error: <message>``
line naming the offending value (plus at most one hint line), with no usage block and no traceback,
and leave no file behind.

All of them run in-process (each costs milliseconds: they are refused before any dataset is read), and
a handful also as real subprocesses, started together, to show that what reaches a terminal is the
same: no traceback, no usage block, nothing written.
"""
import argparse
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_gsl.cli.hub as gsl_main
from timm_gsl.cli import train as train_py
from timm_gsl.cli import validate as validate_py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Should a check fail to refuse, the run stays tiny (and its output folder fails the no-new-file check).
TRAIN = ['--model', 'test_resnet', '--epochs', '1', '--train-batches-per-epoch', '1', '-b', '8', '-vb', '50',
         '--no-train-eval', '--device', 'cpu']
VALIDATE = ['--device', 'cpu', '-j', '0']
COMMANDS = {
    'train': ('timm_gsl.train', 'train.py', train_py.main),
    'validate': ('timm_gsl.validate', 'validate.py', validate_py.main),
    'gsl': ('timm_gsl', 'python -m timm_gsl', gsl_main.main),
}

# id: (command, arguments, texts the error line must hold). Paths are relative to the working folder.
MISTAKES = {
    # --- train.py: names timm does not know, caught before any data is read
    'train_unknown_model': ('train', TRAIN + ['--model', 'resnet5O'],
                            ["--model 'resnet5O'", 'timm has no model', 'did you mean resnet50']),
    'train_unknown_pretrained_tag': ('train', TRAIN + ['--model', 'test_resnet.bogus_in1k'],
                                     ["'test_resnet.bogus_in1k'", "no pretrained tag 'bogus_in1k'", 'r160_in1k']),
    'train_repo_id_as_model': ('train', TRAIN + ['--model', 'org/model'], ["'org/model'", 'hf-hub:org/model']),
    'train_missing_local_dir': ('train', TRAIN + ['--model', 'local-dir:nowhere'],
                                ["'local-dir:nowhere'", 'no such folder']),
    'train_pretrained_without_weights': ('train', TRAIN + ['--model', 'coatnet_0_224', '--pretrained'],
                                         ['--pretrained', 'no pretrained weights for --model coatnet_0_224']),
    'train_unknown_optimizer': ('train', TRAIN + ['--opt', 'adamm'], ["--opt 'adamm'", 'did you mean adam']),
    'train_unknown_scheduler': ('train', TRAIN + ['--sched', 'cosin'], ["--sched 'cosin'"]),
    'train_unknown_model_kwarg': ('train', TRAIN + ['--model-kwargs', 'depht=2'],
                                  ['--model-kwargs depht=2', "unexpected keyword argument 'depht'"]),
    'train_groups_above_feature_size': ('train', TRAIN + ['--gsl-groups', '97'],
                                        ['--gsl-groups 97', 'test_resnet (96', '<= 96']),
    'train_two_dataset_roots': ('train', TRAIN + ['one', '--data-dir', 'two'],
                                ["DIR 'one' and --data-dir 'two' name two dataset roots", 'pass one']),
    'train_kd_options_without_teacher': ('train', TRAIN + ['--loss', 'ce', '--kd-temperature', '2'],
                                         ['--kd-temperature', 'no teacher was given', '--kd-model-name']),
    'train_unknown_teacher': ('train', TRAIN + ['--kd-model-name', 'resnet5O'], ["--kd-model-name 'resnet5O'"]),
    'train_naflex_with_a_cnn': ('train', TRAIN + ['--naflex-loader'],
                                ['--naflex-loader needs a NaFlex model', 'test_resnet']),
    'train_tta_above_two': ('train', TRAIN + ['--tta', '4'], ['--tta 4', 'takes 0 (off), 1 (off) or 2']),
    # --- train.py: checkpoints that are not checkpoints
    'train_resume_missing': ('train', TRAIN + ['--resume', 'missing.pth.tar'],
                             ["--resume 'missing.pth.tar'", 'no such file']),
    'train_resume_text': ('train', TRAIN + ['--resume', 'text.pth.tar'],
                          ["--resume 'text.pth.tar' is not a readable checkpoint"]),
    'train_resume_notes': ('train', TRAIN + ['--resume', 'notes.pth.tar'],
                           ["--resume 'notes.pth.tar' is not a readable checkpoint (IndexError"]),
    'train_resume_random_bytes': ('train', TRAIN + ['--resume', 'random.pth.tar'],
                                  ["--resume 'random.pth.tar' is not a readable checkpoint"]),
    'train_resume_truncated': ('train', TRAIN + ['--resume', 'truncated.pth.tar'],
                               ["--resume 'truncated.pth.tar' is not a readable checkpoint"]),
    'train_resume_empty': ('train', TRAIN + ['--resume', 'empty.pth.tar'],
                           ["--resume 'empty.pth.tar' is an empty file"]),
    'train_resume_folder': ('train', TRAIN + ['--resume', 'folder.pth.tar'],
                            ["--resume 'folder.pth.tar' is a folder"]),
    'train_resume_safetensors': ('train', TRAIN + ['--resume', 'vit.safetensors'],
                                 ["--resume 'vit.safetensors'", 'weights only']),
    'train_initial_checkpoint_random_bytes': ('train', TRAIN + ['--initial-checkpoint', 'random.pth.tar'],
                                              ["--initial-checkpoint 'random.pth.tar' is not a readable"]),
    'train_initial_checkpoint_other_model': ('train', TRAIN + ['--initial-checkpoint', 'vit.safetensors'],
                                             ["--initial-checkpoint 'vit.safetensors'", 'does not fit --model '
                                              'test_resnet']),
    # --- train.py: other files and folders, flags and values
    'train_missing_class_subset_file': ('train', TRAIN + ['--class-subset', 'classes.txt'],
                                        ["--class-subset 'classes.txt'", 'no such file']),
    'train_missing_data_dir': ('train', TRAIN + ['--data-dir', 'nowhere'], ["--data-dir 'nowhere'", 'no such file']),
    'train_missing_config': ('train', TRAIN + ['-c', 'missing.yaml'], ["-c/--config 'missing.yaml'", 'no such file']),
    'train_output_is_a_file': ('train', TRAIN + ['--output', 'a_file'], ["--output 'a_file' is a file"]),
    'train_unknown_device': ('train', TRAIN + ['--device', 'tpu9'], ["--device 'tpu9'"]),
    'train_bce_with_gsl': ('train', TRAIN + ['--bce-loss'], ['--loss gsl cannot be combined with --bce-loss']),
    'train_unknown_flag': ('train', TRAIN + ['--epochz', '3'], ['unrecognized arguments: --epochz']),
    'train_not_a_number': ('train', TRAIN + ['--epochs', 'ten'], ["argument --epochs: invalid int value: 'ten'"]),
    'train_unknown_loss': ('train', TRAIN + ['--loss', 'gls'], ["argument --loss: invalid choice: 'gls'"]),
    # --- validate.py
    'validate_two_dataset_roots': ('validate', VALIDATE + ['one', '--data-dir', 'two'],
                                   ["DIR 'one' and --data-dir 'two' name two dataset roots"]),
    'validate_missing_checkpoint': ('validate', VALIDATE + ['--checkpoint', 'missing.pth.tar'],
                                    ["--checkpoint 'missing.pth.tar': no such file"]),
    'validate_text_checkpoint': ('validate', VALIDATE + ['--checkpoint', 'text.pth.tar'],
                                 ["--checkpoint 'text.pth.tar' is not a readable checkpoint"]),
    'validate_truncated_checkpoint': ('validate', VALIDATE + ['--checkpoint', 'truncated.pth.tar'],
                                      ["--checkpoint 'truncated.pth.tar' is not a readable checkpoint"]),
    'validate_empty_checkpoint': ('validate', VALIDATE + ['--checkpoint', 'empty.pth.tar'],
                                  ["--checkpoint 'empty.pth.tar' is an empty file"]),
    'validate_folder_without_checkpoints': ('validate', VALIDATE + ['--checkpoint', 'empty_folder'],
                                            ["--checkpoint 'empty_folder' is a folder without any"]),
    'validate_weights_of_another_model': ('validate', VALIDATE + ['--checkpoint', 'vit.safetensors', '--model',
                                                                  'test_resnet', '--num-classes', '10'],
                                          ["--checkpoint 'vit.safetensors'", 'does not fit --model test_resnet']),
    'validate_unknown_model': ('validate', VALIDATE + ['--checkpoint', 'good.pth.tar', '--model', 'resnet5O'],
                               ["--model 'resnet5O'", 'did you mean resnet50']),
    'validate_checkpoint_of_unknown_model': ('validate', VALIDATE + ['--checkpoint', 'unknown_arch.pth.tar'],
                                             ["--checkpoint 'unknown_arch.pth.tar' records --model 'no_such_net_xyz'"]),
    'validate_pattern_matching_nothing': ('validate', VALIDATE + ['--model', 'resnet5O*'],
                                          ["--model 'resnet5O*'", 'matches no pretrained timm model']),
    'validate_results_file_in_missing_folder': ('validate', VALIDATE + ['--checkpoint', 'good.pth.tar',
                                                                        '--results-file', 'nodir/results.csv'],
                                                ["--results-file 'nodir/results.csv'", "no such folder 'nodir'"]),
    'validate_missing_class_subset_file': ('validate', VALIDATE + ['--checkpoint', 'good.pth.tar',
                                                                   '--class-subset', 'classes.txt'],
                                           ["--class-subset 'classes.txt'", 'no such file']),
    'validate_bad_results_format': ('validate', VALIDATE + ['--checkpoint', 'good.pth.tar', '--results-format', 'xml'],
                                    ["--results-format 'xml'"]),
    'validate_unknown_flag': ('validate', VALIDATE + ['--chekpoint', 'good.pth.tar'],
                              ['unrecognized arguments: --chekpoint']),
    # --- python -m timm_gsl push / export
    'push_text': ('gsl', ['push', 'text.pth.tar', '--repo-id', 'org/name', '--token', 'unused'],
                  ["checkpoint 'text.pth.tar' is not a readable checkpoint"]),
    'push_random_bytes': ('gsl', ['push', 'random.pth.tar', '--repo-id', 'org/name', '--token', 'unused'],
                          ["checkpoint 'random.pth.tar' is not a readable checkpoint"]),
    'push_truncated': ('gsl', ['push', 'truncated.pth.tar', '--repo-id', 'org/name', '--token', 'unused'],
                       ["checkpoint 'truncated.pth.tar' is not a readable checkpoint"]),
    'push_empty': ('gsl', ['push', 'empty.pth.tar', '--repo-id', 'org/name', '--token', 'unused'],
                   ["checkpoint 'empty.pth.tar' is an empty file"]),
    'push_folder': ('gsl', ['push', 'folder.pth.tar', '--repo-id', 'org/name', '--token', 'unused'],
                    ["checkpoint 'folder.pth.tar' is a folder"]),
    'push_weights_only': ('gsl', ['push', 'vit.safetensors', '--repo-id', 'org/name', '--token', 'unused'],
                          ["checkpoint 'vit.safetensors' records no training arguments"]),
    'push_bad_repo_id': ('gsl', ['push', 'good.pth.tar', '--repo-id', 'org/bad name', '--token', 'unused'],
                         ["argument --repo-id: Invalid repo_id 'org/bad name'"]),
    'export_text': ('gsl', ['export', 'text.pth.tar', 'exported'], ["checkpoint 'text.pth.tar' is not a readable"]),
    'export_notes': ('gsl', ['export', 'notes.pth.tar', 'exported'], ["checkpoint 'notes.pth.tar' is not a readable"]),
    'export_unknown_architecture': ('gsl', ['export', 'unknown_arch.pth.tar', 'new/deeper/exported'],
                                    ["checkpoint 'unknown_arch.pth.tar'", "unknown architecture 'no_such_net_xyz'"]),
    'export_wrong_number_of_classes': ('gsl', ['export', 'wrong_classes.pth.tar', 'new/exported'],
                                       ["checkpoint 'wrong_classes.pth.tar'", 'do not fit', 'num_classes=7']),
    'export_into_a_full_folder': ('gsl', ['export', 'good.pth.tar', 'full_folder'],
                                  ["FOLDER 'full_folder' exists and is not an empty folder"]),
    'export_under_a_file': ('gsl', ['export', 'good.pth.tar', 'a_file/exported'],
                            ["FOLDER 'a_file/exported' cannot be created", 'is a file']),
    'unknown_command': ('gsl', ['pish', 'good.pth.tar'], ["argument COMMAND: invalid choice: 'pish'"]),
}

# Run again as real subprocesses: at least one per command, one per kind of check.
# (Each costs 4 to 10 s of CPU for importing torch and timm: a handful, the rest run in-process.)
SUBPROCESS_CASES = ['train_unknown_model', 'train_resume_notes', 'validate_truncated_checkpoint', 'push_random_bytes',
                    'export_unknown_architecture']


def test_the_table_covers_at_least_25_mistakes_of_every_command():
    commands = [command for command, _, _ in MISTAKES.values()]
    assert len(MISTAKES) >= 25
    assert {'train', 'validate', 'gsl'} == set(commands)
    assert {'push', 'export'} <= {args[0] for command, args, _ in MISTAKES.values() if command == 'gsl'}


def _make_inputs(folder):
    """The files the mistakes name, in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=10)
    args = dict(model='test_resnet', num_classes=10, img_size=28, dataset='embedded/fashion-mnist')
    checkpoint = {'arch': 'test_resnet', 'epoch': 0, 'state_dict': model.state_dict(),
                  'args': argparse.Namespace(**args)}
    torch.save(checkpoint, os.path.join(folder, 'good.pth.tar'))
    torch.save(dict(checkpoint, args=argparse.Namespace(**dict(args, num_classes=7))),
               os.path.join(folder, 'wrong_classes.pth.tar'))
    torch.save(dict(checkpoint, args=argparse.Namespace(**dict(args, model='no_such_net_xyz'))),
               os.path.join(folder, 'unknown_arch.pth.tar'))
    save_file(timm.create_model('test_vit', num_classes=10).state_dict(), os.path.join(folder, 'vit.safetensors'))
    with open(os.path.join(folder, 'good.pth.tar'), 'rb') as f:
        whole = f.read()
    contents = {
        'text.pth.tar': b'hello world\n',
        'notes.pth.tar': b'some notes, not weights\n',  # the unpickler pops an empty stack: IndexError
        'random.pth.tar': np.random.default_rng(0).bytes(4096),
        'truncated.pth.tar': whole[:len(whole) // 2],
        'empty.pth.tar': b'',
        'a_file': b'a file, not a folder\n',
    }
    for name, content in contents.items():
        with open(os.path.join(folder, name), 'wb') as f:
            f.write(content)
    for name in ('folder.pth.tar', 'empty_folder', 'full_folder'):
        os.makedirs(os.path.join(folder, name), exist_ok=True)
    with open(os.path.join(folder, 'full_folder', 'keep.txt'), 'w') as f:
        f.write('already here\n')
    return folder


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
    return _make_inputs(str(tmp_path_factory.mktemp('mistakes') / 'work'))


def _tree(root):
    """Every file and folder under ``root``: path -> (kind, size, mtime) (a folder's own mtime left out)."""
    found = {}
    for folder, folders, files in os.walk(root):
        for name in folders:
            found[os.path.relpath(os.path.join(folder, name), root)] = ('dir', None, None)
        for name in files:
            stat = os.lstat(os.path.join(folder, name))
            found[os.path.relpath(os.path.join(folder, name), root)] = ('file', stat.st_size, stat.st_mtime_ns)
    return found


def _check_output(case, code, stderr, stdout, before, after, repo_output_existed):
    command, argv, expected = MISTAKES[case]
    prog = COMMANDS[command][1]
    everything = stderr + stdout
    assert code == 2, f'{case}: exit status {code}\n{everything[-3000:]}'
    assert 'Traceback' not in everything, f'{case}:\n{everything[-3000:]}'
    assert not any(line.startswith('usage:') for line in everything.splitlines()), f'{case}:\n{everything[-3000:]}'
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if ': error: ' in line]
    assert len(errors) == 1, f'{case}: {errors}'
    tail = lines[-2:] if lines[-1].startswith('see ') else lines[-1:]
    assert tail[0] == errors[0], f'{case}: the error is not the last line (hint aside): {lines[-3:]}'
    assert errors[0].startswith(f'{prog}') and ': error: ' in errors[0]
    for text in expected:
        assert text in errors[0], f'{case}: {text!r} not in {errors[0]!r}'
    assert after == before, f'{case}: files changed: {sorted(set(after.items()) ^ set(before.items()))}'
    assert repo_output_existed or not os.path.exists(os.path.join(ROOT, 'output')), f'{case} wrote {ROOT}/output'


@pytest.fixture
def restore_logging():
    # A console handler left on the root logger by an earlier test writes to that test's (closed) captured
    # stream, and logging reports that with a traceback of its own: none of them during a case.
    handlers, level = list(logging.root.handlers), logging.root.level
    logging.root.handlers[:] = [h for h in handlers if type(h) is not logging.StreamHandler]
    yield
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


@pytest.mark.parametrize('case', list(MISTAKES))
def test_mistake_gives_one_line_exit_2_and_leaves_nothing(case, inputs, monkeypatch, capsys, restore_logging):
    command, argv, _ = MISTAKES[case]
    monkeypatch.chdir(inputs)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    repo_output_existed = os.path.exists(os.path.join(ROOT, 'output'))
    before = _tree(inputs)
    try:
        code = COMMANDS[command][2](list(argv))
        code = code if isinstance(code, int) else 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    _check_output(case, code, out.err, out.out, before, _tree(inputs), repo_output_existed)


@pytest.fixture(scope='module')
def subprocess_runs(tmp_path_factory):
    """The subprocess cases, started together (each pays for importing torch and timm), each in its own folder."""
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', PYTHONPATH=ROOT)
    env.pop('RANK', None)
    env.pop('WORLD_SIZE', None)
    repo_output_existed = os.path.exists(os.path.join(ROOT, 'output'))
    started = {}
    for case in SUBPROCESS_CASES:
        command, argv, _ = MISTAKES[case]
        folder = _make_inputs(str(tmp_path_factory.mktemp(case) / 'work'))
        before = _tree(folder)
        process = subprocess.Popen([sys.executable, '-m', COMMANDS[command][0]] + list(argv), cwd=folder, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started[case] = (process, folder, before)
    done = {}
    for case, (process, folder, before) in started.items():
        try:
            stdout, stderr = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        done[case] = (process.returncode, stderr, stdout, before, _tree(folder))
    return done, repo_output_existed


@pytest.mark.slow
@pytest.mark.parametrize('case', SUBPROCESS_CASES)
def test_mistake_in_a_real_process_prints_no_traceback_and_no_usage(case, subprocess_runs):
    done, repo_output_existed = subprocess_runs
    code, stderr, stdout, before, after = done[case]
    _check_output(case, code, stderr, stdout, before, after, repo_output_existed)
