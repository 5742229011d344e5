"""The fooproxy harness: everything that drives fooproxy from outside, in three parts.

* the core (this package): ``processes`` (child process groups), ``binaries``
  (which Foo peers to run), ``sigusr2`` (reads a proxy's stats), ``tasks``
  (start a server or proxy, run clients, check counts) and ``cli`` (``foo-harness``);
* ``harness.peers``: the Python Foo peers ``foo-server`` and ``foo-client``;
* ``harness.bench``: load tools, ``make bench`` and the locust swarm.

Imports go one way: ``bench`` uses the core and ``peers``; ``peers`` stands alone;
the core imports neither (``foo-harness`` runs a bench command by module name).
"""
