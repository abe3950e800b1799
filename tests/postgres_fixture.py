"""A throw-away PostgreSQL server for integration tests, and helpers for server subprocesses.

    from postgres_fixture import running_postgres

    with running_postgres(tmp_path) as dsn:      # "postgresql://postgres@127.0.0.1:PORT/mlflow"
        ...                                      # trust auth, fsync off, listening on 127.0.0.1 only
        storage = sqlalchemy_url(dsn)            # "postgresql+psycopg2://..." for SQLAlchemy/Optuna

Uses Debian's server binaries (``/usr/lib/postgresql/<version>/bin``; ``apt-get install -y
postgresql``). ``initdb``/``pg_ctl`` refuse to run as root, so as root they run as the ``postgres``
user through ``runuser`` on a data directory created for it (under the system temp dir: pytest's
``tmp_path`` sits below a 0700 directory that user cannot enter). Stopped with ``pg_ctl stop``, then
by PID if that fails; the directory is removed afterwards.

When the binaries (or the ``postgres`` user, as root) are missing, :class:`PostgresUnavailable`
is raised; the ``postgres_dsn`` fixture turns it into a skip naming the reason. Import the fixture
into a test module with ``from postgres_fixture import postgres_dsn  # noqa: F401``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = [
    "PostgresUnavailable",
    "sqlalchemy_url",
    "find_postgres_bin",
    "free_port",
    "postgres_dsn",
    "running_postgres",
    "stop_process_group",
    "wait_for_http",
]

INSTALL_HINT = "apt-get update && apt-get install -y postgresql"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries (or no way to run them) on this machine."""


def sqlalchemy_url(dsn: str) -> str:
    """``postgresql://...`` -> ``postgresql+psycopg2://...`` for SQLAlchemy users (Optuna storages,
    ``mlflow server --backend-store-uri``): SQLAlchemy >= 2.1 maps a bare ``postgresql://`` to
    psycopg 3, and the project installs psycopg2."""
    return "postgresql+psycopg2://" + dsn[len("postgresql://") :] if dsn.startswith("postgresql://") else dsn


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_postgres_bin() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding ``initdb`` and ``pg_ctl``."""
    env = os.environ.get("PIX2SEQ_PG_BIN", "").strip()
    candidates = [env] if env else []

    def version(path: str) -> tuple[int, ...]:
        v = Path(path).parent.parent.name
        return tuple(int(x) for x in v.split(".") if x.isdigit()) or (0,)

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version, reverse=True)
    candidates += [str(Path(p).parent) for p in found]
    which = shutil.which("initdb")
    if which:
        candidates.append(str(Path(which).parent))
    for c in candidates:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    raise PostgresUnavailable(
        f"PostgreSQL server binaries (initdb, pg_ctl) not found; install them: {INSTALL_HINT}"
    )


def _as_postgres_prefix() -> list[str]:
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable(
            f"running as root and there is no 'postgres' user ({INSTALL_HINT})"
        ) from None
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PostgresUnavailable("running as root and runuser(1) is missing (util-linux)")
    return [runuser, "-u", "postgres", "--"]


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def _postmaster_pid(data: Path) -> int | None:
    try:
        return int((data / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def running_postgres(
    tmp_path: str | os.PathLike[str], dbname: str = "mlflow", timeout: float = 60.0
) -> Iterator[str]:
    """Start PostgreSQL on 127.0.0.1 and a free port with database ``dbname``; yield its DSN.

    ``tmp_path`` receives the server log (``postgres.log``, copied there on exit). Raises
    :class:`PostgresUnavailable` when there are no server binaries (or no postgres user, as root),
    RuntimeError with the server's log when it fails to start.
    """
    bindir = find_postgres_bin()
    prefix = _as_postgres_prefix()
    logs = Path(tmp_path)
    logs.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="pix2seq-pg-"))
    data, logfile = base / "data", base / "postgres.log"
    if prefix:
        pw = pwd.getpwnam("postgres")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        base.chmod(0o700)
    port = free_port()
    started = False
    try:
        r = _run(
            [*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--locale=C", "--no-sync"],
            cwd=base, timeout=timeout,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
        opts = (
            f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={base} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
        )
        r = _run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(logfile), "-o", opts,
             "-w", "-t", str(int(timeout)), "start"],
            cwd=base, timeout=timeout + 10,
        )  # fmt: skip
        started = _postmaster_pid(data) is not None
        if r.returncode != 0:
            log = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
            raise RuntimeError(f"pg_ctl start failed ({r.returncode}): {r.stderr.strip()}\n{log}")
        _create_database(port, dbname, timeout)
        yield f"postgresql://postgres@127.0.0.1:{port}/{dbname}"
    finally:
        if started or _postmaster_pid(data) is not None:
            _stop(bindir, prefix, data, base)
        if logfile.exists():
            with contextlib.suppress(OSError):
                shutil.copyfile(logfile, logs / "postgres.log")
        shutil.rmtree(base, ignore_errors=True)


def _create_database(port: int, dbname: str, timeout: float) -> None:
    import psycopg2

    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = psycopg2.connect(
                host="127.0.0.1", port=port, user="postgres", dbname="postgres", connect_timeout=5
            )
            break
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{dbname}"')
    finally:
        conn.close()


def _stop(bindir: Path, prefix: list[str], data: Path, cwd: Path) -> None:
    pid = _postmaster_pid(data)
    try:
        r = _run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop"],
            cwd,
            45,
        )
        ok = r.returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    if not ok and pid is not None:  # by PID: SIGQUIT is PostgreSQL's immediate shutdown
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="module")
def postgres_dsn(tmp_path_factory) -> Iterator[str]:
    """A PostgreSQL DSN for the module's tests; skipped (with the reason) where it cannot run."""
    try:
        cm = running_postgres(tmp_path_factory.mktemp("postgres"))
        dsn = cm.__enter__()
    except PostgresUnavailable as e:
        pytest.skip(str(e))
    try:
        yield dsn
    finally:
        cm.__exit__(None, None, None)


# ------------------------------------------------------------------------------ server processes


def wait_for_http(url: str, proc: subprocess.Popen | None, timeout: float, log: Path | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early (with the log's tail) if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f} s\n{_tail(log)}")
        time.sleep(1.0)


def _tail(log: Path | None, n: int = 3000) -> str:
    if log is None or not Path(log).exists():
        return ""
    return Path(log).read_text(errors="replace")[-n:]


def stop_process_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process group ``proc`` leads (started with ``start_new_session=True``), then SIGKILL."""
    if proc.poll() is None or _group_alive(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + timeout
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
