"""Signal names and numbers: the one parser of a signal as users and image configs write
it ("SIGRTMIN+3", "RTMIN+3", "TERM", 37, "37") and its one canonical name. The project
reader, the image config and the runtime all use it, so they agree on every value.

Real-time signals are numbered as the C library counts them (glibc reserves the kernel's
32 and 33 for its threads: SIGRTMIN is 34 there), which is what a signal sent from here
is; their canonical name is "SIGRTMIN+N" (plain "SIGRTMIN" for N = 0), as docker writes it.
"""

from __future__ import annotations

import re
import signal

# What systemd as PID 1 shuts down on (its SIGTERM re-executes it).
SYSTEMD_STOP = int(signal.SIGRTMIN) + 3
EXPECTED = f'a signal name like "SIGTERM" or "SIGRTMIN+3", or a number in 1..{int(signal.SIGRTMAX)}'
_REALTIME = re.compile(r"SIGRT(MIN|MAX)(?:([+-])([0-9]+))?")


def parse(value: str | int) -> int:
    """The number of signal `value`: a name with or without "SIG", in any case, an alias
    (SIGIOT), SIGRTMIN+N or SIGRTMAX-N, or a number. ValueError ("expected EXPECTED, got
    ...") for anything else, numbers the C library reserves (32, 33) and 0 included."""
    text = str(value).strip().upper()
    if text.isascii() and text.isdigit():
        number = int(text)
    else:
        name = text if text.startswith("SIG") else f"SIG{text}"
        realtime = _REALTIME.fullmatch(name)
        if realtime and realtime[2] is not None:
            # Counted up from SIGRTMIN or down from SIGRTMAX only: "SIGRTMIN-1" is no signal.
            if (realtime[1], realtime[2]) not in (("MIN", "+"), ("MAX", "-")):
                raise _refused(value)
            base = signal.SIGRTMIN if realtime[1] == "MIN" else signal.SIGRTMAX
            number = int(base) + int(realtime[3]) * (1 if realtime[2] == "+" else -1)
        elif name in signal.Signals.__members__:
            number = int(signal.Signals[name])
        else:
            raise _refused(value)
    if number not in signal.valid_signals():
        raise _refused(value)
    return number


def _refused(value: object) -> ValueError:
    return ValueError(f"expected {EXPECTED}, got {value!r}")


def name(number: int) -> str:
    """The canonical name of signal `number` (one `parse` accepts): "SIGTERM", "SIGABRT"
    for SIGIOT's 6, "SIGRTMIN+3" for 37."""
    if signal.SIGRTMIN <= number <= signal.SIGRTMAX:
        offset = number - signal.SIGRTMIN
        return f"SIGRTMIN+{offset}" if offset else "SIGRTMIN"
    return signal.Signals(number).name


def canonical(value: str | int) -> str:
    """`value` parsed and named again: 37, "rtmin+3" and "SIGRTMAX-27" are "SIGRTMIN+3"."""
    return name(parse(value))
