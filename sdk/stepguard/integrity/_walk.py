"""Walking a tree without following links, and where each file came from.

:func:`walk_tree` lists a file or directory tree into :class:`Scan` records: one :class:`Node`
per entry (regular file, symlink, FIFO, socket, device), the directories, and directories that
could not be read. Nothing below the root is followed: each directory is opened with
``O_DIRECTORY|O_NOFOLLOW`` and its ``fstat`` identity compared with what its parent listed, so a
directory swapped for a link while walking is a finding, not a redirection. With
``defer_files=True`` regular files (by their directory entry's type) are not ``lstat``'ed: the
``fstat`` of the descriptor they are later hashed through supplies size, identity and link count
(:meth:`Node.settle`), and the identity of the directory they were listed in is kept so they are
opened relative to that re-opened, re-checked directory (``_direct.DirCursor``).

Symlinks are refused by default; with ``allow_internal_symlinks`` a link to a regular file
inside the root is followed and its target's bytes are what gets hashed. Files whose inode has
names outside the tree (:func:`hardlink_problems`) are refused by the manifest operations unless
the caller opts out. See docs/concepts/integrity.md (time-of-check/time-of-use).

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "sub").mkdir(); _ = (d / "sub" / "x").write_bytes(b"1")
>>> (d / "link").symlink_to("sub/x")
>>> s = walk_tree(str(d), False)
>>> sorted((rel, n.kind) for rel, n in s.nodes.items()), sorted(s.dirs)
([('link', 'symlink'), ('sub/x', 'file')], ['sub'])
"""

from __future__ import annotations

import os
import stat
from collections.abc import Container
from dataclasses import dataclass, field

from stepguard.errors import IntegrityError
from stepguard.integrity._direct import DIR_FLAGS, Changed, DirCursor, kind

__all__ = [
    "UNKNOWN",
    "Node",
    "Scan",
    "hardlink_problems",
    "resolve_root",
    "stat_in_dir",
    "walk_tree",
]

#: Identity of a file whose inode has not been looked at yet (see ``walk_tree(defer_files=True)``).
UNKNOWN: tuple[int, int] = (-1, -1)


@dataclass(slots=True)
class Node:
    """One entry of a walked tree: its manifest key, kind, and the path to open it by."""

    rel: str
    kind: str
    open_path: str
    ident: tuple[int, int] = (0, 0)
    size: int = 0
    nlink: int = 1
    note: str = ""
    #: A regular file by its directory entry, not stat'ed yet: the ``fstat`` of the descriptor
    #: it is hashed through supplies size, identity and link count (``settle``).
    deferred: bool = False
    #: For a deferred file: the identity of the directory it was listed in. The file is opened
    #: relative to that directory, re-opened and checked, so a parent directory swapped for a
    #: link after the walk cannot redirect the read.
    parent: tuple[int, int] | None = None

    def settle(self, size: int, dev: int, ino: int, nlink: int) -> None:
        self.size, self.ident, self.nlink, self.deferred = size, (dev, ino), nlink, False


@dataclass
class Scan:
    """A walked tree: its entries by relative path, its directories, what could not be read."""

    root: str
    is_file: bool
    nodes: dict[str, Node] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    problems: list[tuple[str, str]] = field(default_factory=list)


def resolve_root(path: str | os.PathLike[str]) -> str:
    """The real path of the root the caller named (IntegrityError when it does not exist)."""
    # The caller names the root; following a symlink there is the caller's choice. Below the
    # root nothing is followed unless allowed.
    real = os.path.realpath(os.fspath(path))
    if not os.path.lexists(real):
        raise IntegrityError("input does not exist", subject=os.fspath(path),
                             details=(f"missing: {os.fspath(path)}",))
    return real


def walk_tree(root: str, allow_internal_symlinks: bool, *, defer_files: bool = False,
              descend: Container[str] | None = None) -> Scan:
    """Walk ``root`` without following links. With ``defer_files``, regular files (by their
    directory entry's type) are not ``lstat``'ed: they are opened with ``O_NOFOLLOW`` later and
    the ``fstat`` of that descriptor is what counts, which saves one system call per file.
    With ``descend``, only the directories whose relative path it holds are entered (the others
    are still listed in ``Scan.dirs``): a caller that wants a few files need not walk the rest."""
    st = os.lstat(root)
    if stat.S_ISREG(st.st_mode):
        name = os.path.basename(root)
        scan = Scan(root, True)
        scan.nodes[name] = Node(name, "file", root, (st.st_dev, st.st_ino), st.st_size,
                                st.st_nlink)
        return scan
    if not stat.S_ISDIR(st.st_mode):
        raise IntegrityError("input is neither a regular file nor a directory", subject=root,
                             details=(f"type: {root} is a {kind(st.st_mode)}",))
    scan = Scan(root, False)
    is_reg = stat.S_ISREG
    stack: list[tuple[str, tuple[int, int]]] = [("", (st.st_dev, st.st_ino))]
    while stack:
        rel_dir, ident = stack.pop()
        abs_dir = os.path.join(root, rel_dir) if rel_dir else root
        try:
            fd = os.open(abs_dir, DIR_FLAGS)
        except OSError as exc:
            scan.problems.append((rel_dir or ".", f"unreadable directory ({exc.strerror})"))
            continue
        try:
            dst = os.fstat(fd)
            if (dst.st_dev, dst.st_ino) != ident:
                scan.problems.append((rel_dir, "directory replaced while walking"))
                continue
            with os.scandir(fd) as it:
                if defer_files:
                    entries = [(e.name, None if e.is_file(follow_symlinks=False)
                                else e.stat(follow_symlinks=False)) for e in it]
                else:
                    entries = [(e.name, e.stat(follow_symlinks=False)) for e in it]
        except OSError as exc:
            scan.problems.append((rel_dir or ".", f"unreadable directory ({exc.strerror})"))
            continue
        finally:
            os.close(fd)
        # Plain concatenation, not os.path.join: this loop runs once per file.
        rel_prefix = rel_dir + "/" if rel_dir else ""
        abs_prefix = abs_dir if abs_dir.endswith("/") else abs_dir + "/"
        nodes = scan.nodes
        for name, est in entries:
            rel = rel_prefix + name
            abs_path = abs_prefix + name
            if est is None:
                nodes[rel] = Node(rel, "file", abs_path, UNKNOWN, -1, -1, deferred=True,
                                  parent=ident)
                continue
            mode = est.st_mode
            if is_reg(mode):
                nodes[rel] = Node(rel, "file", abs_path, (est.st_dev, est.st_ino),
                                  est.st_size, est.st_nlink)
            elif stat.S_ISDIR(mode):
                scan.dirs.add(rel)
                if descend is None or rel in descend:
                    stack.append((rel, (est.st_dev, est.st_ino)))
            elif stat.S_ISLNK(mode):
                scan.nodes[rel] = _link_node(root, rel, abs_path, allow_internal_symlinks)
            else:
                scan.nodes[rel] = Node(rel, kind(mode), abs_path)
    return scan


def _link_node(root: str, rel: str, abs_path: str, allowed: bool) -> Node:
    try:
        target = os.readlink(abs_path)
    except OSError:
        target = "?"
    node = Node(rel, "symlink", abs_path, note=f"-> {target}")
    if not allowed:
        return node
    real = os.path.realpath(abs_path)
    if os.path.commonpath([real, root]) != root:
        node.note += " (resolves outside the root)"
        return node
    try:
        tst = os.lstat(real)
    except OSError:
        node.note += " (dangling)"
        return node
    if not stat.S_ISREG(tst.st_mode):
        node.note += f" (resolves to a {kind(tst.st_mode)}; only links to files are allowed)"
        return node
    # The body reads through the link, so the link's target bytes are what gets verified; the
    # target is itself in the tree and counted once for hard-link purposes.
    return Node(rel, "file", real, (tst.st_dev, tst.st_ino), tst.st_size, 1,
                 note=f"symlink -> {target}")


def hardlink_problems(scan: Scan, hashed: Container[str] = ()) -> list[tuple[str, str]]:
    """Files whose inode has names outside the tree: bytes could change there after we check.

    ``hashed``: keys hashed without their statistics being recorded, which means a single name.
    """
    def linked_files() -> list[Node]:
        # Only inodes with more than one name matter (a file never stat'ed has nlink -1).
        return [n for n in scan.nodes.values()
                if n.nlink > 1 and n.kind == "file" and not n.note]

    linked = linked_files()
    if linked:
        # Other names of these inodes may be files nothing has stat'ed yet (added, failed):
        # look at them now, so every name inside the tree is counted.
        for n in scan.nodes.values():
            if n.deferred and n.rel not in hashed:
                try:
                    st = stat_in_dir(n)
                except (OSError, Changed):
                    continue
                if stat.S_ISREG(st.st_mode):
                    n.settle(st.st_size, st.st_dev, st.st_ino, st.st_nlink)
        linked = linked_files()
    seen: dict[tuple[int, int], int] = {}
    for n in linked:
        seen[n.ident] = seen.get(n.ident, 0) + 1
    out = []
    for n in linked:
        if n.nlink > seen[n.ident]:
            outside = n.nlink - seen[n.ident]
            out.append((n.rel, f"hard link with {outside} name(s) outside the root"))
    return out



def stat_in_dir(node: Node) -> os.stat_result:
    """``lstat`` of a deferred file through its checked directory (OSError or Changed)."""
    assert node.parent is not None
    with DirCursor() as dirs:
        return dirs.stat_in(node.open_path, node.parent)

