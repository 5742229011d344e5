"""Reference-compatible Foo peers: ``foo-server`` (harness.server) and ``foo-client`` (harness.client).

``harness.answer`` holds the reference server's answer rule, shared by both.
"""
