"""The shell a booted step's PID 1 starts as (provision._wrapper), run here with /bin/sh and
stand-ins for the image's init and systemctl: it runs the step in the background (output
to files, exit code through the FIFO), then execs the init with its arguments."""

from __future__ import annotations

import os
import select
import subprocess
from pathlib import Path

import pytest

from sysbake.build import steps as provision
from sysbake.build.steps import CONF_DIR, StepPlan


def _run(
    tmp_path: Path,
    plan: StepPlan,
    systemctl: str = "echo running",
    init: tuple[str, ...] = ("/bin/echo", "init", "ran"),
) -> tuple[str, str]:
    """Run the wrapper with `tmp_path/conf` as the conf dir; (the step's exit code as the
    FIFO gave it, what the stand-in init printed)."""
    conf = tmp_path / "conf"
    conf.mkdir()
    fifo = conf / "step.done"
    os.mkfifo(fifo)
    os.mkfifo(conf / "step.started")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(f"#!/bin/sh\n{systemctl}\n")
    (bin_dir / "systemctl").chmod(0o755)
    shell, flag, script, name = provision._wrapper(plan)
    script = script.replace(CONF_DIR, str(conf))
    done = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        # In a session of its own, as the runtime starts PID 1.
        ran = subprocess.run(
            [shell, flag, script, name, *init],
            start_new_session=True,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            env={"PATH": f"{bin_dir}:/usr/bin:/bin", "container": "x"},
        )
        waiter = select.poll()  # as provision._step_result: no writer yet is no EOF
        waiter.register(done, select.POLLIN)
        code = b""
        while waiter.poll(30_000) and (chunk := os.read(done, 64)):
            code += chunk
    finally:
        os.close(done)
    return code.decode().strip(), ran.stdout.strip()


def test_the_step_runs_beside_the_init_with_only_its_own_environment(tmp_path: Path) -> None:
    plan = StepPlan(
        ("/bin/sh", "-c", 'echo "out $A/${container:-unset}"; echo err >&2; exit 3'),
        {"PATH": "/usr/bin:/bin", "A": "b c"},
        waits_for_boot=True,
    )
    code, init = _run(tmp_path, plan, systemctl="exit 1")  # not asked: it waits itself
    assert (code, init) == ("3", "init ran")
    assert (tmp_path / "conf/step.out").read_text() == "out b c/unset\n"
    assert (tmp_path / "conf/step.err").read_text() == "err\n"


def test_a_step_that_does_not_wait_itself_runs_once_systemd_has_booted(tmp_path: Path) -> None:
    answers = tmp_path / "answers"
    answers.write_text("offline\nstarting\ndegraded\n")
    plan = StepPlan(("/bin/sh", "-c", f"cat {answers}"), {"PATH": "/usr/bin:/bin"})
    code, _ = _run(tmp_path, plan, systemctl=f"head -n1 {answers}; sed -i 1d {answers}")
    assert code == "0"
    assert (tmp_path / "conf/step.out").read_text() == ""  # all three answers were used


@pytest.mark.parametrize("answer", ["maintenance", "stopping"])
def test_a_boot_that_ends_badly_stops_the_step_before_it_runs(tmp_path: Path, answer: str) -> None:
    plan = StepPlan(("/bin/sh", "-c", "echo step-ran"), {"PATH": "/usr/bin:/bin"})
    code, init = _run(tmp_path, plan, systemctl=f"echo {answer}")
    assert (code, init) == ("97", "init ran")
    assert (tmp_path / "conf/step.out").read_text() == ""
    assert (tmp_path / "conf/step.err").read_text() == f"sysbake: boot: {answer}\n"


def test_the_step_survives_the_hang_up_of_the_session_it_started_in(tmp_path: Path) -> None:
    """systemd, taking over the console as PID 1, hangs up the session it was started in,
    as soon as it starts: the step has a session of its own; the subshell reporting its
    exit code traps the hang-up before PID 1 execs the init."""
    plan = StepPlan(
        ("/bin/sh", "-c", "sleep 0.5; echo survived"),
        {"PATH": "/usr/bin:/bin"},
        waits_for_boot=True,
    )
    init = ("/bin/sh", "-c", "trap '' HUP; kill -HUP 0; echo init ran")  # at once
    assert _run(tmp_path, plan, init=init) == ("0", "init ran")
    assert (tmp_path / "conf/step.out").read_text() == "survived\n"
