"""The ``-config`` file: a TOML file whose keys are the flag names without the dash.

``ConfigSource`` is where a process's settings come from: the command line
(docopt's options, and which flags were actually typed) plus, with
``-config PATH``, the file. A flag on the command line wins over the file,
the file wins over the defaults (which come from the usage text, i.e. from
``Config``). ``build(text)`` turns them into a ``Config``; a SIGHUP reload
calls it again with the file's new text and the same command line.

Every problem is one ``ConfigError`` line naming the file, the line where
the key is (``tomllib`` gives no line for a key, so the file text is scanned
for ``key =``), and the key: an unknown key, a value of the wrong TOML type,
a value the flag's own validator refuses.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from fooproxy.config import Config, ConfigError

#: Flags that are not settings: they cannot appear in the file.
NOT_IN_FILE = frozenset({"config", "check-config", "worker-id", "help", "version"})


@dataclass(frozen=True)
class FileValue:
    """One key of the file: the value as flag text, and the line it is on (0: not found)."""

    text: str
    line: int


def key_line(text: str, key: str) -> int:
    """The 1-based line where ``key = ...`` is written, 0 if this simple scan cannot find it."""
    pattern = re.compile(r"""^\s*(?:%s|"%s"|'%s')\s*=""" % ((re.escape(key),) * 3))
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return number
    return 0


def where(path: str, line: int, key: str) -> str:
    """``PATH: line N: key`` (without the line when it was not found)."""
    return "%s: %skey %s" % (path, "line %d: " % line if line else "", key)


def read_file(path: str) -> str:
    """The file's text (blocking: at start, or in the threadpool on reload)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(1 << 20)  # a settings file is small; a huge one is a mistake
    except OSError as exc:
        raise ConfigError("-config: cannot read %s: %s" % (path, exc.strerror or exc)) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("-config: %s is not UTF-8 text" % path) from None


def file_settings(path: str, text: str, kinds: dict[str, str]) -> dict[str, FileValue]:
    """Parse the TOML ``text``; check each key against ``kinds`` (key -> the flag's metavar).

    The value becomes the text the flag would have been given, so the flag's
    own validator (and its error) applies unchanged.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("%s: not valid TOML: %s" % (path, exc)) from None
    out: dict[str, FileValue] = {}
    for key, value in data.items():
        line = key_line(text, key)
        if key not in kinds or key in NOT_IN_FILE:
            raise ConfigError(
                "%s: unknown setting (the keys are the flag names without the dash)" % where(path, line, key)
            )
        out[key] = FileValue(_as_flag_text(path, line, key, value, kinds[key]), line)
    return out


def _as_flag_text(path: str, line: int, key: str, value: Any, kind: str) -> str:
    def wrong(expected: str) -> ConfigError:
        return ConfigError("%s: expected %s, got %s %r" % (where(path, line, key), expected, _toml_type(value), value))

    if kind == "SECONDS":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong("a number of seconds")
        return repr(value)
    if kind == "N":
        if key == "workers" and isinstance(value, str):
            return value  # "auto"; anything else is the flag's own error
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return str(value)
    if kind == "ADDRS" and isinstance(value, list):
        if not value or not all(isinstance(item, str) for item in value):
            raise wrong("a list of addresses")
        return ",".join(value)
    if not isinstance(value, str):
        raise wrong("a string")
    return value


def _toml_type(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string")):
        if isinstance(value, kind):
            return name
    return {list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class ConfigSource:
    """The command line of this process and its ``-config`` file: what a reload reads again."""

    #: docopt's options for the command line (keys like ``--listen``), defaults filled in.
    options: dict[str, Any]
    #: The setting keys typed on the command line (``max-conns``): they override the file.
    given: frozenset[str]
    #: key -> metavar (``SECONDS``, ``N``, ``ADDR``...), for the file's type checks.
    kinds: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> str | None:
        """The ``-config`` file, if any."""
        return self.options.get("--config")

    def effective(self, text: str | None) -> tuple[dict[str, Any], dict[str, FileValue]]:
        """The merged options (command line over file over defaults) and the file's values."""
        options = dict(self.options)
        from_file: dict[str, FileValue] = {}
        if self.path is not None and text is not None:
            from_file = file_settings(self.path, text, self.kinds)
            for key, value in from_file.items():
                if key not in self.given:
                    options["--" + key] = value.text
        return options, from_file

    def build(self, text: str | None) -> Config:
        """The ``Config`` for the file's ``text`` (None: no file), or one ``ConfigError`` line."""
        options, from_file = self.effective(text)
        try:
            return Config.from_options(options)
        except ConfigError as exc:
            raise self._in_file(exc, from_file) from None

    def load(self) -> Config:
        """Read the file (blocking) and build the ``Config``."""
        return self.build(read_file(self.path) if self.path else None)

    def _in_file(self, exc: ConfigError, from_file: dict[str, FileValue]) -> ConfigError:
        # A validator names the flag ("-grace: ..."): when the value came from the file, name the key there.
        message = str(exc)
        match = re.match(r"^-([a-z-]+): (.*)$", message)
        if match and match.group(1) in from_file and match.group(1) not in self.given:
            key = match.group(1)
            return ConfigError("%s: %s" % (where(self.path or "", from_file[key].line, key), match.group(2)))
        return exc


def settings_text(options: dict[str, Any], kinds: dict[str, str]) -> str:
    """The effective settings as a TOML document (what ``-check-config`` prints)."""
    lines = []
    for key in sorted(kinds):
        if key in NOT_IN_FILE:
            continue
        value = options.get("--" + key)
        if value is None:
            continue
        lines.append("%s = %s" % (key, _toml_value(str(value), kinds[key])))
    return "\n".join(lines) + "\n"


def _toml_value(text: str, kind: str) -> str:
    # The flag text as TOML: numbers as numbers (".5" is not TOML, 0.5 is), lists as lists, the rest as strings.
    if kind == "ADDRS":
        return "[%s]" % ", ".join(_toml_string(item.strip()) for item in text.split(","))
    try:
        if kind == "N":
            return str(int(text, 10))
        if kind == "SECONDS":
            number = float(text)
            return "%d" % number if number.is_integer() and abs(number) < 1e15 else repr(number)
    except ValueError:
        pass  # "auto" workers
    return _toml_string(text)


def _toml_string(text: str) -> str:
    return '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"')
