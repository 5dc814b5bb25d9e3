"""`python -m surgeon ...` runs the `surgeon` command; `torchrun -m surgeon heal ...` starts it
on every process of a torchrun job (torchrun's `-m` runs a module as `python -m` would)."""

from surgeon.cli import entry

__all__: list[str] = []

if __name__ == "__main__":
    entry()
