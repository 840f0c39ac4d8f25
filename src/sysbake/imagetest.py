"""`sysbake test`: boot an image, wait for systemd, report failed units, run the image's
checks, stop it cleanly through its stop signal, and say whether all of it passed."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sysbake import log, proc, signals
from sysbake.errors import RuntimeFailure, SysbakeError
from sysbake.records import field, record, replace
from sysbake.runtime import containers as rt
from sysbake.runtime import inside
from sysbake.runtime.owners import OwnerLock

if TYPE_CHECKING:
    from sysbake.oci.store import Store
    from sysbake.project.specs import ImageSpec

_STOP_TIMEOUT = 30.0
_PORT_WAIT = 15.0  # services of a `running` system may still be binding their sockets


class TestSpecLike(Protocol):
    """What the harness needs of a [test] section (sysbake.project.load.TestSpec fits)."""

    @property
    def timeout(self) -> float: ...
    @property
    def commands(self) -> tuple[str, ...]: ...
    @property
    def units(self) -> tuple[str, ...]: ...
    @property
    def ports(self) -> tuple[int, ...]: ...


@record
class SystemdOnly:
    """The checks of an image without a [test] section: systemd's own state only."""

    __test__ = False

    timeout: float = 120.0
    commands: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()


@record
class FailedUnit:
    """A unit systemd lists as failed, with the tail of its journal."""

    unit: str
    journal: tuple[str, ...]


@record
class CheckResult:
    """One check: its name ('systemd', 'command: ...', 'unit ...', 'port N', 'stop')."""

    name: str
    passed: bool
    detail: str = ""


Check = Callable[[rt.Container], CheckResult]


@record
class TestReport:
    """The outcome of `sysbake test` for one image."""

    __test__ = False

    image: str
    container: str
    state: str  # systemd's: running, degraded, starting (timed out)...; or no-systemd, error
    boot_seconds: float | None = None
    failed_units: tuple[FailedUnit, ...] = ()
    checks: tuple[CheckResult, ...] = ()
    error: str = ""
    kept: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return (
            not self.error
            and self.state == "running"
            and not self.failed_units
            and all(c.passed for c in self.checks)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "container": self.container,
            "state": self.state,
            "boot_seconds": self.boot_seconds,
            "passed": self.passed,
            "error": self.error,
            "kept": self.kept,
            "failed_units": [
                {"unit": f.unit, "journal": list(f.journal)} for f in self.failed_units
            ],
            "checks": [
                {"name": c.name, "passed": c.passed, "detail": c.detail} for c in self.checks
            ],
        }

    def summary(self) -> str:
        """A few lines for humans: one per check, failed units with their journal."""
        boot = f" in {self.boot_seconds:.1f}s" if self.boot_seconds is not None else ""
        lines = [f"test {self.image} (container {self.container}): {self.state}{boot}"]
        if self.error:
            lines.append(f"  error: {self.error}")
        elif self.state in ("running", "degraded"):
            ok = self.state == "running" and not self.failed_units
            lines.append(
                f"  {'ok  ' if ok else 'FAIL'}  systemd: {self.state}, "
                f"{len(self.failed_units)} failed units"
            )
        for unit in self.failed_units:
            lines.append(f"  FAIL  unit {unit.unit} failed; its journal:")
            lines += [f"          {line}" for line in unit.journal]
        for check in self.checks:
            mark = "ok  " if check.passed else "FAIL"
            detail = f": {check.detail}" if check.detail else ""
            lines.append(f"  {mark}  {check.name}{detail}")
        if self.kept:
            lines.append(
                f"  kept running: sysbake exec {self.container} bash; "
                f"sysbake rm -f {self.container}"
            )
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def failed_units(container: rt.Container) -> tuple[FailedUnit, ...]:
    """systemd's failed units with the last 10 lines of each one's journal."""
    _, out = inside.exec_capture(
        container, ["systemctl", "list-units", "--failed", "--plain", "--no-legend", "--no-pager"]
    )
    found = []
    for line in out.splitlines():
        words = line.split()
        if not words or not re.match(r"^[\w@.:\\-]+\.[a-z]+$", words[0]):
            continue
        _, journal = inside.exec_capture(
            container, ["journalctl", "-u", words[0], "-n", "10", "--no-pager", "--quiet"]
        )
        found.append(FailedUnit(words[0], tuple(journal.rstrip("\n").splitlines())))
    return tuple(found)


def command_check(command: str, timeout: float) -> Check:
    """Passes when `sh -c command` exits 0 inside the container."""

    def check(container: rt.Container) -> CheckResult:
        try:
            code, out = inside.exec_capture(container, ["sh", "-c", command], timeout=timeout)
        except SysbakeError as exc:  # a timeout included
            return CheckResult(f"command: {command}", False, str(exc))
        detail = "" if code == 0 else f"exit {code}: {proc.tail(out, 5)}"
        return CheckResult(f"command: {command}", code == 0, detail)

    return check


def unit_check(unit: str) -> Check:
    """Passes when `unit` is active."""

    def check(container: rt.Container) -> CheckResult:
        _, out = inside.exec_capture(container, ["systemctl", "is-active", unit])
        state = out.strip().splitlines()[-1] if out.strip() else "unknown"
        if state == "active":
            return CheckResult(f"unit {unit}", True)
        _, journal = inside.exec_capture(
            container, ["journalctl", "-u", unit, "-n", "10", "--no-pager", "--quiet"]
        )
        return CheckResult(f"unit {unit}", False, f"{state}: {proc.tail(journal, 10, empty='')}")

    return check


def listening_ports(pid: int) -> set[int]:
    """TCP ports listening in the network namespace of host process `pid`."""
    ports = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def port_check(port: int, wait: float = _PORT_WAIT) -> Check:
    """Passes when something listens on TCP `port` inside the container within `wait` s."""

    def check(container: rt.Container) -> CheckResult:
        deadline = time.monotonic() + wait
        while True:
            pid = rt.status(container).pid
            if pid and port in listening_ports(pid):
                return CheckResult(f"port {port}", True)
            if time.monotonic() >= deadline:
                return CheckResult(f"port {port}", False, f"nothing listens on TCP port {port}")
            time.sleep(0.2)

    return check


def checks_of(spec: TestSpecLike) -> list[Check]:
    """The checks a [test] section declares, in order: commands, units, ports."""
    return (
        [command_check(c, spec.timeout) for c in spec.commands]
        + [unit_check(u) for u in spec.units]
        + [port_check(p, min(_PORT_WAIT, spec.timeout)) for p in spec.ports]
    )


def test_container(
    container: rt.Container,
    image: str,
    spec: TestSpecLike,
    *,
    timeout: float,
    keep: bool = False,
    extra_checks: Sequence[Check] = (),
) -> TestReport:
    """Test an already started container, then stop and remove it (unless `keep`)."""
    start = time.monotonic()
    state, boot, error = "error", None, ""
    failed: tuple[FailedUnit, ...] = ()
    results: list[CheckResult] = []
    try:
        state = inside.wait_for_boot(container, timeout)
        if state in ("running", "degraded"):
            boot = round(time.monotonic() - start, 2)
            failed = failed_units(container)
        else:
            _, jobs = inside.exec_capture(
                container, ["systemctl", "list-jobs", "--no-pager", "--no-legend"]
            )
            error = (
                f"systemd did not finish booting within {timeout:.0f}s (state {state}); "
                f"pending jobs: {proc.tail(jobs, 5, empty='none')}"
            )
        if not error:
            results += [check(container) for check in [*checks_of(spec), *extra_checks]]
    except RuntimeFailure as exc:
        error = str(exc)
    finally:
        if not keep:
            results.append(_stop_check(container))
    return TestReport(
        image=image,
        container=container.name,
        state=state,
        boot_seconds=boot,
        failed_units=failed,
        checks=tuple(results),
        error=error,
        kept=keep,
    )


def _stop_check(container: rt.Container) -> CheckResult:
    try:
        result = rt.stop(container, timeout=_STOP_TIMEOUT)
    finally:
        rt.remove(container, force=True)
    if result.killed:
        return CheckResult(
            "stop",
            False,
            f"still running {_STOP_TIMEOUT:.0f}s after {signals.name(container.stop_signal)}: "
            "killed",
        )
    if result.exit_code != 0:
        return CheckResult("stop", False, f"PID 1 exited with code {result.exit_code}")
    return CheckResult("stop", True, f"exit 0 after {signals.name(container.stop_signal)}")


def run_test(
    store: Any,
    image_ref: str,
    spec: TestSpecLike | None = None,
    *,
    timeout: float | None = None,
    runtime: str = "runc",
    keep: bool = False,
    extra_checks: Sequence[Check] = (),
) -> TestReport:
    """Boot `image_ref` from `store` and test it (see module docstring); never raises for
    a failing image: the report says why. `timeout` (default: the spec's) bounds the boot."""
    spec = spec or SystemdOnly()
    boot_timeout = spec.timeout if timeout is None else timeout
    base = re.sub(r"[^A-Za-z0-9]", "-", image_ref.rsplit("/", 1)[-1].split(":")[0])[:30]
    name = f"test-{base.strip('-') or 'image'}-{uuid.uuid4().hex[:6]}"
    options = rt.RunOptions(name=name, runtime=runtime)
    log.info(f"==> testing {image_ref} in container {name}")
    # Owned by this process until removed (or kept): if it is killed, even with SIGKILL,
    # the next sysbake command removes the container (sysbake.runtime.owners).
    with OwnerLock(store.containers_dir, name) as owner:
        try:
            container = rt.run_image(store, image_ref, options, require_init=True, owner=owner)
        except rt.NoSystemd as exc:
            return TestReport(image=image_ref, container=name, state="no-systemd", error=str(exc))
        except RuntimeFailure as exc:  # PID 1 died at once, a mount failed...
            return TestReport(image=image_ref, container=name, state="error", error=str(exc))
        return test_container(
            container, image_ref, spec, timeout=boot_timeout, keep=keep, extra_checks=extra_checks
        )


def test_image(
    store: Any,
    ref: str,
    image_spec: Any,
    *,
    timeout: float | None = None,
    runtime: str = "runc",
    keep: bool = False,
) -> TestReport:
    """`run_test` with the [test] section of the project's image `image_spec`, plus Salt
    idempotence (each salt/project step re-applied must change nothing) when asked."""
    report = run_test(store, ref, image_spec.test, timeout=timeout, runtime=runtime, keep=keep)
    salt_steps = [s for s in image_spec.provision if s.type in ("salt", "project")]
    if not (image_spec.test.idempotence and salt_steps and report.passed):
        return report
    try:
        extra = tuple(idempotence_checks(store, image_spec, ref))
    except SysbakeError as exc:
        extra = (CheckResult("idempotence", False, str(exc)),)
    return replace(report, checks=report.checks + extra)


def idempotence_checks(store: Store, spec: ImageSpec, ref: str) -> list[CheckResult]:
    """Re-apply each Salt step of image `spec` on a booted container of `ref`; a step
    passes when Salt succeeds and reports no changes."""
    from sysbake.build import steps
    from sysbake.build.salt import run as salt

    layers = store.resolve(ref).layers
    results = []
    for step in spec.provision:
        if step.type not in ("salt", "project"):
            continue
        name = f"idempotence: {step.name}"
        rc, out, err = steps.run_unjudged(
            store, spec, step, layers, f"{spec.name}: {step.name} (idempotence)"
        )
        result = salt.parse_result(out, rc, err)
        if not result.ok:
            results.append(
                CheckResult(name, False, f"salt failed on the image: {result.error_line()}")
            )
        elif result.changes:
            changed = "; ".join(s.describe() for s in result.changed)
            results.append(
                CheckResult(name, False, f"{result.changes} states changed again: {changed}")
            )
        else:
            results.append(CheckResult(name, True, f"{len(result.states)} states, no changes"))
    return results
