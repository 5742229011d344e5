"""fooproxy: a statistics-gathering proxy for the Foo protocol.

Imports nothing on purpose: ``fooproxy.__main__`` must be able to monkey-patch
before any other module is loaded.
"""

__version__ = "0.1.0"
