"""The one signal parser (sysbake.signals) and everything that uses it: the project reader,
the image config, the runtime's stop signal and the docker flags agree on every value."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from sysbake import engines, signals
from sysbake.build import finalize
from sysbake.errors import RuntimeFailure
from sysbake.project.reader import Invalid, stop_signal
from sysbake.project.specs import DEFAULT_STOP_SIGNAL, OciConfigSpec
from sysbake.runtime import bundle

RTMIN = int(signal.SIGRTMIN)  # 34 with glibc, which keeps 32 and 33 for its threads
RTMAX = int(signal.SIGRTMAX)

# Every spelling users and image configs write -> (its number, its canonical name).
SPELLINGS: list[tuple[str | int, int, str]] = [
    ("SIGRTMIN+3", RTMIN + 3, "SIGRTMIN+3"),
    ("RTMIN+3", RTMIN + 3, "SIGRTMIN+3"),
    ("sigrtmin+3", RTMIN + 3, "SIGRTMIN+3"),
    (" SIGRTMIN+3 ", RTMIN + 3, "SIGRTMIN+3"),
    (str(RTMIN + 3), RTMIN + 3, "SIGRTMIN+3"),
    (RTMIN + 3, RTMIN + 3, "SIGRTMIN+3"),
    (f"SIGRTMAX-{RTMAX - RTMIN - 3}", RTMIN + 3, "SIGRTMIN+3"),
    ("SIGRTMIN", RTMIN, "SIGRTMIN"),
    ("SIGRTMIN+0", RTMIN, "SIGRTMIN"),
    ("SIGRTMAX", RTMAX, f"SIGRTMIN+{RTMAX - RTMIN}"),
    ("SIGRTMAX-1", RTMAX - 1, f"SIGRTMIN+{RTMAX - RTMIN - 1}"),
    ("SIGTERM", 15, "SIGTERM"),
    ("TERM", 15, "SIGTERM"),
    ("term", 15, "SIGTERM"),
    (15, 15, "SIGTERM"),
    ("kill", 9, "SIGKILL"),
    ("SIGIOT", 6, "SIGABRT"),  # an alias: named by the signal it is
    ("SIGPWR", 30, "SIGPWR"),
    ("1", 1, "SIGHUP"),
    (31, 31, "SIGSYS"),
]
REFUSED: list[str | int] = [
    "SIGFOO",
    "FOO",
    "",
    " ",
    "SIG",
    "SIGSIGTERM",
    "RT",
    "SIGRTMIN+",
    "SIGRTMIN-1",
    "SIGRTMAX+1",
    f"SIGRTMIN+{RTMAX - RTMIN + 1}",
    "0",
    0,
    "32",
    33,
    str(RTMAX + 1),
    "-1",
    "+3",
    "1.0",
    "3 7",
    "\u00b2",
    "\u0663\u0667",  # non-ASCII digits
]


@pytest.mark.parametrize(("value", "number", "name"), SPELLINGS)
def test_every_spelling_has_one_number_and_one_name(
    value: str | int, number: int, name: str
) -> None:
    assert signals.parse(value) == number
    assert signals.name(number) == name
    assert signals.canonical(value) == name
    assert signals.parse(name) == number  # the canonical name reads back
    # The project reader stores that name, the image config writes it, the runtime sends
    # that number, and docker gets no --stop-signal flag exactly for systemd's.
    assert stop_signal(value) == name
    config = finalize.image_config(
        OciConfigSpec(stop_signal=str(value)),
        architecture="amd64",
        diff_ids=[],
        history=[],
        created="",
        labels={},
    )
    assert config["config"]["StopSignal"] == name  # type: ignore[index]
    image = {"config": {"StopSignal": value}}
    assert bundle.stop_signal(image, ["/lib/systemd/systemd"]) == number
    flags = engines.select_flags(
        "docker", engines.HostFacts("v2"), engines.ImageFacts("x:1", stop_signal=str(value))
    ).flags
    assert ("--stop-signal" in flags) == (number != signals.SYSTEMD_STOP)


@pytest.mark.parametrize("value", REFUSED)
def test_what_is_no_signal_is_refused_everywhere(value: str | int) -> None:
    with pytest.raises(ValueError, match="expected a signal name"):
        signals.parse(value)
    with pytest.raises(Invalid, match=f"^{re.escape(f'expected {signals.EXPECTED}, got ')}"):
        stop_signal(value)
    with pytest.raises(RuntimeFailure, match=r"the image's StopSignal .*: expected a signal"):
        bundle.stop_signal({"config": {"StopSignal": value or "x y"}}, ["sh"])
    flags = engines.select_flags(
        "docker", engines.HostFacts("v2"), engines.ImageFacts("x:1", stop_signal=str(value))
    ).flags
    assert flags[flags.index("--stop-signal") + 1] == "SIGRTMIN+3"


def test_every_signal_number_round_trips() -> None:
    for number in sorted(signal.valid_signals()):
        assert signals.parse(signals.name(number)) == number
        assert signals.parse(str(number)) == number


def test_defaults_are_systemds_signal() -> None:
    assert signals.SYSTEMD_STOP == RTMIN + 3
    assert DEFAULT_STOP_SIGNAL == "SIGRTMIN+3" == OciConfigSpec().stop_signal
    assert signals.EXPECTED.endswith(f"1..{RTMAX}")
    # No StopSignal: systemd's for an init, SIGTERM for anything else.
    assert bundle.stop_signal({"config": {}}, ["/sbin/init"]) == RTMIN + 3
    assert bundle.stop_signal({}, [str(Path("/lib/systemd/systemd"))]) == RTMIN + 3
    assert bundle.stop_signal({"config": {"StopSignal": ""}}, ["sh", "-c", "x"]) == 15
