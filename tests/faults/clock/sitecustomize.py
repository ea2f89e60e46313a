"""Started with the runner processes of the clock-jump scenarios (on their PYTHONPATH): their
wall clock (time.time, time.time_ns) runs ahead or behind by the seconds written in
$RUNNER_TEST_CLOCK_SHIFT_FILE, which the test changes mid-run as an NTP step or a hand-set
clock moves a laptop's. The monotonic and boot-time clocks are left alone, as a real step
leaves them. (The laptop's clock cannot be stepped here without stepping the emulated
instance's and the emulator's too: they share this machine's.)"""

import os
import time

_SHIFT_FILE = os.environ.get("RUNNER_TEST_CLOCK_SHIFT_FILE")

if _SHIFT_FILE:
    _real_time, _real_time_ns = time.time, time.time_ns
    _seen = {"mtime": None, "shift": 0.0}

    def _shift() -> float:
        try:
            mtime = os.stat(_SHIFT_FILE).st_mtime_ns
            if mtime != _seen["mtime"]:
                with open(_SHIFT_FILE) as f:
                    _seen["shift"] = float(f.read().strip() or 0)
                _seen["mtime"] = mtime
        except (OSError, ValueError):
            pass
        return _seen["shift"]

    time.time = lambda: _real_time() + _shift()
    time.time_ns = lambda: _real_time_ns() + int(_shift() * 1e9)
