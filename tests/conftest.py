"""Shared pytest configuration."""


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite the golden text files under tests/golden/ from the current output "
                          "(then review the diff with git before committing it)")
