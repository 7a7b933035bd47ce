"""Entry point: builds the CLI (everything else is importable and testable).

`export` is not a Trainer method, so it is its own small command (`anatomy_lightning.export`);
every other subcommand goes to the `LightningCLI`. `SUBCOMMAND --help` prints the shipped,
grouped help at once (`cli_help`); `SUBCOMMAND --help-all` builds the parser for the full one.
"""

import sys

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["export"]:
        from anatomy_lightning.export import main as export_main

        export_main(args[1:])
    else:
        from anatomy_lightning.cli_help import SUBCOMMANDS, TOP_HELP, print_help

        if args in (["-h"], ["--help"]):
            print(TOP_HELP, end="")
            sys.exit(0)
        if len(args) == 2 and args[0] in SUBCOMMANDS and args[1] in ("-h", "--help") and print_help(args[0]):
            sys.exit(0)
        if len(args) >= 2 and args[0] in SUBCOMMANDS and "--help-all" in args:
            sys.argv = [sys.argv[0], *("--help" if a == "--help-all" else a for a in args)]
        from anatomy_lightning.cli import main

        main()
