"""What a build carries, and what a stage is.

`BuildContext` is made once per build (sysbake.build.pipeline.build_project) and passed
down to every stage maker: the project, the store, its stage cache, the user's options
and the reporter that hears of every stage. It is never changed; nothing of a build
lives in module globals.

A `Stage` is a value: a name, the inputs its cache key hashes, and how to make its layer
on a cache miss. The modules that know a kind of stage (bootstrap, steps) return stages;
the pipeline alone runs them, so that reuse, logging, timing and reporting happen in one
place.
"""

from __future__ import annotations

from collections.abc import Callable

from sysbake.build.cache import Offer, StageCache, stage_key
from sysbake.oci.model import Layer
from sysbake.oci.store import Store
from sysbake.project.specs import Project
from sysbake.records import record

# The JSON-able inputs of a stage's cache key (see sysbake.build.cache.stage_key).
Inputs = dict[str, object]


@record
class BuildOptions:
    """How the user asked to build (the flags of `sysbake build`)."""

    targets: tuple[str, ...] = ()  # images to build with their parents (): all
    no_cache: bool = False  # rebuild every stage
    explain: bool = False  # the reporter says why each stage was reused or rebuilt
    keep_failed: bool = False  # keep the container of a failed booted step
    compression: str = "gzip"  # of the layers committed
    jobs: int = 1  # images built at once, each in a process of its own (-j)
    # The cache sources the user named (--cache-from, [build] cache_from), for this build:
    # stage records, or sources asked per stage key (sysbake.build.cache.StageSource).
    cache_from: tuple[Offer, ...] = ()


@record
class StageResult:
    """What happened to one stage: reused from the cache or rebuilt, and why."""

    image: str
    stage: str
    key: str
    reused: bool
    reason: str
    layer: Layer
    seconds: float
    origin: str = ""  # the cache source a reused stage came from ("": this store)

    def to_json(self) -> dict[str, object]:
        return {
            "image": self.image,
            "stage": self.stage,
            "key": self.key,
            "reused": self.reused,
            "reason": self.reason,
            "diff_id": self.layer.diff_id,
            "digest": self.layer.blob.digest,
            "seconds": round(self.seconds, 3),
            "origin": self.origin,
        }


Reporter = Callable[[StageResult], None]


def no_report(result: StageResult) -> None:
    """The reporter of a build nobody listens to."""


def never() -> bool:
    """The `stopping` of a build that is never asked to stop early."""
    return False


@record
class BuildContext:
    """One build: its project, store, stage cache, options and reporter."""

    project: Project
    store: Store
    cache: StageCache
    options: BuildOptions
    report: Reporter = no_report
    # Whether to stop before the next stage (-j N: another image failed).
    stopping: Callable[[], bool] = never


@record
class Stage:
    """A stage as the pipeline runs it: `name` (bootstrap, or the step's), `inputs` (what
    its key hashes), `created_by` (its history line) and `produce`, called only on a cache
    miss to commit its layer to the store."""

    name: str
    inputs: Inputs
    created_by: str
    produce: Callable[[], Layer]
    # The layer's time (seconds since 1970) for its history, asked after `produce`: the
    # build's epoch (sysbake.build.bootstrap.choose_epoch); None: SOURCE_DATE_EPOCH's or now.
    epoch: Callable[[], int | None] | None = None

    @property
    def key(self) -> str:
        """The stage's cache key."""
        return stage_key(self.inputs)
