"""`sysbake build -j N`: the scheduler (sysbake.build.schedule) with a fake launcher, its
forked jobs for real (output, events, errors, stop, cancel, a parent killed), a whole
build of stand-in stages at -j 2 against -j 1, and the store's locks under two processes
at once (sysbake.oci.store: GC against a writer, one stage made once, tmp/ clean-up against
live staging, a fresh store's index, the named locks)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sysbake import cli
from sysbake.build import pipeline, schedule
from sysbake.build.cache import StageCache
from sysbake.build.context import BuildContext, BuildOptions, Stage, StageResult
from sysbake.build.pipeline import PartialImage
from sysbake.build.schedule import ForkLauncher, Job, JobFailed, Outcome, run_graph
from sysbake.errors import BuildError, ConfigError, Interrupted
from sysbake.oci import model as oci
from sysbake.oci.model import Layer
from sysbake.oci.store import Store
from sysbake.project.load import load_project
from sysbake.project.specs import Project
from sysbake.records import replace
from tests.unit.conftest import files_tar, image_config, put_layer

# -- run_graph, with a fake launcher ---------------------------------------------------------


class FakeLauncher:
    """Jobs that end in the order they started (oldest first) as `wait` is called; the
    jobs in `fails` fail; with `interrupt`, the first `wait` raises KeyboardInterrupt."""

    def __init__(self, fails: tuple[str, ...] = (), *, interrupt: bool = False) -> None:
        self.fails = fails
        self.interrupt = interrupt
        self.events: list[str] = []
        self.running: list[str] = []
        self.most = 0

    def start(self, name: str) -> None:
        self.events.append(f"start {name}")
        self.running.append(name)
        self.most = max(self.most, len(self.running))

    def wait(self) -> Outcome[str]:
        if self.interrupt and "cancel" not in self.events:
            raise KeyboardInterrupt
        name = self.running.pop(0)
        self.events.append(f"end {name}")
        if name in self.fails:
            return Outcome(name, error=BuildError(f"{name}: broken"))
        return Outcome(name, f"value of {name}")

    def stop(self) -> None:
        self.events.append("stop")

    def cancel(self) -> None:
        self.events.append("cancel")


GRAPH = {"base": [], "a": ["base"], "b": ["base"], "c": ["a"], "solo": []}


def test_jobs_start_once_their_dependencies_are_done_n_at_a_time() -> None:
    launcher = FakeLauncher()
    done = run_graph(GRAPH, launcher, 2)
    assert done == {name: f"value of {name}" for name in GRAPH}
    assert launcher.most == 2
    assert launcher.events == [
        "start base",
        "start solo",  # independent of base: at once
        "end base",
        "start a",
        "end solo",
        "start b",
        "end a",
        "start c",
        "end b",
        "end c",
    ]


def test_one_job_at_a_time_keeps_the_given_order() -> None:
    launcher = FakeLauncher()
    run_graph(GRAPH, launcher, 1)
    assert launcher.most == 1
    assert [e for e in launcher.events if e.startswith("start")] == [
        f"start {name}" for name in GRAPH
    ]


def test_a_failure_starts_nothing_new_lets_the_others_end_and_raises_the_first_error() -> None:
    launcher = FakeLauncher(fails=("base", "solo"))
    with pytest.raises(BuildError, match=r"^base: broken$"):
        run_graph(GRAPH, launcher, 2)
    # solo ran on (asked to stop after its stage); a, b, c wait for base: never started.
    assert launcher.events == ["start base", "start solo", "end base", "stop", "end solo"]


def test_an_interrupt_cancels_the_running_jobs_and_waits_for_them() -> None:
    launcher = FakeLauncher(interrupt=True)
    with pytest.raises(KeyboardInterrupt):
        run_graph(GRAPH, launcher, 3)
    assert launcher.events == ["start base", "start solo", "cancel", "end base", "end solo"]
    assert launcher.running == []


def test_a_graph_waiting_for_a_missing_job_is_a_bug_said_plainly() -> None:
    with pytest.raises(BuildError, match="wait for jobs that never ran"):
        run_graph({"a": ["ghost"]}, FakeLauncher(), 2)


# -- ForkLauncher: jobs in forked processes ----------------------------------------------------


def _wait_for(path: Path, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def _collect(launcher: ForkLauncher[str], count: int) -> dict[str, Outcome[str]]:
    return {o.name: o for o in (launcher.wait() for _ in range(count))}


def test_a_forked_job_prefixes_its_output_sends_events_and_returns_its_value(
    capfd: pytest.CaptureFixture[str],
) -> None:
    events: list[tuple[str, object]] = []

    def work(name: str, job: Job) -> schedule.Json:
        print(f"hello from {name}", flush=True)
        os.system(f"echo subprocess of {name} >&2")
        job.send({"event": {"n": 1}})
        sys.stderr.write("no newline at the end")
        return {"pid": os.getpid()}

    launcher = ForkLauncher(work, lambda n, e: events.append((n, e)), lambda n, d: str(d["pid"]))
    launcher.start("web")
    outcome = launcher.wait()
    assert outcome.error is None and outcome.value not in (None, str(os.getpid()))
    assert events == [("web", {"n": 1})]
    err = capfd.readouterr().err.splitlines()
    assert "[web] hello from web" in err
    assert "[web] subprocess of web" in err
    assert "[web] no newline at the end" in err


def test_a_forked_jobs_error_keeps_its_message_and_exit_code() -> None:
    def work(name: str, job: Job) -> schedule.Json:
        raise ConfigError(f"{name}: sysbake.toml: key 'x': expected a string")

    launcher = ForkLauncher(work, lambda n, e: None, lambda n, d: "")
    launcher.start("a")
    error = launcher.wait().error
    assert isinstance(error, JobFailed)
    assert (str(error), error.exit_code) == ("a: sysbake.toml: key 'x': expected a string", 2)


def test_a_cancelled_job_unwinds_its_clean_up_and_says_it_was_interrupted(
    tmp_path: Path,
) -> None:
    def work(name: str, job: Job) -> schedule.Json:
        try:
            (tmp_path / f"{name}.running").touch()
            time.sleep(60)
        finally:
            (tmp_path / f"{name}.cleaned").touch()
        return {}

    launcher = ForkLauncher(work, lambda n, e: None, lambda n, d: "")
    for name in ("a", "b"):
        launcher.start(name)
    for name in ("a", "b"):
        _wait_for(tmp_path / f"{name}.running")
    launcher.cancel()
    outcomes = _collect(launcher, 2)
    for name in ("a", "b"):
        assert isinstance(outcomes[name].error, Interrupted)
        assert (tmp_path / f"{name}.cleaned").exists()


def test_a_stopped_job_sees_it_and_ends_where_it_chooses(tmp_path: Path) -> None:
    def work(name: str, job: Job) -> schedule.Json:
        (tmp_path / "running").touch()
        deadline = time.monotonic() + 20
        while not job.stopping():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        raise BuildError(f"{name}: stopped before its next stage")

    launcher = ForkLauncher(work, lambda n, e: None, lambda n, d: "")
    launcher.start("a")
    _wait_for(tmp_path / "running")
    launcher.stop()
    assert str(launcher.wait().error) == "a: stopped before its next stage"


def test_a_job_killed_outright_is_an_error_naming_the_signal(tmp_path: Path) -> None:
    def work(name: str, job: Job) -> schedule.Json:
        os.kill(os.getpid(), signal.SIGKILL)
        return {}

    launcher = ForkLauncher(work, lambda n, e: None, lambda n, d: "")
    launcher.start("a")
    assert str(launcher.wait().error) == "a: its build ended (killed by SIGKILL)"


def _forked(fn: Callable[[], object]) -> int:
    """`fn` run in a forked process (exit 0 when it returns, 1 with a traceback if not)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def _exit_code(pid: int, seconds: float = 60.0) -> int:
    deadline = time.monotonic() + seconds
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"process {pid} did not end")
        time.sleep(0.01)


def test_a_job_whose_sysbake_is_killed_cleans_up_by_itself(tmp_path: Path) -> None:
    """kill -9 of the parent: its jobs get SIGTERM (the parent-death signal) and unwind."""

    def work(name: str, job: Job) -> schedule.Json:
        try:
            (tmp_path / "running").touch()
            time.sleep(60)
        finally:
            (tmp_path / "cleaned").touch()
        return {}

    def sysbake() -> None:
        launcher = ForkLauncher(work, lambda n, e: None, lambda n, d: "")
        launcher.start("a")
        launcher.wait()

    parent = _forked(sysbake)
    _wait_for(tmp_path / "running")
    os.kill(parent, signal.SIGKILL)
    assert _exit_code(parent) == -signal.SIGKILL
    _wait_for(tmp_path / "cleaned")


# -- a whole build at -j 2, stages made by stand-ins ---------------------------------------------

PROJECT = """\
[images.base.bootstrap]
distro = "debian"
suite = "bookworm"
mirror = "http://deb.example.invalid/debian"

[images.left]
from = "base"

[[images.left.provision]]
type = "script"
name = "one"
run = "echo left > /etc/left"

[images.right]
from = "base"

[[images.right.provision]]
type = "script"
name = "one"
run = "echo right > /etc/right"
"""


def _stand_in(
    barrier: Path | None,
) -> Callable[[BuildContext, PartialImage, Stage], PartialImage]:
    """`run_stage` whose layers are made by a stand-in (a one-file tar); with `barrier`,
    the stages of `left` and `right` each wait until the other has begun: they must run
    at the same time."""
    real = pipeline.run_stage

    def stand_in(ctx: BuildContext, image: PartialImage, stage: Stage) -> PartialImage:
        def produce() -> Layer:
            if barrier is not None and image.name in ("left", "right"):
                (barrier / image.name).touch()
                _wait_for(barrier / ("right" if image.name == "left" else "left"))
            return put_layer(ctx.store, files_tar({f"{image.name}-{stage.name}": b"x"}))

        return real(ctx, image, replace(stage, produce=produce))

    return stand_in


def _build(tmp_path: Path, store: Path, *args: str) -> list[StageResult]:
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    (project / "sysbake.toml").write_text(PROJECT)
    results: list[StageResult] = []
    built = pipeline.build_project(
        load_project(project),
        Store(store),
        BuildOptions(jobs=int(args[0]) if args else 1),
        results.append,
    )
    assert [r.name for r in built] == ["base", "left", "right"]
    assert [r.stages for r in built] == [
        tuple(r for r in results if r.image == name) for name in ("base", "left", "right")
    ]
    return results


def test_two_images_build_at_once_into_the_same_images_as_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    monkeypatch.setattr(pipeline, "run_stage", _stand_in(barrier))
    parallel = _build(tmp_path, tmp_path / "j2", "2")
    err = capfd.readouterr().err.splitlines()
    for name in ("base", "left", "right"):  # each image's lines say whose they are
        assert any(line.startswith(f"[{name}] ==> tagged {name}:latest") for line in err)
    monkeypatch.setattr(pipeline, "run_stage", _stand_in(None))
    serial = _build(tmp_path, tmp_path / "j1")

    def ids(store: Path) -> dict[str, str]:
        return {t.ref: t.image.id for t in Store(store).tags()}

    assert ids(tmp_path / "j2") == ids(tmp_path / "j1")
    assert len(ids(tmp_path / "j1")) == 3
    assert sorted((r.image, r.stage, r.key, r.layer.blob.digest) for r in parallel) == sorted(
        (r.image, r.stage, r.key, r.layer.blob.digest) for r in serial
    )


def test_a_failed_image_fails_the_build_with_its_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stand_in = _stand_in(None)

    def failing(ctx: BuildContext, image: PartialImage, stage: Stage) -> PartialImage:
        if image.name == "left":
            raise BuildError("left: one: script exited 3: no")
        return stand_in(ctx, image, stage)

    monkeypatch.setattr(pipeline, "run_stage", failing)
    project = tmp_path / "project"
    project.mkdir()
    (project / "sysbake.toml").write_text(PROJECT)
    store = tmp_path / "store"
    code = cli.main(["--store", str(store), "build", "-j", "2", str(project)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.splitlines()[-1] == "sysbake: error: left: one: script exited 3: no"
    assert "Traceback" not in err
    assert {t.ref for t in Store(store).tags()} <= {"base:latest", "right:latest"}


# -- the store's locks, two processes at once ------------------------------------------------------


@contextlib.contextmanager
def _processes(*fns: Callable[[], object]) -> Iterator[list[int]]:
    pids = [_forked(fn) for fn in fns]
    try:
        yield pids
    finally:
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                if not os.waitpid(pid, os.WNOHANG)[0]:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)


def test_gc_waits_for_a_writer_whose_blob_is_not_tagged_yet(tmp_path: Path) -> None:
    root = tmp_path / "store"
    Store(root).ensure()
    written, go, collected = (tmp_path / n for n in ("written", "go", "collected"))

    def writer() -> None:
        store = Store(root)
        layer = put_layer(store, files_tar({"f": b"fresh"}))  # held from here on
        written.touch()
        _wait_for(go)
        image = store.put_image(image_config([layer.diff_id]), (layer,))
        store.tag("fresh", image)

    def collector() -> None:
        Store(root).gc()
        collected.touch()

    with _processes(writer) as (w,):
        _wait_for(written)
        with _processes(collector) as (c,):
            time.sleep(1.0)  # room for a GC that does not wait to run
            assert not collected.exists(), "GC ran while a writer held the store"
            go.touch()
            assert _exit_code(w) == 0
            assert _exit_code(c) == 0
    image = Store(root).resolve("fresh")
    assert all(Store(root).has_blob(layer.blob.digest) for layer in image.layers)


def test_a_stage_two_processes_need_at_once_is_made_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "store"
    Store(root).ensure()
    made, producing, waiting = tmp_path / "made", tmp_path / "producing", tmp_path / "waiting"
    monkeypatch.setattr(pipeline, "_waiting", lambda image, stage: waiting.touch())
    inputs: dict[str, object] = {"stage": "bootstrap", "bootstrap": {"suite": "bookworm"}}

    def build(name: str) -> Callable[[], None]:
        def run() -> None:
            store = Store(root).hold()

            def produce() -> Layer:
                producing.touch()
                with made.open("a") as f:
                    f.write(f"{name}\n")
                _wait_for(waiting)  # the other build waits for our lock meanwhile
                return put_layer(store, files_tar({"made-by": name.encode()}))

            results: list[StageResult] = []
            project = Project(path=tmp_path / "sysbake.toml", root=tmp_path, name="t", images=())
            ctx = BuildContext(project, store, StageCache(store), BuildOptions(), results.append)
            pipeline.run_stage(ctx, PartialImage(name, "amd64"), Stage("s", inputs, "t", produce))
            (tmp_path / f"{name}.reused").write_text(str(results[0].reused))

        return run

    with _processes(build("first")) as (first,):
        _wait_for(producing)
        with _processes(build("second")) as (second,):
            assert _exit_code(first) == 0
            assert _exit_code(second) == 0
    assert made.read_text() == "first\n"
    assert (tmp_path / "second.reused").read_text() == "True"
    assert list((root / "locks").glob("stage-*")) == []


def test_clean_stale_never_takes_live_staging_or_blob_writes(tmp_path: Path) -> None:
    root = tmp_path / "store"
    Store(root).ensure()

    def user() -> None:
        store = Store(root)
        for i in range(300):
            with store.staging("live") as path:
                (path / "f").write_bytes(b"x")
                assert (path / "f").read_bytes() == b"x"
            writer = store.blob_writer()
            writer.write(str(i).encode())
            writer.commit(oci.MT_LAYER)

    def cleaner() -> None:
        store = Store(root)
        for _ in range(300):
            store.clean_stale()

    with _processes(user, user, cleaner) as pids:
        assert [_exit_code(pid) for pid in pids] == [0, 0, 0]
    assert sorted(p.name for p in (root / "tmp").iterdir()) == []


def test_processes_making_a_fresh_store_at_once_lose_no_tag(tmp_path: Path) -> None:
    for round_ in range(5):
        root = tmp_path / f"store{round_}"
        go = tmp_path / f"go{round_}"

        def tagger(i: int, root: Path = root, go: Path = go) -> Callable[[], None]:
            def run() -> None:
                _wait_for(go)
                store = Store(root)
                layer = put_layer(store, files_tar({"n": str(i).encode()}))
                store.tag(f"t{i}", store.put_image(image_config([layer.diff_id]), (layer,)))

            return run

        with _processes(*(tagger(i) for i in range(6))) as pids:
            go.touch()
            assert [_exit_code(pid) for pid in pids] == [0] * 6
        assert sorted(t.ref for t in Store(root).tags()) == [f"t{i}:latest" for i in range(6)]


def test_a_named_lock_is_exclusive_across_processes_and_leaves_no_file(tmp_path: Path) -> None:
    root = tmp_path / "store"
    Store(root).ensure()
    counter = tmp_path / "counter"
    counter.write_text("0")

    def add() -> None:
        store = Store(root)
        for _ in range(200):
            with store.exclusive("count"):
                counter.write_text(str(int(counter.read_text()) + 1))

    with _processes(add, add, add) as pids:
        assert [_exit_code(pid) for pid in pids] == [0, 0, 0]
    assert counter.read_text() == "600"
    assert list((root / "locks").glob("count*")) == []


def test_gc_in_a_process_that_wrote_does_not_wait_for_itself(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    put_layer(store, files_tar({"f": b"unreferenced"}))  # this process holds the store
    assert store.gc()[0] == 1
    assert Store(tmp_path / "store").gc() == (0, 0)  # another Store object, same process
    put_layer(store, files_tar({"g": b"again"}))  # held again after the GC


def test_clean_stale_in_the_moment_a_staging_dir_is_made_leaves_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process's clean_stale between mkdtemp and the lock: it must wait."""
    import tempfile

    root = tmp_path / "store"
    Store(root).ensure()
    real_mkdtemp = tempfile.mkdtemp
    cleaners: list[subprocess.Popen[bytes]] = []
    clean = (
        "import sys; from pathlib import Path; from sysbake.oci.store import Store; "
        "Store(Path(sys.argv[1])).clean_stale()"
    )

    def mkdtemp_then_clean(*args: object, **kwargs: object) -> str:
        path = real_mkdtemp(*args, **kwargs)  # type: ignore[call-overload]
        # A process of its own (not forked: it would share our open lock files).
        cleaners.append(subprocess.Popen([sys.executable, "-c", clean, str(root)]))
        time.sleep(0.5)  # room for a cleaner that does not wait
        return str(path)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp_then_clean)
    with Store(root).staging("live") as path:
        monkeypatch.undo()
        assert cleaners[0].wait(60) == 0
        assert path.is_dir(), "clean_stale removed a live staging directory"


def test_a_fresh_stores_index_never_replaces_one_made_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "store")
    layer = put_layer(store, files_tar({"f": b"x"}))
    store.tag("kept", store.put_image(image_config([layer.diff_id]), (layer,)))
    # Another process's ensure() that looked for index.json just before it was written:
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda p: p.name != "index.json" and real_exists(p))
    Store(tmp_path / "store").ensure()
    monkeypatch.undo()
    assert [t.ref for t in Store(tmp_path / "store").tags()] == ["kept:latest"]
