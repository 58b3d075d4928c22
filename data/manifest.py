"""A folder's manifest, made once: every file's header (audio length, image size), so start-up reads no headers again.

fairseq reads LibriSpeech through a .tsv manifest written by a separate script (wav2vec_manifest.py: the root on the
first line, then `path<TAB>frames`). Here the first run over a folder writes it, with the same first line and, per
file, `path<TAB>size<TAB>mtime_ns<TAB>header fields`: later runs stat every file (no open, no read) and read again
only the headers of files that are new or whose size or mtime changed, and of files that could not be read before.
A file that breaks after the manifest was written is still found and skipped mid-run (data.MicroBatches).

Under torchrun each machine's local rank 0 reads the headers and writes the manifest while the other ranks wait,
then they read it (several machines sharing one filesystem write the same file, each by an atomic rename).
The manifest lies in the folder (a hidden .data2vec-<kind>.tsv) or, where the folder is read-only (a shared dataset
mount), in ~/.cache/data2vec/ under a hash of the folder's path ($XDG_CACHE_HOME is honoured).
"""
import hashlib
import os
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch.distributed as dist
from tqdm import tqdm

from data import DataError


def manifest_path(root, kind):
    """Where the manifest of `root` lies: in it if writable, else in the user's cache."""
    root = Path(root).resolve()
    if os.access(root, os.W_OK):
        return root / f'.data2vec-{kind}.tsv'
    cache = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'data2vec'
    return cache / f'{root.name}-{hashlib.sha1(os.fsencode(root)).hexdigest()[:12]}-{kind}.tsv'


def _load(path):
    """{relative path: (size, mtime_ns, (int fields))} from a manifest; {} if there is none or it is unreadable."""
    try:
        with open(path, encoding='utf-8', errors='surrogateescape', newline='') as f:   # names as os.listdir gives them
            lines = f.read().split('\n')[1:]                                  # line 1: the root, as fairseq's
        return {rel: (int(size), int(mtime), tuple(map(int, rest)))
                for rel, size, mtime, *rest in (line.split('\t') for line in lines if line)}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}


def _write(path, root, entries):
    """Write-then-rename, so a reader never sees half a manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'{path.name}.tmp{os.getpid()}')
    lines = [str(root)] + [f'{rel}\t{size}\t{mtime}\t' + '\t'.join(map(str, fields))
                           for rel, (size, mtime, fields) in entries.items() if not any(c in rel for c in '\t\n\r')]
    with open(tmp, 'w', encoding='utf-8', errors='surrogateescape', newline='') as f:   # a name with a tab or line break
        f.write('\n'.join(lines) + '\n')                                  # is left out: it is read again next time
    os.replace(tmp, path)


def _size_and_mtime(path):
    """(size, mtime in ns) of a file; (-1, -1) if it cannot be stat'ed (gone since it was listed: read_header says why)."""
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def list_files(root, suffixes):
    """The files under `root` (and links to files; not into linked folders, as Path.rglob) whose suffix, lower-cased, is
    in `suffixes`: their paths relative to root, as str, in the order sorted() gives their Paths (component by
    component). Strings, not Paths: at a million files, Path objects cost seconds to build and sort, and MBs."""
    found, folders = [], ['']
    while folders:
        rel = folders.pop()
        try:
            with os.scandir(os.path.join(root, rel)) as entries:
                for e in entries:                           # DirEntry: the type from the listing, no stat for plain files
                    path = f'{rel}/{e.name}' if rel else e.name
                    if e.is_dir(follow_symlinks=False):
                        folders.append(path)
                    elif os.path.splitext(e.name)[1].lower() in suffixes and e.is_file():
                        found.append(path)
        except PermissionError:                             # a folder we may not list is skipped, as rglob skips it
            continue
    return sorted(found, key=lambda rel: rel.split('/'))


class FileList(Sequence):
    """Paths under `root` held as one numpy array of bytes, not a Python object per file: a million Paths take ~300 MB
    in every process, and a loader worker, touching their reference counts, copies the pages that hold them; this
    takes the bytes of the names. item i → Path."""

    def __init__(self, root, rels):
        self.root, self.rels = Path(root), np.array([os.fsencode(rel) for rel in rels], dtype=bytes)   # (N,) S<longest>

    def __len__(self):
        return len(self.rels)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.root / os.fsdecode(self.rels[i])


def read_headers(root, rels, read_header, kind):
    """[(int fields) or the DataError message (str)] for the files `rels` (list_files) under `root`, in order: from the
    manifest where a file's size and mtime match it, else from read_header(Path) → tuple of ints (DataError: unreadable).
    → (results, how many headers were read). (Threads did not help: on this machine's disk 16 of them read image
    headers 1.7× slower than one, the GIL's contention; scale.py startup.)"""
    ddp = dist.is_available() and dist.is_initialized()
    first = not ddp or int(os.environ.get('LOCAL_RANK', dist.get_rank() if ddp else 0)) == 0   # one reader per machine
    group = dist.new_group(backend='gloo', timeout=timedelta(hours=6)) if ddp else None   # it may read for hours
    if not first:
        dist.barrier(group)                                                   # wait for its manifest
    path = manifest_path(root, kind)
    known = _load(path)
    stats = [_size_and_mtime(os.path.join(root, rel)) for rel in rels]
    todo = [k for k, (rel, st) in enumerate(zip(rels, stats)) if known.get(rel, (None, None))[:2] != st]
    fresh = {}
    for k in tqdm(todo, desc=f'reading {kind} headers', disable=len(todo) < 2000, leave=False, dynamic_ncols=True):
        try:
            fresh[k] = read_header(Path(root, rels[k]))
        except DataError as e:
            fresh[k] = str(e)
    results = [fresh[k] if k in fresh else known[rel][2] for k, rel in enumerate(rels)]
    if (todo or len(known) != len(rels)) and first:
        try:
            _write(path, Path(root).resolve(), {rel: (*st, r) for rel, st, r in zip(rels, stats, results)
                                                if not isinstance(r, str)})    # unreadable files are tried again next time
        except OSError as e:
            print(f'{path}: could not write the manifest ({e.strerror}); the next start-up reads every header again')
    if ddp and first:
        dist.barrier(group)
    if ddp:
        dist.destroy_process_group(group)
    return results, len(todo)


if __name__ == '__main__':                       # make the manifest before a multi-GPU launch (train.py would make it too)
    import argparse
    p = argparse.ArgumentParser(description='python -m data.manifest --kind audio|images --data DIR: read every header under '
                                            'DIR once and write its manifest (train.py and finetune.py then start without reading them)')
    p.add_argument('--kind', choices=['audio', 'images'], required=True)
    p.add_argument('--data', required=True, help='audio: the folder of .wav/.flac; images: the <class>/<image> folder')
    args = p.parse_args()
    from data.speech import AudioFolder          # here: data.speech and data.vision import this module
    from data.vision import ImageFolder
    try:
        ds = AudioFolder(args.data, strict=False) if args.kind == 'audio' else ImageFolder(args.data, strict=False)
    except DataError as e:
        raise SystemExit(f'data.manifest: error: {e}')
    print(f'{manifest_path(args.data, args.kind)}: {len(ds):,} files ({ds.headers_read:,} headers read now)'
          + (f'; {len(ds.unreadable)} unreadable, e.g. {ds.unreadable[0]}' if ds.unreadable else ''))
