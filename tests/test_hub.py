"""Tests of timm_gsl/hub/ (checkpoint reading, card, publishing) and ``python -m timm_gsl push``: publish to a
Hub, load back with plain timm.

The Hub is :class:`tests._hub_server.HubServer` on 127.0.0.1, driven by the real ``huggingface_hub``
client. That client reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` when it is imported, so publishing
and loading run in subprocesses with those variables set. The loading side runs outside the
repository, never imports ``timm_gsl`` (checked), and refuses to unpickle anything (``torch.load`` and
``pickle`` are disabled in it). The reference logits come from the checkpoint itself, loaded here.
"""
import csv
import json
import os
import shlex
import stat
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import timm
import torch
import torch.nn as nn
import yaml

from timm_gsl import hub
from timm_gsl.data import EMBEDDED_DATASET, create_dataset, dataset_class_names
from timm_gsl.cli.train import main as train_main
from timm_gsl.record import from_training_arguments

from _hub_server import HubServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = 'hf_test_token'
REPO = 'gsl-org/tiny-resnet'
# A tiny run: timm's test_resnet on 3 embedded classes, 8 images each, 2 epochs of 2 batches.
TINY = ['--model', 'test_resnet', '--class-subset', '3', '--samples-per-class', '8', '-b', '8',
        '--train-batches-per-epoch', '2', '-j', '0', '--log-interval', '1', '--device', 'cpu']

# Runs in the loading subprocesses: nothing may be unpickled, and timm_gsl must stay unimported.
LOADER_PRELUDE = textwrap.dedent('''
    import pickle, sys, torch
    def _refuse(*a, **k):
        raise AssertionError('a downloaded file was unpickled')
    torch.load = pickle.load = pickle.loads = _refuse
    def _done():
        assert 'timm_gsl' not in sys.modules, 'timm_gsl was imported'
''')


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def server():
    with HubServer(token=TOKEN) as s:
        yield s


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """A tiny run whose checkpoints record no temperature, as train.py wrote them before it fitted one."""
    out = tmp_path_factory.mktemp('runs')
    result = train_main(TINY + ['--output', str(out), '--experiment', 'tiny', '--epochs', '2'])
    for name in ('model_best.pth.tar', 'last.pth.tar'):
        path = os.path.join(result['output_dir'], name)
        raw = torch.load(path, map_location='cpu', weights_only=False)
        raw.pop('calibration', None)
        raw['run_record']['calibration'] = None
        torch.save(raw, path)
    return result['output_dir']


@pytest.fixture(scope='module')
def hf_home(tmp_path_factory):
    return str(tmp_path_factory.mktemp('hf_home'))


@pytest.fixture(scope='module')
def probe(tmp_path_factory):
    """A fixed input batch, in a safetensors file the subprocesses read."""
    path = str(tmp_path_factory.mktemp('probe') / 'input.safetensors')
    safetensors.torch.save_file({'x': torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(0))}, path)
    return path


def _env(server, hf_home, token=TOKEN, offline=False, with_package=False):
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGINGFACE_', 'PYTHONPATH'))}
    env.update(HF_ENDPOINT=server.url, HF_HOME=hf_home, HF_HUB_DISABLE_TELEMETRY='1',
               HF_HUB_DISABLE_PROGRESS_BARS='1', HF_HUB_OFFLINE='1' if offline else '0', OMP_NUM_THREADS='1')
    if token:
        env['HF_TOKEN'] = token
    if with_package:
        env['PYTHONPATH'] = ROOT
    return env


def _run(args, env, cwd):
    return subprocess.run([sys.executable] + list(args), env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _push(server, hf_home, tmp_path, *args, **env_kwargs):
    return _run(['-m', 'timm_gsl', 'push'] + [str(a) for a in args],
                _env(server, hf_home, with_package=True, **env_kwargs), cwd=str(tmp_path))


def _load_logits(server, hf_home, tmp_path, names, probe, offline=False):
    """Eval logits of ``timm.create_model(name, pretrained=True)`` for each name, in a fresh process."""
    out = tmp_path / f'logits-{len(os.listdir(tmp_path))}.safetensors'
    script = LOADER_PRELUDE + textwrap.dedent(f'''
        import safetensors.torch, timm
        x = safetensors.torch.load_file({probe!r})['x']
        logits = {{}}
        for i, name in enumerate({list(names)!r}):
            model = timm.create_model(name, pretrained=True).eval()
            with torch.no_grad():
                logits[str(i)] = model(x).contiguous()
        safetensors.torch.save_file(logits, {str(out)!r})
        _done()
    ''')
    done = _run(['-c', script], _env(server, hf_home, offline=offline), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = safetensors.torch.load_file(str(out))
    return [loaded[str(i)] for i in range(len(names))]


def _reference_logits(checkpoint, probe, architecture='test_resnet'):
    """The checkpoint's own eval logits, built the slow, obvious way."""
    raw = torch.load(checkpoint, map_location='cpu', weights_only=False)
    model = timm.create_model(architecture, num_classes=raw['args'].num_classes)
    model.load_state_dict(raw['state_dict'])
    with torch.no_grad():
        return model.eval()(safetensors.torch.load_file(probe)['x'])


def _card(text):
    _, front, body = text.split('---\n', 2)
    return yaml.safe_load(front), body


def _summary_row(run_dir, epoch):
    with open(os.path.join(run_dir, 'summary.csv'), newline='') as f:
        return next(r for r in csv.DictReader(f) if r['epoch'] == str(epoch))


@pytest.fixture(scope='module')
def published(server, hf_home, run_dir, tmp_path_factory):
    """``python -m timm_gsl push`` of the tiny run's best checkpoint to REPO."""
    checkpoint = os.path.join(run_dir, 'model_best.pth.tar')
    done = _push(server, hf_home, tmp_path_factory.mktemp('push'), checkpoint, '--repo-id', REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f'Published {checkpoint} to {REPO}' in done.stdout
    # One line a file, not one a request of the HTTP client.
    log = done.stdout + done.stderr
    assert 'HTTP Request' not in log, log
    assert sorted(line.split()[1] for line in log.splitlines() if line.startswith('  uploaded ')) == [
        'README.md', 'config.json', 'learning_curves.png', 'model.safetensors'], log
    return checkpoint


# ----------------------------------------------------------------------------------------------
# What is published
# ----------------------------------------------------------------------------------------------

def test_push_publishes_safetensors_timm_config_card_and_curves(server, published, run_dir):
    files = server.files(REPO)
    assert sorted(files) == ['README.md', 'config.json', 'learning_curves.png', 'model.safetensors']
    weights = safetensors.torch.load(files['model.safetensors'])
    raw = torch.load(published, map_location='cpu', weights_only=False)
    assert weights.keys() == raw['state_dict'].keys()
    assert all(torch.equal(weights[k], raw['state_dict'][k]) for k in weights)
    assert files['learning_curves.png'] == open(os.path.join(run_dir, 'learning_curves.png'), 'rb').read()

    config = json.loads(files['config.json'])
    assert config['architecture'] == 'test_resnet' and config['num_classes'] == 3
    assert 'num_classes' not in config.get('model_args', {})
    names = dataset_class_names(create_dataset(EMBEDDED_DATASET, split='validation', class_subset=3, seed=42))
    assert config['label_names'] == names and len(names) == 3
    pre = config['pretrained_cfg']
    assert (pre['input_size'], pre['mean'], pre['std'], pre['crop_pct'], pre['interpolation']) == (
        [3, 28, 28], raw['args'].mean, raw['args'].std, 1.0, 'bilinear')
    # Attributed to the published repo, not to timm's release of the base architecture.
    assert pre['origin_url'] == f'{server.url}/{REPO}' and pre['license'] == 'apache-2.0'
    assert not set(pre) & {'hf_hub_id', 'tag', 'paper_ids', 'paper_name', 'notes', 'description', 'url', 'file'}
    assert 'pytorch-image-models' not in files['config.json'].decode()


def test_model_card_has_hub_metadata_settings_conditions_metrics_and_citation(server, published, run_dir):
    meta, body = _card(server.files(REPO)['README.md'].decode())
    assert meta['library_name'] == 'timm' and meta['license'] == 'apache-2.0'
    assert {'group-softmax-loss', 'timm', 'image-classification'} <= set(meta['tags'])
    assert meta['datasets'] == ['zalando-datasets/fashion_mnist']
    raw = torch.load(published, map_location='cpu', weights_only=False)
    row = _summary_row(run_dir, raw['epoch'])
    metrics = {m['name']: m['value'] for m in meta['model-index'][0]['results'][0]['metrics']}
    assert metrics == {'Top-1 accuracy': round(float(row['eval_top1']), 4),
                       'Top-5 accuracy': round(float(row['eval_top5']), 4)}
    assert round(float(row['eval_top1']), 4) == round(raw['metric'], 4)
    for text in ('Type-II', '**Groups G:** 4', '**Grouping:** discriminative', "class subset '3'",
                 '8 training images per class', '![Learning curves](learning_curves.png)',
                 '| 0 |', '| 1 |', 'Kobayashi, Takumi', 'python train.py', '--samples-per-class 8',
                 '--class-subset 3', '--model test_resnet', f"timm.create_model('hf-hub:{REPO}', pretrained=True)"):
        assert text in body, text
    # What the replication measured about this loss's calibrated probabilities is on every card of the loss.
    assert f'- **Probabilities:** {hub.card.CALIBRATION_CAVEAT}' in body
    # transformers loads it (tested below), and the card says so; the run started from scratch: no base_model.
    assert 'transformers' in meta['tags'] and 'base_model' not in meta
    # Advice only from the run's own settings: its 28x28 input and loss settings, no foreign dataset or size.
    finetune = body.split('```bash\npython train.py --model ')[1].split('\n')[0]
    assert finetune.startswith(f'hf-hub:{REPO} --pretrained ')
    assert '--input-size 3 28 28' in finetune and '--gsl-groups 4' in finetune
    assert 'food' not in body.lower()
    for foreign in ('224', '101', '--lr', '--epochs', '--dataset'):
        assert foreign not in finetune, foreign
    assert 'local/' not in body and 'local-dir:' not in body


def test_card_names_each_loss_and_where_the_evaluation_images_come_from(server, published):
    meta, body = _card(server.files(REPO)['README.md'].decode())
    # The embedded validation images are part of Fashion-MNIST's test set: so the card says, and its metadata
    # names the Hub dataset's 'test' split, which exists there ('validation' does not).
    assert meta['model-index'][0]['results'][0]['dataset']['split'] == 'test'
    assert "the `validation` split: 100 images per class of Fashion-MNIST's test set, never trained on" in body
    table = body.split('Every evaluated epoch:')[1]
    header = next(line for line in table.splitlines() if line.startswith('| epoch'))
    assert header == ('| epoch | training loss | softmax loss, same batches | clean training loss | evaluation loss '
                      '| top-1 | top-5 |')
    for text in ('- **training loss:** group softmax loss (the sum over groups, Type-II), augmented training '
                 'batches, label smoothing 0.1',
                 '- **softmax loss, same batches:** softmax cross-entropy of the same batches',
                 '- **evaluation loss:** softmax cross-entropy of the evaluation images',
                 '| evaluation loss (softmax cross-entropy) |'):
        assert text in body, text


def test_training_command_sets_exactly_the_non_default_training_flags():
    from timm_gsl.cli.train_args import get_args_parser, training_command
    defaults = vars(get_args_parser().parse_args([]))
    args = dict(defaults, model='resnet18', gsl_groups=8, mean=[0.5, 0.4, 0.3], pin_mem=True, no_aug=True,
                model_kwargs={'drop_rate': 0.1}, output='/somewhere', push_to_hub='a/b')
    command = training_command(args)
    assert command == ('python train.py --model resnet18 --mean 0.5 0.4 0.3 --model-kwargs drop_rate=0.1 '
                       '--no-aug --gsl-groups 8')
    parsed = get_args_parser().parse_args(command.split()[2:])
    assert (parsed.model, parsed.gsl_groups, parsed.mean, parsed.no_aug, parsed.model_kwargs) == (
        'resnet18', 8, [0.5, 0.4, 0.3], True, {'drop_rate': 0.1})


def test_training_command_keeps_workers_and_publishes_no_local_path():
    from timm_gsl.cli.train_args import get_args_parser, training_command
    defaults = vars(get_args_parser().parse_args([]))
    command = training_command(dict(defaults, workers=0, data_dir='/home/someone/datasets/flowers/'))
    assert command == 'python train.py --data-dir path/to/flowers --workers 0'
    assert training_command(dict(defaults, data_dir='relative/dir')) == 'python train.py --data-dir relative/dir'


def test_card_of_an_image_folder_run_shows_no_path_of_the_training_machine(published, tmp_path):
    from timm_gsl.cli.train_args import training_command
    raw = torch.load(published, map_location='cpu', weights_only=False)
    raw['args'].dataset, raw['args'].data_dir = '', '/home/someone/datasets/flowers'
    from timm_gsl.record import RECORD_KEY, from_training_arguments
    assert RECORD_KEY in raw  # train.py saved its record: rewrite it as a folder run would have
    raw[RECORD_KEY] = from_training_arguments(vars(raw['args'])).to_dict()
    path = tmp_path / 'folder-run.pth.tar'
    torch.save(raw, path)
    hub.export_checkpoint(str(path), str(tmp_path / 'out'), training_command=training_command)
    meta, body = _card((tmp_path / 'out' / 'README.md').read_text())
    # No Hub dataset: no dataset id and no model-index (whose dataset must be one); the metrics stay in the body.
    assert 'datasets' not in meta and 'model-index' not in meta
    assert '| top-1 accuracy (%) |' in body
    assert '/home/someone' not in body
    assert "- **Dataset:** image folder 'flowers'" in body
    assert 'python validate.py --model local-dir:' in body and '--data-dir path/to/flowers --class-subset 3' in body
    assert '--data-dir path/to/flowers' in body.split('## Training command')[1]
    assert "the `validation` folder beside the training images" in body


@pytest.mark.slow
def test_the_cards_training_command_reproduces_the_run(server, published, run_dir, tmp_path):
    _, body = _card(server.files(REPO)['README.md'].decode())
    command = body.split('## Training command')[1].split('```bash\n')[1].split('\n')[0]
    words = shlex.split(command)
    assert words[:2] == ['python', 'train.py'] and '--workers' in words
    # As printed, in a new folder (train.py's device and output flags are not part of the recipe).
    again = train_main(words[2:] + ['--output', str(tmp_path), '--experiment', 'again', '--device', 'cpu'])
    with open(os.path.join(run_dir, 'summary.csv'), newline='') as f:
        first = list(csv.DictReader(f))
    with open(os.path.join(again['output_dir'], 'summary.csv'), newline='') as f:
        second = list(csv.DictReader(f))
    assert second == first


# ----------------------------------------------------------------------------------------------
# Loading back, without timm_gsl
# ----------------------------------------------------------------------------------------------

def test_hub_and_local_dir_give_the_checkpoints_logits_then_offline_from_cache(
        server, hf_home, published, probe, tmp_path):
    local = tmp_path / 'exported'
    hub.export_checkpoint(published, str(local), repo_id=REPO)
    assert sorted(os.listdir(local)) == ['README.md', 'config.json', 'learning_curves.png', 'model.safetensors']
    reference = _reference_logits(published, probe)
    start = len(server.requests)  # (publishing asked whether the repo had a README.md)
    from_hub, from_dir = _load_logits(server, hf_home, tmp_path, [f'hf-hub:{REPO}', f'local-dir:{local}'], probe)
    assert torch.equal(from_hub, reference) and torch.equal(from_dir, reference)
    downloads = {p for m, p in server.requests[start:] if '/resolve/' in p}
    assert downloads == {f'/{REPO}/resolve/main/config.json', f'/{REPO}/resolve/main/model.safetensors'}

    before = len(server.requests)
    (offline,) = _load_logits(server, hf_home, tmp_path, [f'hf-hub:{REPO}'], probe, offline=True)
    assert torch.equal(offline, reference)
    assert len(server.requests) == before  # served from the cache the download left


def test_the_cards_python_snippets_run_as_printed_without_timm_gsl(server, hf_home, published, tmp_path):
    local = tmp_path / 'exported'
    hub.export_checkpoint(published, str(local))
    _, body = _card((local / 'README.md').read_text())
    assert '# Model card for exported' in body and 'GMACs at 28x28)' in body
    usage = body.split('## Usage')[1].split('\n## ')[0]
    blocks = [block.split('```')[0] for block in usage.split('```python\n')[1:]]
    assert len(blocks) == 3  # classification, embeddings, feature maps (a ResNet has feature_info)
    from PIL import Image
    Image.new('RGB', (40, 30), (120, 30, 200)).save(tmp_path / 'image.jpg')
    script = '\n'.join(blocks) + textwrap.dedent('''
        import sys
        assert embedding.ndim == 2 and embedding.shape[0] == 1, embedding.shape
        print(len(probabilities), embedding.shape, [tuple(f.shape) for f in model(transform(image).unsqueeze(0))])
        assert 'timm_gsl' not in sys.modules
    ''')
    done = _run(['-c', script], _env(server, hf_home), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1].startswith('3 torch.Size([1, 96])'), done.stdout  # test_resnet: 96


def test_validate_on_the_hub_model_reports_the_cards_top1(server, hf_home, published, tmp_path):
    meta, body = _card(server.files(REPO)['README.md'].decode())
    card_top1 = meta['model-index'][0]['results'][0]['metrics'][0]['value']
    command = body.split('```bash\npython validate.py ')[1].split('\n')[0].split()
    done = _run([os.path.join(ROOT, 'validate.py')] + command + ['--device', 'cpu', '-j', '0'],
                _env(server, hf_home, with_package=True), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.split('--result\n')[1])
    assert results['top1'] == card_top1


def test_train_fine_tunes_from_the_hub_model_and_pushes_the_result(server, hf_home, published, probe, tmp_path):
    # A learning rate of ~0: the fine-tuned weights must be the published ones, not a fresh init.
    done = _run([os.path.join(ROOT, 'train.py')] + TINY + [
        '--model', f'hf-hub:{REPO}', '--pretrained', '--epochs', '1', '--lr', '1e-12', '--warmup-epochs', '0',
        '--min-lr', '0', '--warmup-lr', '0', '--weight-decay', '0', '--output', str(tmp_path), '--experiment', 'ft',
        '--push-to-hub', f'{REPO}-ft', '--hub-revision', 'candidate'], _env(server, hf_home, with_package=True), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert server.files(f'{REPO}-ft', 'main') == {}  # the branch was committed to, not main
    files = server.files(f'{REPO}-ft', 'candidate')
    config = json.loads(files['config.json'])
    assert config['architecture'] == 'test_resnet'  # the base architecture, not the hf-hub: name
    # train.py publishes calibrated: the classifier divided by the temperature its checkpoint records.
    checkpoint = os.path.join(tmp_path, 'ft', 'model_best.pth.tar')
    calibration = torch.load(checkpoint, map_location='cpu', weights_only=False).get('calibration')
    t = calibration['temperature'] if calibration else 1.0
    assert config.get('calibration') == (dict(calibration, folded=True) if calibration else None)
    start = safetensors.torch.load(server.files(REPO)['model.safetensors'])
    tuned = safetensors.torch.load(files['model.safetensors'])
    tuned['fc.weight'] = tuned['fc.weight'] * t
    conv = [k for k in start if k.endswith('conv.weight') or k.endswith('conv1.weight') or k == 'fc.weight']
    assert conv and all(torch.allclose(start[k], tuned[k], atol=1e-6) for k in conv)
    meta, body = _card(files['README.md'].decode())
    assert f'--model hf-hub:{REPO}' in body and '--pretrained' in body
    assert meta['base_model'] == REPO  # the Hub's model tree links it to the model it was tuned from
    assert f'[{REPO}]({server.url}/{REPO})' in body
    # The files are on the branch: the card loads them from there.
    assert f"timm.create_model('hf-hub:{REPO}-ft@candidate', pretrained=True)" in body
    assert json.loads(files['config.json'])['pretrained_cfg']['origin_url'] == f'{server.url}/{REPO}-ft'
    (logits,) = _load_logits(server, hf_home, tmp_path, [f'hf-hub:{REPO}-ft@candidate'], probe)
    assert torch.allclose(logits.double() * t, _reference_logits(checkpoint, probe).double(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Local export: the card names the folder, its usage runs as printed, files are world-readable
# ----------------------------------------------------------------------------------------------

def _python_block(body):
    """The card's first Python block: loading the model and classifying an image."""
    blocks = body.split('```python\n')
    assert len(blocks) >= 2, 'expected a Python block in the card'
    return blocks[1].split('```')[0]


def test_export_card_loads_the_folder_and_its_usage_runs_as_printed(published, server, hf_home, tmp_path):
    folder = tmp_path / 'exported model'  # not a valid repo name: the export must not need one
    files = hub.export_checkpoint(published, str(folder))
    text = (folder / 'README.md').read_text()
    meta, body = _card(text)
    assert meta['model-index'][0]['name'] == 'exported model'
    assert f"timm.create_model('local-dir:{folder}', pretrained=True)" in body
    assert 'hf-hub:' not in body and 'local/' not in body
    config = json.loads((folder / 'config.json').read_text())
    assert 'origin_url' not in config['pretrained_cfg']  # nowhere published yet; timm's is dropped
    assert sorted(files) == sorted(os.listdir(folder))

    # The snippet, exactly as printed, in a fresh process: offline, no unpickling, without timm_gsl,
    # on an image file named as the snippet names it.
    from PIL import Image
    import numpy as np
    work = tmp_path / 'work'
    work.mkdir()
    Image.fromarray((np.random.default_rng(1).random((40, 36)) * 255).astype('uint8')).save(work / 'image.jpg')
    snippet = _python_block(body)
    assert 'image.jpg' in snippet
    done = _run(['-c', LOADER_PRELUDE + snippet + '\n_done()\n'], _env(server, hf_home, offline=True),
                cwd=str(work))
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [line.rsplit(': ', 1) for line in done.stdout.strip().splitlines()]
    names = config['label_names']
    assert sorted(label for label, _ in printed) == sorted(names)  # 3 classes: all of them, by name
    probabilities = [float(p) for _, p in printed]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) == pytest.approx(1, abs=0.005)

    # The same prediction as the checkpoint itself gives, on timm's eval transform of that image.
    raw = torch.load(published, map_location='cpu', weights_only=False)
    model = timm.create_model('test_resnet', num_classes=3)
    model.load_state_dict(raw['state_dict'])
    model.eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=config['pretrained_cfg']))
    with torch.no_grad():
        expected = model(transform(Image.open(work / 'image.jpg').convert('RGB')).unsqueeze(0)).softmax(-1)[0]
    assert printed[0][0] == names[int(expected.argmax())]


@pytest.mark.parametrize('umask', [0o022, 0o027])
def test_export_writes_every_file_with_the_permissions_of_a_plain_write(published, tmp_path, umask):
    old = os.umask(umask)
    try:
        folder = tmp_path / 'exported'
        files = hub.export_checkpoint(published, str(folder))
    finally:
        os.umask(old)
    modes = {name: stat.S_IMODE(os.stat(folder / name).st_mode) for name in files}
    assert 'model.safetensors' in modes
    assert modes == {name: 0o666 & ~umask for name in files}, {k: oct(v) for k, v in modes.items()}
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o777 & ~umask


# ----------------------------------------------------------------------------------------------
# An existing model card, and pull requests
# ----------------------------------------------------------------------------------------------

def _hub_script(server, hf_home, tmp_path, code):
    done = _run(['-c', 'from huggingface_hub import HfApi\napi = HfApi()\n' + textwrap.dedent(code)],
                _env(server, hf_home), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_push_keeps_an_existing_card_unless_asked_to_replace_it(server, hf_home, published, tmp_path):
    repo = 'gsl-org/has-a-card'
    own_card = b'---\nlicense: mit\n---\n# Our own card\n'
    _hub_script(server, hf_home, tmp_path, f"""
        api.create_repo({repo!r})
        api.upload_file(path_or_fileobj={own_card!r}, path_in_repo='README.md', repo_id={repo!r})
    """)
    kept = _push(server, hf_home, tmp_path, published, '--repo-id', repo)
    assert kept.returncode == 0, kept.stderr[-3000:]
    assert 'already has a README.md: kept it' in kept.stderr and '--replace-card' in kept.stderr
    files = server.files(repo)
    assert files['README.md'] == own_card
    assert sorted(files) == ['README.md', 'config.json', 'learning_curves.png', 'model.safetensors']

    replaced = _push(server, hf_home, tmp_path, published, '--repo-id', repo, '--replace-card')
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    meta, body = _card(server.files(repo)['README.md'].decode())
    assert meta['library_name'] == 'timm' and f"'hf-hub:{repo}'" in body


def test_push_opens_a_pull_request_instead_of_committing_to_main(server, hf_home, published, tmp_path):
    repo = 'gsl-org/pull-request'
    _hub_script(server, hf_home, tmp_path, f"""
        api.create_repo({repo!r})
        api.upload_file(path_or_fileobj=b'# maintained by hand\\n', path_in_repo='README.md', repo_id={repo!r})
    """)
    main_before = server.repos[('model', repo)].branches['main']

    done = _push(server, hf_home, tmp_path, published, '--repo-id', repo, '--hub-create-pr', '--replace-card',
                 '--commit-message', 'proposal')
    assert done.returncode == 0, done.stderr[-3000:]
    assert server.repos[('model', repo)].branches['main'] == main_before  # main untouched
    assert server.files(repo) == {'README.md': b'# maintained by hand\n'}
    (pr,) = server.pull_requests(repo)
    assert (pr['ref'], pr['target'], pr['title']) == ('refs/pr/1', 'main', 'proposal')
    assert f'Published {published} to {repo} as a pull request: {server.url}/{repo}/discussions/1' in done.stdout
    proposed = server.files(repo, 'refs/pr/1')
    assert sorted(proposed) == ['README.md', 'config.json', 'learning_curves.png', 'model.safetensors']
    # The card of a pull request names the repo, where the files will be once it is merged.
    assert f"timm.create_model('hf-hub:{repo}', pretrained=True)" in proposed['README.md'].decode()

    before = len(server.requests)
    refused = _push(server, hf_home, tmp_path, published, '--repo-id', repo, '--hub-create-pr', '--revision', 'dev')
    assert refused.returncode == 1 and 'opened against main' in refused.stderr
    assert len(server.requests) == before and len(server.pull_requests(repo)) == 1


def test_publish_run_honours_hub_create_pr(server, hf_home, run_dir, tmp_path):
    repo = 'gsl-org/run-pull-request'
    _hub_script(server, hf_home, tmp_path, f"""
        api.create_repo({repo!r})
        api.upload_file(path_or_fileobj=b'# kept\\n', path_in_repo='README.md', repo_id={repo!r})
    """)
    script = textwrap.dedent(f"""
        import argparse
        from timm_gsl.cli.train import publish_run
        args = argparse.Namespace(push_to_hub={repo!r}, hub_revision=None, hub_private=False, model_ema=False,
                                  hub_create_pr=True)
        print('URL', publish_run(args, {run_dir!r}))
    """)
    done = _run(['-c', script], _env(server, hf_home, with_package=True), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f'URL {server.url}/{repo}/discussions/1' in done.stdout
    assert sorted(server.files(repo)) == ['README.md']  # main: only what was there
    (pr,) = server.pull_requests(repo)
    proposed = server.files(repo, pr['ref'])
    assert proposed['README.md'] == b'# kept\n' and 'model.safetensors' in proposed


# ----------------------------------------------------------------------------------------------
# Card metadata rules
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('args, expected', [
    (dict(model='hf-hub:org/start@v2', pretrained=True), 'org/start'),
    (dict(model='resnet18', pretrained=True), 'timm/resnet18.a1_in1k'),
    (dict(model='resnet18.a1_in1k', pretrained=True), 'timm/resnet18.a1_in1k'),
    (dict(model='resnet18', pretrained=False), None),
    (dict(model='resnet18', pretrained=True, pretrained_path='/weights.safetensors'), None),
    (dict(model='local-dir:/some/folder', pretrained=True), None),
    (dict(model='test_resnet', pretrained=False, initial_checkpoint='hf-hub:org/init'), 'org/init'),
    (dict(model='test_resnet', pretrained=False, initial_checkpoint='/local/checkpoint.pth'), None),
])
def test_base_model_is_the_hub_model_training_started_from(args, expected):
    assert hub.base_model(from_training_arguments(args).model) == expected


def test_transformers_tag_only_for_configs_transformers_can_build():
    good = {'architecture': 'resnet18', 'num_classes': 3, 'model_args': {'in_chans': 3}}
    assert hub.transformers_loads(good)
    assert not hub.transformers_loads(dict(good, model_args={'num_classes': 3}))  # timm's own export
    assert not hub.transformers_loads(dict(good, architecture='no_such_net_xyz'))


# ----------------------------------------------------------------------------------------------
# Faults and bad input
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('fault', ['fail_commits', 'drop_commits'])
def test_failed_commit_reports_nothing_published_and_a_retry_succeeds(
        server, hf_home, published, tmp_path, fault):
    repo = f'gsl-org/retry-{fault.split("_")[0]}'
    commit_path = f'/api/models/{repo}/commit/main'
    # huggingface_hub itself retries a failed commit (5 times, backing off): the fault outlasts that.
    # Its back-off sleeps are skipped so the test does not wait them out.
    setattr(server, fault, 1000)
    script = ('import sys, time; time.sleep = lambda seconds: None; from timm_gsl.__main__ import main; '
              f'sys.exit(main(["push", {published!r}, "--repo-id", {repo!r}]))')
    failed = _run(['-c', script], _env(server, hf_home, with_package=True), cwd=str(tmp_path))
    setattr(server, fault, 0)
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert f"to '{repo}' failed" in failed.stderr and 'Nothing was committed' in failed.stderr
    assert 'Published' not in failed.stdout
    assert server.requests.count(('POST', commit_path)) == 6
    assert server.files(repo) == {} and server.commit_count(repo) == 1  # only the empty initial commit
    retried = _push(server, hf_home, tmp_path, published, '--repo-id', repo)
    assert retried.returncode == 0, retried.stderr[-3000:]
    assert f'Published {published} to {repo}' in retried.stdout
    files, reference = server.files(repo), server.files(REPO)
    assert sorted(files) == sorted(reference)
    # The card and config.json's origin_url name their repo; everything else is the same.
    assert all(files[k] == reference[k] for k in files if k not in ('README.md', 'config.json'))
    config, reference_config = json.loads(files['config.json']), json.loads(reference['config.json'])
    assert config['pretrained_cfg'].pop('origin_url') == f'{server.url}/{repo}'
    reference_config['pretrained_cfg'].pop('origin_url')
    assert config == reference_config


def test_missing_token_is_refused_before_any_request(server, hf_home, published, tmp_path):
    before = len(server.requests)
    done = _push(server, str(tmp_path / 'empty_home'), tmp_path, published, '--repo-id', 'gsl-org/no-token',
                 token=None)
    assert done.returncode == 2 and 'no Hugging Face token' in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and 'Traceback' not in done.stderr
    assert len(server.requests) == before


def test_train_push_to_hub_without_a_token_is_refused_before_training(server, hf_home, tmp_path):
    before = len(server.requests)
    done = _run([os.path.join(ROOT, 'train.py')] + TINY + [
        '--epochs', '1', '--output', str(tmp_path / 'out'), '--experiment', 'x', '--push-to-hub', 'gsl-org/x'],
        _env(server, str(tmp_path / 'empty_home'), token=None, with_package=True), cwd=str(tmp_path))
    assert done.returncode == 2, done.stderr[-3000:]
    assert '--push-to-hub gsl-org/x: no Hugging Face token' in done.stderr
    assert 'Train:' not in done.stderr + done.stdout  # no epoch ran
    assert not (tmp_path / 'out').exists() and len(server.requests) == before


def _no_network(monkeypatch):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError('the Hub was contacted')
    monkeypatch.setattr(huggingface_hub.HfApi, '__init__', refuse)


@pytest.mark.parametrize('repo_id', ['no-slash', 'a/b/c', 'org/bad name', 'org/-x', 'org/a--b', '', 'org/x.'])
def test_malformed_repo_id_is_refused(repo_id, monkeypatch, published):
    _no_network(monkeypatch)
    with pytest.raises(ValueError, match=r'Invalid repo_id .*expected .ORG/NAME'):
        hub.push_checkpoint(published, repo_id, token='t')
    with pytest.raises(SystemExit) as exit_info:
        from timm_gsl.__main__ import main
        main(['push', published, '--repo-id', repo_id])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        from timm_gsl.cli.train import parse_args
        parse_args(['--push-to-hub', repo_id])
    assert exit_info.value.code == 2


def test_checkpoints_that_are_not_timm_checkpoints_are_refused(tmp_path, monkeypatch, published):
    _no_network(monkeypatch)
    raw = torch.load(published, map_location='cpu', weights_only=False)
    record = raw.pop('run_record')  # the cases below edit the arguments: read as a checkpoint without a record
    cases = {
        'bare_state_dict.pth': (raw['state_dict'], 'records no training arguments'),
        'other.pth': ({'weights': [1, 2]}, 'without a state dict'),
        # (training.read_checkpoint reports a text file as refused pickled content; either way it stops.)
        'text.pth': (None, "text.pth' (was refused|is not a readable)"),
        'unknown_arch.pth': (dict(raw, args=dict(vars(raw['args']), model='no_such_net_xyz')),
                             "unknown architecture 'no_such_net_xyz'"),
        'wrong_classes.pth': (dict(raw, args=dict(vars(raw['args']), num_classes=7)), 'do not fit'),
        # With a run record, the record is what the model is built from.
        'record_wrong_classes.pth': (dict(raw, run_record=dict(record, model=dict(record['model'], num_classes=7))),
                                     'do not fit'),
        'record_newer.pth': (dict(raw, run_record=dict(record, version=99)), 'run record version 99'),
    }
    for name, (content, message) in cases.items():
        path = str(tmp_path / name)
        if content is None:
            open(path, 'w').write('not a checkpoint')
        else:
            torch.save(content, path)
        with pytest.raises(ValueError, match=message):
            hub.push_checkpoint(path, 'gsl-org/bad', token='t')
    with pytest.raises(ValueError, match='no such file'):
        hub.push_checkpoint(str(tmp_path / 'missing.pth'), 'gsl-org/bad', token='t')


def test_checkpoint_with_foreign_pickled_objects_is_refused_unrun(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    path = str(tmp_path / 'evil.pth')
    torch.save({'state_dict': {}, 'args': {'model': 'test_resnet'}, 'extra': _Foreign()}, path)
    with pytest.raises(ValueError, match='refused'):
        hub.push_checkpoint(path, 'gsl-org/bad', token='t')


class _Foreign:
    pass


def test_export_refuses_a_non_empty_folder_and_leaves_no_partial_folder(published, tmp_path):
    target = tmp_path / 'taken'
    target.mkdir()
    (target / 'x').write_text('x')
    with pytest.raises(ValueError, match='output_dir'):
        hub.export_checkpoint(published, str(target))
    bad = tmp_path / 'bad.pth'
    torch.save({'weights': 1}, str(bad))
    with pytest.raises(ValueError):
        hub.export_checkpoint(str(bad), str(tmp_path / 'new'))
    assert sorted(os.listdir(tmp_path)) == ['bad.pth', 'taken']


# ----------------------------------------------------------------------------------------------
# A fitted temperature: folded into the classifier (or not), recorded in config.json and the card
# ----------------------------------------------------------------------------------------------

CALIBRATED_REPO = 'gsl-org/tiny-resnet-calibrated'
# 1.75 is exact in binary: the folded classifier must be the trained one divided by it, bit for bit.
CALIBRATION = dict(temperature=1.75, images=24, source='a hold-out of the training pool', nll_before=0.8123,
                   ece_before=12.3456, nll_after=0.6543, ece_after=3.21, reported_on='the validation split',
                   reported_images=15, weights='model')
CALIBRATION_ROWS = ['| NLL, before temperature scaling | 0.812 |', '| NLL, after (T = 1.75) | 0.654 |',
                    '| ECE (%), before temperature scaling | 12.35 |', '| ECE (%), after (T = 1.75) | 3.21 |']
FITTED = ('T = 1.75 (fitted on 24 images: a hold-out of the training pool; figures reported on the '
          'validation split)')


def _with_calibration(checkpoint, path, ema=False, **calibration):
    """A copy of ``checkpoint`` recording a fitted temperature (and, with ``ema``, EMA weights unlike its own)."""
    raw = torch.load(checkpoint, map_location='cpu', weights_only=False)
    raw['calibration'] = dict(CALIBRATION, **calibration)
    if ema:
        raw['state_dict_ema'] = {k: v * 0.5 if k.startswith('fc.') else v for k, v in raw['state_dict'].items()}
    torch.save(raw, str(path))
    return str(path)


@pytest.fixture(scope='module')
def calibrated(run_dir):
    """The tiny run's best checkpoint with a calibration entry, beside the run's summary and curves."""
    return _with_calibration(os.path.join(run_dir, 'model_best.pth.tar'),
                             os.path.join(run_dir, 'model_calibrated.pth.tar'))


@pytest.fixture(scope='module')
def published_calibrated(server, hf_home, calibrated, tmp_path_factory):
    """``python -m timm_gsl push`` of the calibrated checkpoint (folding by default, as train.py publishes)."""
    done = _push(server, hf_home, tmp_path_factory.mktemp('push-calibrated'), calibrated,
                 '--repo-id', CALIBRATED_REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return calibrated


def _without_calibration(card):
    """The card's non-empty lines, less those about the temperature."""
    added = ('- **Calibration:**', '| NLL', '| ECE', 'NLL and ECE')
    return [line for line in card.splitlines() if line and not line.startswith(added)]


def test_folded_temperature_gives_the_checkpoints_logits_over_t_in_plain_timm(
        server, hf_home, published_calibrated, probe, tmp_path):
    local = tmp_path / 'exported'
    hub.export_checkpoint(published_calibrated, str(local))
    names = [f'hf-hub:{CALIBRATED_REPO}', f'local-dir:{local}']
    from_hub, from_dir = _load_logits(server, hf_home, tmp_path, names, probe)
    reference = _reference_logits(published_calibrated, probe).double()
    for logits in (from_hub, from_dir):
        assert torch.allclose(logits.double() * 1.75, reference, rtol=1e-5, atol=1e-6)
        assert torch.equal(logits.argmax(dim=1), reference.argmax(dim=1))
    assert not torch.allclose(from_hub.double(), reference, rtol=1e-2)  # it did change the logits
    # Only the classifier differs from the checkpoint: fc divided by T, every other tensor as trained.
    weights = safetensors.torch.load(server.files(CALIBRATED_REPO)['model.safetensors'])
    trained = torch.load(published_calibrated, map_location='cpu', weights_only=False)['state_dict']
    assert weights.keys() == trained.keys()
    for name, tensor in trained.items():
        assert torch.equal(weights[name], tensor / 1.75 if name in ('fc.weight', 'fc.bias') else tensor), name


def test_folded_config_and_card_record_the_temperature_and_nll_ece_before_and_after(
        server, published, published_calibrated):
    files, plain = server.files(CALIBRATED_REPO), server.files(REPO)
    config, plain_config = json.loads(files['config.json']), json.loads(plain['config.json'])
    assert config.pop('calibration') == dict(CALIBRATION, folded=True)
    for pretrained_cfg in (config['pretrained_cfg'], plain_config['pretrained_cfg']):
        pretrained_cfg.pop('origin_url')
    assert config == plain_config  # nothing else changes in config.json
    card = files['README.md'].decode()
    _, body = _card(card)
    assert (f'- **Calibration:** the logits are temperature-scaled by {FITTED}: the published classifier is the '
            'trained one divided by T, so the probabilities are calibrated and the predictions unchanged.') in body
    table = body.split('## Evaluation\n\n')[1].split('\n\n')[0].splitlines()
    assert table[:3] == ['| metric | value |', '|---|---|', table[2]] and table[2].startswith('| top-1 accuracy')
    assert table[-4:] == CALIBRATION_ROWS
    assert 'NLL and ECE (expected calibration error) are measured on the validation split (15 images).' in body
    # The rest of the card is the card of the same checkpoint without calibration.
    renamed = card.replace(CALIBRATED_REPO.split('/')[1], REPO.split('/')[1])
    assert _without_calibration(renamed) == _without_calibration(plain['README.md'].decode())


def test_no_fold_temperature_publishes_the_weights_as_trained_and_says_so(
        server, hf_home, calibrated, probe, tmp_path):
    folder = tmp_path / 'unfolded'
    done = _run(['-m', 'timm_gsl', 'export', calibrated, str(folder), '--no-fold-temperature'],
                _env(server, hf_home, with_package=True), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    (logits,) = _load_logits(server, hf_home, tmp_path, [f'local-dir:{folder}'], probe)
    assert torch.equal(logits, _reference_logits(calibrated, probe))
    assert json.loads((folder / 'config.json').read_text())['calibration'] == dict(CALIBRATION, folded=False)
    _, body = _card((folder / 'README.md').read_text())
    assert ('- **Calibration:** the published weights are not calibrated (they are the weights as trained); '
            f'dividing the logits by {FITTED} calibrates them.') in body
    assert all(row in body for row in CALIBRATION_ROWS)


def test_transformers_loads_a_folded_export_and_ignores_its_calibration(
        server, hf_home, published_calibrated, probe, tmp_path):
    pytest.importorskip('transformers')
    out = str(tmp_path / 'logits.safetensors')
    script = LOADER_PRELUDE + textwrap.dedent(f'''
        import safetensors.torch
        from transformers import AutoModelForImageClassification
        x = safetensors.torch.load_file({probe!r})['x']
        wrapped = AutoModelForImageClassification.from_pretrained('{CALIBRATED_REPO}').eval()
        with torch.no_grad():
            safetensors.torch.save_file({{'logits': wrapped(pixel_values=x).logits.contiguous()}}, {out!r})
        _done()
    ''')
    done = _run(['-c', script], _env(server, hf_home), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    logits = safetensors.torch.load_file(out)['logits'].double()
    assert torch.allclose(logits * 1.75, _reference_logits(published_calibrated, probe).double(), rtol=1e-5, atol=1e-5)


def test_temperature_fitted_for_other_weights_is_refused_in_one_line_before_any_request(
        server, hf_home, calibrated, tmp_path, monkeypatch):
    for_ema = _with_calibration(calibrated, tmp_path / 'for_ema.pth.tar', ema=True, weights='ema')
    for_model = _with_calibration(calibrated, tmp_path / 'for_model.pth.tar', ema=True)
    with monkeypatch.context() as m:
        _no_network(m)
        with pytest.raises(ValueError, match=r'fitted for the EMA weights, not the model weights.*pass --use-ema.*'
                                             r'--no-fold-temperature'):
            hub.push_checkpoint(for_ema, 'gsl-org/mismatch', token='t')
        with pytest.raises(ValueError, match=r'fitted for the model weights, not the EMA weights.*drop --use-ema.*'
                                             r'--no-fold-temperature'):
            hub.push_checkpoint(for_model, 'gsl-org/mismatch', token='t', use_ema=True)
    before = len(server.requests)
    env = _env(server, hf_home, with_package=True)
    for command in (['push', for_ema, '--repo-id', 'gsl-org/mismatch'], ['export', for_ema, str(tmp_path / 'out')]):
        done = _run(['-m', 'timm_gsl'] + command, env, cwd=str(tmp_path))
        assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr[-3000:]
        assert '--use-ema' in done.stderr and '--no-fold-temperature' in done.stderr
    assert len(server.requests) == before and not (tmp_path / 'out').exists()

    # Publishing the weights it was fitted for folds it into those; unfolded, T (for other weights) is left out.
    hub.export_checkpoint(for_ema, str(tmp_path / 'ema'), use_ema=True)
    ema = torch.load(for_ema, map_location='cpu', weights_only=False)['state_dict_ema']
    folded = safetensors.torch.load_file(str(tmp_path / 'ema' / 'model.safetensors'))
    assert torch.equal(folded['fc.weight'], ema['fc.weight'] / 1.75)
    hub.export_checkpoint(for_ema, str(tmp_path / 'unfolded'), fold_temperature=False)
    assert 'calibration' not in json.loads((tmp_path / 'unfolded' / 'config.json').read_text())


def test_checkpoint_without_calibration_exports_the_same_files_with_or_without_folding(published, tmp_path):
    folded = hub.export_checkpoint(published, str(tmp_path / 'folded'), repo_id=REPO)
    unfolded = hub.export_checkpoint(published, str(tmp_path / 'unfolded'), repo_id=REPO, fold_temperature=False)
    assert folded == unfolded
    for name in folded:
        assert (tmp_path / 'folded' / name).read_bytes() == (tmp_path / 'unfolded' / name).read_bytes(), name
    assert 'calibration' not in json.loads((tmp_path / 'folded' / 'config.json').read_text())
    # Nothing about a temperature of its own (the loss's measured caveat, on every card of the loss, aside).
    card = (tmp_path / 'folded' / 'README.md').read_text().replace(hub.card.CALIBRATION_CAVEAT, '')
    assert 'Calibration' not in card and 'NLL' not in card and 'temperature' not in card
    weights = safetensors.torch.load_file(str(tmp_path / 'folded' / 'model.safetensors'))
    trained = torch.load(published, map_location='cpu', weights_only=False)['state_dict']
    assert all(torch.equal(weights[k], trained[k]) for k in trained)


def _randomised(model):
    """``model`` in eval mode with non-trivial batch-norm statistics (so a misplaced division would show)."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model.eval()


class _ConvClassifierNet(nn.Module):
    """A model whose classifier is a 1x1 convolution on the pooled features."""

    def __init__(self):
        super().__init__()
        self.stem, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 5, 1)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.fc(self.stem(x).relu().mean((2, 3), keepdim=True)).flatten(1)


def _deit_distilled():
    from timm.models.deit import VisionTransformerDistilled
    return VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5)


def _levit_distilled():
    from timm.models.levit import LevitDistilled
    return LevitDistilled(img_size=32, num_classes=5, embed_dim=(16, 24, 32), key_dim=8, num_heads=(2, 2, 2),
                          depth=(1, 1, 1))


@pytest.mark.parametrize('make', [
    lambda: timm.create_model('test_resnet', num_classes=5),  # nn.Linear
    _ConvClassifierNet,  # a 1x1 nn.Conv2d
    _deit_distilled,  # (head, head_dist), predicting with their mean
    _levit_distilled,  # two heads, each a container: BatchNorm1d, Dropout, Linear
], ids=['linear', 'conv1x1', 'deit-distilled', 'levit-distilled'])
def test_folding_divides_the_logits_of_every_head_by_t(make):
    torch.manual_seed(0)
    model = _randomised(make())
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x).double() / 2.5
        folded = hub.fold_into_classifier(model, 2.5)(x).double()
    assert torch.allclose(folded, reference, rtol=1e-5, atol=1e-6)
    assert torch.equal(folded.argmax(dim=1), reference.argmax(dim=1))


@pytest.mark.parametrize('head, found', [
    (nn.Identity(), 'holds no nn.Linear'),
    (nn.Sequential(nn.Linear(96, 5), nn.Softmax(dim=1)), 'does not divide its output by T'),  # not the last step
])
def test_folding_refuses_a_classifier_whose_output_does_not_scale_in_one_line(head, found):
    model = timm.create_model('test_resnet', num_classes=5).eval()
    model.fc = head
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf'{found}.*--no-fold-temperature') as e:
        hub.fold_into_classifier(model, 2.0, (3, 32, 32))
    assert '\n' not in str(e.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())  # left as it was


def test_folding_a_head_that_ends_with_a_linear_layer_divides_its_output():
    model = timm.create_model('test_resnet', num_classes=5).eval()
    model.fc = nn.Sequential(nn.Linear(model.num_features, 8), nn.ReLU(), nn.Linear(8, 5))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x) / 2.0
        assert torch.allclose(hub.fold_into_classifier(model, 2.0, (3, 32, 32))(x), reference, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Hugging Face transformers
# ----------------------------------------------------------------------------------------------

def test_transformers_model_and_pipeline_match_timm(server, hf_home, published, probe, tmp_path):
    pytest.importorskip('transformers')
    out = str(tmp_path / 'transformers.json')
    script = LOADER_PRELUDE + textwrap.dedent(f'''
        import json, numpy as np, safetensors.torch, timm
        from PIL import Image
        from transformers import AutoModelForImageClassification, pipeline
        x = safetensors.torch.load_file({probe!r})['x']
        model = timm.create_model('hf-hub:{REPO}', pretrained=True).eval()
        wrapped = AutoModelForImageClassification.from_pretrained('{REPO}').eval()
        with torch.no_grad():
            ours, theirs = model(x), wrapped(pixel_values=x).logits
            diff = (ours - theirs).abs().max().item()
            # transformers runs on the weights where it memory-maps them; oneDNN's kernels can round
            # differently at other alignments. In freshly allocated memory they must give timm's bits.
            for tensor in list(wrapped.parameters()) + list(wrapped.buffers()):
                tensor.data = tensor.data.clone()
            same = torch.equal(wrapped(pixel_values=x).logits, ours)
        image = Image.fromarray((np.random.default_rng(0).random((40, 36, 3)) * 255).astype('uint8'))
        config = timm.data.resolve_data_config({{}}, model=model)
        with torch.no_grad():
            probs = model(timm.data.create_transform(**config)(image).unsqueeze(0)).softmax(-1)[0]
        predictions = pipeline('image-classification', model='{REPO}', top_k=3)(image)
        json.dump(dict(same=same, diff=diff, labels=wrapped.config.id2label, predictions=predictions,
                       probs=probs.tolist()), open({out!r}, 'w'))
        _done()
    ''')
    done = _run(['-c', script], _env(server, hf_home), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.load(open(out))
    assert result['same'] and result['diff'] <= 1e-6, result['diff']
    names = json.loads(server.files(REPO)['config.json'])['label_names']
    assert [result['labels'][str(i)] for i in range(3)] == names
    expected = sorted(zip(result['probs'], names), reverse=True)
    assert [p['label'] for p in result['predictions']] == [n for _, n in expected]
    assert [p['score'] for p in result['predictions']] == pytest.approx([p for p, _ in expected], abs=1e-6)


# ----------------------------------------------------------------------------------------------
# The test Hub itself, through the real client
# ----------------------------------------------------------------------------------------------

def test_test_hub_answers_the_clients_listing_info_whoami_and_error_calls(server, hf_home, published, tmp_path):
    script = textwrap.dedent(f'''
        import json
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
        api = HfApi()
        info = api.model_info({REPO!r}, revision='main')
        errors = []
        for call in (lambda: hf_hub_download({REPO!r}, 'missing.txt'),
                     lambda: hf_hub_download('gsl-org/no-such-repo', 'config.json'),
                     lambda: hf_hub_download({REPO!r}, 'config.json', revision='no-such-branch')):
            try:
                call()
                errors.append(None)
            except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as e:
                errors.append(type(e).__name__)
        print(json.dumps(dict(
            user=api.whoami()['name'], sha=info.sha, siblings=sorted(s.rfilename for s in info.siblings),
            tree=sorted((f.path, f.size) for f in api.list_repo_tree({REPO!r})),
            files=api.list_repo_files({REPO!r}), exists=[api.file_exists({REPO!r}, 'config.json'),
                                                         api.file_exists({REPO!r}, 'nope.bin')],
            errors=errors)))
    ''')
    done = _run(['-c', script], _env(server, hf_home), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    files = server.files(REPO)
    assert result['user'] == 'tester'
    assert result['sha'] == server.repos[('model', REPO)].branches['main']
    assert result['siblings'] == sorted(files) == sorted(result['files'])
    assert result['tree'] == sorted([p, len(c)] for p, c in files.items())
    assert result['exists'] == [True, False]
    assert result['errors'] == ['RemoteEntryNotFoundError', 'RepositoryNotFoundError', 'RevisionNotFoundError']


def test_the_calibration_caveat_is_on_cards_of_the_group_softmax_loss_only():
    gsl = from_training_arguments(dict(model='m', loss='gsl', gsl_type='II', gsl_groups=4,
                                       gsl_grouping='discriminative'))
    ce = from_training_arguments(dict(model='m', loss='ce'))

    def training_section(record):
        return '\n'.join(hub.card._card_training(record, 'data', 'all images', 'validation', 'its own split'))

    assert hub.card.CALIBRATION_CAVEAT in training_section(gsl)
    assert hub.card.CALIBRATION_CAVEAT not in training_section(ce)
