"""Shared pytest configuration."""
import os

# every compile in the tests re-checks the graph after each pass (off by default: dlc.pipeline.verifying)
os.environ.setdefault("DLC_VERIFY", "1")


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite the golden text files under tests/golden/ from the current output "
                          "(then review the diff with git before committing it)")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip, with the reason, where there is no GPU (or no CuPy)."""
    gpu = [item for item in items if "gpu" in item.keywords]
    if not gpu:
        return
    import pytest
    from dlc.backends.cuda import nvrtc
    have = nvrtc.gpu_available()
    if not have:
        for item in gpu:
            item.add_marker(pytest.mark.skip(reason=have.reason))
