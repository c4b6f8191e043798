"""Shared pytest configuration."""
import os

# every compile in the tests re-checks the graph after each pass (off by default: dlc.pipeline.verifying)
os.environ.setdefault("DLC_VERIFY", "1")


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite the golden text files under tests/golden/ from the current output "
                          "(then review the diff with git before committing it)")
