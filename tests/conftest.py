import warnings

import pytest
import torch

import zdcp  # noqa: F401  (registers bf16/fp8 with zarr-python for every test)
from zdcp.storage.layout import layout_names, layouts


@pytest.fixture(autouse=True)
def _quiet_single_process_warnings():
    # DCP warns on every single-process call; the tests make many on purpose.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@pytest.fixture
def ckpt(tmp_path):
    """A fresh checkpoint path (not yet existing)."""
    return tmp_path / "ckpt"


def assert_bitwise_equal(a, b, where=""):
    """Tensors equal bit for bit (NaNs and -0.0 included), same dtype and shape."""
    assert a.dtype == b.dtype and a.shape == b.shape, (where, a.dtype, b.dtype, a.shape, b.shape)
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.int64}[a.element_size()]
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
        width = {4: torch.int32, 8: torch.int64}[a.element_size()]
    if a.dtype == torch.bool:
        assert torch.equal(a, b), where
        return
    assert torch.equal(a.contiguous().view(width), b.contiguous().view(width)), where


@pytest.fixture(params=layout_names())
def layout(request):
    """Each registered layout in turn (zdcp.SaveOptions.layout): tests of behaviour every layout
    promises."""
    return request.param


def read_root(path):
    """A checkpoint's root zarr.json, in either layout."""
    from zdcp.storage.contents import root_document
    from zdcp.storage.location import Location

    return root_document(Location(path))[1]


def write_root(path, document):
    """Replace a checkpoint's root zarr.json, in either layout (to craft a damaged one)."""
    from zdcp.storage.contents import root_document
    from zdcp.storage.location import Location

    hierarchy, _ = root_document(Location(path))
    # an existing database takes writes under the configuration its manifest records
    hierarchy.write_json("zarr.json", document)


def commit_record(path):
    """What un-commits a local checkpoint when deleted: the commit record of its layout (the
    root zarr.json, a database's manifest)."""
    return next(path / layout.commit_record for layout in layouts() if (path / layout.commit_record).exists())


def _save_at_once(url, version, barrier, results, layout):

    barrier.wait()
    try:
        zdcp.save({"w": torch.full((64, 64), float(version))}, url, layout=layout)
        results.put((version, "ok"))
    except zdcp.CheckpointExistsError as e:
        results.put((version, str(e)))


def assert_one_of_two_racing_saves_commits(url, layout):
    """Two processes start saving to an object-store ``url`` at once: exactly one commits, the
    other fails cleanly, and what is there loads whole."""
    import torch.multiprocessing as mp


    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    savers = [ctx.Process(target=_save_at_once, args=(url, v, barrier, results, layout)) for v in (1, 2)]
    for p in savers:
        p.start()
    outcomes = dict(results.get(timeout=120) for _ in savers)
    for p in savers:
        p.join(60)
    winners = [v for v, outcome in outcomes.items() if outcome == "ok"]
    assert len(winners) == 1, outcomes
    out = {"w": torch.zeros(64, 64)}
    zdcp.load(out, url)
    assert torch.all(out["w"] == winners[0]) and zdcp.verify(url).ok
