"""The workers' shared stats table, in process: slots, exact sums, gauges reset, base slot, child setup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from fooproxy.stats import BLOCK_BYTES, SLOT_BYTES, SlotTable, Snapshot, Stats
from fooproxy.supervisor import _exit_text
from fooproxy.worker import worker_preexec


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def table():
    t = SlotTable.create(2)
    yield t
    t.close()


def test_table_has_one_slot_per_worker_plus_the_base_slot(table: SlotTable) -> None:
    assert table.workers == 2
    assert len(table.blocks) == 3
    assert all(len(b) * 8 == BLOCK_BYTES for b in table.blocks)
    assert table.base is table.blocks[-1]
    assert all(not any(b) for b in table.blocks)  # zeroed


def test_a_second_mapping_of_the_descriptor_sees_the_same_cells(table: SlotTable) -> None:
    # What a worker does with the descriptor the master passed it.
    other = SlotTable.attach(os.dup(table.fd))
    try:
        Stats(block=other.blocks[1]).connection_opened()
        other.blocks[1][0] = 41
        assert table.blocks[1][0] == 41
        assert table.snapshot(0.0).totals["connections_total"] == 1
    finally:
        other.close()


def test_sums_over_slots_are_exact_totals_and_summed_windows(table: SlotTable) -> None:
    clock = FakeClock()
    w0, w1 = Stats(block=table.blocks[0], clock=clock), Stats(block=table.blocks[1], clock=clock)
    w0.record(True, 100, (3, 0, 0, 0))
    w1.record(True, 50, (5, 0, 0, 1))
    clock.t += 0.5
    w0.record(False, 80, (0, 2, 1, 0))
    w1.record(False, 40, (0, 4, 1, 0))
    clock.t += 2.0  # the first records leave the 1 s window, not the 10 s one
    w1.record(True, 10, (1, 0, 0, 0))
    snap = table.snapshot(started=clock.t - 10, now=clock.t)
    d = snap.as_dict()
    assert (d["msg_req"], d["msg_ack"], d["msg_nak"], d["msg_invalid"]) == (9, 6, 2, 1)
    assert d["msg_total"] == 17
    assert d["bytes_client_to_server"] == 160 and d["bytes_server_to_client"] == 120
    # The fleet's rates are the sums of the workers' rates.
    per_worker = [s.snapshot().windows for s in (w0, w1)]
    assert snap.windows == tuple(a + b for a, b in zip(*per_worker, strict=True))
    assert snap.windows == (1, 9, 0, 8)
    assert d["request_rate_10s"] == 0.9 and d["response_rate_10s"] == 0.8 and d["request_rate_1s"] == 1.0


def test_reset_gauges_keeps_history_for_the_replacement(table: SlotTable) -> None:
    clock = FakeClock()
    dead = Stats(block=table.blocks[0], clock=clock)
    for _ in range(3):
        dead.connection_opened()
    dead.record(True, 10, (2, 0, 0, 0))
    dead.set("pool_open", 4)
    dead.set("pool_idle", 2)
    table.beat(0, 123)
    before = table.snapshot(0.0, now=clock.t)
    table.reset(0)
    after = table.snapshot(0.0, now=clock.t)
    for name in ("connections_active", "pool_open", "pool_idle"):
        assert after.totals[name] == 0, name
    assert table.heartbeat_ns(0) == 0  # "not ready" until the replacement stamps it
    for name in ("msg_req", "connections_total", "bytes_client_to_server"):
        assert after.totals[name] == before.totals[name], name
    assert after.windows == before.windows and after.buckets == before.buckets
    # The replacement writes on from there.
    replacement = Stats(block=table.blocks[0], clock=clock)
    replacement.record(True, 5, (1, 0, 0, 0))
    assert table.snapshot(0.0, now=clock.t).totals["msg_req"] == 3
    assert table.messages(0) == 3


def test_base_slot_holds_the_restored_history_in_every_sum(table: SlotTable) -> None:
    clock = FakeClock()
    saved = Snapshot(
        totals={"msg_req": 500, "msg_ack": 450, "msg_nak": 50, "connections_active": 9},
        windows=(0, 0, 0, 0),
        buckets=[(150, 20, 20)],  # 1.5 s old: in the 10 s window only
    )
    Stats(block=table.base, clock=clock).restore(saved, now=clock.t)
    Stats(block=table.blocks[1], clock=clock).record(True, 10, (7, 0, 0, 0))
    d = table.snapshot(0.0, now=clock.t).as_dict()
    assert (d["msg_req"], d["msg_ack"], d["msg_nak"]) == (507, 450, 50)
    assert d["connections_active"] == 0  # a gauge is never restored
    assert d["request_rate_10s"] == 2.7 and d["request_rate_1s"] == 7.0
    table.reset(1)  # a worker's death does not touch the base slot
    assert table.snapshot(0.0, now=clock.t).totals["msg_req"] == 507


def test_attach_refuses_a_file_that_is_not_a_table(tmp_path) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"\0" * (SLOT_BYTES + 8))
    with open(path, "r+b") as f, pytest.raises(ValueError):
        SlotTable.attach(f.fileno())


def test_child_starts_with_sigint_and_sigusr2_ignored_and_a_parent_death_signal() -> None:
    code = (
        "import json, signal, ctypes\n"
        "libc = ctypes.CDLL(None)\n"
        "sig = ctypes.c_int()\n"
        "libc.prctl(2, ctypes.byref(sig), 0, 0, 0)\n"  # PR_GET_PDEATHSIG
        "print(json.dumps([signal.getsignal(signal.SIGINT) == signal.SIG_IGN,"
        " signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN, sig.value]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], preexec_fn=worker_preexec, capture_output=True, check=True)
    assert json.loads(out.stdout) == [True, True, int(signal.SIGTERM)]


def test_exit_text_names_the_signal() -> None:
    assert _exit_text(-9) == "was killed by SIGKILL"
    assert _exit_text(3) == "exited with status 3"


def test_the_heartbeat_is_supervision_data_not_a_metric(table: SlotTable) -> None:
    Stats(block=table.blocks[0]).connection_opened()
    before = table.snapshot(0.0).as_dict()
    table.beat(0, 10**18)
    after = table.snapshot(0.0).as_dict()
    assert table.heartbeat_ns(0) == 10**18
    assert not any("heartbeat" in name for name in after)
    assert {k: v for k, v in after.items() if k != "uptime_s"} == {k: v for k, v in before.items() if k != "uptime_s"}
