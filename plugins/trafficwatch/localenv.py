"""The local settings of a checkout, the one definition that `scripts/env.sh` (every make target) and the
`trafficwatch` command both use.

The first source that sets a variable wins, and a variable set to the empty string counts as unset (the
shell's `${VAR:-default}`):

1. the environment (the shell, the caller);
2. the repository's `.env` (your overrides, git-ignored): `NAME=value` lines, optionally `export`ed, quoted
   ('literal' or "with $VARS") or not (a ` # comment` ends the value), `$NAME` and `${NAME}` expanded;
3. `$TRAFFICWATCH_HOME/secrets.env` (default `<repo>/.data/secrets.env`), the random secrets scripts/env.sh
   generates once: read literally, never written here;
4. the defaults below; unless TRAFFICWATCH_S3 says otherwise than `local`, the local S3 server's endpoint on
   127.0.0.1:$TRAFFICWATCH_S3_PORT and its keys (TRAFFICWATCH_LOCAL_S3_ACCESS_KEY and _SECRET_KEY).

`apply` (the `trafficwatch` command) does nothing outside a checkout, or with TRAFFICWATCH_LOCAL_SETTINGS=0 in
the environment (the test suite's commands, which must not depend on a developer's .env).

Standard library only, and runnable as a file: scripts/env.sh runs it with the system's python3 before any
environment exists (`python3 -I localenv.py home|exports`).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULTS = {
    "TRAFFICWATCH_S3_PORT": "8333",
    "TRAFFICWATCH_FEED_PORT": "8090",
    "TRAFFICWATCH_AIRFLOW_PORT": "8080",
    "TRAFFICWATCH_SUPERSET_PORT": "8088",
    "TRAFFICWATCH_BUCKET": "trafficwatch",
    # The merge sensor's S3 check every 2 s instead of 10: the wait for it was a third of a snapshot's way to
    # the dashboards (5-12 s of 17-31 s, end-to-end test); a check through the worker costs milliseconds.
    "TRAFFICWATCH_MERGE_POLL_INTERVAL": "2",
}
DEFAULT_REGION = "us-east-1"  # as load_settings
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
EXPANSION = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


class LocalEnvError(ValueError):
    """A line of `.env` or `secrets.env` that is not `NAME=value`."""


def is_checkout(repo: Path) -> bool:
    """Whether `repo` is a checkout of TrafficWatch (not an installed copy, e.g. the container image's)."""
    return (repo / "scripts" / "env.sh").is_file()


def _expand(text: str, lookup: Callable[[str], str]) -> str:
    return EXPANSION.sub(lambda match: lookup(match.group(1) or match.group(2)), text)


def _value(raw: str, lookup: Callable[[str], str], where: str) -> str:
    """The value of one `.env` assignment, as the shell would read it (one line; no command substitution)."""
    raw = raw.strip()
    if raw[:1] in ("'", '"'):
        quote, text, i, value = raw[0], raw, 1, []
        while i < len(text) and text[i] != quote:
            if quote == '"' and text[i] == "\\" and i + 1 < len(text) and text[i + 1] in '"\\$`':
                i += 1
            elif quote == '"' and text[i] == "$":  # expanded here, not after the escapes
                match = EXPANSION.match(text, i)
                if match:
                    value.append(lookup(match.group(1) or match.group(2)))
                    i = match.end()
                    continue
            value.append(text[i])
            i += 1
        rest = text[i + 1 :].strip()
        if i >= len(text) or (rest and not rest.startswith("#")):
            raise LocalEnvError(f"{where}: unterminated quote or text after the closing quote")
        return "".join(value)
    return _expand(re.split(r"\s+#", raw, maxsplit=1)[0], lookup)


def read_dotenv(path: Path, lookup: Callable[[str], str] = lambda name: "") -> dict[str, str]:
    """The assignments of a `.env` file ({} if there is none). `lookup(NAME)` gives the value of a `$NAME`
    not assigned earlier in the file."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, equals, raw = line.removeprefix("export ").partition("=")
        name = name.strip()
        where = f"{path} line {number}"
        if not equals or not NAME.fullmatch(name):
            raise LocalEnvError(f"{where}: not NAME=value")
        values[name] = _value(raw, lambda other: values.get(other) or lookup(other), where)
    return values


def read_secrets(path: Path) -> dict[str, str]:
    """The `NAME=value` lines of a generated secrets file, literally ({} if there is none)."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, equals, value = line.partition("=")
        if not equals or not NAME.fullmatch(name.strip()):
            raise LocalEnvError(f"{path} line {number}: not NAME=value")
        values[name.strip()] = value
    return values


def local_settings(repo: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables the local settings of the checkout `repo` add to `environ`: never one it sets."""
    added: dict[str, str] = {}

    def setting(name: str) -> str:
        return environ.get(name) or added.get(name) or ""

    def offer(name: str, value: str) -> None:
        if value and not setting(name):
            added[name] = value

    for name, value in read_dotenv(repo / ".env", setting).items():
        if name == "TRAFFICWATCH_HOME" and value:  # relative to the repository, wherever the command runs
            value = str(repo / value)
        offer(name, value)
    offer("TRAFFICWATCH_HOME", str(repo / ".data"))
    for name, value in read_secrets(Path(setting("TRAFFICWATCH_HOME")) / "secrets.env").items():
        offer(name, value)
    for name, value in DEFAULTS.items():
        offer(name, value)
    if (setting("TRAFFICWATCH_S3") or "local") == "local":
        offer("AWS_ENDPOINT_URL", f"http://127.0.0.1:{setting('TRAFFICWATCH_S3_PORT')}")
        offer("AWS_ACCESS_KEY_ID", setting("TRAFFICWATCH_LOCAL_S3_ACCESS_KEY"))
        offer("AWS_SECRET_ACCESS_KEY", setting("TRAFFICWATCH_LOCAL_S3_SECRET_KEY"))
    offer("AWS_REGION", setting("AWS_DEFAULT_REGION") or DEFAULT_REGION)
    return added


def apply(repo: Path = REPO_ROOT, environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """In a checkout, add its local settings to `environ` (the process's), changing no variable it sets.
    Returns what was added ({} outside a checkout, or with TRAFFICWATCH_LOCAL_SETTINGS=0)."""
    if not is_checkout(repo) or environ.get("TRAFFICWATCH_LOCAL_SETTINGS") == "0":
        return {}
    added = local_settings(repo, environ)
    environ.update(added)
    return added


def main(argv: list[str]) -> int:
    """`home`: the data directory; `exports`: for the shell (scripts/env.sh), `NAME=${NAME:-value}; export NAME`
    for every variable the local settings add."""
    if argv == ["home"]:
        print(local_settings(REPO_ROOT, os.environ).get("TRAFFICWATCH_HOME") or os.environ["TRAFFICWATCH_HOME"])
        return 0
    if argv == ["exports"]:  # a shell variable this process cannot see (not exported) still wins
        for name, value in local_settings(REPO_ROOT, os.environ).items():
            print(f"{name}=${{{name}:-{shlex.quote(value)}}}; export {name}")
        return 0
    print("usage: localenv.py home|exports", file=sys.stderr)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (OSError, LocalEnvError) as error:
        print(f"{Path(__file__).name}: {error}", file=sys.stderr)
        sys.exit(1)
