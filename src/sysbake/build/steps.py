"""Provision stages: run one step in the parent image and commit what it changed.

`provision_stage` returns the stage of one step (sysbake.build.context.Stage); the
pipeline runs it. A step runs either in a container of the parent image booted with
systemd as PID 1 (`boot`, the default: services, daemon-reload and service.running
behave as on a host) or in a chroot of an overlay mount with service starts suppressed
(`chroot`). Either way the image's layer trees are overlay lowerdirs that are never
written; the step's overlay upper dir is cleaned on the merged view and committed as the
step's layer (deletions become whiteouts). Inputs (state trees, pillar, scripts) are
bind-mounted read-only under /run/sysbake, a tmpfs: they never land in a layer.
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import re
import select
import shlex
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sysbake import log, proc
from sysbake.build import finalize
from sysbake.build.cache import hash_tree
from sysbake.build.context import BuildContext, Inputs, Stage
from sysbake.errors import BuildError, CommandError, SysbakeError
from sysbake.fsutil import raise_if_no_space
from sysbake.oci import model as oci
from sysbake.oci.model import Layer
from sysbake.oci.store import Store
from sysbake.project.specs import (
    DEFAULT_STOP_SIGNAL,
    FilesStep,
    ImageSpec,
    ProjectStep,
    SaltStep,
    ScriptStep,
    Step,
)
from sysbake.records import field, record, replace
from sysbake.runtime import owners

if TYPE_CHECKING:
    from sysbake.build.salt.toolchain import Toolchain
    from sysbake.rootfs import Root
    from sysbake.runtime.containers import Container

RUN_DIR = "/run/sysbake"
CONF_DIR = f"{RUN_DIR}/conf"
BOOT_TIMEOUT = 180.0
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_POLICY_RC = "#!/bin/sh\n# sysbake chroot step: no service starts\nexit 101\n"

# How a step's output is judged: exit code, stdout, stderr -> raises BuildError if bad.
Judge = Callable[[int, bytes, bytes], None]


@record
class StepPlan:
    """What a step runs: its command and environment, read-only mounts, generated files
    (container path under CONF_DIR -> bytes), and how to judge its output."""

    command: tuple[str, ...]
    env: dict[str, str]
    mounts: tuple[tuple[Path, str], ...] = ()
    files: dict[str, bytes] = field(default_factory=dict)
    judge: Judge | None = None
    keep_salt: Toolchain | None = None  # a Salt toolchain to install into the image
    waits_for_boot: bool = False  # the command itself waits for systemd (salt_toolchain)


def provision_stage(
    ctx: BuildContext, spec: ImageSpec, step: Step, layers: Sequence[Layer], *, epoch: int
) -> Stage:
    """The stage of provision step `step` of image `spec`, on top of `layers` (the image
    so far, bottom to top); the layer's mtimes are clamped to the image's `epoch`, which
    the step sees as SOURCE_DATE_EPOCH."""
    where = f"{spec.name}: {step.name}"
    plan_inputs, make_plan = _prepare(step, ctx.store, where)
    inputs: Inputs = {
        "stage": "provision",
        "parent": oci.chain_id([layer.diff_id for layer in layers]),
        "step": step.key_inputs(),
        # Keyed by path so that --explain names the tree that changed.
        "trees": {os.path.relpath(p, ctx.project.root): hash_tree(p) for p in step.input_paths()},
        "plan": plan_inputs,
        "cleanup": spec.finalize.key_inputs(),
        "compression": ctx.options.compression,
        "epoch": epoch,
    }

    def produce() -> Layer:
        plan = make_plan()
        plan = replace(plan, env={**plan.env, "SOURCE_DATE_EPOCH": str(epoch)})
        return _provision(ctx, spec, step, tuple(layers), plan, where, epoch)

    created_by = f"sysbake {step.type} {step.name} ({step.mode})"
    return Stage(step.name, inputs, created_by, produce, epoch=lambda: epoch)


def _provision(
    ctx: BuildContext,
    spec: ImageSpec,
    step: Step,
    layers: tuple[Layer, ...],
    plan: StepPlan,
    where: str,
    epoch: int,
) -> Layer:
    """Run the step on the layers' trees, clean what it changed and commit it, mtimes
    clamped to `epoch`, as a layer whose tree (the upper dir, in overlay form) the store
    keeps."""
    # Only a cache miss makes a layer: a no-op build never loads these (start-up cost).
    from sysbake.oci.layers.commit import commit_tree
    from sysbake.rootfs import Root

    store, cleanup = ctx.store, spec.finalize
    lowerdirs = [store.layer_tree(layer) for layer in layers]
    with store.staging(f"step-{spec.name}") as staging:
        upper, work = staging / "upper", staging / "work"
        if isinstance(step, FilesStep):
            upper.mkdir()
            work.mkdir()
            with _mounted(lowerdirs, upper, work, staging / "root") as top, Root(top) as root:
                _copy_files(step, root, where, epoch)
        elif step.mode == "chroot":
            _run_chroot(plan, lowerdirs, staging, step.network, where)
        else:
            _run_booted(
                plan,
                store,
                lowerdirs,
                _step_config(spec),
                staging,
                step.network,
                where,
                keep_failed=ctx.options.keep_failed,
            )
        with _mounted(lowerdirs, upper, work, staging / "root") as top, Root(top) as root:
            finalize.clean_tree(root, cleanup, epoch=epoch)
            if plan.keep_salt is not None:
                from sysbake.build.salt import run as salt

                salt.install_salt(plan.keep_salt, root)
                finalize.drop_bytecode(root, salt.KEEP_DIR)
        # Unmounted: copy-ups equal to what the parent has (Salt's included) go.
        with _parent_view(lowerdirs, staging) as view:
            prune_copy_ups(upper, lowerdirs, view=view)
        with log.step(f"{where}: committing the layer"):
            layer = commit_tree(
                store, upper, compression=ctx.options.compression, mtime=epoch, overlay_upper=True
            )
        # The upper dir is this layer in overlay form (whiteouts as 0/0 devices, opaque
        # xattrs): keep it as the layer's tree so containers need not unpack the blob.
        store.adopt_tree(layer.diff_id, upper)
        return layer


def _step_config(spec: ImageSpec) -> dict[str, object]:
    # The container of a step runs the parent's command (systemd) with its stop signal.
    return {
        "config": {
            "Cmd": ["/lib/systemd/systemd"],
            "StopSignal": DEFAULT_STOP_SIGNAL,
            "Env": [f"PATH={_PATH}", f"container={spec.config.container}"],
        }
    }


def run_unjudged(
    store: Store, spec: ImageSpec, step: Step, layers: Sequence[Layer], where: str
) -> tuple[int, bytes, bytes]:
    """Run step `step` of image `spec` again in a booted container of `layers`, thrown
    away afterwards (sysbake test's idempotence check): its exit code, stdout, stderr."""
    lowerdirs = [store.layer_tree(layer) for layer in layers]
    plan = _prepare(step, store, where)[1]()
    with (
        store.staging("idempotence") as staging,
        _booted(plan, store, lowerdirs, _step_config(spec), staging, step.network, where) as booted,
    ):
        return _step_result(booted, where)


# -- what each kind of step runs ---------------------------------------------------------


def _prepare(step: Step, store: Store, where: str) -> tuple[Inputs, Callable[[], StepPlan]]:
    """The step's extra key inputs, and a function making its plan (called on a miss)."""
    if isinstance(step, FilesStep):
        return {}, lambda: StepPlan((), {})
    if isinstance(step, ScriptStep):
        body = step.body()  # never through a link to a host file (specs.read_input)
        env = {"PATH": _PATH, "HOME": "/root", "LANG": "C.UTF-8", **dict(step.env)}

        def script_plan() -> StepPlan:
            return StepPlan(
                ("/bin/sh", "-e", f"{CONF_DIR}/script"),
                env,
                files={f"{CONF_DIR}/script": body},
                judge=lambda rc, out, err: _judge_script(rc, out, err, where),
            )

        return {}, script_plan
    return _prepare_salt(step, store, where)


def _prepare_salt(
    step: SaltStep | ProjectStep, store: Store, where: str
) -> tuple[Inputs, Callable[[], StepPlan]]:
    from sysbake.build.salt import toolchain as salt_toolchain

    def salt_plan() -> StepPlan:
        from sysbake.build.salt import run as salt  # only on a miss (start-up cost)

        # Built (once per Salt version) only when the step really runs: a cache hit needs
        # only the toolchain's key, which is known without building it.
        try:
            toolchain = salt.ensure_toolchain(store, step.salt_version)
        except BuildError as exc:
            raise BuildError(f"{where}: {exc}") from exc
        # Booted, salt-call's own start-up (~0.4 s of imports) overlaps systemd's boot;
        # it waits for the boot to end before it applies anything.
        wait = BOOT_TIMEOUT if step.mode == "boot" else None
        if isinstance(step, SaltStep):
            run = salt.SaltRun(
                toolchain,
                state_trees=tuple(step.state_tree),
                pillar=tuple(step.pillar),
                sls=tuple(step.sls),
                grains_json=step.grains_json,
                boot_timeout=wait,
            )
        else:
            run = salt.SaltRun(
                toolchain,
                state_trees=(step.state_tree,),
                pillar=tuple(step.pillar),
                project_pillar=step.project_pillar,
                grains_json=_project_grains(step),
                boot_timeout=wait,
            )
        return StepPlan(
            tuple(run.command()),
            {**run.env(), **dict(step.env)},
            mounts=tuple((host, dest) for host, dest, _ro in run.mounts()),
            files=run.config_files(),
            judge=lambda rc, out, err: _judge_salt(rc, out, err, where),
            keep_salt=toolchain if step.keep_salt else None,
            waits_for_boot=wait is not None,
        )

    # Trees, pillars, SLS list and grains are in the step's own inputs already.
    key: Inputs = {
        "schema": salt_toolchain.RUN_SCHEMA,
        "salt_version": step.salt_version or salt_toolchain.DEFAULT_SALT_VERSION,
        "toolchain": salt_toolchain.toolchain_key(step.salt_version),
    }
    return key, salt_plan


def _project_grains(step: ProjectStep) -> str:
    import json

    grains = dict(step.grains)
    grains.setdefault("sysbake_project", step.project)
    return json.dumps(grains, sort_keys=True, separators=(",", ":"))


def _judge_script(rc: int, out: bytes, err: bytes, where: str) -> None:
    if rc != 0:
        raise_if_no_space(out + err, where)
        for line in proc.tail(out + err, 20, sep="\n", empty="").splitlines():
            log.info(f"    {line}")
        raise BuildError(f"{where}: script exited {rc}: {proc.tail(out + err, 5)}")


def _judge_salt(rc: int, out: bytes, err: bytes, where: str) -> None:
    from sysbake.build.salt import run as salt

    result = salt.parse_result(out, rc, err)
    if result.ok:
        log.info(f"    {result.summary}")
        return
    for line in result.report().splitlines():
        log.info(f"    {line}")
    raise_if_no_space(err + b"\n" + out, where)
    raise BuildError(f"{where}: salt: {result.error_line()}")


def _copy_files(step: FilesStep, root: Root, where: str, epoch: int) -> None:
    """The `files` step: `source` copied to `dest` inside the image (symlinks in it copied
    as symlinks), then given the step's owner, group and file mode, and `epoch` as mtime
    (the key hashes no mtime: a fresh checkout must give the same layer)."""
    dest = step.dest
    if not step.source.is_dir() and (dest.endswith("/") or root.is_dir(dest)):
        dest = f"{dest.rstrip('/')}/{step.source.name}"
    try:
        targets = root.copy_in(step.source, dest)
        # Names resolve against the image's own passwd/group, never the host's.
        uid = _image_id(root, "etc/passwd", step.owner, f"{where}: owner")
        gid = _image_id(root, "etc/group", step.group, f"{where}: group")
        for path in targets:
            root.chown(path, uid, gid)
            st = root.lstat(path)
            if step.file_mode is not None and st is not None and stat.S_ISREG(st.st_mode):
                root.chmod(path, step.file_mode)
            root.utime(path, (epoch * 1_000_000_000, epoch * 1_000_000_000))
    except OSError as exc:
        raise BuildError(
            f"{where}: copying {step.source} to {step.dest}: {exc.strerror or exc}"
        ) from exc
    except SysbakeError as exc:
        raise BuildError(f"{where}: {exc}") from exc


def _image_id(root: Root, table: str, name: str, what: str) -> int:
    if name.isdigit():
        return int(name)
    text = root.read_bytes(table).decode(errors="replace") if root.is_file(table) else ""
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) > 2 and fields[0] == name:
            return int(fields[2])
    raise BuildError(f"{what} {name!r}: not in the image's /{table}")


def prune_copy_ups(upper: Path, lowerdirs: list[Path], *, view: Path | None = None) -> None:
    """Drop what overlayfs copied up without a change (a file opened for writing, a parent
    dir of a file created and removed again): files identical to those they shadow, then
    directories left empty whose mode and owner match the lower ones. The layer then holds
    only real changes. `view`, an overlay of `lowerdirs` alone, is where the kernel looks
    up what a path shadows (the cost then follows what changed, not the image's depth)."""
    shadows = _Shadows(upper, lowerdirs, view)
    for dirpath, _dirs, files in os.walk(upper, topdown=False):
        here = Path(dirpath)
        for name in files:
            path = here / name
            lower = shadows.below(path.relative_to(upper))
            if lower is not None and _same_file(path, lower):
                path.unlink()
        if here != upper:
            _prune_dir(here, shadows.below(here.relative_to(upper)))


class _Shadows:
    """What the paths of an overlay's upper dir shadow in its lower dirs (given bottom
    first), as overlayfs resolves them."""

    def __init__(self, upper: Path, lowerdirs: list[Path], view: Path | None = None) -> None:
        from sysbake.oci.layers.tar import is_opaque, read_xattrs

        self.tops = list(reversed(lowerdirs))
        self.view = view
        # The upper's opaque dirs (a dir removed and made again), read before the pruning
        # drops the marks that hide nothing: through them no lower file shows.
        self.opaque = {
            Path(d).relative_to(upper) for d, _, _ in os.walk(upper) if is_opaque(read_xattrs(d))
        }

    def below(self, rel: Path) -> Path | None:
        """What `rel` shadows in the lower layers: None when there is nothing, or a
        whiteout, a non-directory or an opaque dir hides it."""
        if self.opaque.intersection(rel.parents):
            return None
        if self.view is not None:  # the lower layers merged: whiteouts show nothing
            return self.view / rel if os.path.lexists(self.view / rel) else None
        ancestors = list(reversed(rel.parents))[1:]  # "a", "a/b" for "a/b/c"
        for lower in self.tops:
            found, final = _look_in(lower, rel, ancestors)
            if final:
                return found
        return None


def _look_in(lower: Path, rel: Path, ancestors: list[Path]) -> tuple[Path | None, bool]:
    """`rel` in the one lower layer `lower`: (its path there, or None when this layer does
    not show one; whether the search ends here, this layer hiding the ones below)."""
    from sysbake.oci.layers.tar import is_opaque, read_xattrs

    opaque = False  # an opaque ancestor here: the layers below are hidden
    for ancestor in ancestors:
        path = lower / ancestor
        if not os.path.lexists(path):
            return None, opaque  # not in this layer: look in the next one
        if not stat.S_ISDIR(path.lstat().st_mode):
            return None, True  # a whiteout, file or symlink hides the layers below
        opaque = opaque or is_opaque(read_xattrs(os.fspath(path)))
    path = lower / rel
    if not os.path.lexists(path):
        return None, opaque
    st = path.lstat()
    whiteout = stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    return (None if whiteout else path), True


def _prune_dir(here: Path, lower: Path | None) -> None:
    """Drop the upper dir `here` if it is empty, carries no xattrs of its own and matches
    the lower dir `lower` it shadows in mode and owner; with nothing below, drop its
    opaque marks instead."""
    if lower is None:
        # overlayfs marks some new dirs opaque; with nothing below, it means nothing.
        for attr in ("trusted.overlay.opaque", "user.overlay.opaque"):
            with contextlib.suppress(OSError):
                os.removexattr(here, attr)
        return
    if (
        not any(here.iterdir())
        and lower.is_dir()
        and not lower.is_symlink()
        and _same_meta(here.lstat(), lower.lstat())
        and not _xattrs(here)
    ):
        here.rmdir()


def _xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {
        n: os.getxattr(path, n, follow_symlinks=False)
        for n in names
        if not n.startswith(("trusted.overlay.", "user.overlay."))  # user.: rootless
    }


def _same_meta(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_mode, a.st_uid, a.st_gid) == (b.st_mode, b.st_uid, b.st_gid)


def _same_file(a: Path, b: Path) -> bool:
    sa, sb = a.lstat(), b.lstat()
    if not (stat.S_ISREG(sa.st_mode) and stat.S_ISREG(sb.st_mode)) or sa.st_nlink > 1:
        return False
    if not _same_meta(sa, sb) or sa.st_size != sb.st_size or _xattrs(a) != _xattrs(b):
        return False
    return filecmp.cmp(a, b, shallow=False)


# -- where steps run ---------------------------------------------------------------------


@contextlib.contextmanager
def _mounted(lowerdirs: list[Path], upper: Path, work: Path, target: Path) -> Iterator[Path]:
    from sysbake.runtime import overlay

    target.mkdir(exist_ok=True)
    overlay.mount_overlay(lowerdirs, upper, work, target)
    try:
        yield target
    finally:
        overlay.umount(target)


@contextlib.contextmanager
def _parent_view(lowerdirs: list[Path], staging: Path) -> Iterator[Path]:
    """The parent image's layers merged, to read (runtime.overlay.view; its upper dir
    stays empty)."""
    from sysbake.runtime import overlay

    upper, work, target = (staging / n for n in ("view-upper", "view-work", "view"))
    for d in (upper, work, target):
        d.mkdir()
    with overlay.view(lowerdirs, upper, work, target) as view:
        yield view


def _write_files(files: dict[str, bytes], conf: Path) -> None:
    for path, data in files.items():
        if not path.startswith(CONF_DIR + "/"):
            raise BuildError(f"internal: generated file {path} outside {CONF_DIR}")
        host = conf / path.removeprefix(CONF_DIR + "/")
        host.parent.mkdir(parents=True, exist_ok=True)
        host.write_bytes(data)


# A booted step starts beside systemd, not through `runc exec` (~35 ms to start and to
# end): PID 1 starts as a shell that runs the step in the background, its output to files
# of the conf dir and its exit code into a FIFO there (which the build process waits on),
# then becomes the image's init (exec keeps PID 1). The step is systemd's descendant.
_STEP_OUT, _STEP_ERR, _STEP_DONE = "step.out", "step.err", "step.done"
_STEP_STARTED = "step.started"  # a FIFO: PID 1 execs its init once the step is set up
# For a command that does not wait for the boot itself (Salt's does): the same wait, the
# same BOOT_FAILED exit with "sysbake: boot: STATE" on stderr when it ends badly.
_WAIT_FOR_BOOT = """\
deadline=$(($(date +%s) + {timeout}))
while :; do
  state=$(timeout {timeout} systemctl is-system-running --wait 2>/dev/null)
  case "$state" in running|degraded) break ;; ""|offline|initializing|starting) ;;
    *) echo "sysbake: boot: $state" >&2; exit {failed} ;; esac
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "sysbake: boot: ${{state:-offline}}" >&2; exit {failed}
  fi
  sleep 0.02
done"""


def _wrapper(plan: StepPlan) -> tuple[str, ...]:
    """The program PID 1 starts as: the step in the background, then `exec` of the init.
    systemd, taking over the console, at once hangs up the session it started in: the
    step gets a session of its own (setsid) and PID 1 execs systemd only once the step
    runs in it (a rendezvous on the step.started FIFO); the subshell that reports the
    step's exit code traps the hang-up."""
    from sysbake.build.salt.toolchain import BOOT_FAILED

    step = "exec " + shlex.join(
        ["/usr/bin/env", "-i", *[f"{k}={v}" for k, v in plan.env.items()], *plan.command]
    )
    if not plan.waits_for_boot:
        wait = _WAIT_FOR_BOOT.format(timeout=int(BOOT_TIMEOUT), failed=BOOT_FAILED)
        step = f"{wait}\n{step}"
    step = f": >{CONF_DIR}/{_STEP_STARTED}\n{step}"
    script = (
        f"(trap : HUP; setsid /bin/sh -c {shlex.quote(step)} </dev/null "
        f">{CONF_DIR}/{_STEP_OUT} 2>{CONF_DIR}/{_STEP_ERR}; "
        f"echo $? >{CONF_DIR}/{_STEP_DONE}) </dev/null >/dev/null 2>&1 & "
        f': <{CONF_DIR}/{_STEP_STARTED}; exec "$@"'
    )
    return ("/bin/sh", "-c", script, "sysbake-step")


@record
class _Booted:
    """A booted build container, its conf dir (on the host) and the read end of its
    step's FIFO there."""

    container: Container
    conf: Path
    done: int


@contextlib.contextmanager
def _booted(
    plan: StepPlan,
    store: Store,
    lowerdirs: list[Path],
    config: dict[str, object],
    staging: Path,
    network: bool,
    where: str,
    *,
    keep_failed: bool = False,
) -> Iterator[_Booted]:
    """A container of the image booting with systemd, the plan's files and mounts in
    place and its step started (see _wrapper). Stopped and removed afterwards, unless
    `keep_failed` and the body failed with a BuildError (--keep-failed); if sysbake is
    killed, the next command removes it (its owner lock: sysbake.runtime.owners)."""
    from sysbake.runtime import containers as runtime
    from sysbake.runtime.bundle import BindMount

    conf = staging / "conf"
    conf.mkdir()
    _write_files(plan.files, conf)
    for fifo in (_STEP_STARTED, _STEP_DONE):
        os.mkfifo(conf / fifo, 0o600)
    binds = [BindMount(str(conf), CONF_DIR, readonly=False)]
    binds += [BindMount(str(host), dest, readonly=True) for host, dest in plan.mounts]
    name = f"build-{os.urandom(5).hex()}"
    # Open before the step can write: its `echo` waits for a reader, never the other way.
    done = os.open(conf / _STEP_DONE, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with owners.owned(store.containers_dir, name):
        container = None
        keep = False
        try:
            with log.step(f"{where}: booting the image"):
                container = runtime.create(
                    store.containers_dir,
                    lowerdirs,
                    config,
                    image=where,
                    options=runtime.RunOptions(
                        name=name,
                        binds=tuple(binds),
                        network="host" if network else "none",
                        wrapper=_wrapper(plan),
                    ),
                    require_init=True,
                    ready=None,
                )
            try:
                yield _Booted(container, conf, done)
            except BuildError:
                keep = keep_failed
                raise
        finally:
            os.close(done)
            if container is not None and keep:
                log.info(
                    f"kept the failed container {name}: `sysbake exec {name} bash`, "
                    f"then `sysbake rm -f {name}`"
                )
            elif container is not None:
                runtime.remove(container, force=True)


def _check_boot(state: str, where: str) -> None:
    if state not in ("running", "degraded"):
        raise BuildError(f"{where}: the image did not boot (systemd state {state!r})")


def _step_result(booted: _Booted, where: str) -> tuple[int, bytes, bytes]:
    """The step's exit code, stdout and stderr, once it has ended (meanwhile, every
    0.5 s, a check that systemd still runs)."""
    from sysbake.build.salt.toolchain import BOOT_FAILED
    from sysbake.runtime import containers as runtime
    from sysbake.runtime.container_dir import console_tail

    waiter = select.poll()
    waiter.register(booted.done, select.POLLIN)
    said = b""
    while True:
        if waiter.poll(500):
            chunk = os.read(booted.done, 64)
            if not chunk:  # the step's `echo` has closed the FIFO: the code is complete
                break
            said += chunk
        elif runtime.ended(booted.container):
            raise BuildError(
                f"{where}: the image's systemd ended during the step: "
                f"{console_tail(booted.container.dir)}"
            )
    try:
        code = int(said)
    except ValueError:
        raise BuildError(f"{where}: the step reported no exit code ({said!r})") from None
    out, err = ((booted.conf / name).read_bytes() for name in (_STEP_OUT, _STEP_ERR))
    if code == BOOT_FAILED:
        state = re.search(rb"sysbake: boot: (\S+)", err)
        if state:
            _check_boot(state.group(1).decode(errors="replace"), where)
    return code, out, err


def _run_booted(
    plan: StepPlan,
    store: Store,
    lowerdirs: list[Path],
    config: dict[str, object],
    staging: Path,
    network: bool,
    where: str,
    *,
    keep_failed: bool,
) -> None:
    """Run the step in a booted container of the parent; once systemd has shut down
    cleanly, the container's upper dir becomes staging/upper (beside a fresh
    staging/work); the container is kept if the step fails and `keep_failed`."""
    from sysbake.runtime import containers as runtime

    with _booted(
        plan, store, lowerdirs, config, staging, network, where, keep_failed=keep_failed
    ) as booted:
        from sysbake import progress
        from sysbake.build.salt.run import SALT_LOG

        followed = [booted.conf / n for n in (_STEP_OUT, _STEP_ERR, Path(SALT_LOG).name)]
        with (
            log.step(f"{where}: running in the booted container"),
            progress.StepWatch(where).follow(followed),
        ):
            rc, out, err = _step_result(booted, where)
            if plan.judge is not None:
                plan.judge(rc, out, err)
        # The runtime's delete goes on meanwhile; `_booted` removes the container after it.
        if runtime.halt(booted.container, timeout=60).killed:
            log.warn(f"{where}: the build container had to be killed to stop")
        runtime.detach_upper(booted.container, staging / "upper")
        (staging / "work").mkdir()


def _run_chroot(
    plan: StepPlan, lowerdirs: list[Path], staging: Path, network: bool, where: str
) -> None:
    """Run the step with chroot in a private mount namespace (its mounts die with it),
    services suppressed by policy-rc.d; the upper dir stays in staging. The overlay is
    mounted in the child's own mount namespace before it execs (runtime.overlay: any
    number of layers), so it goes with the step's processes, however they end."""
    from sysbake.runtime import overlay

    upper, work, root, conf = (staging / n for n in ("upper", "work", "root", "conf"))
    for d in (upper, work, root, conf):
        d.mkdir()
    _write_files(plan.files, conf)
    binds = [(str(conf), CONF_DIR, False)] + [(str(h), d, True) for h, d in plan.mounts]
    lines = [
        "set -e",
        f"r={shlex.quote(str(root))}",
        # Mounts go on the image's own top-level dirs only: a symlink there (say /proc
        # -> /etc) would be followed on the host. Everything else is written under the
        # fresh tmpfs on /run, or by the image's own shell inside the chroot.
        'for d in proc sys dev run etc; do if [ -L "$r/$d" ] || ! mkdir -p "$r/$d"; then '
        'echo "sysbake: the image\'s /$d is not a directory" >&2; exit 125; fi; done',
        'mount -t proc proc "$r/proc"',
        'mount --rbind /sys "$r/sys"',
        'mount -t tmpfs -o mode=755 tmpfs "$r/dev"',
        'for d in null zero full random urandom tty; do touch "$r/dev/$d"; '
        'mount --bind "/dev/$d" "$r/dev/$d"; done',
        'mkdir -p "$r/dev/pts" "$r/dev/shm"',
        'mount -t tmpfs -o mode=755 tmpfs "$r/run"',
        'mkdir -p "$r/run/lock"',
    ]
    if network:
        lines.append(
            '[ -f "$r/etc/resolv.conf" ] && [ ! -L "$r/etc/resolv.conf" ] && '
            'mount --bind /etc/resolv.conf "$r/etc/resolv.conf" || true'
        )
    for host, dest, ro in binds:
        if not dest.startswith(RUN_DIR + "/"):
            raise BuildError(f"internal: step mount {dest} outside {RUN_DIR}")
        target = f'"$r"{shlex.quote(dest)}'
        if Path(host).is_dir():
            lines.append(f"mkdir -p {target}")
        else:
            lines.append(f"mkdir -p $(dirname {target}) && touch {target}")
        lines.append(f"mount --bind {shlex.quote(host)} {target}")
        if ro:
            lines.append(f"mount -o remount,bind,ro {target}")
    # policy-rc.d only ever exists in the upper dir: created now, removed after the step,
    # both by the image's shell inside the chroot (its /usr/sbin resolves there).
    policy = shlex.quote(_POLICY_RC)
    lines += [
        "made_policy=0",
        f'chroot "$r" /bin/sh -c \'[ -e /usr/sbin/policy-rc.d ] && exit 1; '
        f'printf %s "$1" >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d || exit 2\' '
        f"sh {policy} || made_policy=$?",
        '[ $made_policy -le 1 ] || { echo "sysbake: cannot write /usr/sbin/policy-rc.d in '
        'the image" >&2; exit 125; }',
        "set +e",
        'chroot "$r" /usr/bin/env -i "$@"',
        "rc=$?",
        '[ $made_policy = 1 ] || chroot "$r" /bin/rm -f /usr/sbin/policy-rc.d',
        "exit $rc",
    ]
    env = [f"{k}={v}" for k, v in {**plan.env, "SYSBAKE_CHROOT": "1"}.items()]
    unshare = list(proc.ISOLATED)
    if not network:
        unshare.append("--net")
    cmd = [*unshare, "sh", "-c", "\n".join(lines), "sysbake-step", *env, *plan.command]
    mount = overlay.in_own_namespace(lowerdirs, upper, work, root)
    from sysbake import progress
    from sysbake.build.salt.run import SALT_LOG

    watch = progress.StepWatch(where)
    with log.step(f"{where}: running in a chroot"), watch.follow([conf / Path(SALT_LOG).name]):
        try:
            result = proc.run(cmd, check=False, what=where, setup=mount, on_line=watch.line)
        except CommandError as exc:
            raise BuildError(f"{where}: {exc}") from exc
        if plan.judge is not None:
            plan.judge(result.returncode, result.stdout, result.stderr)
        elif result.returncode != 0:
            raise BuildError(f"{where}: exited {result.returncode}: {proc.tail_of(result)}")
