"""``python -m flows.run_pytest [pytest args]``: pytest, then exit with its code, skipping the interpreter's
teardown. After an integration session that teardown (Ray's, gloo's and torch's threads still alive) has ended in
SIGSEGV once every result was already reported, failing a suite that passed."""

import os
import sys

import pytest

if __name__ == "__main__":
    code = pytest.main()  # the arguments after the module name
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code))
