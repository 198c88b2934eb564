"""Files and processes, one implementation each: atomic outputs, checksums, safe copies and
extraction of untrusted data, retries of flaky calls, process pools.

Nothing here knows about faces or models; every stage uses these instead of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from genderclf.config import GenderclfError

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


class UnsafeArchiveError(GenderclfError, ValueError):
    """An archive member would land outside the target folder, or is a link or device."""


# --- atomic outputs ------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp and mkdtemp create 0600 files and 0700 folders (private temporaries); an output
# gets the modes any other file the user writes gets (0644 and 0755 under the usual umask).
_FILE_MODE = 0o666 & ~_umask()
_DIR_MODE = 0o777 & ~_umask()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (same suffix) that replaces it if the block succeeds.

    For writers that want a file name (`DataFrame.to_csv`, `model.save`, `fig.savefig`).
    On any error the temporary file is removed and `path` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write text or bytes to `path` atomically (temp file + rename)."""
    with atomic_file(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write JSON atomically, keys sorted, creating the parent folder."""
    return atomic_write(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike[str], missing: str) -> Any:
    """Read a JSON file written by an earlier stage.

    Raises:
        FileNotFoundError: `path` is missing; the message ends with `missing` (what to run).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: {missing}")
    return json.loads(p.read_text(encoding="utf-8"))


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces `target` only if the block succeeds.

    A crash or exception leaves `target` as it was (the previous complete version, or
    absent) and removes the temporary folder, so readers never see a half-written output.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, _DIR_MODE)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_stale_temps(target: str | os.PathLike[str]) -> None:
    """Remove temporary folders left next to `target` by a killed `atomic_dir(target)`."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for p in target.parent.glob(pattern):
            shutil.rmtree(p, ignore_errors=True)


# --- checksums and trees -------------------------------------------------------------------


def sha256_file(path: str | os.PathLike[str], bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def md5_file(path: str | os.PathLike[str], bufsize: int = 1 << 20) -> str:
    """The MD5 of a file's bytes: the hash DVC records for a file output in dvc.lock."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


# The date every member of a rewritten zip gets: the earliest a zip can hold.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def reproducible_zip(
    path: str | os.PathLike[str], rewrite: Callable[[str, bytes], bytes] | None = None
) -> Path:
    """Rewrite a zip file in place so that the same members give the same bytes.

    Writers such as Keras' `model.save` and NumPy's `savez` stamp each member with the
    current time; here every member keeps its name, order and compression but gets the
    date `ZIP_EPOCH` and plain permissions. `rewrite(name, data)` may change a member's
    content (e.g. drop a save time from it). Call it on a temporary file (`atomic_file`):
    the rewrite itself is not atomic.
    """
    path = Path(path)
    with zipfile.ZipFile(path) as z:
        members = [(i.filename, i.compress_type, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for name, compression, data in members:
            info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
            info.compress_type = compression
            info.create_system = 3  # Unix, whatever the machine
            info.external_attr = 0o644 << 16
            z.writestr(info, rewrite(name, data) if rewrite else data)
    return path


def iter_files(root: str | os.PathLike[str]) -> Iterator[Path]:
    """Every regular file below `root`, sorted by relative path.

    Hidden files and folders are skipped, and so are symbolic links: a link is never
    followed (see `copy_tree` for how a dataset's links are handled).
    """
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not name.startswith(".") and not p.is_symlink():
                yield p


def tree_checksum(root: str | os.PathLike[str], exclude: tuple[str, ...] = ()) -> tuple[str, int]:
    """A content checksum of a folder: sha256 over (relative path, file sha256) pairs.

    Returns:
        (hex digest, number of files)
    """
    root = Path(root)
    h = hashlib.sha256()
    n = 0
    for p in iter_files(root):
        rel = p.relative_to(root).as_posix()
        if rel in exclude:
            continue
        h.update(f"{rel}\0{sha256_file(p)}\n".encode())
        n += 1
    return h.hexdigest(), n


@dataclass(frozen=True)
class Refused:
    """A file of an untrusted source that was not copied, and why."""

    path: str
    reason: str


def copy_tree(
    src: str | os.PathLike[str], dest: str | os.PathLike[str], move: bool = False
) -> list[Refused]:
    """Copy (or move) the regular files of an untrusted folder; never follow a link out of it.

    A symbolic link to a file inside `src` is copied as that file's content. A link that
    points outside `src` (or nowhere), and any link to a folder, is refused: nothing is
    read through it, and it is returned with its reason so the caller can list it.
    Hidden files and folders are skipped, as in `iter_files`.

    Returns:
        The refused entries, sorted by path.
    """
    src, dest = Path(src), Path(dest)
    root = src.resolve()
    refused: list[Refused] = []
    files: list[Path] = []  # with `move` only: a plain copy is made during the walk
    links: list[Path] = []

    def place(p: Path) -> None:
        out = dest / p.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        if move:
            os.replace(p, out)
        else:
            shutil.copyfile(p, out)  # content only: no permissions or owner from outside

    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        for d in sorted(dirnames):
            if (here / d).is_symlink() and not d.startswith("."):
                refused.append(
                    Refused(
                        (here / d).relative_to(src).as_posix(),
                        "link_refused: a link to a folder is not followed",
                    )
                )
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and not (here / d).is_symlink()
        )
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = here / name
            if p.is_symlink():
                links.append(p)
            elif move:
                files.append(p)
            else:
                place(p)  # nothing is held per file: memory stays flat in the file count
    # Links first: with `move`, the file a link points at must still be in place.
    for p in links:
        target = p.resolve()
        rel = p.relative_to(src)
        if not target.is_relative_to(root) or not target.is_file():
            refused.append(
                Refused(
                    rel.as_posix(),
                    "link_refused: the link points outside the dataset folder (not followed)",
                )
            )
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target, dest / rel)  # a link inside the tree becomes a plain file
    for p in files:
        place(p)
    return sorted(refused, key=lambda r: r.path)


# --- archives ------------------------------------------------------------------------------


def _check_member(target: Path, name: str) -> Path:
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path")
    parts = Path(name.replace("\\", "/")).parts
    if ".." in parts:
        raise UnsafeArchiveError(f"archive member {name!r} has a '..' component")
    dest = (target / name).resolve()
    if not dest.is_relative_to(target.resolve()):
        raise UnsafeArchiveError(f"archive member {name!r} would land outside {target}")
    return dest


def safe_extract(archive: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Extract a zip or tar archive into `target`, refusing unsafe members.

    Every member is checked before anything is written: absolute paths, `..`
    components and links that point outside `target` raise UnsafeArchiveError, and
    nothing is left behind (not even `target` itself, when it did not exist before). An
    extraction that fails part-way (a corrupt member, a full disk) removes a `target` it
    created.
    """
    archive, target = Path(archive), Path(target)
    created = not target.exists()
    try:
        _extract(archive, target)
    except BaseException:
        if created:
            shutil.rmtree(target, ignore_errors=True)
        raise


def _extract(archive: Path, target: Path) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                _check_member(target, info.filename)
                # A zip symlink has the S_IFLNK bits in the high word of external_attr.
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise UnsafeArchiveError(f"archive member {info.filename!r} is a symbolic link")
            target.mkdir(parents=True, exist_ok=True)
            z.extractall(target)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            members = t.getmembers()
            for m in members:
                _check_member(target, m.name)
                if m.issym() or m.islnk():
                    link_dest = (target / Path(m.name).parent / m.linkname).resolve()
                    if m.islnk():
                        link_dest = (target / m.linkname).resolve()
                    if Path(m.linkname).is_absolute() or not link_dest.is_relative_to(
                        target.resolve()
                    ):
                        raise UnsafeArchiveError(
                            f"archive member {m.name!r} links outside the target ({m.linkname!r})"
                        )
                elif not (m.isfile() or m.isdir()):
                    raise UnsafeArchiveError(f"archive member {m.name!r} is a special file")
            target.mkdir(parents=True, exist_ok=True)
            t.extractall(target, members=members, filter="data")
    else:
        raise ValueError(f"{archive}: not a zip or tar archive")


# --- retries (only around calls to a flaky world: network, object storage, servers) --------


def retry(
    fn: Callable[[], T],
    *,
    attempts: int,
    backoff: float,
    what: str,
    retry_on: tuple[type[BaseException], ...],
    give_up: Callable[[BaseException, int], BaseException],
    permanent: Callable[[BaseException], bool] = lambda err: False,
) -> T:
    """Call `fn`; retry errors of the `retry_on` types with exponential backoff (tenacity).

    Args:
        attempts: retries after the first call (0 = call once).
        backoff: seconds before the first retry; doubled each time.
        what: named in the log line of each retry.
        retry_on: exception types that mean "try again".
        give_up: builds the error raised when the last retry fails, from that error and
            the number of calls made.
        permanent: errors of the `retry_on` types that are re-raised at once (for example
            a 4xx answer from a server that did answer).
    """
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

    def retryable(err: BaseException) -> bool:
        return isinstance(err, retry_on) and not permanent(err)

    def note(state) -> None:
        err = state.outcome.exception()
        log.warning(
            "%s failed (%s); retry %d/%d in %.1fs",
            what,
            type(err).__name__,
            state.attempt_number,
            attempts,
            state.next_action.sleep,
        )

    try:
        for attempt in Retrying(
            stop=stop_after_attempt(attempts + 1),
            wait=wait_exponential(multiplier=backoff, min=0, max=600),
            retry=retry_if_exception(retryable),
            before_sleep=note,
            reraise=True,
        ):
            with attempt:
                return fn()
    except BaseException as err:
        if retryable(err):
            raise give_up(err, attempts + 1) from err
        raise
    raise AssertionError("unreachable")  # pragma: no cover


# --- processes -----------------------------------------------------------------------------


def cpu_workers(requested: int) -> int:
    """Resolve a `workers: 0` setting to the number of usable CPU cores."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


_CONTEXT: Any = None


def _set_context(context: Any) -> None:
    global _CONTEXT
    _CONTEXT = context


def _apply_chunk(fn: Callable[[Any, Any], Any], chunk: list[Any]) -> list[Any]:
    return [fn(_CONTEXT, item) for item in chunk]


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of `size` consecutive items (the last may be shorter), read lazily."""
    it = iter(items)
    while chunk := list(itertools.islice(it, max(1, size))):
        yield chunk


def parallel_map(
    fn: Callable[[Any, T], R],
    items: Iterable[T],
    *,
    workers: int,
    context: Any = None,
    chunksize: int = 1,
    cluster: bool = True,
) -> Iterator[R]:
    """`fn(context, item)` for every item, in input order: the project's one parallel map.

    The engine is chosen by where the code runs, never by a setting (STYLE 19): with Ray's
    `RAY_ADDRESS` set, each chunk of `chunksize` items is one Ray task on that cluster
    (`genderclf.engine`); otherwise the chunks go to `workers` local processes, or run here
    with `workers <= 1`. The same `fn` runs either way, so the results are the same.

    Items are read lazily and only a few chunks per worker are in flight at a time, so
    memory stays flat however many items there are. `fn` must be a module-level function;
    `context` (settings, a root folder) is sent to each worker once, not with every item.
    Local workers are spawned, not forked: the parent may have imported TensorFlow, which
    is not fork-safe.

    Args:
        cluster: False for work that must run on this machine whatever RAY_ADDRESS says
            (it writes into a local folder, as the sample generator does).

    Raises:
        Whatever `fn` raises (from a Ray task: the original error when it is a
        GenderclfError); ClusterError when RAY_ADDRESS names no reachable cluster.
    """
    from genderclf.engine import cluster_address

    chunks = chunked(items, chunksize)
    if cluster and cluster_address():
        from genderclf.engine import ray_map

        yield from ray_map(fn, chunks, context)
        return
    if workers <= 1:
        for chunk in chunks:
            for item in chunk:
                yield fn(context, item)
        return
    ctx = mp.get_context("spawn")
    window: deque[Any] = deque()
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_set_context, initargs=(context,)
    ) as pool:
        try:
            for chunk in chunks:
                window.append(pool.submit(_apply_chunk, fn, chunk))
                # Two chunks per worker keep every process busy while the caller consumes.
                if len(window) >= 2 * workers:
                    yield from window.popleft().result()
            while window:
                yield from window.popleft().result()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
