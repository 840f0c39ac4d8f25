"""run, shell, exec, stop, ps, logs, rm and test: containers without a daemon."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sysbake import log
from sysbake.errors import ConfigError, RuntimeFailure
from sysbake.runtime import bundle, inside
from sysbake.runtime import container_dir as cd
from sysbake.runtime import containers as rt

if TYPE_CHECKING:
    from sysbake.cli import Context


def register(subparsers: Any, add_globals: Callable[[argparse.ArgumentParser], None]) -> None:
    def sub(
        name: str, help_text: str, description: str | None = None, **kwargs: Any
    ) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = subparsers.add_parser(
            name, help=help_text, description=description or help_text, **kwargs
        )
        add_globals(parser)
        return parser

    _register_run(sub)
    _register_exec(sub)
    _register_lifecycle(sub)
    _register_listing(sub)
    _register_files(sub)

    p = sub(
        "test",
        "boot an image and check it (failed units, its checks)",
        "Boot an image, wait for systemd, report failed units, run its checks, stop it "
        "cleanly; exit 0 only when all pass.",
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


_Sub = Callable[..., argparse.ArgumentParser]


def _container_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v",
        "--volume",
        action="append",
        default=[],
        metavar="SRC:DST[:ro]",
        help="bind-mount a host path",
    )
    parser.add_argument(
        "-p",
        "--publish",
        action="append",
        default=[],
        metavar="[IP:][HOST:]PORT[/udp]",
        help="publish a container port on the host (127.0.0.1 unless IP is given; "
        "any free host port when HOST is empty); repeatable",
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
    parser.add_argument(
        "--stop-signal",
        default=None,
        metavar="SIGNAL",
        help="stop it with this signal (a name like SIGRTMIN+3; default: the image's)",
    )


def _register_run(sub: _Sub) -> None:
    p = sub(
        "run",
        "boot an image with systemd as PID 1 (no daemon)",
        "Boot an image with systemd as PID 1 (no daemon). In the foreground it shows the "
        "boot and removes the container when it ends; -d keeps it (unless --rm); -i/-t "
        "open a shell (or run COMMAND) in the booted container on this terminal, then "
        "stop and remove it.",
    )
    p.add_argument("image")
    p.add_argument(
        "pid1",
        nargs=argparse.REMAINDER,
        metavar="COMMAND",
        help="run this as PID 1 instead of the image's Cmd (with -i/-t: run it in the "
        "booted container on this terminal)",
    )
    p.add_argument("-d", "--detach", action="store_true", help="start it and return")
    p.add_argument(
        "--rm", action="store_true", help="remove the container when it ends (also with -d)"
    )
    p.add_argument(
        "-i", "--interactive", action="store_true", help="attach stdin to COMMAND (or a shell)"
    )
    p.add_argument("-t", "--tty", action="store_true", help="give COMMAND (or a shell) a terminal")
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="-i/-t: how long to wait for the boot",
    )
    p.add_argument(
        "--stop-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="on Ctrl-C: seconds between the stop signal and SIGKILL",
    )
    _container_options(p)
    p.set_defaults(handler=_run)

    p = sub(
        "shell",
        "boot an image and open a login shell in it",
        "Boot an image, wait for systemd and open a login shell in it; leaving the shell "
        "stops and removes the container.",
    )
    p.add_argument("image")
    p.add_argument(
        "--timeout", type=float, default=60.0, metavar="S", help="how long to wait for the boot"
    )
    _container_options(p)
    p.set_defaults(handler=_shell)


def _register_exec(sub: _Sub) -> None:
    p = sub(
        "exec",
        "run a command in a running container",
        "Run a command in a running container; sysbake exits with its exit code, 127 when "
        "the command is not found in the container, 126 when it cannot run there.",
    )
    p.add_argument("name", metavar="CONTAINER")
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
    p.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="accepted for docker's -it: stdin is attached",
    )
    p.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    p.add_argument(
        "-u", "--user", default=None, metavar="USER[:GROUP]", help="run as this user (name or id)"
    )
    p.add_argument(
        "-w", "--workdir", default=None, metavar="DIR", help="working directory in the container"
    )
    p.set_defaults(handler=_exec)


def _register_lifecycle(sub: _Sub) -> None:
    p = sub("stop", "stop containers through their stop signal, SIGKILL after a timeout")
    p.add_argument("names", nargs="+", metavar="CONTAINER")
    p.add_argument(
        "-t", "--time", "--timeout", dest="timeout", type=float, default=10.0, metavar="S"
    )
    p.add_argument(
        "-s", "--signal", default=None, metavar="SIGNAL", help="instead of the stop signal"
    )
    p.set_defaults(handler=_stop)

    p = sub("start", "start stopped containers again (their changes kept)")
    p.add_argument("names", nargs="+", metavar="CONTAINER")
    p.set_defaults(handler=_start)

    p = sub("restart", "stop containers (if they run), then start them again")
    p.add_argument("names", nargs="+", metavar="CONTAINER")
    p.add_argument(
        "-t", "--time", "--timeout", dest="timeout", type=float, default=10.0, metavar="S"
    )
    p.set_defaults(handler=_restart)

    p = sub("kill", "send a signal to PID 1 of running containers (default: SIGKILL)")
    p.add_argument("names", nargs="+", metavar="CONTAINER")
    p.add_argument(
        "-s",
        "--signal",
        default="SIGKILL",
        metavar="SIGNAL",
        help="a name like SIGTERM or SIGRTMIN+3",
    )
    p.set_defaults(handler=_kill)

    p = sub("rm", "remove containers (their state and upper dir)")
    p.add_argument("names", nargs="+", metavar="CONTAINER")
    p.add_argument("-f", "--force", action="store_true", help="kill it first if it runs")
    p.set_defaults(handler=_rm)


def _register_listing(sub: _Sub) -> None:
    p = sub("ps", "list containers (running ones; --all for every one)", conflict_handler="resolve")
    p.add_argument("-a", "--all", action="store_true")
    p.add_argument(
        "-q", "--quiet", dest="ids", action="store_true", help="print container IDs only"
    )
    p.add_argument(
        "--format",
        default=None,
        metavar="FORMAT",
        help="json (a JSON object a line), or a template like '{{.ID}} {{.Names}}' "
        "(fields: ID, Names, Image, ImageID, Command, CreatedAt, RunningFor, Status, "
        "State, Ports, Pid, ExitCode, Runtime); 'table ...' aligns it under headers",
    )
    p.add_argument("--no-trunc", action="store_true", help="full IDs and commands")
    p.set_defaults(handler=_ps)

    p = sub("logs", "a container's journal (while it runs) or its console log")
    p.add_argument("name", metavar="CONTAINER")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("-n", "--lines", "--tail", dest="lines", type=int, default=None, metavar="N")
    p.add_argument(
        "--console",
        action="store_true",
        help="the console log (systemd's boot output) even while it runs",
    )
    p.set_defaults(handler=_logs)


def _register_files(sub: _Sub) -> None:
    p = sub(
        "cp",
        "copy files between a container and the host",
        "Copy files between a container (running or stopped) and the host: `cp "
        "CONTAINER:SRC DEST` or `cp SRC CONTAINER:DEST`, placed as `docker cp` places "
        "them. Container paths resolve inside the container: its symlinks never lead to "
        "host files; what comes out is never a device node nor setuid.",
    )
    p.add_argument("source", metavar="SRC")
    p.add_argument("dest", metavar="DEST")
    p.add_argument(
        "-a", "--archive", action="store_true", help="into a container: keep owners (default: root)"
    )
    p.add_argument(
        "-L", "--follow-link", action="store_true", help="follow a symlink SRC (else copied as one)"
    )
    p.set_defaults(handler=_cp)

    p = sub(
        "diff",
        "the files a container or an image changed",
        "The files a container changed in its image, or an image's top layer (or its "
        "layers above those it shares with --from) changed: A added, C changed, D deleted.",
    )
    p.add_argument("name", metavar="CONTAINER|IMAGE")
    p.add_argument(
        "--from",
        dest="base",
        default=None,
        metavar="IMAGE",
        help="an image: compare with this one, the layers they share left out",
    )
    p.set_defaults(handler=_diff)


def _options(args: argparse.Namespace, command: tuple[str, ...] = ()) -> rt.RunOptions:
    return rt.RunOptions(
        name=args.name,
        binds=tuple(bundle.parse_volume(v) for v in args.volume),
        network=args.network,
        runtime=args.runtime,
        env=tuple(args.env),
        command=command,
        ports=_published(args),
        stop_signal=_signal(args.stop_signal, "--stop-signal") if args.stop_signal else None,
    )


def _published(args: argparse.Namespace) -> tuple[Any, ...]:
    if not args.publish:
        return ()
    if args.network == "host":
        log.warn("-p is ignored with --network host: the container's ports are the host's")
        return ()
    from sysbake.runtime import ports

    return ports.parse_all(args.publish)


def _signal(value: str, option: str) -> int:
    """The signal `value` names (sysbake.signals); one clear line when it names none."""
    from sysbake import signals

    try:
        return signals.parse(value)
    except ValueError as exc:
        raise RuntimeFailure(f"{option} {value}: {exc}") from None


def _container(ctx: Context, name: str) -> rt.Container:
    return rt.load(ctx.store_path / "containers", name)


def _run(ctx: Context, args: argparse.Namespace) -> int:
    interactive = args.interactive or args.tty
    options = _options(args, () if interactive else tuple(args.pid1))
    if args.detach:
        options = options._replace(auto_remove=args.rm)
        container = rt.run_image(ctx.store(), args.image, options)
        print(container.name)
        return 0
    if args.tty:
        _need_terminal()
    container = rt.run_image(ctx.store(), args.image, options)
    if interactive:
        return _attach(container, args.pid1, args.timeout, args.interactive, args.tty)
    try:
        _foreground(container, args.stop_timeout)
        code = rt.exit_code(container)
    finally:
        rt.remove(container, force=True)
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
    return _attach(container, [], args.timeout, True, sys.stdin.isatty())


def _attach(
    container: rt.Container, command: list[str], timeout: float, stdin: bool, tty: bool
) -> int:
    """Wait for the container's systemd (if it boots one), run `command` (default: a
    login shell) in it on this terminal, then stop and remove the container; the
    command's exit code."""
    try:
        if bundle.is_init(container.args):
            state = inside.wait_for_boot(container, timeout)
            log.info(f"{container.name}: systemd is {state}")
        with rt.open_root(container) as root:
            home = "/root" if root.is_dir("/root") else None
            if not command:
                command = ["/bin/bash" if root.exists("/bin/bash") else "/bin/sh", "-l"]
            path = _env_value(inside.process_env(container), "PATH")
            inside.check_command(root, command[0], path, home or "/", container.name)
        argv = inside.exec_argv(container, command, tty=tty, cwd=home)
        return inside.run_attached(argv, stdin=stdin)
    finally:
        rt.stop(container, timeout=10.0)
        rt.remove(container, force=True)


def _need_terminal() -> None:
    # runc gives the command a terminal through ours: without one it could only fail.
    if not sys.stdin.isatty():
        raise RuntimeFailure("-t: the input is not a terminal (leave -t out, or use -i alone)")


def _env_value(env: list[str], key: str, default: str = "") -> str:
    """The last value of `key` in KEY=VALUE items."""
    found = default
    for item in env:
        name, sep, value = item.partition("=")
        if sep and name == key:
            found = value
    return found


def _exec(ctx: Context, args: argparse.Namespace) -> int:
    if not args.command:
        raise RuntimeFailure("exec: expected a command after the container name")
    if args.workdir and not args.workdir.startswith("/"):
        raise RuntimeFailure(f"exec -w {args.workdir}: expected an absolute path")
    container = _container(ctx, args.name)
    if not rt.status(container).running:
        raise RuntimeFailure(f"container {container.name} is not running")
    env = list(args.env)
    user = None
    with rt.open_root(container) as root:
        if args.user:
            user = inside.find_user(root, args.user, container.name)
            if not _env_value(env, "HOME"):
                env.append(f"HOME={user.home}")
        if args.workdir and not root.is_dir(args.workdir):
            raise inside.ExecRefused(
                f"exec -w {args.workdir}: no such directory in {container.name}", 126
            )
        path = _env_value(inside.process_env(container) + env, "PATH")
        inside.check_command(root, args.command[0], path, args.workdir or "/", container.name)
    tty = sys.stdin.isatty() if args.tty is None else args.tty
    if tty:
        _need_terminal()
    argv = inside.exec_argv(container, args.command, tty=tty, env=env, cwd=args.workdir, user=user)
    return inside.run_attached(argv)


def _stop(ctx: Context, args: argparse.Namespace) -> int:
    sig = _signal(args.signal, "--signal") if args.signal else None
    results = {}
    for name in args.names:
        container = _container(ctx, name)
        if sig is not None:
            container = container._replace(stop_signal=sig)
        result = rt.stop(container, timeout=args.timeout)
        results[name] = {"exit_code": result.exit_code, "killed": result.killed}
        if not ctx.json:
            how = "killed" if result.killed else f"exit code {result.exit_code}"
            if container.auto_remove:
                how += ", removed"
            print(f"{name}: stopped ({how})")
    if ctx.json:
        ctx.emit(results)
    return 0


def _start(ctx: Context, args: argparse.Namespace) -> int:
    for name in args.names:
        rt.start(_container(ctx, name))
        if not ctx.json:
            print(name)
    return 0


def _restart(ctx: Context, args: argparse.Namespace) -> int:
    for name in args.names:
        rt.restart(_container(ctx, name), timeout=args.timeout)
        if not ctx.json:
            print(name)
    return 0


def _kill(ctx: Context, args: argparse.Namespace) -> int:
    sig = _signal(args.signal, "--signal")
    for name in args.names:
        container = _container(ctx, name)
        if not rt.status(container).running:
            raise RuntimeFailure(f"container {container.name} is not running")
        rt.send_signal(container, sig)
        if not ctx.json:
            print(name)
    return 0


def _ps(ctx: Context, args: argparse.Namespace) -> int:
    """Containers (running ones, or all), then those whose owner died: removed just now
    (status "reaped (orphaned: owner pid N gone)"), or left with the reason."""
    import datetime

    from sysbake.commands import formats
    from sysbake.runtime import owners

    containers_dir = ctx.store_path / "containers"
    left = {o.name: o for o in ctx.reaped if o.error}
    now = time.time()
    rows: list[dict[str, Any]] = []
    listed: list[dict[str, Any]] = []  # docker's fields, for -q, --format and the table
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
        shown = formats.container_status(
            status.state, status.exit_code, _since(container, status), now
        )
        if orphan is not None:
            shown = f"{shown} ({orphan.describe()})"
        listed.append(_docker_row(container, status, shown, created, now))
    reaped = [o for o in ctx.reaped if not o.error]
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
        for o in reaped
    ]
    listed += [_reaped_row(o.name, o.image, f"reaped ({o.describe()})") for o in reaped]
    if ctx.json:
        ctx.emit(rows)
    elif args.ids:
        print("\n".join(r["ID"] if args.no_trunc else r["ID"][:12] for r in listed if r["ID"]))
    elif args.format:
        for line in formats.write_rows(args.format, listed, _HEADERS):
            print(line)
    else:
        _ps_table(formats, listed, args.no_trunc)
    return 0


_HEADERS = {
    "ID": "CONTAINER ID",
    "Names": "NAMES",
    "RunningFor": "CREATED",
    "CreatedAt": "CREATED AT",
}


def _since(container: rt.Container, status: rt.Status) -> float | None:
    """When the container started (running) or ended (exited)."""
    if status.state == "exited":
        record = cd.read_exit(container.dir)
        return record.finished if record and record.finished else None
    return container.started or container.created


def _docker_row(
    container: rt.Container, status: rt.Status, shown: str, created: Any, now: float
) -> dict[str, Any]:
    """A container as `docker ps --format` names its fields."""
    from sysbake.commands import formats

    return {
        "ID": container.id,
        "Names": container.name,
        "Image": container.image,
        "ImageID": container.image_id,
        "Command": " ".join(container.args),
        "CreatedAt": created.strftime("%Y-%m-%d %H:%M:%S +0000 UTC"),
        "RunningFor": formats.human_duration(now - container.created) + " ago",
        "Status": shown,
        "State": status.state,
        "Ports": ", ".join(rt.describe_port(p) for p in container.ports),
        "Pid": status.pid or 0,
        "ExitCode": status.exit_code,
        "Runtime": container.runtime,
    }


def _reaped_row(name: str, image: str, shown: str) -> dict[str, Any]:
    return {
        "ID": "",
        "Names": name,
        "Image": image,
        "ImageID": "",
        "Command": "",
        "CreatedAt": "",
        "RunningFor": "",
        "Status": shown,
        "State": "removed",
        "Ports": "",
        "Pid": 0,
        "ExitCode": None,
        "Runtime": "",
    }


def _ps_table(formats: Any, listed: list[dict[str, Any]], full: bool) -> None:
    lines = ["CONTAINER ID\tIMAGE\tCOMMAND\tCREATED\tSTATUS\tPORTS\tNAMES"]
    for r in listed:
        command = r["Command"]
        if not full and len(command) > 20:
            command = command[:19] + "…"
        cells = [
            (r["ID"] if full else r["ID"][:12]) or "-",
            r["Image"],
            f'"{command}"' if command else "",
            r["RunningFor"],
            r["Status"],
            r["Ports"],
            r["Names"],
        ]
        lines.append("\t".join(cells))
    for line in formats.aligned(lines):
        print(line)


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


def _cp_operand(text: str) -> tuple[str | None, str]:
    """(container, path) of a `cp` operand: CONTAINER:PATH, or a host path (one that
    starts with / or ., or has no colon)."""
    name, sep, path = text.partition(":")
    if not sep or text.startswith(("/", ".")) or not name:
        return None, text
    return name, path or "/"


def _cp(ctx: Context, args: argparse.Namespace) -> int:
    from sysbake.runtime import files

    (src_name, src), (dest_name, dest) = _cp_operand(args.source), _cp_operand(args.dest)
    if (src_name is None) == (dest_name is None):
        raise RuntimeFailure(
            "cp: expected one CONTAINER:PATH and one host path (`sysbake cp CONTAINER:SRC "
            "DEST` or `sysbake cp SRC CONTAINER:DEST`)"
        )
    container = _container(ctx, src_name or dest_name or "")
    with rt.files_of(container) as root:
        if dest_name is not None:
            written = files.copy_in(
                root, Path(src), dest, follow=args.follow_link, keep_owner=args.archive
            )
            log.info(f"copied {src} to {container.name}:{written}")
        else:
            out = files.copy_out(root, src, Path(dest), follow=args.follow_link)
            log.info(f"copied {container.name}:{src} to {out}")
    return 0


def _diff(ctx: Context, args: argparse.Namespace) -> int:
    """`docker diff` of a container (its upper dir over its image), or of an image: its
    top layer, or its layers above those it shares with --from."""
    from sysbake.runtime import files

    try:
        container = None if args.base else _container(ctx, args.name)
    except rt.ContainerNotFound:
        container = None
    if container is not None:
        found = files.changes(container.dir / cd.UPPER, [Path(d) for d in container.lowerdirs])
    else:
        found = _image_changes(ctx, args.name, args.base)
    if ctx.json:
        ctx.emit([{"kind": c.kind, "path": c.path} for c in found])
    else:
        for change in found:
            print(change)
    return 0


def _image_changes(ctx: Context, ref: str, base: str | None) -> list[Any]:
    from sysbake.runtime import files

    store = ctx.store()
    layers = list(store.resolve(ref).layers)
    if base is None:
        shared = len(layers) - 1
    else:
        others = store.resolve(base).layers
        shared = 0
        while shared < min(len(layers), len(others)) and layers[shared] == others[shared]:
            shared += 1
    if shared >= len(layers):
        return []
    trees = [store.layer_tree(layer) for layer in layers]
    found: dict[str, Any] = {}
    # Layer by layer, upward: a later layer's word on a path is the last, but what was
    # added above the base stays an addition when changed, and is nothing once deleted.
    for n in range(shared, len(trees)):
        for change in files.changes(trees[n], trees[:n]):
            before = found.get(change.path)
            if before is not None and before.kind == "A":
                if change.kind == "D":
                    del found[change.path]
                continue
            found[change.path] = change
    return sorted(found.values(), key=lambda c: c.path)


def inspect_container(container: rt.Container) -> dict[str, Any]:
    """A container as `docker inspect` shows one (the fields sysbake knows)."""
    import datetime

    from sysbake import signals

    def stamp(seconds: float | None) -> str:
        if not seconds:
            return "0001-01-01T00:00:00Z"
        moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
        return moment.isoformat().replace("+00:00", "Z")

    status = rt.status(container)
    record = cd.read_exit(container.dir)
    env = inside.process_env(container)
    return {
        "Id": container.id,
        "Name": container.name,
        "Created": stamp(container.created),
        "Path": container.args[0] if container.args else "",
        "Args": list(container.args[1:]),
        "State": {
            "Status": status.state,
            "Running": status.running,
            "Pid": status.pid or 0,
            "ExitCode": status.exit_code,
            "Signal": signals.name(record.signal) if record and record.signal else None,
            "StartedAt": stamp(container.started or container.created),
            "FinishedAt": stamp(record.finished if record else None),
        },
        "Image": container.image_id,
        "ImageName": container.image,
        "Config": {
            "Hostname": bundle.hostname_for(container.name),
            "Cmd": list(container.args),
            "Env": env,
            "StopSignal": signals.name(container.stop_signal),
        },
        "HostConfig": {
            "NetworkMode": container.network,
            "AutoRemove": container.auto_remove,
            "Runtime": container.runtime,
            "PortBindings": _port_bindings(container.ports),
        },
        "NetworkSettings": {"Ports": _port_bindings(container.ports)},
        "GraphDriver": {
            "Name": "overlay",
            "Data": {
                "LowerDir": ":".join(reversed(container.lowerdirs)),
                "UpperDir": str(container.dir / cd.UPPER),
                "MergedDir": str(container.rootfs),
            },
        },
        "LogPath": str(container.console),
    }


def _port_bindings(published: tuple[str, ...]) -> dict[str, list[dict[str, str]]]:
    """docker's {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}]}."""
    bindings: dict[str, list[dict[str, str]]] = {}
    for text in published:
        host, _, inside_port = text.rpartition(":")
        address, _, port = host.rpartition(":")
        bindings.setdefault(inside_port, []).append(
            {"HostIp": address.strip("[]"), "HostPort": port}
        )
    return bindings


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
