"""Find the Foo peers to test against: the reference binaries, else the Python peers.

The reference ``server-linux`` / ``client-linux`` are looked up in ``$FOO_BIN_DIR``
(default ``bin/``, relative to the current directory). When either is missing or not
executable, the Python peers ``foo-server`` / ``foo-client`` are used instead, and
``describe()`` says so.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

BIN_DIR_ENV = "FOO_BIN_DIR"
DEFAULT_BIN_DIR = "bin"
REFERENCE_SERVER = "server-linux"
REFERENCE_CLIENT = "client-linux"

REFERENCE = "reference"
PYTHON = "python"


@dataclass(frozen=True)
class Peers:
    """Command prefixes for a Foo server and client, and where they come from.

    ``kind`` is ``"reference"`` or ``"python"``. Both kinds take ``-listen ADDR``
    (server) and ``-connect ADDR`` (client).
    """

    kind: str
    server: tuple[str, ...]
    client: tuple[str, ...]
    note: str = ""

    def server_cmd(self, listen: str, *args: str) -> list[str]:
        """The full server command line for ``listen``."""
        return [*self.server, "-listen", listen, *args]

    def client_cmd(self, connect: str, *args: str) -> list[str]:
        """The full client command line for ``connect``."""
        return [*self.client, "-connect", connect, *args]

    def describe(self) -> str:
        """One line: which peers are used and why."""
        text = "foo peers: %s (server: %s; client: %s)" % (self.kind, " ".join(self.server), " ".join(self.client))
        return text + ("; " + self.note if self.note else "")


def bin_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$FOO_BIN_DIR``, default ``bin``, as given (relative paths resolve against the cwd)."""
    env = os.environ if env is None else env
    return Path(env.get(BIN_DIR_ENV) or DEFAULT_BIN_DIR)


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def reference_server(env: Mapping[str, str] | None = None) -> tuple[str, ...] | None:
    """``(path/to/server-linux,)`` if it exists and is executable, else ``None``."""
    path = bin_dir(env) / REFERENCE_SERVER
    return (str(path.absolute()),) if _executable(path) else None


def reference_client(env: Mapping[str, str] | None = None) -> tuple[str, ...] | None:
    """``(path/to/client-linux,)`` if it exists and is executable, else ``None``."""
    path = bin_dir(env) / REFERENCE_CLIENT
    return (str(path.absolute()),) if _executable(path) else None


def console_script(name: str, module: str) -> tuple[str, ...]:
    """The console script ``name`` next to ``sys.executable``, else ``python -m module``."""
    script = Path(sys.executable).parent / name
    if _executable(script):
        return (str(script),)
    return (sys.executable, "-m", module)


def python_peers(note: str = "") -> Peers:
    """The bundled Python peers ``foo-server`` / ``foo-client``."""
    return Peers(
        PYTHON,
        console_script("foo-server", "harness.peers.server"),
        console_script("foo-client", "harness.peers.client"),
        note,
    )


def find_peers(env: Mapping[str, str] | None = None) -> Peers:
    """The reference binaries when both are in ``$FOO_BIN_DIR``, else the Python peers."""
    server, client = reference_server(env), reference_client(env)
    if server and client:
        return Peers(REFERENCE, server, client, "from %s=%s" % (BIN_DIR_ENV, bin_dir(env)))
    missing = [n for n, cmd in ((REFERENCE_SERVER, server), (REFERENCE_CLIENT, client)) if cmd is None]
    return python_peers(
        "no executable %s in %s=%s, using the Python peers" % (" or ".join(missing), BIN_DIR_ENV, bin_dir(env))
    )


def fooproxy_command() -> tuple[str, ...]:
    """The installed ``fooproxy`` console script, else ``python -m fooproxy``."""
    return console_script("fooproxy", "fooproxy")


def announce(peers: Peers, stream=None) -> None:
    """Write ``peers.describe()`` as one line on stderr (or ``stream``)."""
    stream = sys.stderr if stream is None else stream
    stream.write(peers.describe() + "\n")
    stream.flush()


__all__: Sequence[str] = [
    "Peers",
    "announce",
    "bin_dir",
    "console_script",
    "find_peers",
    "fooproxy_command",
    "python_peers",
    "reference_client",
    "reference_server",
]
