"""`synth` and `prepare` finish in a process that had installed a SIGTERM handler which only records the signal.

That is what `make test` hung on: the trainer's stop flag stayed installed in the test process after an
in-process training, forked pool workers inherited it, and the end of each ``with Pool(...)`` block sent them
SIGTERM and waited forever. The scenario runs in a child process with a deadline, so a regression fails this
test by name instead of hanging the suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

SCRIPT = """
import signal, sys
from pathlib import Path

for sig in (signal.SIGTERM, signal.SIGUSR1):  # as StopSignal.install() leaves them: record, do not stop
    signal.signal(sig, lambda signum, frame: None)

from skinlesion.data.prepare import PrepareOptions, prepare
from skinlesion.data.synthetic import FOLDERS, METADATA, generate

out = Path(sys.argv[1])
generate(out / "synth", n_images=70, seed=0, workers=2)
print("synth done", flush=True)
images = tuple(out / "synth" / folder for folder in FOLDERS)
prepare(PrepareOptions(metadata=out / "synth" / METADATA, images=images, out=out / "shards", image_size=32,
                       min_shards=2, workers=2))
print("prepare done", flush=True)
"""


def test_pools_finish_when_the_parent_had_a_sigterm_handler_that_does_not_stop(tmp_path: Path) -> None:
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", SCRIPT, str(tmp_path)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=300)  # a deadline for a hang, not a speed requirement
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and the workers it waits for
        output, _ = proc.communicate()
        pytest.fail(f"synth/prepare hung waiting for pool workers that ignore SIGTERM; output so far:\n{output}")
    assert proc.returncode == 0, output
    assert "synth done" in output and "prepare done" in output
    assert (tmp_path / "shards" / "manifest.json").is_file()
