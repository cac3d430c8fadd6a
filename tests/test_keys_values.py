"""Key encoding and plain-value JSON: every key and value comes back exactly, nothing escapes."""

import math

import pytest

import zdcp
from zdcp.format.names import MAX_NAME_BYTES, decode_key, decode_node_name, encode_key, node_name, shortened
from zdcp.format.values import from_json, to_json

KEYS = ["net1.weight", "exp_avg", "a/b", "/abs", ".", "..", "../x", "__meta", "zarr.json", "zdcp", "", "%i0", "%e",
        "%41", "é", "tab\tand\nnewline", "back\\slash", "~tilde", "c", 0, 7, -3, 10**20]


@pytest.mark.parametrize("key", KEYS, ids=repr)
def test_key_round_trip_and_safe(key):
    name = encode_key(key)
    assert decode_key(name) == key and type(decode_key(name)) is type(key)
    assert name and "/" not in name and name not in (".", "..") and not name.startswith("__")
    assert name not in ("zarr.json", "zdcp")


def test_keys_never_collide():
    names = [encode_key(k) for k in KEYS]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("key", [1.5, None, b"x", True, ("a",)], ids=repr)
def test_unsupported_key_types_are_refused(key):
    with pytest.raises(zdcp.UnsupportedValueError, match="key"):
        encode_key(key)


@pytest.mark.parametrize("name", ["..", "a/b", "%i+1", "%i01", "%2e", "%zz", "__x", "%C3", ""])
def test_crafted_names_are_refused(name):
    with pytest.raises(zdcp.UnsafeError):
        decode_key(name)


VALUES = [
    None, True, False, 0, -5, 2**70, 1.5, 0.1, 1e-310, "text", "", [], (), {},
    [1, 2.0, "x"], (0.9, 0.999), [(1, 2), [3, (4,)]], {"a": 1, 0: "int key", "0": "str key"},
    {"lr": 0.1, "betas": (0.9, 0.99), "params": ["w", "b"]},
    [{"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0, "foreach": None, "params": [0, 1]}],
    {1: {2: (3, {"x": float("inf")})}},
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_plain_values_round_trip_with_types(value):
    j, desc = to_json(value)
    back = from_json(j, desc)
    assert back == value
    assert repr(back) == repr(value)  # types too: tuple vs list, int vs str keys


def test_non_finite_floats():
    values = [float("nan"), float("inf"), float("-inf"), -0.0]
    j, desc = to_json(values)
    back = from_json(j, desc)
    assert math.isnan(back[0]) and back[1:3] == [math.inf, -math.inf]
    assert math.copysign(1.0, back[3]) == -1.0


def test_json_is_natural_where_it_can_be():
    assert to_json({"lr": 0.1, "n": [1, 2]}) == ({"lr": 0.1, "n": [1, 2]}, None)


@pytest.mark.parametrize("value", [bytearray(b"x"), object(), {1.5: 2}, [1, {"a": set()}]], ids=repr)
def test_values_json_cannot_hold_are_refused_with_where(value):
    with pytest.raises(zdcp.UnsupportedValueError, match="opt/x"):
        to_json(value, "opt/x")


LONG_KEYS = ["a" * 129, "a" * 300, "é" * 100, "%" * 50, "x" * 62 + "é" * 30, "__" + "y" * 200]


@pytest.mark.parametrize("key", LONG_KEYS, ids=lambda k: f"{k[:3]}..{len(k)}")
def test_long_node_names_are_shortened_reversibly(key):
    whole = encode_key(key)
    short = node_name(key)
    assert len(whole) > MAX_NAME_BYTES and short == shortened(whole)
    assert len(short) <= 98 and "/" not in short and whole.startswith(short.split("%h")[0])
    assert decode_node_name(short, {short: whole}) == (key, whole)
    assert node_name("a" * MAX_NAME_BYTES) == "a" * MAX_NAME_BYTES  # at the limit: kept whole


@pytest.mark.parametrize(
    "short, long_names",
    [
        ("a%h" + "0" * 32, {}),  # not recorded
        ("a%h" + "0" * 32, {"a%h" + "0" * 32: "a" * 200}),  # the hash does not match
        (shortened("a" * 200), {shortened("a" * 200): "b" * 200}),  # recorded under another name
        (shortened("a" * 100), {shortened("a" * 100): "a" * 100}),  # whole name short enough
        (shortened("../" * 60), {shortened("../" * 60): "../" * 60}),  # not an encoded name
    ],
)
def test_crafted_shortened_names_are_refused(short, long_names):
    with pytest.raises(zdcp.UnsafeError):
        decode_node_name(short, long_names)


def test_plain_values_load_without_pickle_through_zdcps_planner(tmp_path, monkeypatch):
    """zdcp's reader hands its planner plain values as they are; DCP's default planner, given a
    ZarrReader, still gets the torch.save bytes it expects."""
    import torch
    import torch.distributed.checkpoint as dcp

    import zdcp

    shared = [1, 2.5, "three", (4, None)]
    state = {"w": torch.ones(2), "cfg": {"lr": 0.1, "betas": (0.9, 0.99)}, "tags": shared, "raw": b"\x00\x01"}
    zdcp.save(state, tmp_path / "c")

    def no_pickle(*args, **kwargs):
        raise AssertionError("a plain value took a pickle round trip")

    out = {"w": torch.zeros(2), "cfg": {"lr": None, "betas": None}, "tags": None, "raw": None}
    with monkeypatch.context() as patched:
        patched.setattr(torch, "save", no_pickle)
        patched.setattr(torch, "load", no_pickle)
        zdcp.load(out, tmp_path / "c")
    assert out["cfg"] == {"lr": 0.1, "betas": (0.9, 0.99)} and out["tags"] == shared and out["raw"] == b"\x00\x01"

    through_dcp = {"w": torch.zeros(2), "cfg": {"lr": None, "betas": None}, "tags": None, "raw": None}
    dcp.load(through_dcp, storage_reader=zdcp.ZarrReader(tmp_path / "c"))
    assert through_dcp["cfg"] == {"lr": 0.1, "betas": (0.9, 0.99)} and through_dcp["tags"] == shared
