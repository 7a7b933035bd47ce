"""Entry point: builds the CLI (everything else is importable and testable).

`export` is not a Trainer method, so it is its own small command (`anatomy_lightning.export`);
every other subcommand goes to the `LightningCLI`.
"""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["export"]:
        from anatomy_lightning.export import main as export_main

        export_main(sys.argv[2:])
    else:
        from anatomy_lightning.cli import main

        main()
