"""The `ramjax` command: `ramjax COMMAND --config FILE[:VARIANT] [--config.FIELD=VALUE ...]`.

Each command is a module with `main(config)`; its config is an ml-collections file (locked, so a misspelt
field is an error that names it).
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import app, flags, logging  # noqa: F401  (importing app defines --help)

from ml_collections import config_flags

from ramjax.configs import error_message, load_config
from ramjax.errors import ConfigError, exit_with_usage_error

# command: (module, default config, one line of help, whether it takes --workdir)
COMMANDS = {
    "demo": ("ramjax.demo", "configs/demo.py", "RAM-Net memory op on random data: every implementation checked and timed",
             False),
    "train": ("ramjax.train.trainer", "configs/mqar.py:cpu", "train (or resume) a model from a config; needs --workdir",
              True),
    "prepare": ("ramjax.data.lm", "configs/lm.py", "build a language-model dataset and its tokenizer", False),
}


# Commands with flags of their own: command -> (module with main(argv), one line of help).
OWN_FLAG_COMMANDS = {
    "sweep": ("ramjax.sweep", "a grid of `ramjax train` runs from --config and --sweep FILE; tables and plots"),
    "eval": ("ramjax.evaluate", "evaluate a trained run: --workdir DIR [--split validation] (LM) or "
             "[--settings kv:length,...] (MQAR, selective copying: new lengths)"),
    "generate": ("ramjax.generate", "continue text with a trained language model: --workdir DIR --prompt TEXT "
                 "[--max_new_tokens N --temperature T --top_p P --seed S]"),
}


# The repository ramjax runs from (an editable install): relative config paths not found in the working
# directory are looked up here, so `ramjax train --config configs/mqar.py:cpu` works from any directory.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_config_spec(spec: str, prog: str) -> str:
    """FILE[:VARIANT] with FILE as given if it exists, else under REPO_ROOT; a usage error saying where it
    looked if neither."""
    path, sep, variant = spec.partition(":")
    if os.path.isfile(path):
        return spec
    candidates = [os.path.abspath(path)]
    if not os.path.isabs(path):
        in_repo = os.path.join(REPO_ROOT, path)
        if os.path.isfile(in_repo):
            return in_repo + sep + variant
        candidates.append(in_repo)
    # Run from the repository root, both candidates are the same path: name it once.
    looked = " and ".join(dict.fromkeys(candidates))
    exit_with_usage_error(f"{prog}: config file {path!r} not found (looked for {looked})")


def _with_config_resolved(args: list[str], default: str, prog: str) -> tuple[list[str], str]:
    """(args with the --config value resolved, the resolved default config)."""
    args = list(args)
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            args[i + 1] = resolve_config_spec(args[i + 1], prog)
        elif arg.startswith("--config="):
            args[i] = "--config=" + resolve_config_spec(arg[len("--config="):], prog)
    given = any(a == "--config" or a.startswith("--config=") for a in args)
    return args, default if given else resolve_config_spec(default, prog)


def _command_help(prog: str, args: list[str], default_config: str, takes_workdir: bool) -> str:
    """The command's flags, then the fields of its config (the one --config names, or the default)."""
    from ramjax.config_help import describe_fields

    spec = default_config
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            spec = args[i + 1]
        elif arg.startswith("--config="):
            spec = arg[len("--config="):]
    lines = [f"usage: {prog} [--config FILE[:VARIANT]] [--config.FIELD=VALUE ...]"
             + (" --workdir DIR [--amend] [--restart]" if takes_workdir else ""), "",
             "flags:", f"  --config FILE[:VARIANT]  the config file (default {default_config})"]
    if takes_workdir:
        lines += ["  --workdir DIR            checkpoints, metrics and the summary; rerunning it resumes",
                  "  --amend                  resume although result-changing fields differ (recorded in "
                  "amendments.jsonl)",
                  "  --restart                start over at step 0 when no checkpoint restores",
                  "  --coordinator_address, --num_processes, --process_id   multi-process runs"]
    try:
        config = load_config(spec)
        source = _config_source(spec.partition(":")[0])
    except Exception as error:  # the help must not fail on the config it describes
        return "\n".join(lines + ["", f"(the config {spec!r} did not load: {error})"])
    lines += ["", f"config fields of {spec} (set any with --config.FIELD=VALUE):", describe_fields(config, source)]
    return "\n".join(lines)


def _config_source(path: str) -> str:
    """The text of the config file, then of the modules it imported from its own directory (configs/common.py,
    where the model fields are): the field descriptions come from their comments, the file's own first."""
    directory = os.path.dirname(os.path.abspath(path))
    paths = [os.path.abspath(path)] + sorted({
        os.path.abspath(module.__file__) for module in list(sys.modules.values())
        if getattr(module, "__file__", None) and os.path.dirname(os.path.abspath(module.__file__)) == directory})
    texts = []
    for p in dict.fromkeys(paths):
        with open(p) as f:
            texts.append(f.read())
    return "\n".join(texts)


def usage() -> str:
    lines = ["usage: ramjax COMMAND [--config FILE[:VARIANT]] [--config.FIELD=VALUE ...] [--workdir DIR]", "",
             "commands:"]
    lines += [f"  {name:8s} {text}  (default config: {config})" for name, (_, config, text, _) in COMMANDS.items()]
    lines += [f"  {name:8s} {text}" for name, (_, text) in OWN_FLAG_COMMANDS.items()]
    lines += ["", "`ramjax COMMAND --help` lists a command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        return
    command = argv[1]
    if command in OWN_FLAG_COMMANDS:
        importlib.import_module(OWN_FLAG_COMMANDS[command][0]).main(argv[2:])
        return
    if command not in COMMANDS:
        exit_with_usage_error(f"ramjax: unknown command {command!r}; known: "
                              f"{', '.join(list(COMMANDS) + list(OWN_FLAG_COMMANDS))}\n\n{usage()}")
    module_name, default_config, _, takes_workdir = COMMANDS[command]
    prog = f"ramjax {command}"
    args, default_config = _with_config_resolved(argv[2:], default_config, prog)
    if any(a in ("-h", "--help", "--helpfull") for a in args):
        try:
            print(_command_help(prog, [a for a in args if a not in ("-h", "--help", "--helpfull")], default_config,
                                takes_workdir))
        except BrokenPipeError:  # `ramjax train --help | head`
            pass
        return
    app.define_help_flags()
    try:
        config_flag = config_flags.DEFINE_config_file(
            "config", default_config, f"Config file for `{prog}`.", sys_argv=[prog] + args
        )
        if takes_workdir:
            flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the summary; rerunning "
                                "with the same directory resumes.")
            flags.DEFINE_string("coordinator_address", None, "Multi-process runs: host:port of process 0 (or "
                                "RAMJAX_COORDINATOR_ADDRESS; SLURM and TPU pods need none of these three).")
            flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many processes (or "
                                 "RAMJAX_NUM_PROCESSES).")
            flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index (or "
                                 "RAMJAX_PROCESS_ID).")
            flags.DEFINE_bool("amend", False, "Resume even though result-changing config fields differ from the "
                              "workdir's record; the changes are recorded in amendments.jsonl with their step.")
            flags.DEFINE_bool("restart", False, "When the workdir has checkpoints but none restores, train from "
                              "step 0 instead of refusing (the old metrics.jsonl is kept beside the new one).")
        rest = flags.FLAGS([prog] + args)
        config = config_flag.value
        config.to_dict()  # a config file that failed to load only raises when first used
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as error:
        # A misspelt field, a bad value or a missing config file: say which, without a traceback.
        exit_with_usage_error(f"{prog}: bad flag or config: {error_message(error)}")
    if len(rest) > 1:
        exit_with_usage_error(f"{prog}: unexpected arguments {rest[1:]}; settings go through --config.FIELD=VALUE")
    logging.set_verbosity(logging.WARNING)  # absl would otherwise echo JAX's backend probing as INFO
    try:
        module = importlib.import_module(module_name)
        if takes_workdir:
            from ramjax.train import distributed

            f = flags.FLAGS
            distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
            module.main(config, workdir=f.workdir, amend=f.amend, restart=f.restart)
        else:
            module.main(config)
    except ConfigError as error:
        exit_with_usage_error(f"{prog}: {error}")


if __name__ == "__main__":
    main()
