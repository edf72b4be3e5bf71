"""All-or-nothing writes (``scdlcore._atomic``), the one helper behind every write that matters."""

from __future__ import annotations

from pathlib import Path

import pytest

from scdlcore._atomic import TEMP_PREFIX, atomic_write, atomic_write_text


def test_a_write_that_fails_half_way_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "table.csv", "old\n")

    def fail_half_way(tmp: Path) -> None:
        tmp.write_text("new, but only ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail_half_way)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_the_temporary_is_a_hidden_sibling_ending_with_the_final_name(tmp_path: Path) -> None:
    """Writers that pick the format by suffix (SimpleITK, matplotlib) see the final name's suffix."""
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"png")

    path = atomic_write(tmp_path / "new" / "overview.png", write, durable=True)  # the folder is created
    assert path.read_bytes() == b"png"
    assert seen[0].parent == path.parent
    assert seen[0].name.startswith(TEMP_PREFIX) and seen[0].name.endswith("-overview.png")
    assert not seen[0].exists()
