"""The ``ssh://`` host kind, through Fabric, against a real sshd started in a network namespace.

The test installs Debian's ``openssh-server`` when it is missing (root, apt-get),
makes a throwaway host key and client key, and runs ``sshd -D`` on port 22 of
its namespace's bridge address. The Foo server and fooproxy then run on
``ssh://root@<that address>`` (``harness.SshHost``); clients from here go
through the proxy and its SIGUSR2 stats (a ``kill`` over ssh, the JSON line
streamed back) count them exactly. Skipped, saying why, without root and
namespaces, Fabric, or an sshd that can be installed and started.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import netns, tasks
from harness.apt import apt_install
from harness.fleet import Fleet, inventory_from_dict
from harness.processes import ProcessError
from harness.ssh import SshHost

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SSHD = "/usr/sbin/sshd"
SSHD_CONFIG = """\
Port 22
ListenAddress {address}
HostKey {dir}/host_key
AuthorizedKeysFile {dir}/authorized_keys
PidFile {dir}/sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
"""


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """An sshd in its own namespace; ``(address, client key file)``. The namespace is removed afterwards."""
    reason = netns.netns_supported()
    if reason:
        pytest.skip("cannot make a namespace for sshd: %s" % reason)
    if importlib.util.find_spec("fabric") is None:
        pytest.skip("Fabric is not installed: pip install -e '.[hosts]' (make install does)")
    found, reason = apt_install("openssh-server", SSHD)
    if found is None:
        pytest.skip("no sshd: %s" % reason)
    keys = tmp_path / "ssh"
    keys.mkdir()
    _keygen(keys / "host_key")
    _keygen(keys / "id_client")
    (keys / "authorized_keys").write_text((keys / "id_client.pub").read_text())
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory (made by its service unit)
    with netns.Network() as net:
        host = net.add("ssh")
        config = keys / "sshd_config"
        config.write_text(SSHD_CONFIG.format(address=host.address, dir=keys))
        try:
            with host.run([SSHD, "-D", "-e", "-f", str(config)], name="sshd", ready_port=(host.address, 22)):
                yield host.address, str(keys / "id_client")
        except ProcessError as exc:
            pytest.skip("sshd would not start in the namespace: %s" % str(exc).splitlines()[0])
    assert not net.leftovers()


def test_server_and_fooproxy_on_an_ssh_host_count_exactly(sshd: tuple[str, str], tmp_path: Path) -> None:
    address, key = sshd
    far = {"url": "ssh://root@%s" % address, "key": key}
    inv = inventory_from_dict(
        {"hosts": {"far": far, "here": "local"}, "roles": {"server": "far", "proxies": ["far"], "clients": "here"}}
    )
    with Fleet(inv, log_dir=str(tmp_path)) as fleet:
        far_host = fleet.host("server")
        assert isinstance(far_host, SshHost)
        server, proxy = fleet.server, fleet.proxies[0]
        # They run over there: the remote PIDs are in the sshd's namespace, not children of this process.
        remote = far_host.check("ip netns identify $$; ps -o pid= -p %d,%d" % (server.pid, proxy.pid)).split()
        assert remote[0].endswith("-ssh") and {str(server.pid), str(proxy.pid)} <= set(remote[1:]), remote
        results = fleet.run_clients(5)
        assert not tasks.failures(results), [r.describe() for r in results]
        stats = tasks.signal_stats(proxy)  # kill -USR2 over ssh, the JSON line streamed back
        assert not tasks.check_counts(stats, 5), stats
        assert proxy.stop() == 0, proxy.tail()  # SIGTERM over ssh drains and exits 0
        pids = (server.pid, proxy.pid)
    # Fleet.close stopped the server too and closed the connection: nothing of ours runs there any more.
    left = subprocess.run(["ps", "-o", "pid=", "-p", ",".join(map(str, pids))], capture_output=True, text=True)
    assert left.stdout.strip() == "", left.stdout
