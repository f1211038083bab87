"""Joining Ray: `local` starts a Ray instance on this machine, `auto` joins the cluster this machine
belongs to, `ray://HOST:PORT` (Ray Client) or `HOST:PORT` (the head's GCS) a remote one.

Every failure is one line: Ray missing (with the pip command), an address nobody answers at, a
cluster that refuses the connection (token authentication, see the README).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

from lmf_cli.errors import LmfError, option_name

ADDRESSES = "local, auto, ray://HOST:PORT or HOST:PORT"
REACH_TIMEOUT_S = 5.0
TOKEN_HELP = ("the cluster uses token authentication: set RAY_AUTH_MODE=token and the cluster's token in "
              "RAY_AUTH_TOKEN (or a file named by RAY_AUTH_TOKEN_PATH, default ~/.ray/auth_token)")


class ClusterError(LmfError):
    """Ray is missing, or the cluster cannot be reached or refuses the connection."""


def import_ray() -> ModuleType:
    """Ray, or a one-line error that says how to get it."""
    try:
        import ray
    except ImportError as exc:
        raise ClusterError(f'{option_name("ray")} needs Ray, an optional extra: pip install "lmf-cli[ray]"') from exc
    return ray


@dataclass
class Connection:
    """A connection to Ray; `close` shuts Ray down only if this connection started it."""

    address: str
    started: bool

    def close(self) -> None:
        if self.started:
            import_ray().shutdown()
            self.started = False


def _host_port(address: str) -> tuple[str, int]:
    """(host, port) of ray://HOST[:PORT] or HOST:PORT, for a quick check that someone answers there."""
    rest, default = (address[len("ray://"):], 10001) if address.startswith("ray://") else (address, 6379)
    host, _, port = rest.rpartition(":") if ":" in rest else (rest, ":", str(default))
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ClusterError(f"{option_name('ray')} {address}: use {ADDRESSES}")
    return host, int(port)


def _reachable(address: str) -> None:
    """Fail in seconds, in one line, where Ray would retry for a minute before giving up."""
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=REACH_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {reason.lower()}") from exc


@contextlib.contextmanager
def _held_stderr() -> Iterator[list[str]]:
    """Keep what Ray's C++ core prints on the process's stderr while it connects (it retries for a
    while, a line a second); the caller reads it to explain a failure in one line."""
    held: list[str] = []
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (a test runner's stream)
        yield held
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), fd)
        try:
            yield held
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            sink.seek(0)
            held.append(sink.read().decode(errors="replace"))


def _refused(text: str) -> bool:
    return any(mark in text.lower() for mark in ("invalidauthtoken", "unauthenticated", "authenticationerror"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def connect(address: str) -> Connection:
    """Connect this process to Ray at `address` (local, auto, ray://HOST:PORT or HOST:PORT).

    A process already connected (a test's Ray instance, a notebook's) keeps its connection.
    `local` uses every core and GPU of this machine; the others use the cluster's. Joining a
    cluster with token authentication takes its token from the environment, as every Ray tool does.
    """
    ray = import_ray()
    if ray.is_initialized():
        return Connection(address, started=False)
    if address not in ("local", "auto"):
        _reachable(address)
    options = {"logging_level": logging.ERROR, "log_to_driver": False}
    if address == "local":
        options["include_dashboard"] = False
    logging.getLogger("ray").setLevel(logging.ERROR)
    try:
        with _held_stderr() as held:
            ray.init(address=address, **options)
    except ray.exceptions.AuthenticationError as exc:
        raise ClusterError(f"the Ray cluster at {address} refused the connection: {TOKEN_HELP}") from exc
    except ValueError as exc:
        if "ray[client]" in str(exc):
            raise ClusterError(f'{option_name("ray")} {address}: ray:// addresses need Ray Client: '
                               'pip install "ray[client]"') from exc
        raise ClusterError(f"{option_name('ray')} {address}: {_first_line(exc)}") from exc
    except (ConnectionError, RuntimeError, TimeoutError) as exc:
        if _refused(f"{exc} {''.join(held)}"):
            raise ClusterError(f"the Ray cluster at {address} refused the connection: {TOKEN_HELP}") from exc
        hint = " (a cluster with token authentication does not answer Ray Client without its token: set " \
               "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN)" if address.startswith("ray://") else ""
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {_first_line(exc)}{hint}") from exc
    return Connection(address, started=True)
