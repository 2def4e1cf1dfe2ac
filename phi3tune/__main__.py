"""``python -m phi3tune``: the same CLI as the ``phi3tune`` command (also what torchrun/accelerate launch run)."""

from phi3tune.cli import app

if __name__ == "__main__":
    app(prog_name="phi3tune")
