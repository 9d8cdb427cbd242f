"""Run the CLI in a subprocess that file permissions apply to.

The tests run as root, which reads and writes through any permission bits. A permission test
therefore runs ``lung-effnet`` without the capabilities that bypass them: as root under
``capsh --drop=cap_dac_override,cap_dac_read_search`` (``libcap2-bin``; root is then held to the
owner's bits, so a folder of mode 000 is unreadable), or as user ``nobody`` where capsh is missing
(then the test's folders must be reachable by ``nobody``: ``base_dir`` gives one), or as it is when
the tests do not run as root. ``runner()`` returns ``None`` when none of these is possible.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

DROP = "cap_dac_override,cap_dac_read_search"
Runner = Callable[..., subprocess.CompletedProcess]


def _capsh_works() -> bool:
    capsh = shutil.which("capsh")
    if capsh is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        locked = Path(tmp) / "locked"
        locked.mkdir(mode=0)
        try:
            probe = subprocess.run([capsh, f"--drop={DROP}", "--", "-c", f"ls {locked}"], capture_output=True)
        finally:
            locked.chmod(0o700)
    return probe.returncode != 0  # the listing was refused: permissions apply


def _nobody_uid() -> int | None:
    try:
        import pwd

        return pwd.getpwnam("nobody").pw_uid
    except (ImportError, KeyError):
        return None


@cache
def runner() -> tuple[Runner, str] | None:
    """``(run, how)``: ``run(args, timeout=...)`` runs ``python -m lung_effnet.cli *args``
    without permission-bypassing capabilities and returns the completed process (text output)."""
    cli = [sys.executable, "-m", "lung_effnet.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}

    def run_with(prefix: list[str], **extra) -> Runner:
        def run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
            return subprocess.run([*prefix, *cli, *map(str, args)], capture_output=True, text=True, env=env,
                                  timeout=timeout, **extra)
        return run

    if os.geteuid() != 0:
        return run_with([]), "non-root user"
    if _capsh_works():
        return run_with(["capsh", f"--drop={DROP}", "--", "-c", 'exec "$@"', "sh"]), "capsh"
    uid = _nobody_uid()
    if uid is not None:
        probe = subprocess.run([*cli, "--version"], capture_output=True, preexec_fn=lambda: os.setuid(uid))  # noqa: PLW1509
        if probe.returncode == 0:
            return run_with([], preexec_fn=lambda: os.setuid(uid)), "nobody"
    return None


def base_dir(how: str, tmp_path: Path) -> Path:
    """A folder for the test's files that the unprivileged process can reach and write in."""
    if how != "nobody":
        return tmp_path
    base = Path(tempfile.mkdtemp(prefix="lung-effnet-perm-"))
    base.chmod(0o777)
    return base
