"""Name the file when timm skips an image it cannot read.

timm's ``ImageDataset`` skips an unreadable image with the warning ``Skipped sample (index N). <error>``, which
names the file only when the decoder's error does (a truncated JPEG's does not). :func:`name_skipped_files`
gives a dataset a subclass that records, per thread, which dataset is loading, and a filter on timm's dataset
logger appends the file of index N to that warning. timm's loading and retry logic stay timm's.
"""
from __future__ import annotations

import logging
import re
import threading
from typing import Any

from timm.data import ImageDataset

__all__ = ['NamingImageDataset', 'name_skipped_files']

_SKIPPED = re.compile(r'Skipped sample \(index (\d+)\)\.')


class _Loading(threading.local):
    dataset: Any = None


_loading = _Loading()


class NamingImageDataset(ImageDataset):
    """timm's ``ImageDataset`` whose skipped-image warnings name the file (see the module docstring)."""

    def __getitem__(self, index):
        _loading.dataset = self
        try:
            return super().__getitem__(index)
        finally:
            _loading.dataset = None


class _NameSkippedFile(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        dataset = _loading.dataset
        match = _SKIPPED.match(record.getMessage()) if dataset is not None else None
        if match:
            try:
                name = dataset.filename(int(match.group(1)), absolute=True)
            except Exception:  # noqa: BLE001 - a reader without file names: leave timm's message as it is
                return True
            record.msg, record.args = f'{record.getMessage()} (file {name})', ()
        return True


_FILTER = _NameSkippedFile()
logging.getLogger('timm.data.dataset').addFilter(_FILTER)  # once, on import (data-loader workers import it too)


def name_skipped_files(dataset: Any) -> Any:
    """Make a timm ``ImageDataset`` name the files it skips (in place); other datasets are returned unchanged."""
    if type(dataset) is ImageDataset:
        dataset.__class__ = NamingImageDataset
    return dataset
