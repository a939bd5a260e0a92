"""Class names are data: checked where they are read, made safe where they name files."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

import mcloss
from mcloss.core.checkpoint import CheckpointError, load_checkpoint
from mcloss.core.errors import ParameterError
from mcloss.core.model import clean_class_name
from mcloss.data.files import unique_file_stems
from mcloss.interop.sources import SourceError, read_class_list


@pytest.mark.parametrize(
    ("names", "reason"),
    [
        (["Crow"] * 4, "'Crow' appears twice"),
        (["001.Crow", "002.Wren", "003.Crow", "004.Gull"], r"'001.Crow' and '003.Crow' are the same name \(a numeric prefix"),
        (["Crow", "Wren", "3.Crow", "Gull"], r"'Crow' and '3.Crow' are the same name \(a numeric prefix and spaces aside\)"),
        (["Crow", "Wren\x07", "Dove", "Gull"], "holds the control character U\\+0007"),
        (["Crow", "Wren", "evil\u202etxt.exe", "Gull"], "holds the control character U\\+202E"),
        (["Crow", "", "Dove", "Gull"], "must be a non-empty string"),
    ],
)
def test_a_checkpoint_with_bad_class_names_is_refused_naming_the_file(tmp_path, names, reason):
    model = mcloss.build_model("resnet18", 4, xi=2, img_size=32)
    good = tmp_path / "good.safetensors"
    mcloss.save_checkpoint(model, good)
    with safe_open(str(good), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta["class_names"] = json.dumps(names)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors: metadata class_names: .*{reason}"):
        load_checkpoint(bad)
    with pytest.raises(ParameterError, match=reason):
        mcloss.build_model("resnet18", 4, xi=2, img_size=32, class_names=names)


def test_names_that_are_numbers_are_names_not_prefixes():
    """Bins of a regression-like tree (0.5/, 1.5/) stay distinct classes; a 001. prefix before a word is dropped."""
    assert mcloss.build_model("resnet18", 3, xi=2, img_size=32, class_names=["0.5", "1.5", "2.5"]).class_names == ["0.5", "1.5", "2.5"]
    assert [clean_class_name(n) for n in ("1.5", "10.25.3", "001.Crow", "2012 Tesla Model S")] == ["1.5", "10.25.3", "Crow", "2012 Tesla Model S"]


def test_a_names_file_with_a_control_character_is_refused(tmp_path):
    (tmp_path / "names.txt").write_text("Crow\nWr\x1ben\n")
    with pytest.raises(SourceError, match=r"names\.txt: name 1 'Wr\\x1ben' holds the control character U\+001B"):
        read_class_list(tmp_path / "names.txt")


def test_file_stems_from_class_names_are_safe_and_distinct():
    names = [".", "..", "a/b", "a_b", "Crow", "crow", "Common_Bird", "<img src=x>", "CON"]
    stems = unique_file_stems(names)
    assert stems[:4] == ["_~0", "_~1", "a_b~2", "a_b"] and stems[4:7] == ["Crow", "crow~5", "Common_Bird"]
    assert len({s.lower() for s in stems}) == len(stems)
    assert all("/" not in s and not s.startswith(".") for s in stems)
