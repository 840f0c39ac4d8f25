"""Salt inside images without a trace: what a provision runner needs to run `salt-call`.

Salt never comes from the image (a minbase image has no Python at all): it runs from a
toolchain (sysbake.build.salt.toolchain) bind-mounted read-only at /run/sysbake/salt and
started with the toolchain's own dynamic loader, so neither the image's libc nor its Python
matter and no LD_LIBRARY_PATH reaches the commands Salt runs. Config, cache, keys, logs and
temp files all live under /run/sysbake: nothing of Salt lands in a layer unless
`install_salt` copies it in.

A runner does, inside the step's container or chroot:
1. /run is a tmpfs (it is in our containers; in chroot mode, mount one on <root>/run);
2. write `run.config_files()` (all under CONF_DIR: a writable dir, Salt may add files);
3. bind-mount `run.mounts()` (mkdir -p the container paths first);
4. run `run.command()` with `run.env()` as the whole environment, cwd /, capture stdout;
5. `parse_result(stdout, returncode, stderr)` says what happened.

Pillar: the global pillar roots are Salt's env `base` (several roots: Salt's rules, the first
top.sls wins). A project pillar gets its own env, PROJECT_PILLAR_ENV, merged over `base`
(`env_order`, recursive merge). Its top.sls is written like any other (`base:`); a generated
top renames that section to the project env, because Salt keys top files by the env named in
them and two `base: '*':` sections would replace each other. A project pillar without a
top.sls but with an init.sls gets `'*': [init]`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sysbake import log, proc
from sysbake.build import cache
from sysbake.build.salt.toolchain import (
    DEFAULT_SALT_VERSION,
    RUN_SCHEMA,
    Toolchain,
    boot_code,
    ensure_toolchain,
    loader_path,
    toolchain_key,
)
from sysbake.errors import BuildError
from sysbake.project.specs import read_input
from sysbake.records import record

if TYPE_CHECKING:
    from sysbake.rootfs import Root

__all__ = [
    "CONF_DIR",
    "DEFAULT_SALT_VERSION",
    "KEEP_DIR",
    "KEEP_WRAPPER",
    "PROJECT_PILLAR_ENV",
    "SALT_LOG",
    "SALT_MOUNT",
    "SaltResult",
    "SaltRun",
    "StateOutcome",
    "Toolchain",
    "ensure_toolchain",
    "install_salt",
    "loader_path",
    "parse_result",
    "salt_key_inputs",
    "toolchain_key",
]

RUN_DIR = "/run/sysbake"
SALT_MOUNT = f"{RUN_DIR}/salt"  # the toolchain, read-only
CONF_DIR = f"{RUN_DIR}/conf"  # every file of config_files() is under it
VAR_DIR = f"{RUN_DIR}/var"  # Salt's cache, pki, sockets, logs and temp files
SRV_DIR = f"{RUN_DIR}/srv"  # state trees and pillar roots, read-only
PROJECT_PILLAR_ENV = "project"
MINION_ID = "sysbake"
# Salt's log file: in the conf dir, which is on the host too, where sysbake.progress follows
# the states done while a step runs.
SALT_LOG = f"{CONF_DIR}/salt.log"
KEEP_DIR = "/opt/sysbake/salt"
KEEP_WRAPPER = "/usr/local/sbin/salt-call"

# Without custom modules in the state trees, two of Salt's defaults only cost time (~1 s
# of a 2.5 s run): the sync of `_modules/` & co. before every highstate (20 module types,
# a file client each), and the search of every module file whenever a function is not in
# the module named like it (`"pkg.ex_mod_init" in __salt__` loads them all). Salt's own
# test suites run with strict matching; Salt's modules are all named like their virtual
# names, only custom ones may not be.
_NO_CUSTOM_MODULES = {"autoload_dynamic_modules": False, "lazy_loader_strict_matching": True}
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_SLS_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]*$")
_USER_TOP = "sysbake-user-top.sls"
# Rendered by Salt (jinja, then yaml): the project's own top file with its `base` section
# moved to the project's pillar env.
_RENAMED_TOP = """\
{#- sysbake: the project's top.sls, its `base` section applied in the pillar env %(env)s -#}
{%%- load_yaml as user_top %%}
{%% include '%(user_top)s' %%}
{%%- endload %%}
{%%- set renamed = {} %%}
{%%- for env, targets in (user_top or {}).items() %%}
{%%-   do renamed.update({('%(env)s' if env == 'base' else env): targets}) %%}
{%%- endfor %%}
{{ renamed | json }}
"""


@record
class SaltRun:
    """One `salt-call --local state.apply`: state trees (Salt's file_roots), global pillar
    roots, an optional project pillar merged over them, SLS names (empty = highstate from
    top.sls), grains (canonical JSON text, as in config specs) and test (dry-run) mode."""

    toolchain: Toolchain
    state_trees: tuple[Path, ...]
    pillar: tuple[Path, ...] = ()
    project_pillar: Path | None = None
    sls: tuple[str, ...] = ()
    grains_json: str = "{}"
    test: bool = False
    boot_timeout: float | None = None  # in a booted container: wait for systemd first

    def __post_init__(self) -> None:
        if not self.state_trees:
            raise BuildError("salt: no state tree (file_roots) given")
        for name in self.sls:
            if not _SLS_RE.match(name):
                raise BuildError(f"salt: sls {name!r}: expected an SLS name like 'web.nginx'")
        try:
            grains = json.loads(self.grains_json)
        except ValueError:
            grains = None
        if not isinstance(grains, dict):
            raise BuildError(f"salt: grains {self.grains_json!r}: expected a JSON object")
        if self.project_pillar is not None and not self.toolchain.ordered_pillar:
            raise BuildError(
                f"salt_version {self.toolchain.version!r} cannot merge a project "
                "pillar over the global one in a fixed order (it ignores "
                f"env_order): use {DEFAULT_SALT_VERSION}"
            )
        for path in (*self.state_trees, *self.pillar, *filter(None, [self.project_pillar])):
            if not path.is_absolute():
                raise BuildError(f"salt: {path}: expected an absolute path")

    @property
    def grains(self) -> dict[str, Any]:
        return dict(json.loads(self.grains_json))

    def mounts(self) -> list[tuple[Path, str, bool]]:
        """(host path, container path, read-only) bind mounts the run needs. Host paths are
        the trees' real directories (the project file made sure those of the project stay in
        it); links inside a tree are resolved by the step, in the image's own root."""
        out = [(self.toolchain.path, SALT_MOUNT, True)]
        out += [(_real(p), f"{SRV_DIR}/salt/{i}", True) for i, p in enumerate(self.state_trees)]
        out += [(_real(p), f"{SRV_DIR}/pillar/{i}", True) for i, p in enumerate(self.pillar)]
        if self.project_pillar is not None:
            out.append((_real(self.project_pillar), f"{SRV_DIR}/pillar/{PROJECT_PILLAR_ENV}", True))
        return out

    def _project_tops(self) -> dict[str, bytes]:
        if self.project_pillar is None:
            return {}
        gen = f"{CONF_DIR}/pillar-top/{PROJECT_PILLAR_ENV}"
        top = self.project_pillar / "top.sls"
        if top.is_file():
            # Read here, not by Salt: a link may only lead within the pillar dir (as it
            # would, mounted in the step), never to a host file.
            user_top = read_input(top, self.project_pillar)
            text = _RENAMED_TOP % {"env": PROJECT_PILLAR_ENV, "user_top": _USER_TOP}
            return {f"{gen}/top.sls": text.encode(), f"{gen}/{_USER_TOP}": user_top}
        if (self.project_pillar / "init.sls").is_file():
            return {f"{gen}/top.sls": json.dumps({PROJECT_PILLAR_ENV: {"*": ["init"]}}).encode()}
        return {}

    def minion_config(self) -> dict[str, Any]:
        """Salt's minion config for this run: every path Salt writes is under VAR_DIR."""
        pillar_roots: dict[str, list[str]] = {
            "base": [f"{SRV_DIR}/pillar/{i}" for i in range(len(self.pillar))]
        }
        if self.project_pillar is not None:
            gen = [f"{CONF_DIR}/pillar-top/{PROJECT_PILLAR_ENV}"] if self._project_tops() else []
            pillar_roots[PROJECT_PILLAR_ENV] = [*gen, f"{SRV_DIR}/pillar/{PROJECT_PILLAR_ENV}"]
        return {
            "id": MINION_ID,
            "file_client": "local",
            "root_dir": VAR_DIR,
            "conf_file": f"{CONF_DIR}/minion",
            "cachedir": f"{VAR_DIR}/cache",
            "extension_modules": f"{VAR_DIR}/cache/extmods",
            "pki_dir": f"{VAR_DIR}/pki",
            "sock_dir": f"{VAR_DIR}/sock",
            "pidfile": f"{VAR_DIR}/salt-minion.pid",
            "log_file": SALT_LOG,
            "log_level_logfile": "info",
            "file_roots": {"base": [f"{SRV_DIR}/salt/{i}" for i in range(len(self.state_trees))]},
            "pillar_roots": pillar_roots,
            # Later envs win; without env_order Salt merges pillar envs in set order (random).
            "env_order": list(pillar_roots),
            "top_file_merging_strategy": "merge",
            "pillar_source_merging_strategy": "recurse",
            "grains": self.grains,
            # Reverse DNS of every address and lspci: slow, and meaningless in a build.
            "enable_fqdns_grains": False,
            "enable_gpu_grains": False,
            **({} if self.custom_modules() else _NO_CUSTOM_MODULES),
            # Salt's file server cannot list a name that is not UTF-8 (it crashes writing
            # its file list): such files are left out (`config_files` warns of them).
            "file_ignore_regex": [_NOT_UTF8],
        }

    def custom_modules(self) -> bool:
        """Whether a state tree ships Salt modules of its own (`_modules/`, `_states/`,
        ... at its root), which highstate syncs and which may use any virtual name."""
        return any(
            child.is_dir() and child.name.startswith("_")
            for tree in self.state_trees
            if tree.is_dir()
            for child in tree.iterdir()
        )

    def config_files(self) -> dict[str, bytes]:
        """Container path -> content of the files to write before the run (under CONF_DIR).
        The minion config is JSON, which Salt's YAML loader reads as is."""
        odd = [
            name
            for tree in (*self.state_trees, *self.pillar, *filter(None, [self.project_pillar]))
            for name in _odd_names(tree)
        ]
        if odd:
            more = f" and {len(odd) - 1} more" if len(odd) > 1 else ""
            log.warn(
                f"{odd[0]}{more}: names that are not UTF-8, which Salt cannot serve: "
                "they are left out of the state tree or pillar"
            )
        minion = json.dumps(self.minion_config(), indent=2, sort_keys=True) + "\n"
        return {f"{CONF_DIR}/minion": minion.encode(), **self._project_tops()}

    def command(self) -> list[str]:
        """The argv that runs salt-call inside the container (stdout: Salt's JSON result)."""
        fun = ["state.apply", ",".join(self.sls)] if self.sls else ["state.apply"]
        code = boot_code(SALT_MOUNT, f"{VAR_DIR}/tmp", boot_timeout=self.boot_timeout)
        return [
            *self.toolchain.argv(SALT_MOUNT),
            "-I",
            "-c",
            code,
            # salt-call writes no log file unless told so here (its config's log_file is
            # not enough); the states it logs there are the build's progress.
            f"--log-file={SALT_LOG}",
            "--local",
            f"--config-dir={CONF_DIR}",
            "--out=json",
            "--retcode-passthrough",
            "--log-level=warning",
            *fun,
            *(["test=True"] if self.test else []),
        ]

    def env(self) -> dict[str, str]:
        """The whole environment of the command (nothing of the host's)."""
        return {"PATH": _PATH, "HOME": "/root", "LANG": "C.UTF-8"}


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


# A lone surrogate: how Python names a byte that is not UTF-8 (a regex escape, for Salt).
_NOT_UTF8 = "[\\udc80-\\udcff]"


def _odd_names(tree: Path) -> list[str]:
    """Paths under `tree` (links not followed) whose names are not UTF-8, shown escaped."""
    out, todo = [], [os.fsencode(tree)]
    while todo:  # no recursion: a tree may be deeper than Python's limit
        try:
            with os.scandir(todo.pop()) as it:
                entries = list(it)
        except OSError:
            continue  # not ours to report: Salt says what it cannot read
        for entry in entries:
            try:
                entry.name.decode()
            except UnicodeDecodeError:
                out.append(entry.path.decode(errors="backslashreplace"))
                continue
            if entry.is_dir(follow_symlinks=False):
                todo.append(entry.path)
    return sorted(out)


def salt_key_inputs(run: SaltRun) -> dict[str, Any]:
    """Everything about a run that its stage key must cover; trees and pillar as hashes."""
    return {
        "schema": RUN_SCHEMA,
        "salt_version": run.toolchain.version,
        "toolchain": run.toolchain.key,
        "sls": list(run.sls),
        "grains": run.grains,
        "test": run.test,
        "state_trees": [cache.hash_tree(p) for p in run.state_trees],
        "pillar": [cache.hash_tree(p) for p in run.pillar],
        "project_pillar": (
            cache.hash_tree(run.project_pillar) if run.project_pillar is not None else None
        ),
    }


def install_salt(toolchain: Toolchain, root: Root) -> None:
    """Copy the toolchain into the image tree `root` at KEEP_DIR, with a KEEP_WRAPPER
    salt-call (`keep_salt = true`). Idempotent: a previous copy is replaced."""
    root.remove(root.resolve(KEEP_DIR))
    root.copy_in(toolchain.path, KEEP_DIR, keep_owner=True)
    argv = [*toolchain.argv(KEEP_DIR), "-I", "-c", boot_code(KEEP_DIR, None)]
    root.mkdir(os.path.dirname(KEEP_WRAPPER))
    root.remove(root.resolve(KEEP_WRAPPER))
    root.write_bytes(
        KEEP_WRAPPER,
        (
            "#!/bin/sh\n"
            f"# Installed by sysbake (keep_salt = true): Salt {toolchain.version} "
            f"from {KEEP_DIR},\n"
            "# started with that tree's own loader and libraries (it needs no Python here).\n"
            f'exec {shlex.join(argv)} "$@"\n'
        ).encode(),
        mode=0o755,
    )


@record
class StateOutcome:
    """One state of a Salt run, as salt-call's JSON output reports it."""

    id: str
    function: str
    name: str
    sls: str
    result: bool | None  # None: test mode, it would change
    comment: str
    changed: bool
    run_num: int

    def describe(self) -> str:
        first = self.comment.strip().splitlines()[0] if self.comment.strip() else "no comment"
        return f"{self.id} ({self.function} {self.name!r}, sls {self.sls}): {first}"


@record
class SaltResult:
    """What a run did: its states in run order, or the errors that stopped it before any
    state ran (a top file, an SLS or the pillar that failed to render), with the details
    Salt only logs (on stderr) appended to them."""

    returncode: int
    states: tuple[StateOutcome, ...]
    errors: tuple[str, ...]

    @property
    def failed(self) -> tuple[StateOutcome, ...]:
        return tuple(s for s in self.states if s.result is False)

    @property
    def changed(self) -> tuple[StateOutcome, ...]:
        return tuple(s for s in self.states if s.changed)

    @property
    def changes(self) -> int:
        return len(self.changed)

    @property
    def succeeded(self) -> int:
        return sum(1 for s in self.states if s.result is not False)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.errors and not self.failed

    @property
    def summary(self) -> str:
        if self.errors:
            return f"Salt stopped before applying states: {self.error_line()}"
        return (
            f"{len(self.states)} states: {self.succeeded} succeeded, {len(self.failed)} "
            f"failed, {self.changes} changed"
        )

    def error_line(self) -> str:
        """One line for a build error: what stopped Salt, or the first failed state that is
        not only the consequence of another."""
        if self.errors:
            # The most detailed message (Salt's own summary lines say "see the log").
            text = max((_one_line(e) for e in self.errors), key=len)
            if "pillar" not in text.lower() and any("pillar" in e.lower() for e in self.errors):
                text = f"pillar: {text}"
            return text
        causes = [s for s in self.failed if "requisite failed" not in s.comment]
        if not (causes or self.failed):
            return f"salt-call exited {self.returncode}" if self.returncode else "ok"
        worst = (causes or list(self.failed))[0]
        return f"{len(self.failed)} of {len(self.states)} states failed, first: {worst.describe()}"

    def report(self) -> str:
        """Several lines for humans: the summary, then each failed state with its comment."""
        lines = [self.summary, *self.errors]
        for state in self.failed:
            lines.append(f"  FAILED {state.id}: {state.function} {state.name!r} (sls {state.sls})")
            lines += [f"    {ln}" for ln in state.comment.strip().splitlines()]
        return "\n".join(lines)


_SEE_LOG = re.compile(r"\s*Please see (the )?master log for details\.?")
_MARK = "<======================"


def _one_line(message: str) -> str:
    """A render error on one line: its text, then the template line Salt marked."""
    head, _, block = message.partition("\n---\n")
    text = " ".join(head.split())
    marked = [ln.replace(_MARK, "").strip() for ln in block.splitlines() if _MARK in ln]
    return f"{text}: {marked[0]}" if marked else text


def _logged_errors(stderr: bytes) -> list[str]:
    # Salt's console log: "[ERROR   ] message" records, tracebacks included; keep the
    # messages (a render error's details are only there).
    text = stderr.decode(errors="replace")
    out = []
    for m in re.finditer(r"^\[(ERROR|CRITICAL) *\] (.*?)(?=^\[[A-Z]+ *\] |\Z)", text, re.M | re.S):
        message = m.group(2).split("Traceback (most recent call last):")[0].strip()
        if message and message != "Rendering exception occurred":
            out.append(_SEE_LOG.sub("", message))
    return out


def _load_json(stdout: bytes) -> Any:
    text = stdout.decode(errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        pass
    # Something printed before the result: the result is the last top-level JSON object.
    for m in reversed(list(re.finditer(r"^\{", text, re.M))):
        try:
            return json.JSONDecoder().raw_decode(text[m.start() :])[0]
        except ValueError:
            continue
    return None


def _outcome(key: str, data: dict[str, Any]) -> StateOutcome:
    parts = key.split("_|-")
    module, fun = (parts[0], parts[-1]) if len(parts) >= 4 else ("", "")
    comment = data.get("comment", "")
    if isinstance(comment, list):
        comment = "\n".join(str(c) for c in comment)
    result = data.get("result")
    return StateOutcome(
        id=str(data.get("__id__", parts[1] if len(parts) >= 4 else key)),
        function=f"{module}.{fun}" if module else "",
        name=str(data.get("name", parts[2] if len(parts) >= 4 else "")),
        sls=str(data.get("__sls__", "")),
        result=None if result is None else bool(result),
        comment=str(comment),
        changed=bool(data.get("changes")),
        run_num=int(data.get("__run_num__", 0)),
    )


def parse_result(stdout: bytes, returncode: int, stderr: bytes = b"") -> SaltResult:
    """The SaltResult of `salt-call --out=json --retcode-passthrough state.apply`; give
    stderr too: some errors (a top file that does not render) are only logged there."""
    doc = _load_json(stdout)
    ret = doc.get("local", doc) if isinstance(doc, dict) else doc
    logged = _logged_errors(stderr)
    if isinstance(ret, dict) and ret and all(isinstance(v, dict) for v in ret.values()):
        states = sorted((_outcome(k, v) for k, v in ret.items()), key=lambda s: s.run_num)
        if [s.function for s in states] != ["no.None"]:
            return SaltResult(returncode, tuple(states), ())
        # "No Top file ... matches found": no top.sls, none matching, or one that failed
        # to render (then only the log says why).
        ret = [states[0].comment]
    if isinstance(ret, str) and ret:
        ret = [ret]
    if isinstance(ret, list) and ret:
        said = [_SEE_LOG.sub("", str(e)) for e in ret]
        return SaltResult(
            returncode or 1,
            (),
            tuple(dict.fromkeys([*said, *(e for e in logged if e not in said)])),
        )
    return SaltResult(
        returncode or 1,
        (),
        (f"salt-call printed no result (exit {returncode}): {proc.tail(stderr)}",),
    )
