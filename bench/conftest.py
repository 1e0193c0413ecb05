import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_benchmark_update_machine_info(config, machine_info):
    """The report states what the figures ran on."""
    machine_info["lfm_fast"] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
