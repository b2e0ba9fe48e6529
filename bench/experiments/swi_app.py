"""bench/realapps.py with the GIL switch interval of BENCH_SWITCHINTERVAL
(seconds) set at import, in each worker that loads it: switchinterval.py."""
import os
import sys

sys.setswitchinterval(float(os.environ['BENCH_SWITCHINTERVAL']))

from realapps import app, make_app  # noqa: E402,F401
