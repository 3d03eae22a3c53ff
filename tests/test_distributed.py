"""The launcher's view of the job and the process group must agree; otherwise each rank trains alone."""

from __future__ import annotations

import pytest

from skinlesion import distributed
from skinlesion.errors import UserError


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps its state in a process-wide singleton: leave none behind for other tests."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_launch_info_reads_each_launcher() -> None:
    assert distributed.launch_info({}) == distributed.LaunchInfo("none", 1, 0, 0)
    torchrun = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}
    assert distributed.launch_info(torchrun) == distributed.LaunchInfo("torchrun", 4, 3, 1)
    accelerate = torchrun | {"ACCELERATE_MIXED_PRECISION": "bf16"}
    assert distributed.launch_info(accelerate).launcher == "accelerate"
    srun = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    assert distributed.launch_info(srun) == distributed.LaunchInfo("slurm", 2, 1, 0)


def test_a_process_group_smaller_than_the_launch_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # The launcher said 2 processes, but nothing formed a group: this process would train alone.
    monkeypatch.setattr(distributed, "launch_info", lambda: distributed.LaunchInfo("torchrun", 2, 0, 0))
    with pytest.raises(UserError, match="started 2 processes but the process group has 1"):
        distributed.make_accelerator("no", timeout_s=30)


def test_srun_without_a_rendezvous_address_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setattr(distributed, "launch_info", lambda: distributed.LaunchInfo("slurm", 2, 0, 0))
    with pytest.raises(UserError, match="MASTER_ADDR is not set"):
        distributed.make_accelerator("no", timeout_s=30)
