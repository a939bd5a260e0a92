"""Checkpoints: round trip, metadata, and refusal of bad or malicious files."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from mcloss import CheckpointError, build_model, load_checkpoint, read_metadata, save_checkpoint
from mcloss.core.checkpoint import DIGEST_KEY, rewrite_card, weights_digest
from mcloss.core.transforms import EvalTransform


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(
        "resnet18", 3, xi=3, img_size=64, class_names=["ant", "bee", "cat"],
        transform=EvalTransform(72, (64, 64)), card={"seed": 5, "command": "mcloss train ..."},
    )
    # give BN running stats non-default values, so they must round-trip too
    m.train()
    with torch.no_grad():
        m(torch.randn(4, 3, 64, 64))
    return m.eval()


def test_round_trip(tmp_path, model):
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path)
    loaded = load_checkpoint(path)
    assert not loaded.training
    assert loaded.class_names == ["ant", "bee", "cat"] and loaded.groups == [3, 3, 3]
    assert loaded.transform == model.transform and loaded.card == model.card
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        torch.testing.assert_close(loaded.forward_features(x), model.forward_features(x))
    meta = read_metadata(path)
    assert meta["config"]["backbone"] == "resnet18" and meta["card"]["seed"] == 5
    assert not list(tmp_path.glob(".*tmp*"))  # no temp file left behind


def test_half_precision_storage(tmp_path, model):
    full, half = tmp_path / "f.safetensors", tmp_path / "h.safetensors"
    save_checkpoint(model, full)
    save_checkpoint(model, half, half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = load_checkpoint(half)
    assert loaded.features[0].weight.dtype == torch.float32
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "empty or truncated"), (b"\x00" * 3, "empty or truncated"), (b"garbage" * 50, "not a valid safetensors")],
)
def test_corrupt_files(tmp_path, content, reason):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=reason) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_checkpoint(tmp_path, model):
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_foreign_safetensors_and_mismatch(tmp_path, model):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not an mcloss checkpoint"):
        load_checkpoint(foreign)
    # metadata claiming another architecture than the weights
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    config = json.loads(meta["config"])
    config["num_classes"], config["groups"] = 4, [3, 3, 3, 3]
    meta["config"], meta["class_names"] = json.dumps(config), json.dumps(list("abcd"))
    wrong = tmp_path / "wrong.safetensors"
    save_file(state, str(wrong), metadata=meta)
    with pytest.raises(CheckpointError, match="metadata says 4 classes but the weights have 3"):
        load_checkpoint(wrong)
    meta["config"] = "{not json"
    save_file(state, str(wrong), metadata=meta)
    with pytest.raises(CheckpointError, match="corrupt metadata"):
        load_checkpoint(wrong)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    evil_pt = tmp_path / "evil.pt"
    evil_pt.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CheckpointError):
        load_checkpoint(evil_pt)
    assert not marker.exists()


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.safetensors")


# ------------------------------------------------------------------------------------- weights' digest


def _raw(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _data_start(path) -> int:
    import struct

    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_saving_records_the_digest_of_the_tensors(tmp_path, model):
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path)
    meta, _ = _raw(path)
    assert meta[DIGEST_KEY] == weights_digest(path) and len(meta[DIGEST_KEY]) == 64
    half = tmp_path / "h.safetensors"
    save_checkpoint(model, half, half=True)
    assert _raw(half)[0][DIGEST_KEY] == weights_digest(half) != meta[DIGEST_KEY]


def test_flipped_tensor_bytes_are_refused_naming_the_file(tmp_path, model):
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path)
    load_checkpoint(path)  # verified once: the next load of the changed file must not trust that
    data = bytearray(path.read_bytes())
    start = _data_start(path)
    middle = start + (len(data) - start) // 2
    for i in range(middle, middle + 4096):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert message == f"{path}: tensor bytes do not match the digest recorded when it was saved (corrupted?)"
    # one byte suffices, wherever it lies in the data region (the first and the last byte here)
    for at in (start, len(data) - 1):
        save_checkpoint(model, path)
        data = bytearray(path.read_bytes())
        data[at] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match="do not match the digest"):
            load_checkpoint(path)


def test_a_checkpoint_saved_without_a_digest_still_loads(tmp_path, model):
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path)
    meta, state = _raw(path)
    del meta[DIGEST_KEY]
    old = tmp_path / "old.safetensors"
    save_file(state, str(old), metadata=meta)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(old)(x), model(x))


def test_a_metadata_only_change_keeps_the_digest_valid(tmp_path, model):
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path)
    meta, state = _raw(path)
    meta["card"] = json.dumps({"seed": 5, "note": "rewritten without touching the weights" * 20})
    edited = tmp_path / "edited.safetensors"
    save_file(state, str(edited), metadata=meta)
    assert weights_digest(edited) == weights_digest(path) == meta[DIGEST_KEY]
    assert load_checkpoint(edited).card["note"].startswith("rewritten")
    # the digest covers the header's tensor entries too: the same bytes under another dtype or shape differ
    variants = {"f32": {"w": torch.zeros(4)}, "i32": {"w": torch.zeros(4, dtype=torch.int32)}, "2x2": {"w": torch.zeros(2, 2)}}
    digests = set()
    for name, tensors in variants.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        digests.add(weights_digest(tmp_path / f"{name}.safetensors"))
    assert len(digests) == 3


def test_a_malformed_digest_is_refused(tmp_path, model):
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path)
    meta, state = _raw(path)
    meta[DIGEST_KEY] = "not a digest"
    save_file(state, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=rf"m\.safetensors: metadata {DIGEST_KEY} is not a sha256 hex digest"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------- card rewrite


def test_rewriting_the_card_leaves_every_tensor_byte_as_it_was(tmp_path, model):
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path)
    meta, state = _raw(path)
    before, data = weights_digest(path), path.read_bytes()
    card = {"seed": 5, "goals": {"above Grad-CAM": "tie"}, "text": "# Card\n\n- Above Grad-CAM — tie ≥ ½."}
    assert rewrite_card(path, card) == before
    new_meta, new_state = _raw(path)
    assert weights_digest(path) == before == new_meta[DIGEST_KEY]
    assert path.read_bytes()[_data_start(path):] == data[8 + int.from_bytes(data[:8], "little"):]  # the data region
    assert new_state.keys() == state.keys() and all(torch.equal(new_state[k], state[k]) for k in state)
    # only the card changed: every other metadata key is as it was, and the model loads with the new card
    assert {k: v for k, v in new_meta.items() if k != "card"} == {k: v for k, v in meta.items() if k != "card"}
    assert read_metadata(path)["card"] == card
    loaded = load_checkpoint(path)
    assert loaded.card == card
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_rewriting_keeps_tensors_it_does_not_know_and_seals_a_file_saved_before_digests(tmp_path, model):
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path)
    meta, state = _raw(path)
    del meta[DIGEST_KEY]
    meta["extra"] = "kept"
    state["domain.mean"] = torch.arange(7, dtype=torch.float64)  # a tensor a later version might add
    old = tmp_path / "old.safetensors"
    save_file(state, str(old), metadata=meta)
    before = weights_digest(old)
    assert rewrite_card(old, {"seed": 6}) == before
    new_meta, new_state = _raw(old)
    assert new_meta[DIGEST_KEY] == before == weights_digest(old) and new_meta["extra"] == "kept"
    assert torch.equal(new_state["domain.mean"], state["domain.mean"]) and new_state.keys() == state.keys()
    assert read_metadata(old)["card"] == {"seed": 6}


def test_rewriting_refuses_a_corrupted_file_instead_of_sealing_it_anew(tmp_path, model):
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match the digest .*the card was not rewritten"):
        rewrite_card(path, {"seed": 7})
    assert path.read_bytes() == bytes(data)
    save_checkpoint(model, path)
    with pytest.raises(CheckpointError, match="a card must be a JSON object"):
        rewrite_card(path, ["not", "a", "card"])  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="the card is not JSON"):
        rewrite_card(path, {"ratio": float("nan")})
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        rewrite_card(tmp_path / "missing.safetensors", {})
