"""`python -m flipguard` == the `flipguard` command."""

from flipguard.cli import app

if __name__ == "__main__":
    app()
