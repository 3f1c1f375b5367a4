"""The `ramjax` command: `ramjax COMMAND [flags]`. Each command is a module with absl flags and a main(argv)."""

from __future__ import annotations

import importlib
import sys

from absl import app

COMMANDS = {
    "demo": ("ramjax.demo", "RAM-Net memory op on random data: every implementation checked and timed"),
}


def usage() -> str:
    lines = ["usage: ramjax COMMAND [--config FILE[:VARIANT]] [--config.FIELD=VALUE ...]", "", "commands:"]
    lines += [f"  {name:8s} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`ramjax COMMAND --help` lists a command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        return
    command = argv[1]
    if command not in COMMANDS:
        raise SystemExit(f"ramjax: unknown command {command!r}; known: {', '.join(COMMANDS)}\n\n{usage()}")
    module = importlib.import_module(COMMANDS[command][0])
    app.run(module.main, argv=[f"ramjax {command}"] + argv[2:])


if __name__ == "__main__":
    main()
