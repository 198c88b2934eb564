"""The one parallel map and how it picks its engine (`genderclf.io`, `genderclf.engine`).

Without RAY_ADDRESS the local pool runs (and Ray is never imported); items are read
lazily, a few chunks ahead, and results come back in input order; a head that does not
answer is one line naming the address, quickly. The cluster itself is exercised in
tests/integration/test_ray_cluster.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml
from tests.helpers import BIN
from tests.helpers.params import real_params, shrink
from tests.helpers.servers import free_port

from genderclf.config import GenderclfError
from genderclf.engine import ClusterError, _host_port, check_reachable
from genderclf.io import chunked, parallel_map


def square(offset: int, x: int) -> tuple[int, int]:
    return x * x + offset, os.getpid()


class Odd(GenderclfError):
    pass


def refuse_odd(context: None, x: int) -> int:
    if x % 2:
        raise Odd(f"item {x} is odd")
    return x


def test_chunked_keeps_order_and_reads_lazily():
    pulled = []

    def items():
        for i in range(10):
            pulled.append(i)
            yield i

    it = chunked(items(), 4)
    assert next(it) == [0, 1, 2, 3] and len(pulled) == 4
    assert list(it) == [[4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize("workers", [1, 2])
def test_results_in_input_order_from_a_lazy_stream(workers, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    pulled = []

    def items():
        for i in range(400):
            pulled.append(i)
            yield i

    results = parallel_map(square, items(), workers=workers, context=7, chunksize=10)
    first = next(results)
    # A bounded window: only a few chunks were read before the first result came back.
    assert len(pulled) <= 2 * workers * 10 + 10
    rest = list(results)
    assert [v for v, _ in [first, *rest]] == [x * x + 7 for x in range(400)]
    pids = {pid for _, pid in [first, *rest]}
    assert (pids == {os.getpid()}) if workers == 1 else (os.getpid() not in pids)


def test_an_error_in_a_worker_is_raised_as_itself(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(Odd, match="item 1 is odd"):
        list(parallel_map(refuse_odd, range(6), workers=2, chunksize=2))


def test_ray_is_not_imported_without_ray_address(tmp_path):
    code = (
        "import sys\n"
        "from genderclf.io import parallel_map\n"
        "from genderclf.stages import validate, split, augment\n"
        "from genderclf import tools\n"
        "assert list(parallel_map(max, range(5), workers=2, context=2)) == [2, 2, 2, 3, 4]\n"
        "assert 'ray' not in sys.modules, 'ray imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.1.2.3:6379", ("10.1.2.3", 6379)),
        ("ray://head.internal:10001", ("head.internal", 10001)),
        ("[::1]:6379", ("::1", 6379)),
        ("auto", None),
    ],
)
def test_head_addresses_are_read_as_host_and_port(address, expected):
    assert _host_port(address) == expected


def test_the_job_api_address_is_refused_with_what_to_set():
    with pytest.raises(ClusterError, match="host:6379"):
        check_reachable("http://127.0.0.1:8265")


def test_an_unreachable_head_is_one_line_naming_the_address(tmp_path, make_celeba):
    port = free_port()  # nothing listens there
    raw = tmp_path / "data" / "raw"
    make_celeba(raw, [1, 0] * 6)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(shrink(real_params())))
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    started = time.monotonic()
    proc = subprocess.run(
        [str(BIN / "genderclf"), "validate", "-q"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    took = time.monotonic() - started
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert errors == [
        f"error (validate): RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster answers there "
        "(Connection refused); start the cluster or fix the address, or unset RAY_ADDRESS "
        "to run on this machine"
    ], proc.stderr
    assert "Traceback" not in proc.stderr
    assert took < 120  # no minute-long wait for the head (most of this is GX importing)
