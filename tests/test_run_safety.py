"""Nothing lost, nothing false: interrupted runs, shared output folders, degenerate data.

Real signals (to a real train.py process, and to this process for the in-process cases), real folders and
files. Each case checks the exit status, the one-line message and the files left behind.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from timm_gsl.cli import train as train_cli
from timm_gsl.cli.train import main
from timm_gsl.cli.train_args import RUN_FOLDER_FLAGS
from timm_gsl.engine import RunFolderError, check_run_folder, claim_run_folder, read_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--model', 'test_resnet', '--class-subset', '3', '--samples-per-class', '8', '-b', '8', '-j', '0',
        '--log-interval', '1']


def _refused(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2, err
    assert message in err and len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------------------------
# Interrupts
# ----------------------------------------------------------------------------------------------

def _signal_in_epoch(monkeypatch, signum, epoch):
    """Send ``signum`` to this process when epoch ``epoch`` starts training."""
    original = train_cli.train_one_epoch

    def train_one_epoch(current, *args, **kwargs):
        if current == epoch:
            os.kill(os.getpid(), signum)
            time.sleep(1)  # the handler runs here, in the main thread
        return original(current, *args, **kwargs)

    monkeypatch.setattr(train_cli, 'train_one_epoch', train_one_epoch)


@pytest.mark.parametrize('signum, status', [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_exits_with_the_signal_status_publishes_nothing_and_says_how_to_resume(
        tmp_path, monkeypatch, caplog, signum, status):
    published = []
    monkeypatch.setattr(train_cli, 'publish_run', lambda *a, **k: published.append(a))
    monkeypatch.setenv('HF_TOKEN', 'hf_test_token')
    _signal_in_epoch(monkeypatch, signum, 1)
    argv = TINY + ['--epochs', '3', '--output', str(tmp_path), '--experiment', 'run', '--push-to-hub', 'org/x']
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == status
    assert not published
    out = tmp_path / 'run'
    last = read_checkpoint(str(out / 'last.pth.tar'), 'test')
    assert last['epoch'] == 0 and 'calibration' not in last  # epoch 0 complete, nothing fitted on a partial run
    message = [r.getMessage() for r in caplog.records if 'interrupted by' in r.getMessage()]
    assert len(message) == 1 and f'interrupted by {signal.Signals(signum).name}' in message[0]
    assert f'--resume {out / "last.pth.tar"}' in message[0] and 'nothing was published' in message[0]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    # The printed command resumes the run to its planned end.
    monkeypatch.undo()
    resumed = main(argv[:-2] + ['--resume', str(out / 'last.pth.tar')])
    assert [row['epoch'] for row in resumed['history']] == [1, 2]


def test_interrupt_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path, monkeypatch, caplog):
    _signal_in_epoch(monkeypatch, signal.SIGINT, 0)
    with pytest.raises(SystemExit) as exc:
        main(TINY + ['--epochs', '2', '--output', str(tmp_path), '--experiment', 'run'])
    assert exc.value.code == 130
    assert 'no checkpoint to resume from' in caplog.text
    assert not [f for f in os.listdir(tmp_path / 'run') if f.endswith('.pth.tar')]


@pytest.mark.slow
def test_sigterm_to_a_train_py_process_with_loader_workers(tmp_path):
    out = tmp_path / 'run'
    command = [sys.executable, os.path.join(ROOT, 'train.py')] + TINY[:-4] + [
        '-j', '2', '--samples-per-class', '40', '--epochs', '50', '--output', str(tmp_path), '--experiment', 'run']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    deadline = time.monotonic() + 180
    while not (out / 'last.pth.tar').exists():
        assert proc.poll() is None and time.monotonic() < deadline, 'the run never wrote a checkpoint'
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output[-2000:]
    assert 'interrupted by SIGTERM' in output and 'Traceback' not in output
    for name in os.listdir(out):
        if name.endswith('.pth.tar'):
            read_checkpoint(str(out / name), 'test')


# ----------------------------------------------------------------------------------------------
# Output folders
# ----------------------------------------------------------------------------------------------

def test_a_new_run_never_writes_into_another_runs_folder(tmp_path, capsys):
    argv = TINY + ['--epochs', '1', '--no-calibrate', '--output', str(tmp_path), '--experiment', 'run']
    main(argv)
    before = {n: os.path.getmtime(tmp_path / 'run' / n) for n in os.listdir(tmp_path / 'run')}
    _refused(capsys, argv, "already holds a run (args.yaml, checkpoint-0.pth.tar, last.pth.tar")
    assert {n: os.path.getmtime(tmp_path / 'run' / n) for n in os.listdir(tmp_path / 'run')} == before
    # Resuming from a checkpoint inside it continues it.
    main(argv[:-1] + ['run', '--epochs', '2', '--resume', str(tmp_path / 'run' / 'last.pth.tar')])


def test_a_live_run_holds_its_folder(tmp_path, capsys):
    folder = claim_run_folder(str(tmp_path / 'run'))  # as a live run would
    try:
        _refused(capsys, TINY + ['--epochs', '1', '--output', str(tmp_path), '--experiment', 'run'],
                 'another live run is writing into')
    finally:
        folder.release()
    with pytest.raises(RunFolderError, match='another live run'):
        held = claim_run_folder(str(tmp_path / 'other'))
        try:
            claim_run_folder(str(tmp_path / 'other'))
        finally:
            held.release()


def test_run_folder_messages_name_the_keywords_and_through_names_the_flags(tmp_path):
    folder = str(tmp_path / 'run')
    os.makedirs(folder)
    open(os.path.join(folder, 'args.yaml'), 'w').close()
    last = os.path.join(folder, 'last.pth.tar')

    def refusal(call, **kwargs):
        with pytest.raises(RunFolderError) as info:
            call(folder, **kwargs)
        return str(info.value)

    assert refusal(check_run_folder) == (
        f"folder: {folder!r} already holds a run (args.yaml); a new run never writes into another run's folder: "
        f'pass resume {last} to continue it, or choose another experiment (or output).')
    assert refusal(check_run_folder, names=RUN_FOLDER_FLAGS) == (  # train.py's words
        f"--output/--experiment: {folder!r} already holds a run (args.yaml); a new run never writes into another "
        f"run's folder: pass --resume {last} to continue it, or choose another --experiment (or --output).")
    held = claim_run_folder(str(tmp_path / 'live'))
    try:
        folder = str(tmp_path / 'live')
        assert refusal(claim_run_folder).startswith(f'folder: another live run is writing into {folder!r}; ')
        assert refusal(claim_run_folder).endswith('choose another experiment (or output).')
        assert refusal(claim_run_folder, names=RUN_FOLDER_FLAGS) == (
            f'--output/--experiment: another live run is writing into {folder!r}; two runs never share a folder: '
            f'wait for it to end, or choose another --experiment (or --output).')
    finally:
        held.release()


def test_runs_without_experiment_names_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    class Frozen:
        @staticmethod
        def now():
            import datetime
            return datetime.datetime(2026, 12, 7, 4, 0, 0)

    monkeypatch.setattr(train_cli, 'datetime', Frozen)
    first = main(TINY + ['--epochs', '1', '--no-calibrate', '--output', str(tmp_path)])['output_dir']
    second = main(TINY + ['--epochs', '1', '--no-calibrate', '--output', str(tmp_path)])['output_dir']
    assert os.path.basename(second) == os.path.basename(first) + '-1'


def test_a_resumed_run_removes_the_temporary_files_a_killed_run_left(tmp_path):
    argv = TINY + ['--epochs', '1', '--no-calibrate', '--output', str(tmp_path), '--experiment', 'run']
    main(argv)
    orphan = tmp_path / 'run' / '.last.pth.tar.abc123.tmp'
    orphan.write_bytes(b'x' * 1000)
    main(argv[:-2] + ['--experiment', 'run', '--epochs', '2', '--resume', str(tmp_path / 'run' / 'last.pth.tar')])
    assert not orphan.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason='root may write into a read-only folder, so there is nothing to refuse')
def test_a_read_only_output_is_refused_before_anything_is_built(tmp_path, capsys):
    locked = tmp_path / 'locked'
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _refused(capsys, TINY + ['--epochs', '1', '--output', str(locked)], 'is not writable')
    finally:
        locked.chmod(0o755)


# ----------------------------------------------------------------------------------------------
# Degenerate data
# ----------------------------------------------------------------------------------------------

def _image_folder(root, layout):
    """``layout``: split -> list of class folders ('' for images directly in the split)."""
    for split, classes in layout.items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(6):
                Image.new('RGB', (8, 8), (i * 40, 0, 0)).save(folder / f'{i}.png')
    return root


@pytest.mark.parametrize('layout, message', [
    (dict(train=[''], validation=['']), "has 1 class (['']); a classifier needs at least 2"),
    (dict(train=['a'], validation=['a']), "has 1 class (['a']); a classifier needs at least 2"),
])
def test_image_folders_that_cannot_train_a_classifier_are_refused_before_anything_is_written(tmp_path, capsys,
                                                                                         layout, message):
    data = _image_folder(tmp_path / 'data', layout)
    out = tmp_path / 'out'
    _refused(capsys, [str(data), '--model', 'test_resnet', '-b', '4', '-j', '0', '--epochs', '1', '--no-calibrate',
                      '--output', str(out)], message)
    assert not out.exists()


@pytest.mark.parametrize('flags, message', [
    (['--samples-per-class', '1', '-b', '8'], 'the training split has 3 images with --samples-per-class 1, fewer '
                                              'than one batch of 8'),
    (['--samples-per-class', '20', '-b', '64'], 'has 60 images with --samples-per-class 20, fewer than one batch'),
])
def test_fewer_images_than_one_batch_is_refused_naming_the_flags(tmp_path, capsys, flags, message):
    out = tmp_path / 'out'
    _refused(capsys, ['--model', 'test_resnet', '--class-subset', '3', '-j', '0', '--epochs', '1',
                      '--output', str(out)] + flags, message)
    assert not out.exists()


def test_no_metric_over_zero_images(tmp_path, capsys):
    data = _image_folder(tmp_path / 'data', dict(train=['a', 'b']))
    (data / 'validation').mkdir()  # a validation split without a single image
    _refused(capsys, [str(data), '--model', 'test_resnet', '-b', '4', '-j', '0', '--epochs', '1', '--no-calibrate',
                      '--output', str(tmp_path / 'out')], "Found 0 images in subfolders of")
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('flags, message', [
    (['--lr', 'nan'], '--lr nan is invalid, expected a finite number > 0'),
    (['--lr', 'inf'], '--lr inf is invalid, expected a finite number > 0'),
    (['--lr', '-1'], '--lr -1.0 is invalid, expected a finite number > 0'),
    (['--min-lr', '-0.1'], '--min-lr -0.1 is invalid, expected a finite number >= 0'),
])
def test_learning_rates_that_cannot_train_are_refused_before_anything_is_built(tmp_path, capsys, flags, message):
    _refused(capsys, TINY + ['--epochs', '1', '--output', str(tmp_path / 'out')] + flags, message)
    assert not (tmp_path / 'out').exists()


def test_a_non_finite_loss_before_any_checkpoint_says_there_is_nothing_to_resume(tmp_path, monkeypatch, capsys):
    from timm_gsl.loss import GroupSoftmaxLoss
    forward = GroupSoftmaxLoss.forward
    monkeypatch.setattr(GroupSoftmaxLoss, 'forward', lambda self, *a, **k: forward(self, *a, **k) * float('nan'))
    with pytest.raises(SystemExit) as exc:
        main(TINY + ['--epochs', '1', '--output', str(tmp_path), '--experiment', 'run'])
    assert 'no checkpoint was written before it' in str(exc.value.code)


def test_validate_refuses_numpy_weights_for_a_model_that_cannot_load_them(tmp_path, capsys):
    import numpy as np

    from timm_gsl.cli.validate import main as validate_main
    path = tmp_path / 'x.npz'
    np.savez(path, a=np.zeros(3))
    with pytest.raises(SystemExit) as exc:
        validate_main(['--model', 'test_resnet', '--checkpoint', str(path), '--device', 'cpu'])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and 'holds NumPy weights' in err and len(err.splitlines()) == 1


def test_resume_with_another_learning_rate_is_refused_instead_of_ignored(tmp_path, capsys):
    argv = TINY + ['--epochs', '1', '--no-calibrate', '--output', str(tmp_path), '--experiment', 'run', '--lr', '0.01']
    main(argv)
    last = str(tmp_path / 'run' / 'last.pth.tar')
    _refused(capsys, argv[:-1] + ['0.5', '--epochs', '2', '--resume', last],
             '--lr 0.5 with --resume')
    main(argv + ['--epochs', '2', '--resume', last])  # the same --lr continues


def test_a_full_disk_ends_the_run_with_one_line_and_complete_checkpoints(tmp_path, monkeypatch, capsys):
    """ENOSPC simulated in the checkpoint write of epoch 1 (a real full tmpfs needs mount rights CI lacks)."""
    import errno

    import torch as torch_module
    real_save = torch_module.save
    calls = []

    def save(obj, path, *args, **kwargs):
        calls.append(path)
        if isinstance(obj, dict) and obj.get('epoch') == 1:
            with open(path, 'wb') as f:
                f.write(b'partial')  # what a full disk leaves half-written
            raise OSError(errno.ENOSPC, 'No space left on device', str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch_module, 'save', save)
    with pytest.raises(SystemExit) as exc:
        main(TINY + ['--epochs', '3', '--no-calibrate', '--output', str(tmp_path), '--experiment', 'run'])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and len(err) == 1 and 'no space left on the device' in err[0]
    out = tmp_path / 'run'
    assert f'--resume {out / "last.pth.tar"}' in err[0]
    assert read_checkpoint(str(out / 'last.pth.tar'), 'test')['epoch'] == 0
    assert not [n for n in os.listdir(out) if n.endswith('.tmp')]


@pytest.mark.parametrize('flag', ['--initial-checkpoint', 'validate --checkpoint'])
def test_a_state_dict_holding_a_non_tensor_is_refused_in_one_line(tmp_path, capsys, flag):
    import torch

    from timm_gsl.cli.validate import main as validate_main
    result = main(TINY + ['--epochs', '1', '--no-calibrate', '--output', str(tmp_path), '--experiment', 'run'])
    checkpoint = torch.load(os.path.join(result['output_dir'], 'last.pth.tar'), weights_only=False)
    checkpoint['state_dict']['fc.bias'] = 3
    bad = str(tmp_path / 'bad.pth.tar')
    torch.save(checkpoint, bad)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        if flag == '--initial-checkpoint':
            main(TINY + ['--epochs', '1', '--output', str(tmp_path), '--experiment', 'x', flag, bad])
        else:
            validate_main(['--checkpoint', bad, '--device', 'cpu'])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "holds values other than tensors in its state dict, e.g. ['fc.bias (int)']" in err
    assert len(err.splitlines()) == 1


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs of ``size`` bytes, mounted on demand (needs mount rights: root with CAP_SYS_ADMIN)."""
    mounted = []

    def mount(size):
        folder = tmp_path / 'small-disk'
        folder.mkdir()
        try:
            done = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(folder)],
                                  capture_output=True, text=True)
        except OSError as e:
            pytest.skip(f'cannot run mount here ({e}): the simulated full-disk test covers the message')
        if done.returncode != 0:
            pytest.skip(f'cannot mount a tmpfs here ({done.stderr.strip() or "mount failed"}): the simulated '
                        f'full-disk test covers the message')
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(['umount', '-l', str(folder)], capture_output=True)


def test_a_real_full_disk_keeps_the_checkpoints_complete(tmp_path, small_tmpfs, capsys):
    # The size of one epoch's files, measured on the ordinary disk; the small disk holds them once, not twice.
    probe = main(TINY + ['--epochs', '1', '--no-calibrate', '--no-train-eval', '--output', str(tmp_path / 'probe'),
                         '--experiment', 'run'])['output_dir']
    used = sum(os.path.getsize(os.path.join(probe, n)) for n in os.listdir(probe) if n != 'checkpoint-0.pth.tar')
    disk = small_tmpfs(int(used * 1.5))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(TINY + ['--epochs', '3', '--no-calibrate', '--no-train-eval', '--output', str(disk),
                     '--experiment', 'run'])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and len(err) == 1 and 'no space left on the device' in err[0], err
    out = disk / 'run'
    assert not [n for n in os.listdir(out) if n.endswith('.tmp')]
    epochs = {n: read_checkpoint(str(out / n), 'test')['epoch'] for n in os.listdir(out) if n.endswith('.pth.tar')}
    assert epochs and set(epochs.values()) <= {0, 1}  # complete checkpoints of the epochs that fitted


def test_a_skipped_unreadable_image_is_named_in_the_warning(tmp_path, caplog):
    import io

    import numpy as np

    from timm_gsl.data import create_dataset
    data = _image_folder(tmp_path / 'data', dict(train=['a', 'b']))
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype('uint8')).save(buffer, 'JPEG')
    broken = data / 'train' / 'a' / '0.png'
    broken.write_bytes(buffer.getvalue()[:300])  # a truncated JPEG: the decoder's error names no file
    dataset = create_dataset('', root=str(data / 'train'), split='train')
    index = [i for i in range(len(dataset)) if dataset.filename(i, absolute=True) == str(broken)][0]
    caplog.set_level('WARNING', logger='timm.data.dataset')
    dataset[index]  # timm skips it and loads the next image
    warnings = [r.getMessage() for r in caplog.records if 'Skipped sample' in r.getMessage()]
    assert warnings and all(warning.endswith(f'(file {broken})') for warning in warnings)


def test_a_folder_under_a_file_is_refused_in_one_line(tmp_path):
    from timm_gsl.engine.run_folder import RunFolderError, check_run_folder
    (tmp_path / 'a-file').write_text('x')
    with pytest.raises(RunFolderError, match=r"^folder: '.*a-file' is not a folder; expected a folder"):
        check_run_folder(str(tmp_path / 'a-file' / 'run'))
