"""Bad input and untrusted files (issue 4, items 4 and 5).

Every refused command line must stop with one line naming the flag, the value and what is allowed,
before anything is written: the output folder must not exist afterwards. A checkpoint whose
unpickling would run code must be refused by every flag that reads checkpoints, without running it.
"""
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from timm_gsl.cli import validate as validate_py
from timm_gsl.cli.train import apply_embedded_recipe, build_run, check_args, main, parse_args
from timm_gsl.engine import read_checkpoint

# timm's BatchNorm-free test_vit has 64 features; 3 classes of 8 embedded images, one batch an epoch.
TINY = ['--model', 'test_vit', '--img-size', '32', '--class-subset', '3', '--samples-per-class', '8', '-b', '8',
        '--train-batches-per-epoch', '1', '--epochs', '1', '-j', '0']


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """An image folder with an empty class, and checkpoints of another architecture."""
    root = tmp_path_factory.mktemp('inputs')
    rng = np.random.default_rng(0)
    for split in ('train', 'validation'):
        for name in ('coat', 'shirt', 'sandal'):
            os.makedirs(root / 'folder' / split / name)
            if name == 'sandal' and split == 'train':
                continue  # the empty class
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                    root / 'folder' / split / name / f'{i}.png')
    other = timm.create_model('test_resnet', num_classes=3)
    torch.save({'arch': 'test_resnet', 'epoch': 0, 'state_dict': other.state_dict()}, root / 'resnet.pth.tar')
    ten_classes = timm.create_model('test_vit', num_classes=10)
    torch.save({'arch': 'test_vit', 'epoch': 0, 'state_dict': ten_classes.state_dict()}, root / 'vit10.pth.tar')
    return root


# (extra flags, [text the message must hold]); '{root}' is the fixture's folder.
CASES = {
    'missing_data_folder': (['--data-dir', '{root}/nowhere'],
                            ["--data-dir '{root}/nowhere'", 'no such file or folder', 'expected an existing']),
    'empty_class': (['--data-dir', '{root}/folder', '--class-subset', '2'],
                    ['--data-dir', "'{root}/folder/train/sandal'", 'holds no images', 'expected at least one']),
    'num_classes_disagrees': (['--num-classes', '5'],
                              ['--num-classes 5', 'has 3 classes', 'expected --num-classes 3']),
    'groups_above_feature_size': (['--gsl-groups', '65'],
                                  ['--gsl-groups 65', 'feature size of --model test_vit (64',
                                   'expected 1 <= --gsl-groups <= 64']),
    'class_subset_too_large': (['--class-subset', '11'],
                               ['--class-subset 11', 'expected an integer in [2, 10]']),
    'samples_per_class_too_large': (['--samples-per-class', '501'],
                                    ['--samples-per-class 501', 'has only 500 images',
                                     'expected an integer in [1, 500]']),
    'gsl_with_bce': (['--bce-loss'], ['--loss gsl cannot be combined with --bce-loss', 'Use --loss ce']),
    'gsl_flags_without_gsl': (['--loss', 'ce', '--gsl-type', 'I'],
                              ['--gsl-type', "--loss is 'ce'", 'pass --loss gsl or drop them']),
    'jsd_with_bce': (['--loss', 'ce', '--bce-loss', '--jsd-loss', '--aug-splits', '2'],
                     ['--bce-loss and --jsd-loss', 'pass one of them']),
    'resume_other_architecture': (['--resume', '{root}/resnet.pth.tar'],
                                  ["--resume '{root}/resnet.pth.tar'", 'checkpoint of test_resnet',
                                   'does not fit --model test_vit', 'Expected a checkpoint of the same architecture']),
    'resume_other_classes': (['--resume', '{root}/vit10.pth.tar'],
                             ['--resume', 'head.weight (10, 64) vs (3, 64)']),
    'initial_checkpoint_other_architecture': (['--initial-checkpoint', '{root}/resnet.pth.tar'],
                                              ['--initial-checkpoint', 'does not fit --model test_vit']),
    'resume_missing_file': (['--resume', '{root}/none.pth.tar'],
                            ["--resume '{root}/none.pth.tar'", 'no such file', 'expected a checkpoint']),
    'resume_safetensors': (['--resume', '{root}/weights.safetensors'],
                           ['--resume', 'weights only', 'expected a .pth.tar checkpoint']),
}


@pytest.mark.parametrize('case', list(CASES))
def test_bad_command_line_gives_one_clear_line_and_writes_nothing(files, tmp_path, capsys, case):
    flags, expected = CASES[case]
    flags = [f.format(root=files) for f in flags]
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as exc:
        main(TINY + ['--output', str(out), '--experiment', 'run'] + flags)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # The message on one line, and no usage block before it (issue 12).
    message = lines[-1]
    assert message.startswith('train.py: error: ')
    assert not any(line.startswith('usage:') for line in lines)
    for text in expected:
        assert text.format(root=files) in message, message
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# Untrusted checkpoints
# ----------------------------------------------------------------------------------------------

class _RunsAShellCommand:
    """Unpickling this calls os.system: the classic malicious checkpoint."""

    def __reduce__(self):
        return os.system, ('touch "$GSL_MARKER"',)


@pytest.fixture
def malicious_checkpoint(tmp_path, monkeypatch):
    model = timm.create_model('test_vit', num_classes=3)
    path = tmp_path / 'evil.pth.tar'
    torch.save({'arch': 'test_vit', 'epoch': 0, 'state_dict': model.state_dict(), 'args': _RunsAShellCommand()},
               path)
    # The file really runs its command when loaded the unsafe way.
    control = tmp_path / 'CONTROL'
    monkeypatch.setenv('GSL_MARKER', str(control))
    torch.load(path, weights_only=False)
    assert control.exists()
    marker = tmp_path / 'MARKER'
    monkeypatch.setenv('GSL_MARKER', str(marker))
    return path, marker


@pytest.mark.parametrize('flag', ['--resume', '--initial-checkpoint'])
def test_train_refuses_a_checkpoint_carrying_code_and_runs_nothing(malicious_checkpoint, tmp_path, capsys, flag):
    path, marker = malicious_checkpoint
    with pytest.raises(SystemExit) as exc:
        main(TINY + ['--output', str(tmp_path / 'out'), '--experiment', 'run', flag, str(path)])
    assert exc.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert f'{flag} {str(path)!r} was refused' in message and 'nothing in it was run' in message
    assert 'posix.system' in message or 'os.system' in message
    assert not marker.exists()
    assert not (tmp_path / 'out').exists()


def test_validate_refuses_a_checkpoint_carrying_code_and_runs_nothing(malicious_checkpoint, capsys):
    path, marker = malicious_checkpoint
    # validate.py reads checkpoints through the same read_checkpoint as train.py, so the same refusal.
    with pytest.raises(ValueError) as refused:
        validate_py.validate(validate_py.parse_args(['--checkpoint', str(path), '--model', 'test_vit',
                                                     '--img-size', '32']))
    message = str(refused.value)
    assert f'--checkpoint {str(path)!r} was refused' in message and 'nothing in it was run' in message
    assert not marker.exists()
    # The command line says so in one line and exits with status 2.
    with pytest.raises(SystemExit) as exc:
        validate_py.main(['--checkpoint', str(path), '--model', 'test_vit', '--img-size', '32'])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f'validate.py: error: {message}'
    assert not marker.exists()


def test_read_checkpoint_accepts_weights_only_and_safetensors_files(tmp_path):
    model = timm.create_model('test_vit', num_classes=3)
    save_file(model.state_dict(), str(tmp_path / 'w.safetensors'))
    torch.save(model.state_dict(), tmp_path / 'bare.pth')
    for name in ('w.safetensors', 'bare.pth'):
        loaded = read_checkpoint(str(tmp_path / name), '--initial-checkpoint')['state_dict']
        assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    (tmp_path / 'cut.pth.tar').write_bytes((tmp_path / 'bare.pth').read_bytes()[:200])
    with pytest.raises(ValueError, match=r"--resume '.*cut.pth.tar' is not a readable checkpoint"):
        read_checkpoint(str(tmp_path / 'cut.pth.tar'), '--resume')


def _legacy_bytes(tmp_path):
    path = tmp_path / 'legacy.pth'
    torch.save({'state_dict': {'w': torch.zeros(3)}}, path, _use_new_zipfile_serialization=False)
    return path.read_bytes()


# Files that are not checkpoints, and the exception torch.load (or the zip reader) raises on each.
NOT_CHECKPOINTS = {
    'text.pth.tar': (lambda tmp_path: b'hello world\n', 'KeyError'),
    'random.pth.tar': (lambda tmp_path: np.random.default_rng(0).bytes(4096), 'UnpicklingError'),
    'truncated_zip.pth.tar': (lambda tmp_path: _zip_bytes(tmp_path)[:1000], 'RuntimeError'),
    'truncated_legacy.pth': (lambda tmp_path: _legacy_bytes(tmp_path)[:30], 'struct.error'),
    'not_utf8.pth': (lambda tmp_path: b'\x80\x02X\xff\xfe\x00\x00\x00\xff\xfe', 'UnicodeDecodeError'),
    'notes.pth.tar': (lambda tmp_path: b'some notes, not weights\n', 'IndexError'),  # the unpickler pops an empty stack
    'json.pth': (lambda tmp_path: b'{"state_dict": {}}', 'UnpicklingError'),
    'empty.pth.tar': (lambda tmp_path: b'', None),
    'damaged.safetensors': (lambda tmp_path: b'garbage' * 3, 'SafetensorError'),
}


def _zip_bytes(tmp_path):
    path = tmp_path / 'whole.pth.tar'
    torch.save({'state_dict': {'w': torch.zeros(300)}}, path)
    return path.read_bytes()


@pytest.mark.parametrize('name', list(NOT_CHECKPOINTS))
def test_read_checkpoint_gives_one_line_for_any_file_that_is_not_a_checkpoint(tmp_path, name):
    content, kind = NOT_CHECKPOINTS[name]
    path = tmp_path / name
    path.write_bytes(content(tmp_path))
    with pytest.raises(ValueError) as refused:
        read_checkpoint(str(path), '--resume')
    message = str(refused.value)
    assert message.startswith(f'--resume {str(path)!r} is ') and '\n' not in message, message
    assert 'was refused' not in message  # kept for files asking for objects that could run code
    if kind:
        assert f'({kind}' in message, message
    # The reason it was raised with is kept, not a traceback.
    assert isinstance(refused.value.__cause__, Exception) or kind is None


def test_read_checkpoint_names_a_folder_as_a_folder(tmp_path):
    with pytest.raises(ValueError, match=r"--initial-checkpoint '.*' is a folder; expected a checkpoint"):
        read_checkpoint(str(tmp_path), '--initial-checkpoint')


def test_initial_checkpoint_from_safetensors_sets_the_weights(tmp_path):
    model = timm.create_model('test_vit', num_classes=3)
    save_file(model.state_dict(), str(tmp_path / 'w.safetensors'))
    args, explicit = parse_args(TINY + ['--initial-checkpoint', str(tmp_path / 'w.safetensors'), '--seed', '7'])
    apply_embedded_recipe(args, explicit)
    check_args(args)
    run = build_run(args)
    loaded = run.task.get_trainable_module().state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
