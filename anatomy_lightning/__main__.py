"""Entry point: only builds the CLI (everything else is importable and testable)."""

from anatomy_lightning.cli import main

if __name__ == "__main__":
    main()
