"""Reference-compatible Foo peers: ``foo-server`` (harness.peers.server) and ``foo-client`` (harness.peers.client).

``harness.peers.answer`` holds the reference server's answer rule, shared by both.
"""
