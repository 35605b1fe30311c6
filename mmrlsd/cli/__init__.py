"""The `mmrlsd` command: one module per subcommand, each attached the same way, parse and dispatch only.

A subcommand module defines `HELP` (one line), `EXAMPLES` (the end of its `--help`), `add_arguments(parser)` and
`run(args) -> exit status`; `COMMANDS` maps the name a user types to the module. Nothing here or in the
subcommand modules imports torch at parse time, so `--help` is instant: `run` imports the library it calls.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

import mmrlsd

EXAMPLES = """examples:
  mmrlsd train configs/tiny_cpu.yaml --output-dir runs/tiny      # the built-in tiny default, CPU only
  mmrlsd train configs/qwen2vl_7b.yaml trainer.total_steps=3 algo.lam0=0
  mmrlsd train configs/tiny_cpu.yaml --output-dir runs/tiny --resume
  mmrlsd validate configs/qwen3vl_8b.yaml
  mmrlsd eval --bench mathvista --model runs/tiny/checkpoint-100
  mmrlsd make-tiny --arch qwen2_5_vl --out /tmp/tiny
  mmrlsd ls
"""

COMMANDS = {
    "train": "train",
    "validate": "validate",
    "ls": "ls",
    "make-tiny": "make_tiny",
    "eval": "eval",
    "sft": "sft",
    "export": "export",
    "viz": "viz",
    "perf": "perf",
    "data": "data",
    "lab": "lab",
}
"""Subcommand -> its module under `mmrlsd.cli`."""


def attach(sub, name: str, module) -> argparse.ArgumentParser:
    """Add `module` as subcommand `name` of the subparsers `sub` (also used for nested subcommands)."""
    p = sub.add_parser(name, help=module.HELP, description=module.HELP, epilog=module.EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    module.add_arguments(p)
    p.set_defaults(fn=module.run)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmrlsd", description="RLSD training and evaluation for Qwen-VL models.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    p.add_argument("--version", action="version", version=f"%(prog)s {mmrlsd.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        attach(sub, name, importlib.import_module(f"mmrlsd.cli.{module}"))
    return p


def setup_logging(verbose: bool = False) -> None:
    """One stderr handler on the `mmrlsd` logger only. The root logger is left unconfigured, so other libraries'
    records (which often have their own handler and propagate) are printed once, by their own handler."""
    logger = logging.getLogger("mmrlsd")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted (a caller may swap it, as pytest does)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; ignored
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # dotted overrides may follow options (`train CFG --output-dir D key=value`), which argparse cannot interleave
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(verbose=args.verbose)
    from mmrlsd.errors import MmrlsdError

    try:
        return args.fn(args)
    except (MmrlsdError, OSError) as e:
        # our own errors name the file/key/record; OSError carries the path (missing, unwritable, a full disk)
        if args.debug:
            raise
        print(f"error: {_os_message(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (the newest complete checkpoint, if any, is intact)", file=sys.stderr)
        return 130


def _os_message(e: OSError) -> str:
    """`<path>: <reason>` for an OSError (a full disk, a read-only folder, a directory given as a file)."""
    if e.filename is None:
        return str(e)
    where = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
    return f"{where}: {e.strerror or e}"


if __name__ == "__main__":
    sys.exit(main())
