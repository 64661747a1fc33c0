"""What the Ingest page collects (pure helper, no page run): uploads with bad files, the size
limit and formats, server paths read only inside the ``--docs-root`` folders, a folder's skipped
files."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from ui_cases import _outside_setup  # noqa: E402

from ragkv.ui.collect import OUTSIDE_ROOTS, collect  # noqa: E402


class _Upload:
    def __init__(self, name: str, data: bytes) -> None:
        self.name, self._data = name, data

    def getvalue(self) -> bytes:
        return self._data


def test_collect_reports_bad_files(tmp_path: Path) -> None:
    docs, errors = collect([_Upload("a.md", b"hello"), _Upload("b.txt", bytes(range(256)) * 3),
                            _Upload("c.txt", b"  \n"), _Upload("d.exe", b"MZ")], "")
    assert docs == [("a.md", "hello")]
    assert any(e.startswith("b.txt: not text") for e in errors)
    assert any(e.startswith("c.txt: empty") for e in errors)
    assert any(e.startswith("d.exe: unsupported format .exe") for e in errors)
    docs, errors = collect([], str(tmp_path / "missing"), [tmp_path])
    assert not docs and "no such file" in errors[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    docs, errors = collect([], str(empty), [tmp_path])
    assert not docs and "no .txt" in errors[0]


def test_collect_uploads_size_limit_and_formats() -> None:
    html = b"<html><body><nav>menu</nav><p>Hello <b>there</b>.</p><script>x()</script></body>"
    big = b"word " * 50
    docs, errors = collect([_Upload("page.HTML", html), _Upload("big.txt", big),
                            _Upload("bom.txt", "caf\u00e9 na\u00efve".encode("utf-8-sig"))],
                           "", max_bytes=200)
    assert docs == [("page.HTML", "Hello there."), ("bom.txt", "caf\u00e9 na\u00efve")]
    assert errors == ["big.txt: too large (250 bytes; the limit is 200); skipped"]
    docs, errors = collect([_Upload("big.txt", big)], "")  # the default limit is 20 MiB
    assert docs == [("big.txt", big.decode().strip())] and not errors



def test_collect_reads_only_inside_docs_roots(tmp_path: Path) -> None:
    root, secret = _outside_setup(tmp_path)
    (root / "sub" / "link.txt").symlink_to(secret)
    (root / "dirlink").symlink_to(tmp_path, target_is_directory=True)
    outside = [str(secret), str(root / ".." / "secret.txt"), str(root / "sub" / "link.txt"),
               str(root / "dirlink" / "secret.txt"), str(root / "dirlink"), str(tmp_path),
               "/", str(tmp_path / "missing-outside.txt")]
    if Path("/etc/hostname").exists():
        outside.append("/etc/hostname")
    for path in outside:
        docs, errors = collect([], path, [root])
        assert docs == [], path
        assert errors == [f"{path}: {OUTSIDE_ROOTS}"], path
    # No roots at all: no server path is read, not even one that exists.
    docs, errors = collect([], str(root / "sub" / "good.md"))
    assert not docs and OUTSIDE_ROOTS in errors[0] and "none were named" in errors[0]
    # Inside: a file, a folder (the link inside it is skipped with its reason, the linked
    # folder is not entered), a relative spelling that stays inside, a second root.
    for path in (root / "sub" / "good.md", root / "sub" / ".." / "sub" / "good.md"):
        docs, errors = collect([], str(path), [tmp_path / "elsewhere", root])
        assert docs == [(str((root / "sub" / "good.md").resolve()), "Inside the root.")]
        assert not errors
    docs, errors = collect([], str(root), [root])
    assert docs == [(str(root.resolve() / "sub" / "good.md"), "Inside the root.")]
    assert errors == [f"{root.resolve() / 'sub' / 'link.txt'}: links outside the --docs-root "
                      "folders; skipped"]
    assert not any("SECRET" in text for _, text in docs)
    # A link inside a root that points into another root is read.
    other = tmp_path / "other"
    other.mkdir()
    (other / "shared.txt").write_text("Shared text.")
    (root / "sub" / "shared.txt").symlink_to(other / "shared.txt")
    docs, _ = collect([], str(root / "sub"), [root, other])
    assert [t for _, t in docs] == ["Inside the root.", "Shared text."]


def test_collect_folder_reports_skipped_files(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    (root / ".hidden").mkdir(parents=True)
    (root / ".hidden" / "h.txt").write_text("hidden")
    (root / "a.txt").write_text("Alpha text.")
    (root / "b.md").write_text("Alpha text.")
    (root / "bin.txt").write_bytes(bytes(range(256)) * 4)
    (root / "big.txt").write_text("x" * 300)
    (root / "notes.csv").write_text("ignored,by,suffix")
    docs, errors = collect([], str(root), [root], max_bytes=200)
    assert docs == [(str(root.resolve() / "a.txt"), "Alpha text.")]
    assert sorted(errors) == sorted([
        f"{root.resolve() / 'b.md'}: duplicate of {root.resolve() / 'a.txt'}; skipped",
        f"{root.resolve() / 'big.txt'}: too large (300 bytes; the limit is 200); skipped",
        f"{root.resolve() / 'bin.txt'}: too large (1,024 bytes; the limit is 200); skipped",
    ])
    docs, errors = collect([], str(root / "bin.txt"), [root])
    assert not docs and errors == [f"{root.resolve() / 'bin.txt'}: not text (no character "
                                   "encoding fits); skipped"]



def test_collect_takes_each_text_once_and_each_upload_name_once(tmp_path: Path) -> None:
    """Two uploads of one text filled two of the k places with one chunk; a second upload of
    one name replaced the first while the page counted both."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "same.md").write_text("The ferry leaves at nine.")
    docs, errors = collect([_Upload("notes.txt", b"The ferry leaves at nine."),
                            _Upload("copy.txt", b"The ferry leaves at nine.\n"),
                            _Upload("README.md", b"Project one."),
                            _Upload("README.md", b"Project two.")], str(root), [root])
    assert docs == [("notes.txt", "The ferry leaves at nine."), ("README.md", "Project one.")]
    assert errors == [
        "README.md: another file uploaded now has this name; skipped (documents are named by "
        "file name: rename one to ingest both)",
        "copy.txt: duplicate of notes.txt; skipped",
        f"{root.resolve() / 'same.md'}: duplicate of notes.txt; skipped"]


def test_collect_names_why_a_file_inside_the_root_was_skipped(tmp_path: Path) -> None:
    """A broken link and a named pipe inside the root were both "links outside the
    --docs-root folders"."""
    import os

    root = tmp_path / "root"
    root.mkdir()
    (root / "good.md").write_text("Inside the root.")
    (root / "broken.md").symlink_to(root / "gone.md")
    os.mkfifo(root / "pipe.txt")
    docs, errors = collect([], str(root), [root])
    assert docs == [(str(root.resolve() / "good.md"), "Inside the root.")]
    assert sorted(errors) == [f"{root.resolve() / 'broken.md'}: broken link; skipped",
                              f"{root.resolve() / 'pipe.txt'}: not a regular file; skipped"]
