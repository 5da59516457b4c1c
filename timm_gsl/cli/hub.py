"""``python -m timm_gsl <command>``: the Hub commands (push a checkpoint, export it to a folder).

Commands:
    push    publish a checkpoint of ``train.py`` to the Hugging Face Hub as a plain timm model.
    export  write the same files (weights, config, model card) into a local folder (``local-dir:`` loadable).

Examples:
    python -m timm_gsl push output/train/run/model_best.pth.tar --repo-id my-org/resnet50-gsl
    python -m timm_gsl export output/train/run/model_best.pth.tar exported/resnet50-gsl
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from typing import Callable, Dict, Optional, Sequence

from ..hub import HubPublishError, build_model, export_checkpoint, load_training_checkpoint, push_checkpoint
from .common import ArgumentParser, check_can_create, exit_with_error, one_line, quiet_http_logs, repo_id_type
from .train_args import training_command

__all__ = ['get_args_parser', 'main']

_logger = logging.getLogger('timm_gsl')


def _add_publish_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--use-ema', action='store_true', default=False,
                        help='publish the checkpoint\'s EMA weights (state_dict_ema) when it has them')
    parser.add_argument('--license', default='apache-2.0', metavar='ID',
                        help='Hub license id written in the model card (default: apache-2.0)')
    parser.add_argument('--no-fold-temperature', dest='fold_temperature', action='store_false', default=True,
                        help="publish the weights as trained, without dividing the classifier by the checkpoint's "
                             "fitted temperature")


def get_args_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m timm_gsl``, one sub-parser per command.

    Returns:
        A new parser.
    """
    parser = ArgumentParser(prog='python -m timm_gsl', description='timm-gsl commands.')
    commands = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)

    push = commands.add_parser(
        'push', help='publish a train.py checkpoint to the Hugging Face Hub',
        description='Publish a train.py checkpoint to the Hugging Face Hub as a plain timm model: '
                    'model.safetensors, config.json, README.md (model card) and the learning curves.')
    push.add_argument('checkpoint', metavar='CHECKPOINT', help='checkpoint file, e.g. model_best.pth.tar')
    push.add_argument('--repo-id', required=True, type=repo_id_type, metavar='ORG/NAME', help='the Hub repo')
    push.add_argument('--revision', default=None, metavar='BRANCH',
                      help='branch to commit to, created when missing (default: main)')
    push.add_argument('--private', action='store_true', default=False, help='create the repo private')
    push.add_argument('--commit-message', default=None, metavar='TEXT', help='commit summary')
    push.add_argument('--token', default=None, metavar='TOKEN',
                      help='Hub token (default: HF_TOKEN or the token saved by `hf auth login`)')
    push.add_argument('--hub-create-pr', '--create-pr', dest='hub_create_pr', action='store_true', default=False,
                      help='open a pull request against main instead of committing (not with --revision)')
    push.add_argument('--replace-card', action='store_true', default=False,
                      help="replace the repo's README.md with this checkpoint's model card (default: a card "
                           "the repo already has is kept, as timm's push_to_hf_hub does)")
    _add_publish_args(push)

    export = commands.add_parser(
        'export', help='write the files push would publish into a local folder',
        description='Write model.safetensors, config.json, README.md and the learning curves of a train.py '
                    'checkpoint into a new folder, loadable with timm.create_model("local-dir:FOLDER").')
    export.add_argument('checkpoint', metavar='CHECKPOINT', help='checkpoint file, e.g. model_best.pth.tar')
    export.add_argument('output_dir', metavar='FOLDER', help='folder to create (must not exist or be empty)')
    export.add_argument('--repo-id', default=None, type=repo_id_type, metavar='ORG/NAME',
                        help='the Hub repo you will upload the folder to: the model card and config.json then '
                             'name hf-hub:ORG/NAME (default: the card loads the folder, local-dir:FOLDER)')
    _add_publish_args(export)
    return parser


def _push(args: argparse.Namespace) -> None:
    url = push_checkpoint(args.checkpoint, args.repo_id, revision=args.revision, private=args.private,
                          commit_message=args.commit_message, token=args.token, use_ema=args.use_ema,
                          license=args.license, create_pr=args.hub_create_pr, replace_card=args.replace_card,
                          training_command=training_command, fold_temperature=args.fold_temperature)
    print(f'Published {args.checkpoint} to {args.repo_id}{" as a pull request" if args.hub_create_pr else ""}: '
          f'{url}')


def _export(args: argparse.Namespace) -> None:
    files = export_checkpoint(args.checkpoint, args.output_dir, repo_id=args.repo_id, use_ema=args.use_ema,
                              license=args.license, training_command=training_command,
                              fold_temperature=args.fold_temperature)
    print(f'Exported {args.checkpoint} to {args.output_dir}: {", ".join(files)}')


_COMMANDS: Dict[str, Callable[[argparse.Namespace], None]] = {'push': _push, 'export': _export}


def check_inputs(args: argparse.Namespace) -> None:
    """What a command can know is wrong before it does anything: the checkpoint and (export) the folder.

    The checkpoint is read (without running anything in it), checked to be a timm training checkpoint
    that names its model, and its model is built with its weights, exactly as the command will; the
    command then repeats this, which costs a second for the sizes a checkpoint usually has.

    Raises:
        ValueError: naming the argument, the path and what is expected.
    """
    if args.command == 'export':
        output_dir = args.output_dir
        if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
            raise ValueError(f'FOLDER {output_dir!r} exists and is not an empty folder; expected a new (or empty) '
                             f'folder to export into.')
        check_can_create(output_dir, 'FOLDER')
    if args.command == 'push' and not args.token:
        from huggingface_hub import get_token
        if not get_token():  # before the checkpoint is read, and long before any request
            raise ValueError('--token: no Hugging Face token; pass --token, set HF_TOKEN, or run `hf auth login`.')
    loaded = load_training_checkpoint(args.checkpoint)  # (the command itself says which weights it publishes)
    model = build_model(loaded)
    del loaded, model
    gc.collect()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 when the command failed (the Hub refused or dropped the upload;
        the message is on stderr). A command line that does not parse, a missing token (push), a checkpoint
        that is not a readable training checkpoint and (export) a folder that is not new exit with status 2
        and one line, ``python -m timm_gsl <command>: error: <message>``, before anything is written or sent.
    """
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    quiet_http_logs()
    parser = get_args_parser()
    args = parser.parse_args(argv)
    prog = f'{parser.prog} {args.command}'
    try:
        check_inputs(args)
    except ValueError as e:
        exit_with_error(prog, e)
    try:
        _COMMANDS[args.command](args)
    except (ValueError, HubPublishError) as e:
        print(f'{prog}: error: {one_line(e)}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    from timm_gsl.cli.hub import main as _main
    sys.exit(_main())
