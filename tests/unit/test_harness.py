"""The test driver itself: peer discovery, ports, process groups, stats reading, count checks, CLI."""

from __future__ import annotations

import os
import signal
import socket
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from harness import binaries, cli, tasks
from harness.processes import Process, ProcessError, free_port, port_listening
from harness.sigusr2 import StatsError, read_stats, read_stats_when_idle


# -- binaries -----------------------------------------------------------------
def make_exe(path: Path, mode: int = 0o755) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(mode)
    return path


def test_reference_binaries_found_in_foo_bin_dir(tmp_path: Path) -> None:
    server = make_exe(tmp_path / "server-linux")
    client = make_exe(tmp_path / "client-linux")
    peers = binaries.find_peers({"FOO_BIN_DIR": str(tmp_path)})
    assert peers.kind == "reference"
    assert peers.server == (str(server),) and peers.client == (str(client),)
    assert peers.server_cmd("127.0.0.1:1") == [str(server), "-listen", "127.0.0.1:1"]
    assert peers.client_cmd("127.0.0.1:2", "-x") == [str(client), "-connect", "127.0.0.1:2", "-x"]
    assert "reference" in peers.describe() and str(tmp_path) in peers.describe()


def test_relative_bin_dir_resolves_against_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bin").mkdir()
    make_exe(tmp_path / "bin" / "server-linux")
    make_exe(tmp_path / "bin" / "client-linux")
    monkeypatch.chdir(tmp_path)
    peers = binaries.find_peers({})  # default FOO_BIN_DIR=bin
    assert peers.kind == "reference"
    assert peers.server == (str(tmp_path / "bin" / "server-linux"),)


@pytest.mark.parametrize("present, mode", [(("server-linux",), 0o755), (("server-linux", "client-linux"), 0o644)])
def test_python_peers_when_a_binary_is_missing_or_not_executable(tmp_path: Path, present, mode) -> None:
    for name in present:
        make_exe(tmp_path / name, mode)
    peers = binaries.find_peers({"FOO_BIN_DIR": str(tmp_path)})
    assert peers.kind == "python"
    assert "client-linux" in peers.describe() and "Python peers" in peers.describe()
    assert peers.server[-1].endswith("foo-server") or peers.server[-1] == "harness.peers.server"
    assert peers.client[-1].endswith("foo-client") or peers.client[-1] == "harness.peers.client"


def test_python_peers_fall_back_to_python_m(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    peers = binaries.python_peers()
    assert peers.server == (str(tmp_path / "python"), "-m", "harness.peers.server")
    assert peers.client == (str(tmp_path / "python"), "-m", "harness.peers.client")
    assert binaries.fooproxy_command() == (str(tmp_path / "python"), "-m", "fooproxy")


def test_announce_writes_one_line(capsys: pytest.CaptureFixture) -> None:
    binaries.announce(binaries.python_peers("because"))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("foo peers: python") and "because" in err


# -- ports and processes ------------------------------------------------------------
def test_free_port_can_be_bound() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        state = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_process_stops_its_whole_group(tmp_path: Path) -> None:
    script = "sleep 60 & echo child $!; sleep 60 & echo child $!; echo ready; wait"
    with Process(
        ["sh", "-c", script], name="family", ready_regex=r"ready", ready_stream="stdout", log_dir=tmp_path
    ) as proc:
        children = [int(line.split()[1]) for line in proc.stdout_text().splitlines() if line.startswith("child")]
        assert len(children) == 2 and all(alive(pid) for pid in children)
        assert os.getpgid(proc.pid) == proc.pid  # its own group
        assert os.getpgid(children[0]) == proc.pid
    assert not alive(proc.pid)
    assert all(wait_gone(pid) for pid in children)
    assert proc.returncode == -signal.SIGTERM


def test_stop_falls_back_to_sigkill(tmp_path: Path) -> None:
    proc = Process(
        ["sh", "-c", "trap '' TERM; echo ready; sleep 60"], ready_regex="ready", ready_stream="stdout", log_dir=tmp_path
    ).start()
    started = time.monotonic()
    assert proc.stop(timeout=0.5) == -signal.SIGKILL
    assert time.monotonic() - started < 5


def test_readiness_by_port(tmp_path: Path) -> None:
    port = free_port()
    code = "import socket,time; s=socket.socket(); s.bind(('127.0.0.1',%d)); s.listen(); time.sleep(60)" % port
    with Process([sys.executable, "-c", code], name="listener", ready_port=("127.0.0.1", port), log_dir=tmp_path) as p:
        assert p.alive()
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    assert not p.alive()


def test_port_listening_reads_the_kernel_table_without_connecting() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert not port_listening(port)  # bound is not listening
        sock.listen()
        assert port_listening(port)
        sock.settimeout(0)
        with pytest.raises(BlockingIOError):
            sock.accept()  # nobody connected to find out
    assert not port_listening(port)


def test_readiness_by_listen_waits_for_the_listen_call(tmp_path: Path) -> None:
    port = free_port()
    code = "import socket,time; s=socket.socket(); s.bind(('127.0.0.1',%d)); time.sleep(0.5); s.listen()" % port
    code += "\ns.settimeout(1)\ntry:\n s.accept(); print('accepted')\nexcept OSError:\n print('nobody')"
    started = time.monotonic()
    with Process([sys.executable, "-c", code], name="late", ready_listen=port, log_dir=tmp_path) as proc:
        assert time.monotonic() - started >= 0.5  # bound early, listened late
        assert proc.wait_for_output("accepted|nobody", timeout=10, stream="stdout").group(0) == "nobody"


def test_start_proxy_and_server_are_ready_without_a_probe_and_at_any_log_level(tmp_path: Path) -> None:
    """One readiness rule: no connection reaches the proxy's stats or the server's log, even at -log-level warning."""
    peers = binaries.python_peers()
    with tasks.start_server(peers=peers, log_dir=tmp_path) as server:
        with tasks.start_proxy(server.address, extra_args=["-log-level", "warning"], log_dir=tmp_path) as proxy:
            assert "listening on" not in proxy.stderr_text()  # the line the old rule waited for
            stats = read_stats(proxy)
            assert stats["connections_total"] == 0, stats
            assert tasks.run_client(proxy.address, peers=peers).ok
        assert server.stderr_text().count(": connected") == 1, server.stderr_text()


def test_early_exit_raises_with_the_output(tmp_path: Path) -> None:
    proc = Process(
        ["sh", "-c", "echo boom >&2; exit 3"], name="early", ready_port=("127.0.0.1", free_port()), log_dir=tmp_path
    )
    with pytest.raises(ProcessError) as info:
        proc.start()
    assert "boom" in str(info.value) and "exit 3" in str(info.value)
    assert not proc.alive()


def test_output_written_just_before_exit_is_found(tmp_path: Path) -> None:
    proc = Process(["sh", "-c", "echo done >&2"], log_dir=tmp_path)
    proc.start()  # no readiness condition: returns at once
    assert proc.wait_for_output("done", timeout=5, stream="stderr").group(0) == "done"
    with pytest.raises(ProcessError, match="exited"):
        proc.wait_for_output("done", timeout=5, stream="stdout")
    proc.close()


def test_readiness_timeout_stops_the_process(tmp_path: Path) -> None:
    proc = Process(["sleep", "60"], ready_regex="never", ready_timeout=0.3, log_dir=tmp_path)
    with pytest.raises(ProcessError, match="did not appear"):
        proc.start()
    assert not proc.alive() and proc.returncode == -signal.SIGTERM


def test_own_log_dir_is_removed_on_close() -> None:
    proc = Process(["sh", "-c", "echo hi; echo ready >&2; sleep 60"], ready_regex="ready")
    with proc:
        assert proc.log_dir.is_dir()
        assert "hi" in proc.tail()
    assert not proc.log_dir.exists()


def test_wait_does_not_reap_and_stop_reports_status(tmp_path: Path) -> None:
    proc = Process(["sh", "-c", "echo ready >&2; exit 5"], ready_regex="ready", log_dir=tmp_path).start()
    assert proc.wait(timeout=5) == 5
    assert proc.stop() == 5 and proc.returncode == 5


# -- stats ---------------------------------------------------------------------
FAKE_PROXY = textwrap.dedent(
    """
    import json, signal, sys, time
    n = 0
    def usr2(*_):
        global n
        n += 1
        print(json.dumps({"msg_total": 2 * n, "msg_req": n, "msg_ack": n, "msg_nak": 0,
                          "request_rate_1s": 0.0, "request_rate_10s": 0.0,
                          "response_rate_1s": 0.0, "response_rate_10s": 0.0}), flush=True)
    signal.signal(signal.SIGUSR2, usr2)
    print("early line, not stats", flush=True)
    print("listening on", file=sys.stderr, flush=True)
    while True:
        time.sleep(1)
    """
)


def test_read_stats_returns_the_next_line_each_time(tmp_path: Path) -> None:
    with Process(
        [sys.executable, "-c", FAKE_PROXY], name="fakeproxy", ready_regex="listening on", log_dir=tmp_path
    ) as proc:
        assert [read_stats(proc, timeout=5)["msg_req"] for _ in range(5)] == [1, 2, 3, 4, 5]
        assert proc.stdout_text().count("\n") == 6


def test_read_stats_times_out_with_the_output(tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGUSR2, lambda *a: None); print('ready', flush=True)"
    code += "; time.sleep(60)"
    with Process([sys.executable, "-c", code], ready_regex="ready", ready_stream="stdout", log_dir=tmp_path) as proc:
        with pytest.raises(StatsError, match="no line"):
            read_stats(proc, timeout=0.3)


def test_read_stats_when_idle_polls_until_no_session_is_open(tmp_path: Path) -> None:
    fake = FAKE_PROXY.replace('"msg_nak": 0,', '"msg_nak": 0, "connections_active": max(0, 3 - n),')
    with Process([sys.executable, "-c", fake], name="fakeproxy", ready_regex="listening on", log_dir=tmp_path) as proc:
        stats = read_stats_when_idle(proc, timeout=10, interval=0.01)
        assert (stats["connections_active"], stats["msg_req"]) == (0, 3)  # three reads: 2, 1, then 0 open


# -- tasks -----------------------------------------------------------------------
def test_check_counts() -> None:
    good = {"msg_req": 200, "msg_ack": 170, "msg_nak": 30, "msg_total": 400, "msg_invalid": 0}
    assert tasks.check_counts(good, runs=2) == []
    assert any("msg_req" in p for p in tasks.check_counts(good, runs=3))
    assert any("msg_ack + msg_nak" in p for p in tasks.check_counts({**good, "msg_ack": 169}, runs=2))
    assert any("msg_total" in p for p in tasks.check_counts({**good, "msg_total": 401}, runs=2))
    assert any("msg_invalid" in p for p in tasks.check_counts({**good, "msg_invalid": 1}, runs=2))
    assert any("msg_nak" in p for p in tasks.check_counts({**good, "msg_ack": 200, "msg_nak": 0}, runs=2))


def test_split_address() -> None:
    assert tasks.split_address("127.0.0.1:80") == ("127.0.0.1", 80)
    assert tasks.split_address(":81") == ("127.0.0.1", 81)
    assert tasks.split_address("[::1]:82") == ("::1", 82)


def test_run_client_captures_status_and_output() -> None:
    script = 'echo "FAILED!"; echo "Errors:"; echo "$1 $2" >&2; exit 1'
    peers = binaries.Peers("fake", ("true",), ("sh", "-c", script, "sh"))
    result = tasks.run_client("127.0.0.1:1", peers=peers)
    assert result.failed and not result.ok and result.rc == 1 and "Errors:" in result.stdout
    assert result.stderr.strip() == "-connect 127.0.0.1:1"
    ok = tasks.run_client("127.0.0.1:1", peers=binaries.Peers("fake", ("true",), ("sh", "-c", "echo ..........OK!")))
    assert ok.ok and not ok.failed


def test_run_client_kills_on_timeout() -> None:
    peers = binaries.Peers("fake", ("true",), ("sh", "-c", "sleep 60", "sh"))
    result = tasks.run_client("127.0.0.1:1", peers=peers, timeout=0.3)
    assert result.rc == -signal.SIGKILL and "timeout" in result.stderr


# -- cli -------------------------------------------------------------------------
def test_cli_help_and_errors(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["-h"]) == 0
    assert "foo-harness" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert cli.main(["demo", "-sequential", "x"]) == 2
    assert cli.main(["demo", "-h"]) == 0


def test_cli_delegates_to_a_module_main(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    fake = types.ModuleType("harness.bench.swarm")
    fake.main = lambda argv: seen.append(argv) or 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "harness.bench.swarm", fake)
    assert cli.main(["swarm", "-users", "5"]) == 3
    assert seen == [["-users", "5"]]


def test_cli_missing_module_is_a_clear_message(capsys: pytest.CaptureFixture) -> None:
    assert cli.delegate("no_such_command_xyz", []) == 1
    assert "no_such_command_xyz is not available" in capsys.readouterr().err


def test_e2e_dir_exists() -> None:
    assert cli.e2e_dir().is_dir()
