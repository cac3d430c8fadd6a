"""zdcp.collectives: the rule for the error every rank raises, and the payload failures travel
in (the multi-rank runs in test_reliability.py show the collectives themselves)."""

import pickle

import pytest

import zdcp
from zdcp.collectives import Collectives, RankFailure, agreed_error


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("no pickling of this one")


def test_the_lowest_failing_ranks_own_error_when_it_is_zdcps():
    corrupt = zdcp.CorruptCheckpointError("array 'w': chunk 0 fails its crc32c checksum")
    assert agreed_error({3: corrupt, 5: zdcp.StorageError("s3://b/c: no access")}, "checkpoint") is corrupt


def test_other_errors_become_a_distributed_error_naming_the_ranks():
    failures = {2: RankFailure("ValueError", "bad shape"), 1: RankFailure("KeyError", "'w'")}
    error = agreed_error(failures, "state_dict()")
    assert isinstance(error, zdcp.DistributedError)
    assert str(error) == "state_dict() failed on rank(s) [1, 2]; rank 1: KeyError: 'w'"
    assert list(error.failures) == [1, 2] and error.failures[2].kind == "ValueError"


def test_a_failure_travels_whatever_the_users_exception_holds():
    failure = RankFailure(type(Unpicklable()).__name__, "boom")
    assert str(pickle.loads(pickle.dumps(failure))) == "Unpicklable: boom"
    with pytest.raises(TypeError):
        pickle.dumps(Unpicklable("boom"))


def test_one_process_raises_its_own_error_and_agrees_with_itself():
    alone = Collectives(no_dist=True)
    assert alone.is_coordinator and alone.from_coordinator({"a": 1}) == {"a": 1}
    assert alone.any(True) and not alone.any(False)
    assert alone.run("step", lambda: 5) == 5
    with pytest.raises(ValueError, match="mine"):
        alone.run("step", lambda: (_ for _ in ()).throw(ValueError("mine")))
