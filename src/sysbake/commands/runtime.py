"""run, shell, exec, stop, ps, logs, rm and test: containers without a daemon."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sysbake import log, rootfs
from sysbake.errors import ConfigError, RuntimeFailure
from sysbake.runtime import bundle, inside
from sysbake.runtime import containers as rt

if TYPE_CHECKING:
    from sysbake.cli import Context


def register(subparsers: Any, add_globals: Callable[[argparse.ArgumentParser], None]) -> None:
    def sub(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = subparsers.add_parser(
            name, help=help_text, description=help_text
        )
        add_globals(parser)
        return parser

    def container_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "-v",
            "--volume",
            action="append",
            default=[],
            metavar="SRC:DST[:ro]",
            help="bind-mount a host path",
        )
        parser.add_argument(
            "--network",
            choices=("none", "host"),
            default="none",
            help="none: own namespace, loopback only (default); host",
        )
        parser.add_argument(
            "--runtime",
            choices=("runc", "crun"),
            default="runc",
            help="OCI runtime (default: runc)",
        )
        parser.add_argument(
            "-e",
            "--env",
            action="append",
            default=[],
            metavar="K=V",
            help="set an environment variable of PID 1",
        )
        parser.add_argument("--name", help="container name (default: IMAGE-<random>)")

    p = sub(
        "run",
        "boot an image with systemd as PID 1 (no daemon); foreground shows the "
        "boot and removes the container when it ends, -d keeps it",
    )
    p.add_argument("image")
    p.add_argument(
        "pid1",
        nargs=argparse.REMAINDER,
        metavar="COMMAND",
        help="run this as PID 1 instead of the image's Cmd",
    )
    p.add_argument("-d", "--detach", action="store_true", help="start it and return")
    p.add_argument(
        "--stop-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="on Ctrl-C: seconds between the stop signal and SIGKILL",
    )
    container_options(p)
    p.set_defaults(handler=_run)

    p = sub(
        "shell",
        "boot an image, wait for systemd and open a login shell in it; "
        "leaving the shell stops and removes the container",
    )
    p.add_argument("image")
    p.add_argument(
        "--timeout", type=float, default=60.0, metavar="S", help="how long to wait for the boot"
    )
    container_options(p)
    p.set_defaults(handler=_shell)

    p = sub("exec", "run a command in a running container (exit code propagated)")
    p.add_argument("name")
    p.add_argument("command", nargs=argparse.REMAINDER)
    tty = p.add_mutually_exclusive_group()
    tty.add_argument(
        "-t",
        "--tty",
        action="store_true",
        default=None,
        help="allocate a terminal (default: when stdin is one)",
    )
    tty.add_argument("-T", "--no-tty", dest="tty", action="store_false")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    p.set_defaults(handler=_exec)

    p = sub("stop", "stop containers through their stop signal, SIGKILL after a timeout")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S")
    p.set_defaults(handler=_stop)

    p = sub("ps", "list containers (running ones; --all for every one)")
    p.add_argument("-a", "--all", action="store_true")
    p.set_defaults(handler=_ps)

    p = sub("logs", "a container's journal (while it runs) or its console log")
    p.add_argument("name")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("-n", "--lines", type=int, default=None, metavar="N")
    p.add_argument(
        "--console",
        action="store_true",
        help="the console log (systemd's boot output) even while it runs",
    )
    p.set_defaults(handler=_logs)

    p = sub("rm", "remove containers (their state and upper dir)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("-f", "--force", action="store_true", help="kill it first if it runs")
    p.set_defaults(handler=_rm)

    p = sub(
        "test",
        "boot an image, wait for systemd, report failed units, run its checks, "
        "stop it cleanly; exit 0 only when all pass",
    )
    p.add_argument("image")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="boot timeout (default: the image's [test] timeout, or 120)",
    )
    p.add_argument("--keep", action="store_true", help="leave the container running")
    p.add_argument("--runtime", choices=("runc", "crun"), default="runc")
    p.add_argument(
        "--project",
        type=Path,
        default=None,
        metavar="PATH",
        help="take the checks from this project (default: ./sysbake.toml, "
        "when it defines the image)",
    )
    p.set_defaults(handler=_test)


def _options(args: argparse.Namespace, command: tuple[str, ...] = ()) -> rt.RunOptions:
    return rt.RunOptions(
        name=args.name,
        binds=tuple(bundle.parse_volume(v) for v in args.volume),
        network=args.network,
        runtime=args.runtime,
        env=tuple(args.env),
        command=command,
    )


def _container(ctx: Context, name: str) -> rt.Container:
    return rt.load(ctx.store_path / "containers", name)


def _run(ctx: Context, args: argparse.Namespace) -> int:
    options = _options(args, tuple(args.pid1))
    container = rt.run_image(ctx.store(), args.image, options)
    if args.detach:
        print(container.name)
        return 0
    try:
        _foreground(container, args.stop_timeout)
    finally:
        rt.remove(container, force=True)
    code = rt.exit_code(container)
    return 0 if code is None else code


def _foreground(container: rt.Container, stop_timeout: float) -> None:
    """Show the console until the container ends; Ctrl-C (or SIGTERM) sends the stop
    signal, a second one or `stop_timeout` s later SIGKILL."""
    position = 0
    kill_at: float | None = None
    polls = 0
    while True:
        try:
            position = _copy_console(container, position)
            polls += 1
            if polls % 5 == 0 and not rt.status(container).running:
                _copy_console(container, position)
                return
            if kill_at is not None and time.monotonic() >= kill_at:
                log.warn(f"{container.name} did not stop within {stop_timeout:.0f}s: killing it")
                rt.send_signal(container, signal.SIGKILL)
                kill_at = float("inf")
            time.sleep(0.1)
        except KeyboardInterrupt:
            if kill_at is None:
                log.info(f"\nsysbake: stopping {container.name} (Ctrl-C again to kill it)")
                rt.send_signal(container, container.stop_signal)
                kill_at = time.monotonic() + stop_timeout
            else:
                rt.send_signal(container, signal.SIGKILL)


def _copy_console(container: rt.Container, position: int) -> int:
    """Write the console log from `position` to stdout; the new position."""
    try:
        with open(container.console, "rb") as f:
            f.seek(position)
            data = f.read()
    except FileNotFoundError:
        return position
    if data:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return position + len(data)


def _shell(ctx: Context, args: argparse.Namespace) -> int:
    container = rt.run_image(ctx.store(), args.image, _options(args))
    try:
        if bundle.is_init(container.args):
            state = inside.wait_for_boot(container, args.timeout)
            log.info(f"{container.name}: systemd is {state}")
        with rootfs.Root(container.rootfs) as root:
            shell = "/bin/bash" if root.exists("/bin/bash") else "/bin/sh"
            home = "/root" if root.is_dir("/root") else None
        return inside.run_attached(
            inside.exec_argv(container, [shell, "-l"], tty=sys.stdin.isatty(), cwd=home)
        )
    finally:
        rt.stop(container, timeout=10.0)
        rt.remove(container, force=True)


def _exec(ctx: Context, args: argparse.Namespace) -> int:
    if not args.command:
        raise RuntimeFailure("exec: expected a command after the container name")
    container = _container(ctx, args.name)
    if not rt.status(container).running:
        raise RuntimeFailure(f"container {container.name} is not running")
    tty = sys.stdin.isatty() if args.tty is None else args.tty
    return inside.run_attached(inside.exec_argv(container, args.command, tty=tty, env=args.env))


def _stop(ctx: Context, args: argparse.Namespace) -> int:
    results = {}
    for name in args.names:
        result = rt.stop(_container(ctx, name), timeout=args.timeout)
        results[name] = {"exit_code": result.exit_code, "killed": result.killed}
        if not ctx.json:
            how = "killed" if result.killed else f"exit code {result.exit_code}"
            print(f"{name}: stopped ({how})")
    if ctx.json:
        ctx.emit(results)
    return 0


def _ps(ctx: Context, args: argparse.Namespace) -> int:
    """Containers (running ones, or all), then those whose owner died: removed just now
    (status "reaped (orphaned: owner pid N gone)"), or left with the reason."""
    import datetime

    from sysbake.runtime import owners

    containers_dir = ctx.store_path / "containers"
    left = {o.name: o for o in ctx.reaped if o.error}
    rows: list[dict[str, Any]] = []
    for container in rt.all_containers(containers_dir):
        status = rt.status(container)
        orphan = left.get(container.name)
        if not args.all and not status.running and orphan is None:
            continue
        state = status.state if status.exit_code is None else f"{status.state} ({status.exit_code})"
        if orphan is not None:
            state = f"{state} ({orphan.describe()})"
        created = datetime.datetime.fromtimestamp(container.created, datetime.UTC)
        rows.append(
            {
                "name": container.name,
                "image": container.image,
                "image_id": container.image_id,
                "status": state,
                "exit_code": status.exit_code,
                "created": created.isoformat(),
                "pid": status.pid,
                "runtime": container.runtime,
                "owner_pid": owners.owner_pid(containers_dir, container.name),
                "orphaned": orphan is not None,
            }
        )
    rows += [
        {
            "name": o.name,
            "image": o.image,
            "image_id": "",
            "status": f"reaped ({o.describe()})",
            "exit_code": None,
            "created": None,
            "pid": None,
            "runtime": None,
            "owner_pid": o.owner_pid,
            "orphaned": True,
        }
        for o in ctx.reaped
        if not o.error
    ]
    if ctx.json:
        ctx.emit(rows)
        return 0
    table = [("NAME", "IMAGE", "STATUS", "CREATED", "PID")]
    table += [
        (
            str(r["name"]),
            str(r["image"]),
            str(r["status"]),
            str(r["created"] or "-")[:19].replace("T", " "),
            str(r["pid"] or "-"),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _logs(ctx: Context, args: argparse.Namespace) -> int:
    container = _container(ctx, args.name)
    journal = bundle.is_init(container.args) and not args.console
    if journal and rt.status(container).running:
        command = ["journalctl", "--no-pager"]
        if args.follow:
            command.append("--follow")
        if args.lines is not None:
            command += ["--lines", str(args.lines)]
        return inside.run_attached(inside.exec_argv(container, command))
    try:
        data = container.console.read_bytes()
    except FileNotFoundError:
        data = b""
    position = len(data)
    if args.lines is not None:
        data = b"".join(data.splitlines(keepends=True)[-args.lines :]) if args.lines else b""
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    while args.follow and rt.status(container).running:
        position = _copy_console(container, position)
        time.sleep(0.5)
    return 0


def _rm(ctx: Context, args: argparse.Namespace) -> int:
    reaped = {o.name for o in ctx.reaped if not o.error}  # gone already: done
    for name in args.names:
        if name not in reaped:
            rt.remove(_container(ctx, name), force=args.force)
        if not ctx.json:
            print(name)
    return 0


def _test_spec(args: argparse.Namespace) -> tuple[str, Any]:
    """The ref to test and its image spec, when a project defines the image."""
    path = args.project
    if path is None:
        if not (Path.cwd() / "sysbake.toml").is_file():
            return args.image, None
        path = Path.cwd()
    from sysbake.project.load import load_project

    project = load_project(path)
    try:
        spec = project.image(args.image)
    except ConfigError:
        if args.project is not None:
            raise
        return args.image, None
    return spec.tag, spec


def _test(ctx: Context, args: argparse.Namespace) -> int:
    from sysbake import imagetest as checks

    ref, spec = _test_spec(args)
    if spec is None:
        report = checks.run_test(
            ctx.store(), ref, None, timeout=args.timeout, runtime=args.runtime, keep=args.keep
        )
    else:
        report = checks.test_image(
            ctx.store(), ref, spec, timeout=args.timeout, runtime=args.runtime, keep=args.keep
        )
    if ctx.json:
        ctx.emit(report.to_json())
    else:
        print(report.summary())
    return 0 if report.passed else 1
